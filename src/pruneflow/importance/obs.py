"""Structured OBS (ZipLM arXiv 2302.04089, SlimGPT arXiv 2412.18110): importance that knows the
remaining weights will be re-fitted.

For each layer's o_proj and down_proj, with the damped Gram matrix H = X X^T + lam I of the input
over the calibration tokens, units are removed greedily: each step the unit (an FFN channel, a query
head's columns or a KV group's heads' columns) whose removal, after the optimal update of every other
column, adds the least output error tr(W_M (Hinv[M, M])^-1 W_M^T). A unit's score is the error at its
step (made non-decreasing), so the planner's "lowest first" removes the greedy prefix; the prune stage's
`least_squares` reconstruction applies exactly that optimal update to the kept columns.

Gram matrices come from the activation cache (`activations.gram_matrices`); without them they are
gathered by forward passes over the calibration ids, a few layers at a time under a memory budget
(SmolLM2: 21 MB per layer in float64; LLaMA-7B: 1.1 GB).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from pruneflow.architectures import decoder_layers, head_dim, layer_shape, projection
from pruneflow.gram import gram_matrices
from pruneflow.importance.base import COMMON_SCALE_KEY, GroupScores, ScoringInputs
from pruneflow.progress import progress
from pruneflow.reconstruction import obs_removal_order, scores_from_order

GRAM_BUDGET_BYTES = 2 * 1024**3  # Gram matrices held at once while scoring


def _gram_bytes(layer: nn.Module) -> int:
    return 8 * (projection(layer, 'o_proj').in_features ** 2 + projection(layer, 'down_proj').in_features ** 2)


class StructuredObs:
    name: ClassVar[str] = "obs"
    needs_gradients: ClassVar[bool] = False
    needs_activations: ClassVar[bool] = True  # reads the cached Gram matrices when there are any

    def __init__(self, damping: float = 1e-3, budget_bytes: int = GRAM_BUDGET_BYTES) -> None:
        self.damping = damping
        self.budget_bytes = budget_bytes

    def _layer_chunks(self, blocks: nn.ModuleList) -> list[list[int]]:
        chunks: list[list[int]] = [[]]
        used = 0
        for index, layer in enumerate(blocks):
            size = _gram_bytes(layer)
            if chunks[-1] and used + size > self.budget_bytes:
                chunks.append([])
                used = 0
            chunks[-1].append(index)
            used += size
        return chunks

    @torch.no_grad()
    def score(self, model: nn.Module, inputs: ScoringInputs) -> GroupScores:
        blocks = decoder_layers(model)
        size = head_dim(model)
        count = len(blocks)
        attention: list[torch.Tensor | None] = [None] * count
        heads: list[torch.Tensor | None] = [None] * count
        ffn: list[torch.Tensor | None] = [None] * count
        bar = progress(total=count, desc="obs scores", unit="layer")
        for chunk in self._layer_chunks(blocks):
            targets = [(i, p) for i in chunk for p in ("o_proj", "down_proj")]
            grams = gram_matrices(model, targets, activations=inputs.activations,
                                  calibration_ids=inputs.calibration_ids, batch_size=inputs.forward_batch_size,
                                  device=inputs.device)
            for i in chunk:
                layer = blocks[i]
                shape = layer_shape(layer, size)
                per_group = shape.num_attention_heads // shape.num_key_value_heads
                o_gram = grams.pop((i, "o_proj")).gram
                o_weight = projection(layer, 'o_proj').weight
                head_units = [list(range(h * size, (h + 1) * size)) for h in range(shape.num_attention_heads)]
                group_units = [[c for h in range(g * per_group, (g + 1) * per_group) for c in head_units[h]]
                               for g in range(shape.num_key_value_heads)]
                heads[i] = scores_from_order(obs_removal_order(o_weight, o_gram, head_units, self.damping),
                                             len(head_units))
                attention[i] = scores_from_order(obs_removal_order(o_weight, o_gram, group_units, self.damping),
                                                 len(group_units))
                down_gram = grams.pop((i, "down_proj")).gram
                channel_units = [[c] for c in range(shape.intermediate_size)]
                ffn[i] = scores_from_order(
                    obs_removal_order(projection(layer, 'down_proj').weight, down_gram, channel_units, self.damping),
                    len(channel_units))
                bar.update()
        bar.close()
        # every score is a squared output error of the layer's residual-stream write: one scale
        return GroupScores(attention=attention, ffn=ffn, attention_heads=heads, metadata={COMMON_SCALE_KEY: "true"})
