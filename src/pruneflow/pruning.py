"""Structural pruning: choose the lowest-scored groups and physically remove them.

`ratio` is the fraction of *all* model parameters to remove (embeddings included in the total),
which is what the papers' "20% pruned" means. Removable units, per pruned layer:
- attention, `attention_unit: kv_group`: whole GQA groups (a KV head with its query heads);
- attention, `attention_unit: query_head`: query heads, the same number from every KV group (so the
  layer stays expressible as heads = kv_heads x heads_per_group); a "level" removes each group's
  next-lowest head;
- FFN channels.
Allocation:
- `uniform` (LLM-Pruner's block-wise setting): every pruned layer loses the same fraction of its
  attention units; FFN channels are solved so the total matches the request to within one channel
  per layer;
- `global`: one ranking across layers and structures (FLAP-style): each unit's score per removed
  parameter, standardised per structure over the pruned layers, lowest removed first until the
  target is met, so widths differ per layer.
Every layer keeps at least one unit of each structure. The real parameter count is measured after
surgery and checked against the plan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pruneflow.architectures import (
    LayerShape,
    count_parameters,
    decoder_layers,
    family_config_refusal,
    family_of,
    head_dim,
    layer_shape,
    projection,
    set_projection,
    shrink_linear,
    shrink_norm,
    sliced_norms,
    sync_layer_attributes,
)
from pruneflow.config import ALLOCATIONS, ATTENTION_UNITS, check_ratio
from pruneflow.errors import ConfigError, DataError
from pruneflow.families import PROJECTIONS, check_attention_unit
from pruneflow.groups import attention_group_params, ffn_channel_params, query_head_params
from pruneflow.importance.base import COMMON_SCALE_KEY, GroupScores
from pruneflow.sources import BIAS_MODEL_TYPES


@dataclass
class PruningPlan:
    """Which heads, groups and channels each layer keeps, and the bookkeeping that predicts the result."""

    requested_ratio: float
    layers: list[int]
    structures: tuple[str, ...]
    allocation: str = "uniform"
    attention_unit: str = "kv_group"
    per_layer_fraction: float | None = None
    width_multiple: int | None = None
    kept_attention_groups: dict[int, list[int]] = field(default_factory=dict)
    kept_query_heads: dict[int, list[int]] = field(default_factory=dict)
    kept_ffn_channels: dict[int, list[int]] = field(default_factory=dict)
    removed_attention_groups: dict[int, list[int]] = field(default_factory=dict)
    removed_query_heads: dict[int, list[int]] = field(default_factory=dict)
    removed_ffn_channels: dict[int, list[int]] = field(default_factory=dict)
    params_before: int = 0
    expected_params_removed: int = 0


@dataclass(frozen=True)
class _LayerUnits:
    """One layer's removable units of one structure, in removal order (lowest score first)."""

    layer: int
    structure: str  # "attention" | "ffn"
    cost: int  # parameters removed per unit
    ordered_scores: torch.Tensor  # ascending
    order: list[list[int]]  # order[k]: the indices (groups / heads / channels) the k-th unit removes
    max_units: int  # at least one unit stays


def _check_scores(scores: torch.Tensor, what: str) -> None:
    if torch.isnan(scores).any():
        raise DataError(f"{what} scores contain NaN; rescore (fp16 is known to give NaN: use bfloat16 or float32)")


def _ascending(scores: torch.Tensor) -> list[int]:
    return torch.argsort(scores.double(), stable=True).tolist()


def _norm_rows(layer: nn.Module) -> set[str]:
    """Which projection outputs ('q', 'kv') a norm of this layer spans row by row (OLMo 2)."""
    return set(sliced_norms(layer).values())


