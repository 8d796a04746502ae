"""Structural pruning: choose the lowest-scored groups and physically remove them.

`ratio` is the fraction of *all* model parameters to remove (embeddings included in the total),
which is what the papers' "20% pruned" means. Every pruned layer gets the same per-layer fraction
(LLM-Pruner's block-wise setting): attention loses round(p * KV groups) whole GQA groups, and the FFN
channel count is solved so that the total removed matches the request to within one channel per
layer. The real parameter count is measured after surgery and checked against the plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pruneflow.architectures import (
    LayerShape,
    count_parameters,
    decoder_layers,
    head_dim,
    layer_shape,
    shrink_linear,
    sync_layer_attributes,
)
from pruneflow.config import check_ratio
from pruneflow.errors import ConfigError, DataError
from pruneflow.groups import attention_group_params, ffn_channel_params
from pruneflow.importance.base import GroupScores


@dataclass
class PruningPlan:
    """Which groups each layer keeps, and the bookkeeping that predicts the result."""

    requested_ratio: float
    layers: list[int]
    structures: tuple[str, ...]
    per_layer_fraction: float
    kept_attention_groups: dict[int, list[int]] = field(default_factory=dict)
    kept_ffn_channels: dict[int, list[int]] = field(default_factory=dict)
    removed_attention_groups: dict[int, list[int]] = field(default_factory=dict)
    removed_ffn_channels: dict[int, list[int]] = field(default_factory=dict)
    params_before: int = 0
    expected_params_removed: int = 0


def _layer_costs(layer: nn.Module, shape: LayerShape, size: int) -> tuple[int, int]:
    attn = layer.self_attn
    group = attention_group_params(
        hidden_size=attn.q_proj.in_features,
        head_size=size,
        heads_per_group=shape.num_attention_heads // shape.num_key_value_heads,
        q_bias=attn.q_proj.bias is not None,
        kv_bias=attn.k_proj.bias is not None,
    )
    channel = ffn_channel_params(layer.mlp.gate_proj.in_features, gate_up_bias=layer.mlp.gate_proj.bias is not None)
    return group, channel


def _lowest(scores: torch.Tensor, count: int, what: str) -> list[int]:
    if torch.isnan(scores).any():
        raise DataError(f"{what} scores contain NaN; rescore (fp16 is known to give NaN: use bfloat16 or float32)")
    order = torch.argsort(scores.double(), stable=True)
    return sorted(order[:count].tolist())


def plan_pruning(
    model: nn.Module,
    scores: GroupScores,
    ratio: float,
    layers: Sequence[int],
    structures: Sequence[str] = ("attention", "ffn"),
) -> PruningPlan:
    """Decide what to remove so that `ratio` of all parameters goes, lowest scores first."""
    ratio = check_ratio(ratio, "ratio")
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
    costs = {i: _layer_costs(blocks[i], shapes[i], size) for i in layers}
    for i in layers:
        if scores.attention[i].numel() != shapes[i].num_key_value_heads or scores.ffn[i].numel() != shapes[i].intermediate_size:
            raise DataError(
                f"scores of layer {i} have {scores.attention[i].numel()} attention groups / "
                f"{scores.ffn[i].numel()} FFN channels but the layer has {shapes[i].num_key_value_heads} / "
                f"{shapes[i].intermediate_size}; rerun the score stage for this model"
            )

    use_attention = "attention" in structures
    use_ffn = "ffn" in structures
    prunable = sum(
        (costs[i][0] * shapes[i].num_key_value_heads if use_attention else 0)
        + (costs[i][1] * shapes[i].intermediate_size if use_ffn else 0)
        for i in layers
    )
    # at least one attention group and one FFN channel stay in every layer
    removable = sum(
        (costs[i][0] * (shapes[i].num_key_value_heads - 1) if use_attention else 0)
        + (costs[i][1] * (shapes[i].intermediate_size - 1) if use_ffn else 0)
        for i in layers
    )
    if target > removable:
        raise ConfigError(
            f"ratio={ratio} asks to remove {int(target):,} parameters but layers "
            f"{layers[0]}..{layers[-1]} with structures {list(structures)} hold only {removable:,} removable "
            f"ones; allowed here: ratio <= {removable / total:.3f} (or widen prune.layer_start/layer_end)"
        )
    fraction = target / prunable if prunable else 0.0

    attention_removed = {i: 0 for i in layers}
    if use_attention:
        for i in layers:
            kv = shapes[i].num_key_value_heads
            share = fraction if use_ffn else target / sum(costs[j][0] * shapes[j].num_key_value_heads for j in layers)
            attention_removed[i] = min(round(share * kv), kv - 1)
    removed_by_attention = sum(attention_removed[i] * costs[i][0] for i in layers)

    ffn_removed = {i: 0 for i in layers}
    if use_ffn:
        remaining = max(0.0, target - removed_by_attention)
        channel_capacity = sum(costs[i][1] * shapes[i].intermediate_size for i in layers)
        share = remaining / channel_capacity if channel_capacity else 0.0
        for i in layers:
            width = shapes[i].intermediate_size
            ffn_removed[i] = min(round(share * width), width - 1)

    plan = PruningPlan(
        requested_ratio=ratio,
        layers=list(layers),
        structures=tuple(structures),
        per_layer_fraction=fraction,
        params_before=total,
    )
    for i in layers:
        removed_att = _lowest(scores.attention[i], attention_removed[i], f"layer {i} attention")
        removed_ffn = _lowest(scores.ffn[i], ffn_removed[i], f"layer {i} FFN")
        plan.removed_attention_groups[i] = removed_att
        plan.removed_ffn_channels[i] = removed_ffn
        plan.kept_attention_groups[i] = [g for g in range(shapes[i].num_key_value_heads) if g not in set(removed_att)]
        plan.kept_ffn_channels[i] = [c for c in range(shapes[i].intermediate_size) if c not in set(removed_ffn)]
        plan.expected_params_removed += len(removed_att) * costs[i][0] + len(removed_ffn) * costs[i][1]
    return plan


def _rows_of_heads(heads: Sequence[int], size: int) -> torch.Tensor:
    if not heads:
        return torch.empty(0, dtype=torch.long)
    return torch.cat([torch.arange(h * size, (h + 1) * size) for h in heads])


def prune_layer(layer: nn.Module, kept_groups: Sequence[int], kept_channels: Sequence[int], size: int) -> LayerShape:
    """Physically shrink one decoder layer to the kept KV groups and FFN channels."""
    shape = layer_shape(layer, size)
    per_group = shape.num_attention_heads // shape.num_key_value_heads
    attn, mlp = layer.self_attn, layer.mlp
    if len(kept_groups) != shape.num_key_value_heads:
        query_heads = [g * per_group + j for g in kept_groups for j in range(per_group)]
        q_rows = _rows_of_heads(query_heads, size)
        kv_rows = _rows_of_heads(list(kept_groups), size)
        attn.q_proj = shrink_linear(attn.q_proj, keep_out=q_rows)
        attn.k_proj = shrink_linear(attn.k_proj, keep_out=kv_rows)
        attn.v_proj = shrink_linear(attn.v_proj, keep_out=kv_rows)
        attn.o_proj = shrink_linear(attn.o_proj, keep_in=q_rows)
    if len(kept_channels) != shape.intermediate_size:
        channels = torch.tensor(list(kept_channels), dtype=torch.long)
        mlp.gate_proj = shrink_linear(mlp.gate_proj, keep_out=channels)
        mlp.up_proj = shrink_linear(mlp.up_proj, keep_out=channels)
        mlp.down_proj = shrink_linear(mlp.down_proj, keep_in=channels)
    new_shape = LayerShape(
        num_attention_heads=len(kept_groups) * per_group,
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
        prune_layer(blocks[i], plan.kept_attention_groups[i], plan.kept_ffn_channels[i], size)
    record_layer_shapes(model)
    removed = plan.params_before - count_parameters(model)
    if removed != plan.expected_params_removed:
        raise RuntimeError(
            f"pruning removed {removed:,} parameters but the plan predicted {plan.expected_params_removed:,}"
        )
    return removed
