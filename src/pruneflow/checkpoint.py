"""Checkpoints any Hugging Face user can load, pruned or not.

- Every layer the same shape: the config is vanilla (`intermediate_size`, `num_attention_heads`,
  `num_key_value_heads`, the family's own `model_type`), so plain `AutoModelForCausalLM.from_pretrained`,
  lm-eval, vLLM and llama.cpp's converter load it.
- Widths differ per layer (LLM-Pruner keeps the first and last layers dense): Hugging Face's mechanism
  for a model class it does not ship. The folder holds `configuration_pruneflow.py` and
  `modeling_pruneflow.py` (torch and transformers only), config.json names them in `auto_map` under a
  model type of their own (`pruneflow_llama`, ...), lists the widths in `pruneflow_layer_shapes` and
  the family's resizable modules in `pruneflow_layout` (so one loading file serves every family), so
  `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` loads it anywhere, and without
  `trust_remote_code` transformers says that the folder needs it.
pruneflow registers the same classes with the Auto classes, so inside pruneflow no flag is needed.
Weights are safetensors in the dtype of the model the checkpoint was made from; whole models are
never pickled.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from pruneflow.architectures import (
    LayerShape,
    check_supported,
    family_config_refusal,
    family_of,
    fuse_projections,
    head_dim,
    layer_shapes,
    unsupported_architecture,
)
from pruneflow.errors import ModelError
from pruneflow.families import BY_MODEL_TYPE, FAMILIES, supported_names
from pruneflow.remote_code import CODE_DIR, CODE_FILES
from pruneflow.remote_code import configuration_pruneflow as remote_config
from pruneflow.remote_code import modeling_pruneflow as remote_modeling
from pruneflow.sources import PRUNED_MODEL_TYPES, read_config_dict

LAYER_SHAPES_KEY = remote_config.LAYER_SHAPES_KEY
LAYOUT_KEY = remote_config.LAYOUT_KEY
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _register() -> None:
    """Make every family's per-layer-width classes known to the Auto classes in this process (no remote
    code needed); a family the installed transformers lacks is skipped."""
    for family in FAMILIES:
        try:
            config_cls = getattr(remote_config, family.pruned_config_class)
            model_cls = getattr(remote_modeling, family.pruned_architecture)
        except AttributeError:
            continue
        AutoConfig.register(family.pruned_model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


_register()


def record_layer_shapes(model: nn.Module) -> list[LayerShape]:
    """Write the model's real per-layer widths into its config: vanilla when every layer has the same
    widths and the family's config accepts them, else the per-layer-width keys (shapes and layout)."""
    config = model.config
    size = head_dim(model)
    shapes = layer_shapes(model)
    config.head_dim = size  # explicit: derived head_dim would change with num_attention_heads
    uniform = len(set(shapes)) == 1
    if uniform:
        shape = shapes[0]
        config.num_attention_heads = shape.num_attention_heads
        config.num_key_value_heads = shape.num_key_value_heads
        config.intermediate_size = shape.intermediate_size
    family = family_of(model)
    # the family's own class may refuse uniform widths too: Llama's and Gemma's hidden_size % heads check
    # (Llama-3.2-1B: 2048 hidden, 24 heads after one head per group), Phi-3's longrope rotary width;
    # such checkpoints are written with the per-layer classes, which validate as if the heads were unpruned
    if uniform and family_config_refusal(model) is None:
        for key in (LAYER_SHAPES_KEY, LAYOUT_KEY):
            if hasattr(config, key):
                delattr(config, key)
        if type(config).__name__ == family.pruned_config_class and type(model).__name__ == family.architecture:
            config.__class__ = type(config).__mro__[1]  # back to the family's own class
    else:
        # the per-layer class: its validation accepts what the family's own class refuses
        # (transformers validates the config again when saving)
        config.__class__ = getattr(remote_config, family.pruned_config_class)
        config.num_attention_heads = max(s.num_attention_heads for s in shapes)
        config.num_key_value_heads = max(s.num_key_value_heads for s in shapes)
        config.intermediate_size = max(s.intermediate_size for s in shapes)
        setattr(config, LAYER_SHAPES_KEY, [s.to_dict() for s in shapes])
        setattr(config, LAYOUT_KEY, family.stored_layout())
    return shapes


def base_model_type(model_type: str | None) -> str | None:
    """The family model type (llama, gemma3_text, ...) of a vanilla or per-layer-width model type."""
    return PRUNED_MODEL_TYPES.get(model_type or "", model_type)