def _attention_units(layer_index: int, layer: nn.Module, shape: LayerShape, size: int, scores: GroupScores,
                     unit: str) -> _LayerUnits:
    q_proj, k_proj = projection(layer, "q_proj"), projection(layer, "k_proj")
    per_group = shape.num_attention_heads // shape.num_key_value_heads
    hidden = q_proj.in_features
    if unit == "kv_group":
        group_scores = scores.attention[layer_index]
        _check_scores(group_scores, f"layer {layer_index} attention")
        order = _ascending(group_scores)
        cost = attention_group_params(hidden, size, per_group, q_bias=q_proj.bias is not None,
                                      kv_bias=k_proj.bias is not None, norm_rows=_norm_rows(layer))
        return _LayerUnits(layer_index, "attention", cost, group_scores.double()[order], [[g] for g in order],
                           shape.num_key_value_heads - 1)
    if scores.attention_heads is None:
        raise DataError(
            f"the scores (criterion {scores.metadata.get('criterion')!r}) hold no per-query-head scores; "
            "prune.attention_unit='query_head' needs them: use attention_unit 'kv_group' or another criterion"
        )
    head_scores = scores.attention_heads[layer_index]
    if head_scores.numel() != shape.num_attention_heads:
        raise DataError(f"scores of layer {layer_index} have {head_scores.numel()} query heads but the layer has "
                        f"{shape.num_attention_heads}; rerun the score stage for this model")
    _check_scores(head_scores, f"layer {layer_index} query-head")
    # level k removes the k-th lowest head of every group: same count per group, config stays valid
    per_group_order = [
        [g * per_group + j for j in _ascending(head_scores[g * per_group:(g + 1) * per_group])]
        for g in range(shape.num_key_value_heads)
    ]
    levels = [[order[k] for order in per_group_order] for k in range(per_group)]
    level_scores = torch.stack([head_scores.double()[level].sum() for level in levels])
    cost = shape.num_key_value_heads * query_head_params(hidden, size, q_bias=q_proj.bias is not None,
                                                         q_norm="q" in _norm_rows(layer))
    return _LayerUnits(layer_index, "attention", cost, level_scores, levels, per_group - 1)


def _ffn_units(layer_index: int, layer: nn.Module, shape: LayerShape, scores: GroupScores) -> _LayerUnits:
    channel_scores = scores.ffn[layer_index]
    _check_scores(channel_scores, f"layer {layer_index} FFN")
    order = _ascending(channel_scores)
    gate = projection(layer, "gate_proj")
    cost = ffn_channel_params(gate.in_features, gate_up_bias=gate.bias is not None)
    return _LayerUnits(layer_index, "ffn", cost, channel_scores.double()[order], [[c] for c in order],
                       shape.intermediate_size - 1)


def _uniform_counts(units: list[_LayerUnits], target: float,
                    width_multiple: int | None = None) -> tuple[dict[tuple[int, str], int], float]:
    """Same fraction of attention units per layer; FFN channels fill the rest of the target, the kept
    width rounded to the nearest multiple of `width_multiple` when given (never below one multiple, never
    above the layer's width)."""
    prunable = sum(u.cost * (u.max_units + 1) for u in units)
    fraction = target / prunable if prunable else 0.0
    attention = [u for u in units if u.structure == "attention"]
    ffn = [u for u in units if u.structure == "ffn"]
    counts: dict[tuple[int, str], int] = {}
    share = fraction if ffn else target / sum(u.cost * (u.max_units + 1) for u in attention)
    for u in attention:
        counts[(u.layer, u.structure)] = min(round(share * (u.max_units + 1)), u.max_units)
    removed = sum(counts[(u.layer, u.structure)] * u.cost for u in attention)
    if ffn:
        capacity = sum(u.cost * (u.max_units + 1) for u in ffn)
        ffn_share = max(0.0, target - removed) / capacity
        for u in ffn:
            counts[(u.layer, u.structure)] = min(round(ffn_share * (u.max_units + 1)), u.max_units)
            if width_multiple:
                width = u.max_units + 1
                kept = width - counts[(u.layer, u.structure)]
                rounded = max(width_multiple, round(kept / width_multiple) * width_multiple)
                counts[(u.layer, u.structure)] = max(0, width - min(rounded, width))
    return counts, fraction


