"""Weight-magnitude baselines (LLM-Pruner's L1 / L2): no data needed."""

from __future__ import annotations

from typing import ClassVar

import torch

from pruneflow.importance.base import GroupScores, ScoringInputs
from pruneflow.importance.elementwise import Aggregated, score_elementwise


class L1Magnitude(Aggregated):
    """Sum of |w| over the group's parameters."""

    name: ClassVar[str] = "l1_magnitude"

    def score(self, model: torch.nn.Module, inputs: ScoringInputs) -> GroupScores:
        return score_elementwise(model, lambda _i, _n, module, kind: getattr(module, kind).detach().abs(),
                                 self.aggregation)


class L2Magnitude(Aggregated):
    """Sum of w^2 over the group's parameters (LLM-Pruner's `l2`; same ranking as the L2 norm)."""

    name: ClassVar[str] = "l2_magnitude"

    def score(self, model: torch.nn.Module, inputs: ScoringInputs) -> GroupScores:
        return score_elementwise(model, lambda _i, _n, module, kind: getattr(module, kind).detach().float().pow(2),
                                 self.aggregation)
