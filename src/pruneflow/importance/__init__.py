"""Pruning criteria, selectable by name in params.yaml (`grid.criteria`), tuned under `score:`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pruneflow.criteria import CRITERIA as CRITERION_INFO
from pruneflow.errors import ConfigError
from pruneflow.importance.activation import Flap, WandaSP
from pruneflow.importance.base import GroupScores, Importance, ScoringInputs
from pruneflow.importance.magnitude import L1Magnitude, L2Magnitude
from pruneflow.importance.mutual_information import MutualInformation
from pruneflow.importance.obs import StructuredObs
from pruneflow.importance.random_baseline import RandomImportance
from pruneflow.importance.taylor import TaylorElement1, TaylorElement2, TaylorVector

CRITERIA: dict[str, type] = {
    cls.name: cls
    for cls in (
        RandomImportance, L1Magnitude, L2Magnitude, TaylorVector, TaylorElement1, TaylorElement2,
        WandaSP, Flap, MutualInformation, StructuredObs,
    )
}
# criteria whose group scores come from summing parameter scores: `score.aggregation` applies
AGGREGATED = tuple(name for name, info in CRITERION_INFO.items() if info.aggregated)


def criterion_settings(name: str, settings: Any | None) -> dict[str, Any]:
    """The constructor arguments of criterion `name` from the `score:` params (None: defaults)."""
    if settings is None:
        return {}
    if name in AGGREGATED:
        return {"aggregation": settings.aggregation}
    if name == MutualInformation.name:
        return {
            "alpha": settings.mi_alpha, "bandwidth": settings.mi_bandwidth,
            "bandwidth_scale": settings.mi_bandwidth_scale, "max_tokens": settings.mi_tokens,
            "threshold": settings.mi_threshold, "pairs_per_neuron": settings.mi_pairs_per_neuron,
        }
    if name == StructuredObs.name:
        return {"damping": settings.obs_damping}
    return {}


def get_criterion(name: str, settings: Any | None = None) -> Importance:
    """Instantiate a criterion by name (with the `score:` params), or fail naming the allowed ones."""
    if name not in CRITERIA:
        import difflib

        close = difflib.get_close_matches(name, list(CRITERIA), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"criterion={name!r} is not allowed; allowed: {', '.join(CRITERIA)}{hint}")
    return CRITERIA[name](**criterion_settings(name, settings))


__all__ = ["CRITERIA", "GroupScores", "Importance", "ScoringInputs", "get_criterion"]


def score_groups(model: nn.Module, criterion: str, calibration_ids: torch.Tensor,
                 activations: Mapping[str, torch.Tensor] | None, params, device: torch.device,
                 dtype: torch.dtype, layer_weights=None) -> GroupScores:
    """Per-group importance of one criterion with the `score` settings and seed of `params` (a `Params`);
    `layer_weights`: the model is in host memory and gradients are taken one layer at a time."""
    from pruneflow.runtime import seed_everything

    scorer = get_criterion(criterion, params.score)
    seed_everything(params.seed)
    return scorer.score(model, ScoringInputs(
        calibration_ids=calibration_ids, activations=activations if scorer.needs_activations else None,
        micro_batch_size=params.score.micro_batch_size, forward_batch_size=params.activations.batch_size,
        seed=params.seed, device=device, dtype=dtype, layer_weights=layer_weights))
