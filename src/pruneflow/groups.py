"""Coupled structures ("groups") of a decoder layer and the reduction of parameter scores onto them.

- An **attention group** is one KV head with every query head that reads it (GQA): its rows of
  q/k/v_proj (and their biases) and its query heads' columns of o_proj. Removing a whole group keeps
  the query/KV ratio of the layer, so the config stays expressible.
- An **FFN channel group** is one intermediate channel: its row of gate_proj and up_proj and its
  column of down_proj.

LLM-Pruner scores a group by aggregating its parameters' scores over the coupled matrices; the
per-matrix vectors are kept apart so that aggregation (sum, product, max, last) is a choice.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import torch
from torch import nn

from pruneflow.architectures import projection

ATTENTION_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_MATRICES = ("gate_proj", "up_proj", "down_proj")
AGGREGATIONS = ("sum", "product", "max", "last")


def attention_matrix(layer: nn.Module, name: str) -> nn.Linear:
    return projection(layer, name)


def ffn_matrix(layer: nn.Module, name: str) -> nn.Linear:
    return projection(layer, name)


def attention_group_vectors(
    layer: nn.Module,
    num_kv_heads: int,
    element_score: Callable[[str, nn.Linear, str], torch.Tensor | None],
) -> dict[str, torch.Tensor]:
    """Per-matrix group scores, each of shape [num_kv_heads].

    `element_score(matrix_name, module, "weight"|"bias")` returns a tensor shaped like that
    parameter (or None to skip it); rows of q/k/v and columns of o_proj are summed per group.
    """
    vectors: dict[str, torch.Tensor] = {}
    for name in ("q_proj", "k_proj", "v_proj"):
        module = attention_matrix(layer, name)
        weight_scores = element_score(name, module, "weight")
        total = weight_scores.reshape(num_kv_heads, -1).sum(dim=1)
        if module.bias is not None:
            bias_scores = element_score(name, module, "bias")
            if bias_scores is not None:
                total = total + bias_scores.reshape(num_kv_heads, -1).sum(dim=1)
        vectors[name] = total
    o_proj = attention_matrix(layer, "o_proj")
    o_scores = element_score("o_proj", o_proj, "weight")
    vectors["o_proj"] = o_scores.reshape(o_scores.shape[0], num_kv_heads, -1).sum(dim=(0, 2))
    return vectors


def attention_head_vectors(
    layer: nn.Module,
    num_heads: int,
    element_score: Callable[[str, nn.Linear, str], torch.Tensor | None],
) -> dict[str, torch.Tensor]:
    """Per-matrix scores of single query heads, each of shape [num_heads]: a query head owns its
    rows of q_proj (and bias) and its columns of o_proj; k/v stay with the KV group."""
    q_proj = attention_matrix(layer, "q_proj")
    total = element_score("q_proj", q_proj, "weight").reshape(num_heads, -1).sum(dim=1)
    if q_proj.bias is not None:
        bias_scores = element_score("q_proj", q_proj, "bias")
        if bias_scores is not None:
            total = total + bias_scores.reshape(num_heads, -1).sum(dim=1)
    o_proj = attention_matrix(layer, "o_proj")
    o_scores = element_score("o_proj", o_proj, "weight")
    return {"q_proj": total, "o_proj": o_scores.reshape(o_scores.shape[0], num_heads, -1).sum(dim=(0, 2))}


def ffn_group_vectors(
    layer: nn.Module,
    element_score: Callable[[str, nn.Linear, str], torch.Tensor | None],
) -> dict[str, torch.Tensor]:
    """Per-matrix channel scores, each of shape [intermediate_size]."""
    vectors: dict[str, torch.Tensor] = {}
    for name in ("gate_proj", "up_proj"):
        module = ffn_matrix(layer, name)
        total = element_score(name, module, "weight").sum(dim=1)
        if module.bias is not None:
            bias_scores = element_score(name, module, "bias")
            if bias_scores is not None:
                total = total + bias_scores
        vectors[name] = total
    down = ffn_matrix(layer, "down_proj")
    vectors["down_proj"] = element_score("down_proj", down, "weight").sum(dim=0)
    return vectors


def aggregate(vectors: Mapping[str, torch.Tensor], how: str = "sum") -> torch.Tensor:
    """Combine per-matrix group scores into one score per group (LLM-Pruner's group reduction)."""
    stacked = torch.stack([v.double() for v in vectors.values()])
    if how == "sum":
        return stacked.sum(dim=0)
    if how == "product":
        return stacked.prod(dim=0)
    if how == "max":
        return stacked.max(dim=0).values
    if how == "last":
        return stacked[-1]
    raise ValueError(f"aggregation={how!r} is not allowed; allowed: {', '.join(AGGREGATIONS)}")


def attention_group_params(hidden_size: int, head_size: int, heads_per_group: int,
                           q_bias: bool = False, kv_bias: bool = False, o_bias: bool = False,
                           norm_rows: Collection[str] = ()) -> int:
    """Parameters removed with one attention group (q/k/v rows, o columns, their biases, and the
    entries of norms spanning the q or kv projection output: `norm_rows` holds 'q' and/or 'kv')."""
    q_rows = heads_per_group * head_size
    count = q_rows * hidden_size + 2 * head_size * hidden_size + hidden_size * q_rows
    count += q_rows if q_bias else 0
    count += 2 * head_size if kv_bias else 0
    count += q_rows if "q" in norm_rows else 0
    count += head_size if "kv" in norm_rows else 0
    del o_bias  # o_proj's bias is per output (hidden) row: it stays
    return count


def query_head_params(hidden_size: int, head_size: int, q_bias: bool = False, q_norm: bool = False) -> int:
    """Parameters removed with one query head (its q rows, bias and q_norm entries, its o_proj columns)."""
    return 2 * head_size * hidden_size + (head_size if q_bias else 0) + (head_size if q_norm else 0)


def ffn_channel_params(hidden_size: int, gate_up_bias: bool = False) -> int:
    """Parameters removed with one FFN channel (gate/up rows, down column)."""
    return 3 * hidden_size + (2 if gate_up_bias else 0)
