"""Pruning criteria, selectable by name in params.yaml (`grid.criteria`)."""

from __future__ import annotations

from pruneflow.errors import ConfigError
from pruneflow.importance.activation import WandaSP
from pruneflow.importance.base import GroupScores, Importance, ScoringInputs
from pruneflow.importance.magnitude import L1Magnitude, L2Magnitude
from pruneflow.importance.random_baseline import RandomImportance
from pruneflow.importance.taylor import TaylorElement1

CRITERIA: dict[str, type] = {
    cls.name: cls for cls in (RandomImportance, L1Magnitude, L2Magnitude, TaylorElement1, WandaSP)
}


def get_criterion(name: str) -> Importance:
    """Instantiate a criterion by name, or fail naming the allowed ones."""
    if name not in CRITERIA:
        import difflib

        close = difflib.get_close_matches(name, list(CRITERIA), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"criterion={name!r} is not allowed; allowed: {', '.join(CRITERIA)}{hint}")
    return CRITERIA[name]()


__all__ = ["CRITERIA", "GroupScores", "Importance", "ScoringInputs", "get_criterion"]