def _global_counts(units: list[_LayerUnits], target: float, common_scale: bool = False) -> dict[tuple[int, str], int]:
    """One ranking over all layers: score per parameter, lowest first. Scores are standardised per
    structure unless they share one scale already (`common_scale`: e.g. obs, whose scores are output
    errors in the residual stream both structures write to), so attention and FFN compete directly."""
    candidates = []
    for structure in ("attention", "ffn"):
        members = [u for u in units if u.structure == structure]
        if not members:
            continue
        per_param = torch.cat([u.ordered_scores / u.cost for u in members])
        mean, std = per_param.mean(), per_param.std(unbiased=False)
        std = std if std > 0 else torch.tensor(1.0, dtype=per_param.dtype)
        if common_scale:
            mean, std = torch.tensor(0.0, dtype=per_param.dtype), torch.tensor(1.0, dtype=per_param.dtype)
        for u in members:
            normalised = ((u.ordered_scores / u.cost - mean) / std).tolist()
            # removal order inside a layer is fixed: a later unit never ranks before an earlier one
            running = float("-inf")
            for rank, value in enumerate(normalised):
                running = max(running, value)
                candidates.append((running, u.layer, structure, rank, u))
    candidates.sort(key=lambda c: (c[0], c[1], c[2], c[3]))
    counts = {(u.layer, u.structure): 0 for u in units}
    removed = 0
    for _, layer, structure, rank, u in candidates:
        key = (layer, structure)
        if counts[key] != rank or counts[key] >= u.max_units or removed + u.cost > target:
            continue
        counts[key] += 1
        removed += u.cost
    return counts


def plan_pruning(
    model: nn.Module,
    scores: GroupScores,
    ratio: float,
    layers: Sequence[int],
    structures: Sequence[str] = ("attention", "ffn"),
    allocation: str = "uniform",
    attention_unit: str = "kv_group",
    width_multiple: int | None = None,
) -> PruningPlan:
    """Decide what to remove so that `ratio` of all parameters goes, lowest scores first.

    `width_multiple` (uniform allocation only): FFN widths rounded to multiples of it, for checkpoints
    whose widths GPU kernels and serving engines take as they are (`servable`).
    """
    ratio = check_ratio(ratio, "ratio")
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"prune.allocation={allocation!r} is not allowed; allowed: {', '.join(ALLOCATIONS)}")
    if attention_unit not in ATTENTION_UNITS:
        raise ConfigError(f"prune.attention_unit={attention_unit!r} is not allowed; allowed: {', '.join(ATTENTION_UNITS)}")
    blocks = decoder_layers(model)
    if len(scores.attention) != len(blocks):
        raise DataError(
            f"scores cover {len(scores.attention)} layers but the model has {len(blocks)}; "
            "they were computed for another model: rerun the score stage"
        )
    size = head_dim(model)
    total = count_parameters(model)
    target = ratio * total
    shapes = {i: layer_shape(blocks[i], size) for i in layers}
    for i in layers:
        if scores.attention[i].numel() != shapes[i].num_key_value_heads or scores.ffn[i].numel() != shapes[i].intermediate_size:
            raise DataError(
                f"scores of layer {i} have {scores.attention[i].numel()} attention groups / "
                f"{scores.ffn[i].numel()} FFN channels but the layer has {shapes[i].num_key_value_heads} / "
                f"{shapes[i].intermediate_size}; rerun the score stage for this model"
            )
    check_attention_unit({f"layer {i}": shapes[i] for i in layers}, structures, attention_unit)
    units: list[_LayerUnits] = []
    for i in layers:
        if "attention" in structures:
            units.append(_attention_units(i, blocks[i], shapes[i], size, scores, attention_unit))
        if "ffn" in structures:
            units.append(_ffn_units(i, blocks[i], shapes[i], scores))
    removable = sum(u.cost * u.max_units for u in units)
    if target > removable:
        raise ConfigError(
            f"ratio={ratio} asks to remove {int(target):,} parameters but layers "
            f"{layers[0]}..{layers[-1]} with structures {list(structures)} hold only {removable:,} removable "
            f"ones; allowed here: ratio <= {removable / total:.3f} (or widen prune.layer_start/layer_end)"
        )
    if width_multiple is not None and allocation != "uniform":
        raise ConfigError(f"widths rounded to a multiple ({width_multiple}) need prune.allocation='uniform', "
                          f"not {allocation!r}")
    if allocation == "uniform":
        counts, fraction = _uniform_counts(units, target, width_multiple)
    else:
        common = scores.metadata.get(COMMON_SCALE_KEY) == "true"
        counts, fraction = _global_counts(units, target, common_scale=common), None

    plan = PruningPlan(requested_ratio=ratio, layers=list(layers), structures=tuple(structures),
                       allocation=allocation, attention_unit=attention_unit, per_layer_fraction=fraction,
                       width_multiple=width_multiple, params_before=total)
    for i in layers:
        shape = shapes[i]
        per_group = shape.num_attention_heads // shape.num_key_value_heads
        removed_groups: list[int] = []
        removed_heads: list[int] = []
        removed_channels: list[int] = []
        for u in units:
            if u.layer != i:
                continue
            chosen = sorted(index for unit in u.order[:counts[(i, u.structure)]] for index in unit)
            plan.expected_params_removed += counts[(i, u.structure)] * u.cost
            if u.structure == "ffn":
                removed_channels = chosen
            elif attention_unit == "kv_group":
                removed_groups = chosen
                removed_heads = [g * per_group + j for g in chosen for j in range(per_group)]
            else:
                removed_heads = chosen
        plan.removed_attention_groups[i] = removed_groups
        plan.removed_query_heads[i] = removed_heads
        plan.removed_ffn_channels[i] = removed_channels
        plan.kept_attention_groups[i] = [g for g in range(shape.num_key_value_heads) if g not in set(removed_groups)]
        plan.kept_query_heads[i] = [h for h in range(shape.num_attention_heads) if h not in set(removed_heads)]
        plan.kept_ffn_channels[i] = [c for c in range(shape.intermediate_size) if c not in set(removed_channels)]
    if width_multiple is not None:  # servable: the family's own config class must take the widths
        _check_saved_head_count(model, plan, blocks, size)
    return plan


