"""Choosing how attention is pruned by measurement: `prune.attention_unit: auto`.

Which structures lose least depends on the model: on a model with few KV groups (SmolLM2: 3) removing
whole groups costs far more than narrowing the FFN, on a model with many heads the opposite can hold,
and past the FFN's share of the parameters (about 47% of SmolLM2's in the default layer range) the
ratio cannot be reached without attention at all. So instead of a value tuned for one model, `auto`
tries each way -- FFN only (attention untouched), whole KV groups + FFN, query heads + FFN -- with the
same plan, allocation and re-fit the prune stage uses, and keeps the one whose next-token loss on the
first calibration samples is lowest. An end-to-end loss, not the layer-local re-fit error: the local
errors of attention and FFN outputs are not comparable enough to rank layouts (a global allocation by
them lost to the uniform one in docs/reconstruction.md). No library does this search; it is a loop
over the planner.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pruneflow.errors import ConfigError, PruneflowError

AUTO = "auto"


@dataclass(frozen=True)
class Layout:
    """The structures that lose units and how attention loses them."""

    structures: tuple[str, ...]
    attention_unit: str

    @property
    def label(self) -> str:
        if "attention" not in self.structures:
            return "+".join(self.structures)
        return "+".join(self.attention_unit if s == "attention" else s for s in self.structures)


def layouts_to_try(structures: Sequence[str], attention_unit: str, ruled_out: Collection[str] = ()) -> list[Layout]:
    """The candidates `attention_unit` stands for within the allowed `structures` (one unless it is auto).
    `ruled_out`: attention units some pruned layer cannot lose (`pruneflow.families.ruled_out_units`:
    KV groups under MQA, query heads under MHA), which are no candidates."""
    structures = tuple(structures)
    if attention_unit != AUTO:
        return [Layout(structures, attention_unit)]
    candidates = []
    if "ffn" in structures:
        candidates.append(Layout(("ffn",), "kv_group"))  # attention untouched
    if "attention" in structures:
        candidates += [Layout(structures, unit) for unit in ("kv_group", "query_head") if unit not in ruled_out]
    return candidates


def calibration_loss(model: nn.Module, calibration_ids: torch.Tensor, samples: int, batch_size: int,
                     device: torch.device | str = "cpu", layer_weights=None) -> float:
    """Mean next-token loss on the first `samples` calibration sequences (each its own window)."""
    from pruneflow.perplexity import perplexity

    ids = calibration_ids[:samples]
    result = perplexity(model, ids.reshape(-1), seq_len=ids.shape[1], batch_size=batch_size, device=device,
                        layer_weights=layer_weights)
    return float(torch.tensor(result.ppl).log())


@dataclass
class Trial:
    layout: Layout
    loss: float | None = None
    params_after: int | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return {"layout": self.layout.label, "structures": list(self.layout.structures),
                "attention_unit": self.layout.attention_unit if "attention" in self.layout.structures else None,
                "calibration_loss": self.loss,
                "params_after": self.params_after, "error": self.error}


def choose_layout(
    model: nn.Module,
    candidates: Sequence[Layout],
    prune: Callable[[nn.Module, Layout], object],
    loss: Callable[[nn.Module], float],
) -> tuple[Layout, list[Trial]]:
    """Prune a copy of `model` with each candidate (`prune` plans, removes and re-fits in place) and
    return the one with the lowest `loss`, with every trial. A single candidate is returned untried.

    A candidate the planner refuses (the ratio is out of its reach) is recorded with its error; when
    every candidate is refused, the first refusal is raised.
    """
    from pruneflow.architectures import count_parameters

    if len(candidates) == 1:
        return candidates[0], []
    trials: list[Trial] = []
    refusals: list[PruneflowError] = []
    for layout in candidates:
        trial = Trial(layout)
        trials.append(trial)
        trial_model = copy.deepcopy(model)
        try:
            prune(trial_model, layout)
        except PruneflowError as exc:
            trial.error = str(exc)
            refusals.append(exc)
            continue
        trial.params_after = count_parameters(trial_model)
        with torch.no_grad():
            trial.loss = loss(trial_model)
        del trial_model
    measured = [t for t in trials if t.loss is not None]
    if not measured:
        raise refusals[0] if refusals else ConfigError("prune.attention_unit='auto' found no layout to try")
    best = min(measured, key=lambda t: t.loss)
    return best.layout, trials
