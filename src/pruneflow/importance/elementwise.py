"""Shared machinery for criteria that score every parameter and reduce the scores onto groups."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from pruneflow.architectures import decoder_layers, head_dim, layer_shape, projection
from pruneflow.errors import ConfigError
from pruneflow.families import PROJECTIONS
from pruneflow.groups import (
    AGGREGATIONS,
    aggregate,
    attention_group_vectors,
    attention_head_vectors,
    ffn_group_vectors,
)
from pruneflow.importance.base import GroupScores

# element_score(layer_index, matrix_name, module, "weight" | "bias") -> tensor like that parameter
ElementScore = Callable[[int, str, nn.Linear, str], torch.Tensor | None]


def score_elementwise(model: nn.Module, element_score: ElementScore, aggregation: str = "sum",
                      absolute_per_matrix: bool = False) -> GroupScores:
    """Group scores of every layer (KV groups, query heads, FFN channels) from per-parameter scores.

    Per-parameter scores are summed over each matrix's slice of a group; `absolute_per_matrix`
    takes |that sum| (vector-wise Taylor, whose per-parameter terms are signed). Each matrix's
    scores are computed once per layer and reused for the three structures.
    """
    size = head_dim(model)
    rows = [score_layer(layer, index, size, element_score, aggregation, absolute_per_matrix)
            for index, layer in enumerate(decoder_layers(model))]
    return scores_from_layers(rows, aggregation)


def score_layer(layer: nn.Module, index: int, head_size: int, element_score: ElementScore, aggregation: str,
                absolute_per_matrix: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's (KV-group, query-head, FFN-channel) scores, on the CPU; see `score_elementwise`."""

    def reduce(vectors: dict[str, torch.Tensor]) -> torch.Tensor:
        if absolute_per_matrix:
            vectors = {name: vector.abs() for name, vector in vectors.items()}
        return aggregate(vectors, aggregation)

    shape = layer_shape(layer, head_size)
    cache: dict[tuple[str, str], torch.Tensor | None] = {}

    def bound(name: str, module: nn.Linear, kind: str) -> torch.Tensor | None:
        if (name, kind) not in cache:
            scores = element_score(index, name, module, kind)
            cache[(name, kind)] = None if scores is None else scores.double()
        return cache[(name, kind)]

    with torch.no_grad():
        return (reduce(attention_group_vectors(layer, shape.num_key_value_heads, bound)).cpu(),
                reduce(attention_head_vectors(layer, shape.num_attention_heads, bound)).cpu(),
                reduce(ffn_group_vectors(layer, bound)).cpu())


def scores_from_layers(rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], aggregation: str) -> GroupScores:
    return GroupScores(attention=[r[0] for r in rows], ffn=[r[2] for r in rows],
                       attention_heads=[r[1] for r in rows], metadata={"aggregation": aggregation})


def projection_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Weights and biases of every prunable projection (the only tensors criteria look at)."""
    params = []
    for layer in decoder_layers(model):
        for module in (projection(layer, name) for name in PROJECTIONS):
            params.append(module.weight)
            if module.bias is not None:
                params.append(module.bias)
    return params


class Aggregated:
    """Base of criteria whose group score reduces per-matrix scores (`score.aggregation`)."""

    needs_gradients: ClassVar[bool] = False
    needs_activations: ClassVar[bool] = False

    def __init__(self, aggregation: str = "sum") -> None:
        if aggregation not in AGGREGATIONS:
            raise ConfigError(f"score.aggregation={aggregation!r} is not allowed; allowed: {', '.join(AGGREGATIONS)}")
        self.aggregation = aggregation
