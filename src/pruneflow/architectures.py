"""Uniform access to the prunable parts of every supported decoder family.

A family's layout is data (`pruneflow.families`); this module turns it into module access: the
decoder layers, the seven logical projections (q/k/v/o, gate/up/down: real Linears, fused ones split
while pruneflow works), the norms that lose rows with heads, and the check that a model holds exactly
the modules its family lists. Scoring, surgery, re-fit and checkpoints go through these functions only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from pruneflow.errors import ModelError
from pruneflow.families import BY_ARCHITECTURE, BY_DECODER_LAYER, BY_MODEL_TYPE, Family, supported_names
from pruneflow.remote_code.modeling_pruneflow import sync_layer_attributes as sync_widths
from pruneflow.sources import unsupported_architecture  # noqa: F401  (config.json-level, torch-free)


@dataclass(frozen=True)
class LayerShape:
    """The prunable widths of one decoder layer."""

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class FusedLinear(nn.Module):
    """A fused projection (Phi-3's qkv_proj, gate_up_proj) held as its parts while pruneflow works.

    Its output is the concatenation of the parts' outputs in the stored order, so the family's forward
    pass (which slices or chunks the fused output) runs unchanged; each part is an ordinary Linear that
    criteria score and surgery shrinks. `fused()` gives the single Linear the checkpoint stores.
    """

    def __init__(self, parts: dict[str, nn.Linear]) -> None:
        super().__init__()
        for name, part in parts.items():
            self.add_module(name, part)

    @property
    def in_features(self) -> int:
        return next(iter(self.children())).in_features

    @property
    def out_features(self) -> int:
        return sum(part.out_features for part in self.children())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.children()], dim=-1)

    def fused(self) -> nn.Linear:
        parts = list(self.children())
        first = parts[0]
        with torch.inference_mode(False):  # ordinary parameters even when called under inference mode
            new = nn.Linear(first.in_features, self.out_features, bias=first.bias is not None,
                            device=first.weight.device, dtype=first.weight.dtype)
        with torch.inference_mode(False), torch.no_grad():
            new.weight.copy_(torch.cat([part.weight for part in parts]))
            if new.bias is not None:
                new.bias.copy_(torch.cat([part.bias for part in parts]))
        new.weight.requires_grad_(first.weight.requires_grad)
        return new


def family_of(model: nn.Module) -> Family:
    """The family of a model (its class, else its config's model_type); unsupported ones are refused."""
    name = type(model).__name__
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = BY_ARCHITECTURE.get(name) or BY_MODEL_TYPE.get(model_type or "")
    if family is None:
        raise ModelError(f"architecture {name!r} (model_type={model_type!r}) is not supported; supported: "
                         f"{supported_names()}")
    return family


def layer_family(layer: nn.Module) -> Family:
    family = BY_DECODER_LAYER.get(type(layer).__name__)
    if family is None:
        raise ModelError(f"decoder layer {type(layer).__name__!r} belongs to no supported family; supported: "
                         f"{supported_names()}")
    return family


def _parameterised_modules(layer: nn.Module) -> list[str]:
    return [name for name, module in layer.named_modules() if name and any(True for _ in module.parameters(recurse=False))]


def check_layout(model: nn.Module, family: Family) -> None:
    """Every decoder layer holds exactly the modules its family lists, projections are Linears whose
    widths split into whole heads: otherwise stop before anything is scored, naming the module."""
    size = head_dim(model)
    stored = family.stored_modules()
    working = stored | set(family.projections.values())
    for index, layer in enumerate(model.get_submodule(family.layers_path)):
        if type(layer).__name__ != family.decoder_layer:
            raise ModelError(f"layer {index} is a {type(layer).__name__}, not the {family.decoder_layer} the "
                             f"{family.architecture} layout expects")
        for name in _parameterised_modules(layer):
            if name not in working:
                raise ModelError(
                    f"layer {index} holds the module {name!r} ({type(layer.get_submodule(name)).__name__}), which "
                    f"the {family.name} layout does not list (expected: {', '.join(sorted(stored))}); pruneflow "
                    "stops rather than prune a block it does not fully know")
        for path in stored - set(family.other_modules) - set(family.sliced_norms):
            try:
                module = layer.get_submodule(path)
            except AttributeError:
                raise ModelError(f"layer {index} has no module {path!r}, which the {family.name} layout needs") from None
            if not isinstance(module, nn.Linear | FusedLinear):
                raise ModelError(f"layer {index}: {path!r} is a {type(module).__name__}, not a Linear")
        shape = layer_shape(layer, size)
        if shape.num_attention_heads % shape.num_key_value_heads:
            raise ModelError(f"layer {index}: {shape.num_attention_heads} query heads are not a multiple of "
                             f"{shape.num_key_value_heads} KV heads")


def check_supported(model: nn.Module) -> Family:
    """The model's family, with its layout checked (an unknown family or module stops here)."""
    family = family_of(model)
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    if heads % kv_heads:
        raise ModelError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    check_layout(model, family)
    return family


def family_config_refusal(model: nn.Module, config=None) -> Exception | None:
    """What the family's own (vanilla) config class says against `config` (the model's by default): the
    first validator's error, or None when it accepts. Run on the vanilla validators even when the config
    is already a per-layer class (whose own validation is laxer about head counts)."""
    import transformers

    base = getattr(transformers, family_of(model).config_class)
    for validator in getattr(base, "__class_validators__", ()):
        try:
            validator(config if config is not None else model.config)
        except (ValueError, TypeError) as exc:
            return exc
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks (`model.model.layers` for every supported family)."""
    return model.get_submodule(family_of(model).layers_path)


def head_dim(model: nn.Module) -> int:
    config = model.config
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@torch.inference_mode(False)
def _split(layer: nn.Module, family: Family) -> None:
    """Replace the layer's fused projections by `FusedLinear`s of their parts (rows in stored order).
    Runs outside inference mode even when called under it (activation statistics split lazily): the
    parts are ordinary parameters that gradient criteria later train."""
    for path, parts in family.fused.items():
        module = layer.get_submodule(path)
        if isinstance(module, FusedLinear):
            continue
        widths = _fused_widths(layer, family, path)
        weights = module.weight.data.split(widths)
        biases = module.bias.data.split(widths) if module.bias is not None else [None] * len(widths)
        pieces = {}
        for name, weight, bias in zip(parts, weights, biases, strict=True):
            piece = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                              device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                piece.weight.copy_(weight)
                if bias is not None:
                    piece.bias.copy_(bias)
            piece.weight.requires_grad_(module.weight.requires_grad)
            pieces[name] = piece
        layer.set_submodule(path, FusedLinear(pieces))


def _fused_widths(layer: nn.Module, family: Family, path: str) -> list[int]:
    """The output widths of a stored fused Linear's parts: q from o_proj's input, kv from what is left."""
    parts = family.fused[path]
    module = layer.get_submodule(path)
    if parts == ("q_proj", "k_proj", "v_proj"):
        q = layer.get_submodule(family.projections["o_proj"]).in_features
        kv = (module.out_features - q) // 2
        return [q, kv, kv]
    if parts == ("gate_proj", "up_proj"):
        half = module.out_features // 2
        return [half, half]
    raise ModelError(f"{family.name}: fused module {path!r} of {parts} has no known split")


def fuse_projections(model: nn.Module) -> None:
    """Put split fused projections back into single Linears (what checkpoints and users' code expect)."""
    family = family_of(model)
    if not family.fused:
        return
    for layer in decoder_layers(model):
        for path in family.fused:
            module = layer.get_submodule(path)
            if isinstance(module, FusedLinear):
                layer.set_submodule(path, module.fused())


def projection(layer: nn.Module, name: str) -> nn.Linear:
    """A logical projection (`q_proj` ... `down_proj`) of a decoder layer, as a Linear of its own."""
    family = layer_family(layer)
    if family.fused_parent(name) is not None:
        _split(layer, family)
    return layer.get_submodule(family.projections[name])


def set_projection(layer: nn.Module, name: str, linear: nn.Linear) -> None:
    family = layer_family(layer)
    if family.fused_parent(name) is not None:
        _split(layer, family)
    layer.set_submodule(family.projections[name], linear)


def sliced_norms(layer: nn.Module) -> dict[str, str]:
    """Norms whose weight spans a whole q or kv projection output: path -> 'q' | 'kv'."""
    return dict(layer_family(layer).sliced_norms)


def _stored_width(layer: nn.Module, family: Family, name: str) -> int:
    """The output width of a logical projection, read from the layer split or not."""
    parent = family.fused_parent(name)
    if parent is None or isinstance(layer.get_submodule(parent), FusedLinear):
        return layer.get_submodule(family.projections[name]).out_features
    widths = _fused_widths(layer, family, parent)
    return widths[family.fused[parent].index(name)]


def layer_shape(layer: nn.Module, head_size: int) -> LayerShape:
    """Read a layer's widths from its weights (the truth, whatever the config says)."""
    family = layer_family(layer)
    return LayerShape(
        num_attention_heads=layer.get_submodule(family.projections["o_proj"]).in_features // head_size,
        num_key_value_heads=_stored_width(layer, family, "k_proj") // head_size,
        intermediate_size=layer.get_submodule(family.projections["down_proj"]).in_features,
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


def shrink_norm(layer: nn.Module, path: str, keep: torch.Tensor) -> None:
    """Keep only the `keep` entries of a norm's weight (a norm over a whole projection output)."""
    module = layer.get_submodule(path)
    weight = module.weight
    module.weight = nn.Parameter(weight.data.index_select(0, keep.to(weight.device)).clone(),
                                 requires_grad=weight.requires_grad)


def sync_layer_attributes(layer: nn.Module, shape: LayerShape) -> None:
    """Keep the modules' bookkeeping attributes equal to their new widths."""
    sync_widths(layer, shape.num_attention_heads, shape.num_key_value_heads, shape.intermediate_size,
                layer_family(layer).stored_layout())
