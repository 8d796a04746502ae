"""Decoder models with per-layer widths, for every family pruneflow prunes (written next to the weights).

`PruneflowLlamaForCausalLM`, `PruneflowGemma3ForCausalLM`, ... are made on first use: the family's
own transformers model, after whose usual construction every decoder layer gets the widths its entry in
`config.pruneflow_layer_shapes` names, before the weights are read, so
`from_pretrained(path, trust_remote_code=True)` restores the pruned model exactly. Which modules change
width is data, `config.pruneflow_layout` (module path -> width kinds, written by pruneflow for the
family; Llama's layout when absent): Linears get new in/out widths, norms over a whole projection
(OLMo 2's q_norm / k_norm) a new weight length. Forward passes stay the family's own: they read widths
from the projections, except the GQA repeat factor and head counts, set per layer here, and a
family whose attention reads widths from the config (Phi-3) gets a per-layer view of it.
Imports only torch and transformers.
"""

import torch
from torch import nn

from .configuration_pruneflow import LAYOUT_KEY, PREFIX, layer_shapes_of, variant_class

# Llama's layout: what checkpoints written before layouts were recorded mean
LLAMA_LAYOUT = {
    "self_attn.q_proj": ["hidden", "q"], "self_attn.k_proj": ["hidden", "kv"], "self_attn.v_proj": ["hidden", "kv"],
    "self_attn.o_proj": ["q", "hidden"], "mlp.gate_proj": ["hidden", "ffn"], "mlp.up_proj": ["hidden", "ffn"],
    "mlp.down_proj": ["ffn", "hidden"],
}
WIDTH_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


class LayerConfig:
    """One decoder layer's view of the shared model config: its own head counts and FFN width, everything
    else (attention implementation included) read from the shared config when asked."""

    def __init__(self, shared, **widths) -> None:
        self.__dict__["_shared"] = shared
        self.__dict__["_widths"] = widths

    def __getattr__(self, name):
        widths = self.__dict__.get("_widths")
        if widths is None:  # during copy/unpickling, before the state is restored
            raise AttributeError(name)
        if name in widths:
            return widths[name]
        return getattr(self.__dict__["_shared"], name)

    def __setattr__(self, name, value) -> None:
        if name in self.__dict__["_widths"]:
            self.__dict__["_widths"][name] = value
        else:  # a setting written through a layer reaches the shared config, which every layer reads
            setattr(self.__dict__["_shared"], name, value)


def shared_config(config):
    return config.__dict__["_shared"] if isinstance(config, LayerConfig) else config


def layout_of(config) -> dict:
    return getattr(config, LAYOUT_KEY, None) or LLAMA_LAYOUT


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _role_parents(layout: dict) -> tuple[str, str]:
    """The paths of the attention and MLP modules: the parents of the q-input and ffn-input Linears."""
    attention = next(_parent(path) for path, kinds in layout.items() if len(kinds) == 2 and kinds[0] == "q")
    mlp = next(_parent(path) for path, kinds in layout.items() if len(kinds) == 2 and kinds[0] == "ffn")
    return attention, mlp


def width(kind: str, hidden: int, head_dim: int, heads: int, kv_heads: int, intermediate: int) -> int:
    """The width of a kind ('hidden', 'q', 'kv', 'ffn', or fused kinds joined by '+')."""
    sizes = {"hidden": hidden, "q": heads * head_dim, "kv": kv_heads * head_dim, "ffn": intermediate}
    return sum(sizes[part] for part in kind.split("+"))


def sync_layer_attributes(layer: nn.Module, num_attention_heads: int, num_key_value_heads: int,
                          intermediate_size: int, layout: dict | None = None) -> None:
    """Keep a layer's bookkeeping attributes (GQA repeat factor, head counts, widths, the config the
    attention reads) equal to its projections."""
    attention_path, mlp_path = _role_parents(layout or LLAMA_LAYOUT)
    attn, mlp = layer.get_submodule(attention_path), layer.get_submodule(mlp_path)
    attn.num_key_value_groups = num_attention_heads // num_key_value_heads
    for name, value in (("num_heads", num_attention_heads), ("num_key_value_heads", num_key_value_heads)):
        if hasattr(attn, name):
            setattr(attn, name, value)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = intermediate_size
    widths = dict(zip(WIDTH_KEYS, (num_attention_heads, num_key_value_heads, intermediate_size), strict=True))
    for module in (attn, mlp):
        config = getattr(module, "config", None)
        if config is None:
            continue
        shared = shared_config(config)
        differs = any(getattr(shared, key, None) != value for key, value in widths.items())
        module.config = LayerConfig(shared, **widths) if differs else shared


def _resized_linear(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=old.bias is not None,
                     device=old.weight.device, dtype=old.weight.dtype)


def resize_layer(layer: nn.Module, num_attention_heads: int, num_key_value_heads: int,
                 intermediate_size: int, head_dim: int, layout: dict | None = None) -> None:
    """Replace a decoder layer's resizable modules by uninitialised ones of the given widths."""
    layout = layout or LLAMA_LAYOUT
    hidden = None
    for path, kinds in layout.items():
        module = layer.get_submodule(path)
        if len(kinds) == 2 and kinds[0] == "hidden":
            hidden = module.in_features
    counts = (num_attention_heads, num_key_value_heads, intermediate_size)
    for path, kinds in layout.items():
        module = layer.get_submodule(path)
        if len(kinds) == 2:
            new = _resized_linear(module, width(kinds[0], hidden, head_dim, *counts),
                                  width(kinds[1], hidden, head_dim, *counts))
            layer.set_submodule(path, new)
        else:  # a norm over a whole projection output: one weight entry per row
            size = width(kinds[0], hidden, head_dim, *counts)
            module.weight = nn.Parameter(torch.empty(size, device=module.weight.device, dtype=module.weight.dtype))
    sync_layer_attributes(layer, *counts, layout=layout)


def apply_layer_shapes(model: nn.Module) -> None:
    """Give every decoder layer of `model` the widths its config lists."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layout = layout_of(config)
    for layer, shape in zip(model.model.layers, layer_shapes_of(config), strict=True):
        resize_layer(layer, shape["num_attention_heads"], shape["num_key_value_heads"],
                     shape["intermediate_size"], head_dim, layout)


class PerLayerWidths:
    """Mixed into a family's model class: per-layer widths applied right after construction."""

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        apply_layer_shapes(self)


def _attributes(base) -> dict:
    from . import configuration_pruneflow

    return {"__module__": __name__, "config_class": getattr(configuration_pruneflow, PREFIX + base.config_class.__name__)}


def __getattr__(name: str):
    """`Pruneflow<Base>ForCausalLM` for transformers' `<Base>ForCausalLM` (what config.json's auto_map names)."""
    return variant_class(name, "ForCausalLM", _attributes, mixins=(PerLayerWidths,))
