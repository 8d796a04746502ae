"""Which decoder families pruneflow can prune, and uniform access to their prunable parts.

Llama, Mistral and Qwen2 share one block layout: `self_attn.{q,k,v,o}_proj` with grouped-query
attention and `mlp.{gate,up,down}_proj` (SwiGLU). Qwen2 adds q/k/v biases, which follow their rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from pruneflow.errors import ModelError
from pruneflow.remote_code.modeling_pruneflow import resize_layer
from pruneflow.remote_code.modeling_pruneflow import sync_layer_attributes as sync_widths
from pruneflow.sources import (  # noqa: F401  (config.json-level facts live in the torch-free module)
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_MODEL_TYPES,
    unsupported_architecture,
)


@dataclass(frozen=True)
class LayerShape:
    """The prunable widths of one decoder layer."""

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def check_supported(model: nn.Module) -> None:
    """Fail clearly on an architecture whose block layout we have not verified."""
    name = type(model).__name__
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if name not in SUPPORTED_ARCHITECTURES and model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"architecture {name!r} (model_type={model_type!r}) is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    if heads % kv_heads:
        raise ModelError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks (model.model.layers for every supported family)."""
    check_supported(model)
    return model.model.layers


def head_dim(model: nn.Module) -> int:
    config = model.config
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_shape(layer: nn.Module, head_size: int) -> LayerShape:
    """Read a layer's widths from its weights (the truth, whatever the config says)."""
    attn, mlp = layer.self_attn, layer.mlp
    return LayerShape(
        num_attention_heads=attn.q_proj.out_features // head_size,
        num_key_value_heads=attn.k_proj.out_features // head_size,
        intermediate_size=mlp.gate_proj.out_features,
    )


def layer_shapes(model: nn.Module) -> list[LayerShape]:
    size = head_dim(model)
    return [layer_shape(layer, size) for layer in decoder_layers(model)]


def count_parameters(model: nn.Module) -> int:
    """Count unique parameters (tied embeddings once), from the tensors actually present."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
    return total


def _new_linear(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(
        in_features,
        out_features,
        bias=old.bias is not None,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )


def shrink_linear(linear: nn.Linear, *, keep_out: torch.Tensor | None = None,
                  keep_in: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding only the kept output rows / input columns (and matching bias)."""
    weight = linear.weight.data
    bias = linear.bias.data if linear.bias is not None else None
    if keep_out is not None:
        weight = weight.index_select(0, keep_out.to(weight.device))
        if bias is not None:
            bias = bias.index_select(0, keep_out.to(bias.device))
    if keep_in is not None:
        weight = weight.index_select(1, keep_in.to(weight.device))
    new = _new_linear(linear, weight.shape[1], weight.shape[0])
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def set_layer_shape(layer: nn.Module, shape: LayerShape, head_size: int) -> None:
    """Replace a layer's projections by (uninitialised) ones of `shape`, for loading weights into
    (the function the checkpoints' own modeling code runs)."""
    resize_layer(layer, shape.num_attention_heads, shape.num_key_value_heads, shape.intermediate_size, head_size)


def sync_layer_attributes(layer: nn.Module, shape: LayerShape) -> None:
    """Keep the modules' bookkeeping attributes equal to their new widths."""
    sync_widths(layer, shape.num_attention_heads, shape.num_key_value_heads, shape.intermediate_size)