def checkpoint_dtype(path: str | Path) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in (config.json `dtype`; float32 when unstated)."""
    raw = read_config_dict(path)
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    return _DTYPES.get(str(name).removeprefix("torch."), torch.float32)


def _rewrite_config(out_dir: Path, per_layer: bool) -> None:
    """Name the per-layer-width classes (and ship their code) or the family's vanilla ones."""
    path = out_dir / "config.json"
    config = json.loads(path.read_text())
    family = BY_MODEL_TYPE.get(config.get("model_type") or "")
    if family is None:
        raise ModelError(f"model_type={config.get('model_type')!r} has no per-layer-width variant; supported: "
                         f"{', '.join(f.model_type for f in FAMILIES)}")
    if per_layer:
        config["model_type"] = family.pruned_model_type
        config["architectures"] = [family.pruned_architecture]
        config["auto_map"] = {"AutoConfig": f"configuration_pruneflow.{family.pruned_config_class}",
                              "AutoModelForCausalLM": f"modeling_pruneflow.{family.pruned_architecture}"}
        for name in CODE_FILES:
            shutil.copyfile(CODE_DIR / name, out_dir / name)
    else:
        config["model_type"] = family.model_type
        config["architectures"] = [family.architecture]
        config.pop("auto_map", None)
        config.pop(LAYER_SHAPES_KEY, None)
        config.pop(LAYOUT_KEY, None)
        for name in CODE_FILES:
            (out_dir / name).unlink(missing_ok=True)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_pruned(model: nn.Module, out_dir: str | Path, tokenizer=None, dtype: torch.dtype | None = None) -> Path:
    """Save weights (safetensors), config with real shapes, loading code when widths differ, tokenizer.

    `dtype`: the dtype the weights are stored in (the source model's, `checkpoint_dtype`); the model is
    cast in place, so call this last.
    """
    out_dir = Path(out_dir)
    fuse_projections(model)  # a family's fused matrices are stored fused (pruneflow splits them to work)
    record_layer_shapes(model)
    if dtype is not None and next(model.parameters()).dtype != dtype:
        model.to(dtype)
    model.save_pretrained(out_dir)
    _rewrite_config(out_dir, per_layer=hasattr(model.config, LAYER_SHAPES_KEY))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir



def _check_folder(path: Path) -> dict:
    """config.json of a model folder, refusing a missing folder or an unsupported architecture."""
    if not path.is_dir():
        raise ModelError(f"model folder {str(path)!r} does not exist")
    raw = read_config_dict(path)
    unsupported = unsupported_architecture(raw)
    if unsupported:
        raise ModelError(
            f"architecture {unsupported!r} in {path}/config.json is not supported; supported: "
            f"{supported_names()}"
        )
    if raw.get(LAYER_SHAPES_KEY) and raw.get("model_type") not in PRUNED_MODEL_TYPES:
        raise ModelError(f"{path}/config.json lists per-layer widths under model_type={raw.get('model_type')!r}; "
                         f"expected one of {', '.join(PRUNED_MODEL_TYPES)} (written by an older pruneflow? "
                         "re-run the prune stage)")
    return raw


def model_skeleton(path: str | Path, *, dtype: torch.dtype | None = None, buffers: bool = False) -> nn.Module:
    """The checkpoint's module tree with its real widths on the meta device: shapes, no weights read.

    Lets settings that depend on the model (LoRA rank, targets) be checked before anything heavy runs.
    With `buffers`, the buffers a module computes at init (rotary tables) are real tensors on the CPU,
    as layer-by-layer loading needs; `dtype` is the dtype from_pretrained would build the model in.
    """
    from accelerate import init_empty_weights

    path = Path(path)
    _check_folder(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{path}/config.json is not a usable model config: {exc}") from exc
    empty = init_empty_weights(include_buffers=False) if buffers else torch.device("meta")
    with empty:
        return AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype is not None else {}))


def placeholder_model(path: str | Path, *, dtype: torch.dtype) -> nn.Module:
    """The checkpoint's model with uninitialised weights and real buffers, in eval mode, nothing read.

    What the other processes of a sharded (FSDP) run hold while the main process reads the weights and
    broadcasts them shard by shard: `torch.empty` reserves the memory without writing it, so it stays
    out of the host's resident memory. `nn.Module.to_empty` would also empty the buffers the model
    computes at init (rotary tables), which are not in the checkpoint to broadcast.
    """
    model = model_skeleton(path, dtype=dtype, buffers=True)
    empty: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is not None and param.device.type == "meta":
                if id(param) not in empty:
                    empty[id(param)] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype),
                                                    requires_grad=param.requires_grad)
                module._parameters[key] = empty[id(param)]
    model.tie_weights()  # accelerate's empty-weights context leaves tied heads as separate parameters
    return model.eval()


def load_pruned(path: str | Path, *, dtype: Any = torch.float32, device: torch.device | str | None = None,
                **from_pretrained_kwargs: Any) -> nn.Module:
    """Load any pruneflow checkpoint (dense, uniformly or per-layer pruned) in eval mode.

    A thin wrapper of `AutoModelForCausalLM.from_pretrained` (which loads the same folders with
    `trust_remote_code=True`): it checks the folder first for a clear error, and takes from_pretrained's
    own arguments (`device_map`, `attn_implementation`, `dtype`: "auto" keeps the stored dtype).
    `device` moves the loaded model there (for a single device; use `device_map` to spread one).
    """
    path = Path(path)
    _check_folder(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **from_pretrained_kwargs)
    except MemoryError:
        raise
    except TypeError:  # a misspelt keyword argument is the caller's error, not the checkpoint's
        raise
    except Exception as exc:  # safetensors raises its own SafetensorError on a truncated file
        raise ModelError(f"could not load the model in {str(path)!r} (missing, truncated or corrupt weights?): "
                         f"{type(exc).__name__}: {exc}") from exc
    check_supported(model)
    if device is not None:
        model = model.to(device)
    return model.eval()
