"""One-shot pruning of an in-memory model: calibration windows, activation statistics, group scores,
removal and re-fit, in one process.

This is the core the pipeline's stages call one step each (calibrate, cache_activations, score,
prune) and that `pruneflow.prune(...)` and `pruneflow prune` chain: the same functions with the same
settings, so a notebook, a script and the DAG give the same checkpoint. Needs only the core install
(torch, transformers, safetensors, huggingface_hub): no Snakemake, DVC, MLflow or lm-eval.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pruneflow.config import BIAS_RECONSTRUCTIONS, Params, load_params, params_from_mapping
from pruneflow.errors import ConfigError, DataError
from pruneflow.importance import GroupScores, Importance, get_criterion

log = logging.getLogger(__name__)


def resolve_params(params: Params | Mapping[str, Any] | str | Path | None = None) -> Params:
    """Settings for a one-shot run: a `Params`, a params.yaml path, a mapping of overrides (sections
    of params.yaml, e.g. `{"prune": {"allocation": "global"}}`), or None for the built-in defaults
    (the same pruning settings as the project's params.yaml)."""
    if params is None:
        return params_from_mapping({})
    if isinstance(params, Params):
        return params
    if isinstance(params, str | Path):
        return load_params(params)
    if isinstance(params, Mapping):
        return params_from_mapping(params)
    raise ConfigError(f"params={params!r} is not allowed; allowed: None, a params.yaml path, a mapping of "
                      "params.yaml sections, or pruneflow.config.Params")


def calibration_windows(texts: Sequence[str], tokenizer, params: Params) -> torch.Tensor:
    """`calibration.num_samples` windows of `calibration.seq_len` tokens from `texts` (LLM-Pruner's
    sampling, seeded by `seed`): [num_samples, seq_len] token ids."""
    from pruneflow.text_data import sample_calibration

    if isinstance(texts, str):
        raise DataError("calibration_texts is one string; allowed: a list of texts (e.g. the lines of a file)")
    cfg = params.calibration
    return sample_calibration(list(texts), tokenizer, cfg.num_samples, cfg.seq_len, params.seed).input_ids


def check_prunable(model: nn.Module, criterion: str, ratio: float, params: Params, servable: bool = False) -> Importance:
    """Everything that can be refused before any forward pass: criterion, ratio, family, layer range,
    attention unit, bias re-fit. Returns the criterion."""
    from pruneflow.architectures import check_supported, layer_shapes
    from pruneflow.config import check_ratio
    from pruneflow.families import check_attention_unit
    from pruneflow.pruning import check_bias_compensation
    from pruneflow.surgery import layers_to_prune

    scorer = get_criterion(criterion, params.score)
    check_ratio(ratio, "ratio")
    check_supported(model)
    shapes = layer_shapes(model)
    layers = layers_to_prune(len(shapes), params, servable)
    check_attention_unit({f"layer {i}": shapes[i] for i in layers}, params.prune.structures,
                         params.prune.attention_unit)
    if params.prune.reconstruction in BIAS_RECONSTRUCTIONS:
        check_bias_compensation(getattr(model.config, "model_type", None),
                                f"prune.reconstruction={params.prune.reconstruction!r}")
    return scorer


@dataclass
class PruneResult:
    """What `prune` did: the measured ratio and parameter counts, the full summary, the scores."""

    summary: dict[str, Any]
    scores: GroupScores = field(repr=False)

    @property
    def achieved_ratio(self) -> float:
        return self.summary["achieved_ratio"]

    @property
    def params_before(self) -> int:
        return self.summary["params_before"]

    @property
    def params_after(self) -> int:
        return self.summary["params_after"]


def prune(model: nn.Module, tokenizer, calibration_texts: Sequence[str], *, criterion: str = "obs",
          ratio: float = 0.2, params: Params | Mapping[str, Any] | str | Path | None = None,
          servable: bool = False, device: torch.device | str | None = None) -> PruneResult:
    """Prune `model` in place: `ratio` of all its parameters removed by `criterion`, what stays re-fitted.

    Calibration windows come from `calibration_texts` (a list of texts, e.g. a training file's lines);
    settings from `params` (see `resolve_params`). As in the pipeline, activations and scores are taken
    in `runtime.dtype` (a temporary copy when it differs from the model's) and the surgery in float32;
    the model ends in the dtype it came in. `servable=True` prunes every layer to one width (a vanilla
    config). Save with `pruneflow.save_pruned`.
    """
    from pruneflow.runtime import resolve_device, resolve_dtype

    settings = resolve_params(params)
    scorer = check_prunable(model, criterion, ratio, settings, servable)
    target = resolve_device(str(device) if device is not None else settings.runtime.device)
    work_dtype = resolve_dtype(settings.runtime.dtype, target)
    came_as = next(model.parameters()).dtype
    was_training = model.training
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}  # gradient criteria reset them
    model.eval()
    try:
        return _prune_in_place(model, tokenizer, calibration_texts, scorer, criterion, ratio, settings, servable,
                               target, work_dtype)
    finally:  # refused or done: the caller's model keeps its family's modules, dtype, mode and flags
        from pruneflow.architectures import fuse_projections

        fuse_projections(model)  # Phi-3: fused qkv_proj / gate_up_proj again
        model.to(came_as)
        model.train(was_training)
        for name, param in model.named_parameters():
            param.requires_grad_(trainable.get(name, True))


