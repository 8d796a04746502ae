"""Llama, Mistral and Qwen2 with per-layer widths (written by pruneflow next to the weights).

Each class is the family's own transformers model; after the usual construction every decoder layer
gets the widths its entry in `config.pruneflow_layer_shapes` names, before the weights are read, so
`from_pretrained(path, trust_remote_code=True)` restores the pruned model exactly. Attention and MLP
forward passes are the family's own: they read widths from the projections, except the GQA
repeat factor, which is set per layer here. Imports only torch and transformers.
"""

from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

from .configuration_pruneflow import (
    PruneflowLlamaConfig,
    PruneflowMistralConfig,
    PruneflowQwen2Config,
    layer_shapes_of,
)


def _resized(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=old.bias is not None,
                     device=old.weight.device, dtype=old.weight.dtype)


def sync_layer_attributes(layer: nn.Module, num_attention_heads: int, num_key_value_heads: int,
                          intermediate_size: int) -> None:
    """Keep a layer's bookkeeping attributes (GQA repeat factor, widths) equal to its projections."""
    attn, mlp = layer.self_attn, layer.mlp
    attn.num_key_value_groups = num_attention_heads // num_key_value_heads
    for name, value in (("num_heads", num_attention_heads), ("num_key_value_heads", num_key_value_heads)):
        if hasattr(attn, name):
            setattr(attn, name, value)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = intermediate_size


def resize_layer(layer: nn.Module, num_attention_heads: int, num_key_value_heads: int,
                 intermediate_size: int, head_dim: int) -> None:
    """Replace a decoder layer's projections by uninitialised ones of the given widths."""
    attn, mlp = layer.self_attn, layer.mlp
    hidden = attn.q_proj.in_features
    q_width, kv_width = num_attention_heads * head_dim, num_key_value_heads * head_dim
    attn.q_proj = _resized(attn.q_proj, hidden, q_width)
    attn.k_proj = _resized(attn.k_proj, hidden, kv_width)
    attn.v_proj = _resized(attn.v_proj, hidden, kv_width)
    attn.o_proj = _resized(attn.o_proj, q_width, hidden)
    mlp.gate_proj = _resized(mlp.gate_proj, hidden, intermediate_size)
    mlp.up_proj = _resized(mlp.up_proj, hidden, intermediate_size)
    mlp.down_proj = _resized(mlp.down_proj, intermediate_size, hidden)
    sync_layer_attributes(layer, num_attention_heads, num_key_value_heads, intermediate_size)


def apply_layer_shapes(model: nn.Module) -> None:
    """Give every decoder layer of `model` the widths its config lists."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for layer, shape in zip(model.model.layers, layer_shapes_of(config), strict=True):
        resize_layer(layer, shape["num_attention_heads"], shape["num_key_value_heads"],
                     shape["intermediate_size"], head_dim)


class PruneflowLlamaForCausalLM(LlamaForCausalLM):
    config_class = PruneflowLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        apply_layer_shapes(self)


class PruneflowMistralForCausalLM(MistralForCausalLM):
    config_class = PruneflowMistralConfig

    def __init__(self, config):
        super().__init__(config)
        apply_layer_shapes(self)


class PruneflowQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = PruneflowQwen2Config

    def __init__(self, config):
        super().__init__(config)
        apply_layer_shapes(self)
