"""Random scores: the floor every criterion must beat. Seeded, so reproducible."""

from __future__ import annotations

from typing import ClassVar

import torch

from pruneflow.architectures import layer_shapes
from pruneflow.importance.base import GroupScores, ScoringInputs


class RandomImportance:
    name: ClassVar[str] = "random"
    needs_gradients: ClassVar[bool] = False
    needs_activations: ClassVar[bool] = False

    def score(self, model: torch.nn.Module, inputs: ScoringInputs) -> GroupScores:
        generator = torch.Generator().manual_seed(inputs.seed)
        attention, heads, ffn = [], [], []
        for shape in layer_shapes(model):
            attention.append(torch.rand(shape.num_key_value_heads, generator=generator, dtype=torch.float64))
            ffn.append(torch.rand(shape.intermediate_size, generator=generator, dtype=torch.float64))
        for shape in layer_shapes(model):  # after the groups: adding heads keeps older group scores
            heads.append(torch.rand(shape.num_attention_heads, generator=generator, dtype=torch.float64))
        return GroupScores(attention=attention, ffn=ffn, attention_heads=heads)
