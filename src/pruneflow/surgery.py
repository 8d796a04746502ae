"""Prune scored groups out of a model and re-fit what stays: the prune stage's core, shared with
`pruneflow.prune` (`pruneflow.oneshot`). Plans with `pruning.plan_pruning`, removes and re-fits with
`reconstruction.prune_and_reconstruct`, and with `prune.attention_unit: auto` tries each layout
(`layout_search`); returns the summary the checkpoint carries, with measured parameter counts."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pruneflow.config import BIAS_RECONSTRUCTIONS, Params
from pruneflow.importance.base import GroupScores


def layers_to_prune(num_layers: int, params: Params, servable: bool) -> list[int]:
    """Servable: every layer alike (a dense first or last layer would differ); else prune.layer_*."""
    return list(range(num_layers)) if servable else list(params.prune.layer_range(num_layers))


def prune_scored(model: nn.Module, scores: GroupScores, ratio: float, params: Params, *,
                 calibration_ids: torch.Tensor | None, activations: Mapping[str, torch.Tensor] | None,
                 servable: bool = False, device: torch.device | str = "cpu",
                 layer_weights=None) -> dict[str, Any]:
    """Remove the lowest-scored groups of `model` (in place) so that `ratio` of all parameters goes,
    re-fit what stays, and return the summary (`pruning_summary.json`) with measured counts.

    With `layer_weights` (`pruneflow.layerwise.ResidentWeights`: the model in host memory) the
    re-fitting and layout-search forward passes bring one decoder layer at a time to `device`."""
    from pruneflow.architectures import count_parameters, layer_shapes
    from pruneflow.families import ruled_out_units
    from pruneflow.layout_search import calibration_loss, choose_layout, layouts_to_try
    from pruneflow.pruning import plan_pruning
    from pruneflow.reconstruction import prune_and_reconstruct

    settings = params.prune
    layers = layers_to_prune(len(layer_shapes(model)), params, servable)
    allocation = "uniform" if servable else settings.allocation
    width_multiple = settings.servable_multiple if servable else None
    shapes_before = layer_shapes(model)
    ruled_out = ruled_out_units({f"layer {i}": shapes_before[i] for i in layers})
    candidates = layouts_to_try(settings.structures, settings.attention_unit, ruled_out)
    if settings.reconstruction == "none":
        activations = None

    def prune_with(target: nn.Module, layout):
        plan = plan_pruning(target, scores, ratio, layers, layout.structures, allocation=allocation,
                            attention_unit=layout.attention_unit, width_multiple=width_multiple)
        return plan, prune_and_reconstruct(
            target, plan, method=settings.reconstruction, mode=settings.reconstruction_mode,
            damping=settings.damping, calibration_ids=calibration_ids,
            batch_size=params.activations.batch_size, device=device, activations=activations,
            layer_weights=layer_weights)

    started = time.perf_counter()
    layout, trials = choose_layout(
        model, candidates, prune_with,
        lambda trial: calibration_loss(trial, calibration_ids, settings.search_samples,
                                       params.activations.batch_size, device, layer_weights))
    plan, result = prune_with(model, layout)
    params_after = count_parameters(model)
    return {
        "criterion": scores.metadata.get("criterion"),
        "requested_ratio": ratio,
        "achieved_ratio": (plan.params_before - params_after) / plan.params_before,
        "params_before": plan.params_before,
        "params_after": params_after,
        "params_removed": result.params_removed,
        "params_added_by_bias_compensation": result.params_added,
        "pruned_layers": layers,
        "structures": list(plan.structures),
        "allocation": plan.allocation,
        "servable": servable,
        "width_multiple": plan.width_multiple,
        # None when attention is untouched (the FFN-only layout): no unit was used
        "attention_unit": plan.attention_unit if "attention" in plan.structures else None,
        # attention_unit: auto -- each layout tried, its loss on the first search_samples calibration sequences
        "layout_search": [trial.to_dict() for trial in trials],
        "reconstruction": settings.reconstruction,
        "reconstruction_mode": settings.reconstruction_mode,
        "damping": settings.damping,
        "bias_compensation": settings.reconstruction in BIAS_RECONSTRUCTIONS,
        # relative output error of o_proj / down_proj on the calibration tokens, removed vs re-fitted
        "reconstruction_errors": result.mean_errors(),
        "reconstruction_errors_per_layer": result.errors,
        "per_layer_fraction": plan.per_layer_fraction,
        "layer_shapes_before": [s.to_dict() for s in shapes_before],
        "layer_shapes_after": [s.to_dict() for s in layer_shapes(model)],
        "removed_attention_groups": {str(k): v for k, v in plan.removed_attention_groups.items()},
        "removed_query_heads": {str(k): v for k, v in plan.removed_query_heads.items()},
        "removed_ffn_channels": {str(k): v for k, v in plan.removed_ffn_channels.items()},
        "surgery_seconds": time.perf_counter() - started,
    }