def _same_device(home: torch.device, target: torch.device) -> bool:
    """Whether weights on `home` are on `target`: `cuda` (the current GPU, as runtime.device resolves it)
    matches the model's `cuda:N` of that GPU."""
    if home.type != target.type:
        return False
    if home.type != "cuda" or (home.index is not None and target.index is not None):
        return home.index == target.index
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (home.index if home.index is not None else current) == (target.index if target.index is not None
                                                                   else current)


def _prune_in_place(model: nn.Module, tokenizer, calibration_texts: Sequence[str], scorer: Importance,
                    criterion: str, ratio: float, settings: Params, servable: bool, target: torch.device,
                    work_dtype: torch.dtype) -> PruneResult:
    """`prune`'s work on a model in eval mode (prune restores what it changes)."""
    from pruneflow.activations import activation_statistics
    from pruneflow.importance import score_groups
    from pruneflow.layerwise import (
        ResidentWeights,
        choose_execution,
        dtype_remedy,
        gradients_of,
        refit_grams,
        weight_bytes,
    )
    from pruneflow.surgery import prune_scored

    came_as = next(model.parameters()).dtype
    home = next(model.parameters()).device
    ids = calibration_windows(calibration_texts, tokenizer, settings)
    reconstruct = settings.prune.reconstruction != "none"
    # a model too big for `target` stays where it is and its layers visit the device one at a time
    # a model on `target` in the working dtype is there already: its weights count as free memory there
    on_device = weight_bytes(model, came_as) if _same_device(home, target) and work_dtype == came_as else 0
    cached_grams = settings.activations.gram_matrices and (scorer.needs_activations or reconstruct)
    grams = "saved" if cached_grams else refit_grams(settings.prune, cached=False)
    execution = choose_execution(settings.runtime.execution, model, work_dtype, target, tokens=ids.numel(),
                                 gradients=gradients_of(scorer), grams=grams, on_device=on_device,
                                 what=f"pruneflow.prune with {criterion}",
                                 remedies=["fewer calibration tokens (calibration.num_samples, calibration_texts)",
                                           *dtype_remedy(work_dtype)])
    layer_weights = ResidentWeights(home) if execution == "layer_by_layer" else None
    with torch.no_grad():
        working = model if layer_weights is not None else model.to(target)
        if work_dtype != came_as:  # measure in runtime.dtype, as the pipeline's stages load the model
            working = copy.deepcopy(model).to(work_dtype)
    activations = None
    if scorer.needs_activations or reconstruct:
        log.info("activation statistics on %d x %d calibration tokens", *ids.shape)
        activations = activation_statistics(working, ids, settings, target, layer_weights=layer_weights)
    log.info("scoring groups with %s", criterion)
    scores = score_groups(working, criterion, ids, activations, settings, target, work_dtype,
                          layer_weights=layer_weights)
    scores.metadata.setdefault("criterion", criterion)
    del working
    model.float()  # exact surgery and solves, as the prune stage does
    log.info("pruning %.3g of the parameters", float(ratio))
    summary = prune_scored(model, scores, float(ratio), settings, calibration_ids=ids, activations=activations,
                           servable=servable, device=target, layer_weights=layer_weights)
    return PruneResult(summary=summary, scores=scores)