def _check_saved_head_count(model: nn.Module, plan: PruningPlan, blocks: Sequence[nn.Module], size: int) -> None:
    """Refuse, before any surgery, query-head counts the family's own config refuses: a servable
    checkpoint promises the vanilla classes, and transformers' Llama and Gemma configs ask hidden_size to
    be a multiple of num_attention_heads (a Gemma 3 losing one of 4 heads). Checkpoints with per-layer
    widths take any count (`checkpoint.record_layer_shapes` writes them with the per-layer classes)."""
    import copy

    heads = max(len(plan.kept_query_heads[i]) if i in plan.kept_query_heads else layer_shape(block, size).num_attention_heads
                for i, block in enumerate(blocks))
    config = copy.deepcopy(model.config)
    config.__dict__["num_attention_heads"] = heads
    reason = family_config_refusal(model, config)
    if reason is not None:
        family = family_of(model)
        raise ConfigError(f"prune.attention_unit={plan.attention_unit!r} would leave {heads} query heads, which "
                          f"{family.config_class} refuses ({reason}); allowed: another ratio or "
                          "attention_unit ('auto' skips this layout), or prune.structures ['ffn']")


def _rows_of_heads(heads: Sequence[int], size: int) -> torch.Tensor:
    if not heads:
        return torch.empty(0, dtype=torch.long)
    return torch.cat([torch.arange(h * size, (h + 1) * size) for h in heads])


