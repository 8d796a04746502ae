"""Shared machinery for criteria that score every parameter and sum the scores over a group."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pruneflow.architectures import decoder_layers, head_dim, layer_shape
from pruneflow.groups import aggregate, attention_group_vectors, ffn_group_vectors
from pruneflow.importance.base import GroupScores

# element_score(layer_index, matrix_name, module, "weight" | "bias") -> tensor like that parameter
ElementScore = Callable[[int, str, nn.Linear, str], torch.Tensor | None]


def score_elementwise(model: nn.Module, element_score: ElementScore, aggregation: str = "sum") -> GroupScores:
    """Group scores of every layer from per-parameter scores."""
    size = head_dim(model)
    attention, ffn = [], []
    for index, layer in enumerate(decoder_layers(model)):
        shape = layer_shape(layer, size)

        def bound(name: str, module: nn.Linear, kind: str, _index: int = index) -> torch.Tensor | None:
            scores = element_score(_index, name, module, kind)
            return None if scores is None else scores.float()

        with torch.no_grad():
            attention.append(aggregate(attention_group_vectors(layer, shape.num_key_value_heads, bound), aggregation))
            ffn.append(aggregate(ffn_group_vectors(layer, bound), aggregation))
    return GroupScores(attention=[a.cpu() for a in attention], ffn=[f.cpu() for f in ffn])


def projection_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Weights and biases of every prunable projection (the only tensors criteria look at)."""
    params = []
    for layer in decoder_layers(model):
        for module in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                       layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            params.append(module.weight)
            if module.bias is not None:
                params.append(module.bias)
    return params
