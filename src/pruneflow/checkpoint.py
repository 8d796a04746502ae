"""Checkpoints any Hugging Face user can load, pruned or not.

- Every layer the same shape: the config is vanilla (`intermediate_size`, `num_attention_heads`,
  `num_key_value_heads`), so plain `AutoModelForCausalLM.from_pretrained` loads it.
- Widths differ per layer (LLM-Pruner keeps the first and last layers dense): config.json also holds
  `pruneflow_layer_shapes`, one entry per layer, and `pruneflow.load_pruned(path)` builds the model
  with those widths before the weights are read. Plain `from_pretrained` then fails loudly on the
  size mismatch instead of loading a wrong model.
Weights are safetensors; whole models are never pickled.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from pruneflow.architectures import (
    SUPPORTED_ARCHITECTURES,
    LayerShape,
    decoder_layers,
    head_dim,
    layer_shapes,
    set_layer_shape,
    unsupported_architecture,
)
from pruneflow.errors import ModelError
from pruneflow.sources import read_config_dict

LAYER_SHAPES_KEY = "pruneflow_layer_shapes"


def record_layer_shapes(model: nn.Module) -> list[LayerShape]:
    """Write the model's real per-layer widths into its config (vanilla when uniform)."""
    config = model.config
    size = head_dim(model)
    shapes = layer_shapes(model)
    config.head_dim = size  # explicit: derived head_dim would change with num_attention_heads
    if len(set(shapes)) == 1:
        shape = shapes[0]
        config.num_attention_heads = shape.num_attention_heads
        config.num_key_value_heads = shape.num_key_value_heads
        config.intermediate_size = shape.intermediate_size
        if hasattr(config, LAYER_SHAPES_KEY):
            delattr(config, LAYER_SHAPES_KEY)
    else:
        widest = LayerShape(
            num_attention_heads=max(s.num_attention_heads for s in shapes),
            num_key_value_heads=max(s.num_key_value_heads for s in shapes),
            intermediate_size=max(s.intermediate_size for s in shapes),
        )
        config.num_attention_heads = widest.num_attention_heads
        config.num_key_value_heads = widest.num_key_value_heads
        config.intermediate_size = widest.intermediate_size
        setattr(config, LAYER_SHAPES_KEY, [s.to_dict() for s in shapes])
    return shapes


def save_pruned(model: nn.Module, out_dir: str | Path, tokenizer=None) -> Path:
    """Save weights (safetensors), config with real shapes, and the tokenizer into `out_dir`."""
    out_dir = Path(out_dir)
    record_layer_shapes(model)
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def _with_layer_shapes(base_cls: type) -> type:
    """A subclass of `base_cls` that resizes its layers from the config before weights load."""

    class PrunedCausalLM(base_cls):  # type: ignore[misc, valid-type]
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            shapes = getattr(config, LAYER_SHAPES_KEY, None)
            if shapes:
                apply_layer_shapes(self, [LayerShape(**s) for s in shapes])

    PrunedCausalLM.__name__ = base_cls.__name__
    PrunedCausalLM.__qualname__ = base_cls.__qualname__
    return PrunedCausalLM


def apply_layer_shapes(model: nn.Module, shapes: list[LayerShape]) -> None:
    layers = decoder_layers(model)
    if len(shapes) != len(layers):
        raise ModelError(f"config lists {len(shapes)} layer shapes for a model with {len(layers)} layers")
    size = head_dim(model)
    for layer, shape in zip(layers, shapes, strict=True):
        set_layer_shape(layer, shape, size)


def _model_class(path: Path):
    """The config and the class that builds this checkpoint's real widths; refuses unknown architectures."""
    if not path.is_dir():
        raise ModelError(f"model folder {str(path)!r} does not exist")
    raw = read_config_dict(path)
    unsupported = unsupported_architecture(raw)
    if unsupported:
        raise ModelError(
            f"architecture {unsupported!r} in {path}/config.json is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{path}/config.json is not a usable model config: {exc}") from exc
    base_cls = AutoModelForCausalLM._model_mapping[type(config)]
    return config, (_with_layer_shapes(base_cls) if raw.get(LAYER_SHAPES_KEY) else base_cls)


def model_skeleton(path: str | Path) -> nn.Module:
    """The checkpoint's module tree with its real widths on the meta device: shapes, no weights read.

    Lets settings that depend on the model (LoRA rank, targets) be checked before anything heavy runs.
    """
    config, cls = _model_class(Path(path))
    with torch.device("meta"):
        return cls(config)


def load_pruned(
    path: str | Path,
    *,
    dtype: torch.dtype | None = torch.float32,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Load any pruneflow checkpoint (dense, uniformly or non-uniformly pruned) in eval mode."""
    path = Path(path)
    _, cls = _model_class(path)
    try:
        model = cls.from_pretrained(path, dtype=dtype)
    except MemoryError:
        raise
    except Exception as exc:  # safetensors raises its own SafetensorError on a truncated file
        raise ModelError(f"could not load the model in {str(path)!r} (missing, truncated or corrupt weights?): "
                         f"{type(exc).__name__}: {exc}") from exc
    if device is not None:
        model = model.to(device)
    return model.eval()