def prune_layer(layer: nn.Module, kept_groups: Sequence[int], kept_heads: Sequence[int],
                kept_channels: Sequence[int], size: int) -> LayerShape:
    """Physically shrink one decoder layer to the kept KV groups, query heads and FFN channels.

    `kept_heads` must hold the same number of query heads of every kept group (GQA stays valid).
    """
    shape = layer_shape(layer, size)
    per_group = shape.num_attention_heads // shape.num_key_value_heads
    kept_groups, kept_heads = sorted(kept_groups), sorted(kept_heads)
    heads_per_kept_group = [sum(1 for h in kept_heads if h // per_group == g) for g in kept_groups]
    if len(set(heads_per_kept_group)) != 1 or any(h // per_group not in set(kept_groups) for h in kept_heads):
        raise ValueError(f"kept query heads {kept_heads} do not give every kept KV group {kept_groups} the same "
                         "number of heads; GQA needs heads = kv_heads x heads_per_group")
    new_per_group = heads_per_kept_group[0]
    norms = sliced_norms(layer)

    def shrink(name: str, **keep: torch.Tensor) -> None:
        set_projection(layer, name, shrink_linear(projection(layer, name), **keep))

    if len(kept_heads) != shape.num_attention_heads:
        q_rows = _rows_of_heads(kept_heads, size)
        shrink("q_proj", keep_out=q_rows)
        shrink("o_proj", keep_in=q_rows)
        for path in (path for path, kind in norms.items() if kind == "q"):
            shrink_norm(layer, path, q_rows)
    if len(kept_groups) != shape.num_key_value_heads:
        kv_rows = _rows_of_heads(kept_groups, size)
        shrink("k_proj", keep_out=kv_rows)
        shrink("v_proj", keep_out=kv_rows)
        for path in (path for path, kind in norms.items() if kind == "kv"):
            shrink_norm(layer, path, kv_rows)
    if len(kept_channels) != shape.intermediate_size:
        channels = torch.tensor(list(kept_channels), dtype=torch.long)
        shrink("gate_proj", keep_out=channels)
        shrink("up_proj", keep_out=channels)
        shrink("down_proj", keep_in=channels)
    new_shape = LayerShape(
        num_attention_heads=len(kept_groups) * new_per_group,
        num_key_value_heads=len(kept_groups),
        intermediate_size=len(kept_channels),
    )
    sync_layer_attributes(layer, new_shape)
    return new_shape


def apply_pruning(model: nn.Module, plan: PruningPlan) -> int:
    """Apply a plan in place; return the measured number of parameters removed (checked)."""
    from pruneflow.checkpoint import record_layer_shapes

    size = head_dim(model)
    blocks = decoder_layers(model)
    for i in plan.layers:
        prune_layer(blocks[i], plan.kept_attention_groups[i], plan.kept_query_heads[i], plan.kept_ffn_channels[i], size)
    record_layer_shapes(model)
    removed = plan.params_before - count_parameters(model)
    if removed != plan.expected_params_removed:
        raise RuntimeError(
            f"pruning removed {removed:,} parameters but the plan predicted {plan.expected_params_removed:,}"
        )
    return removed


# ---- bias compensation (FLAP): a removed input channel is replaced by its calibration mean ----



def check_bias_compensation(model_type: str | None, setting: str = "prune.reconstruction='bias'") -> None:
    """Only families whose config can switch on o_proj/down_proj biases keep a loadable checkpoint."""
    if model_type not in BIAS_MODEL_TYPES:
        raise ConfigError(
            f"{setting} needs output biases on o_proj/down_proj, which model_type="
            f"{model_type!r} cannot express in its config; allowed for: {', '.join(BIAS_MODEL_TYPES)} "
            "(set prune.reconstruction to 'least_squares' or 'none')"
        )


def _with_bias(linear: nn.Linear) -> nn.Linear:
    if linear.bias is not None:
        return linear
    new = nn.Linear(linear.in_features, linear.out_features, bias=True,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight)
        new.bias.zero_()
    return new


def add_compensation_biases(model: nn.Module, deltas: Mapping[int, tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Switch the config's attention/MLP biases on (zero where nothing is compensated), add the
    deltas to o_proj/down_proj, and return the number of parameters this adds."""
    check_bias_compensation(getattr(model.config, "model_type", None))
    before = count_parameters(model)
    for index, layer in enumerate(decoder_layers(model)):
        for name in PROJECTIONS:  # the config switches biases on for every projection of a kind
            set_projection(layer, name, _with_bias(projection(layer, name)))
        if index in deltas:
            o_delta, down_delta = deltas[index]
            with torch.no_grad():
                for name, delta in (("o_proj", o_delta), ("down_proj", down_delta)):
                    bias = projection(layer, name).bias
                    bias.add_(delta.to(bias.device, bias.dtype))
    for flag in family_of(model).output_bias_flags:
        setattr(model.config, flag, True)
    return count_parameters(model) - before
