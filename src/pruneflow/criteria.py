"""The pruning criteria by name, and the checks of their settings, without importing torch.

Config validation and the pipeline's plan read this module; `pruneflow.importance` maps each name
to its implementation (a test keeps the two in step). Keeping it torch-free keeps params checks fast
and keeps the scoring code out of every stage's source dependencies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pruneflow.errors import ConfigError


@dataclass(frozen=True)
class CriterionInfo:
    name: str
    needs_gradients: bool
    needs_activations: bool
    aggregated: bool  # group score = reduction of parameter scores: `score.aggregation` applies


CRITERIA: dict[str, CriterionInfo] = {info.name: info for info in (
    CriterionInfo("random", False, False, False),
    CriterionInfo("l1_magnitude", False, False, True),
    CriterionInfo("l2_magnitude", False, False, True),
    CriterionInfo("taylor_vector", True, False, True),
    CriterionInfo("taylor_element1", True, False, True),
    CriterionInfo("taylor_element2", True, False, True),
    CriterionInfo("wanda_sp", False, True, True),
    CriterionInfo("flap", False, True, False),
    CriterionInfo("mutual_information", False, True, False),
    CriterionInfo("obs", False, True, False),
)}
BANDWIDTH_RULES = ("silverman", "median")


def without_gradients() -> list[str]:
    """The criteria that take no gradients: what to use where a gradient criterion cannot fit."""
    return [name for name, info in CRITERIA.items() if not info.needs_gradients]


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def check_mutual_information_settings(alpha: Any, bandwidth: Any, bandwidth_scale: Any, max_tokens: Any,
                                      threshold: Any, pairs_per_neuron: Any) -> None:
    """The MI estimator's settings, named by their `score.mi_*` keys."""
    if not (_number(alpha) and alpha > 0 and alpha != 1):
        raise ConfigError(f"score.mi_alpha={alpha!r} is not allowed; allowed: a number > 0 and != 1")
    if bandwidth not in BANDWIDTH_RULES:
        raise ConfigError(f"score.mi_bandwidth={bandwidth!r} is not allowed; allowed: {', '.join(BANDWIDTH_RULES)}")
    if not (_number(bandwidth_scale) and bandwidth_scale > 0):
        raise ConfigError(f"score.mi_bandwidth_scale={bandwidth_scale!r} is not allowed; allowed: a number > 0")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
        raise ConfigError(f"score.mi_tokens={max_tokens!r} is not allowed; allowed: an integer >= 2")
    if threshold is not None and not (_number(threshold) and threshold >= 0):
        raise ConfigError(f"score.mi_threshold={threshold!r} is not allowed; allowed: null or a number >= 0 (bits)")
    if pairs_per_neuron is not None and (isinstance(pairs_per_neuron, bool) or not isinstance(pairs_per_neuron, int)
                                         or pairs_per_neuron < 1):
        raise ConfigError(
            f"score.mi_pairs_per_neuron={pairs_per_neuron!r} is not allowed; allowed: null or an integer >= 1")
    if alpha != 2 and pairs_per_neuron is None:
        raise ConfigError(
            f"score.mi_pairs_per_neuron=None is not allowed with score.mi_alpha={alpha!r}: only alpha 2 has the "
            "all-pairs closed form; allowed: an integer >= 1 (e.g. 8), or score.mi_alpha: 2")
