"""Weight reconstruction after structural removal: the least-squares core and the structured-OBS order.

A pruned layer loses input columns of its output projections (o_proj: the removed query heads'
columns; down_proj: the removed FFN channels). With X the projection's input over the calibration
tokens (d_in x N) and G = X X^T its Gram matrix, the kept columns S can be re-fitted so the layer's
output stays close to the dense one:

    W~_S = argmin ||W X - W~_S X_S||^2 + lam ||W~_S - W_S||^2
         = W_S + W_M G[M, S] (G[S, S] + lam I)^-1          (M: the removed columns)

The ridge term pulls the new weights towards the old ones (not towards zero), so lam -> infinity is
plain pruning and lam -> 0 the exact least-squares refit. This is the optimal update of structured
OBS (ZipLM, SlimGPT) with the damped Hessian H = G + lam I, and with a constant input appended it
contains FLAP's bias compensation (`intercept=True`: the bias absorbs the removed columns' mean and the
kept columns are fitted on centred inputs). lam = damping x mean(diag G).

No library does this on a Gram matrix with structured (grouped) columns, so it is written here, in
float64 throughout (Gram matrices are accumulated in float64 too; see `GramAccumulator`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pruneflow import layerwise
from pruneflow.architectures import decoder_layers
from pruneflow.architectures import layer_shape as layer_shape_of
from pruneflow.config import BIAS_RECONSTRUCTIONS, RECONSTRUCTION_MODES, RECONSTRUCTIONS
from pruneflow.gram import (
    PROJECTIONS,
    GramAccumulator,
    StopForward,
    gram_matrices,
    projection_of,
)
from pruneflow.layerwise import InPlace, LayerWeights


def damping_value(gram: torch.Tensor, damping: float) -> float:
    """lam = damping x the mean diagonal of G (scale-free; a zero Gram matrix gets lam = damping)."""
    mean_diag = float(torch.diagonal(gram).mean()) if gram.numel() else 0.0
    return damping * mean_diag if mean_diag > 0 else damping


def ridge_refit(weight: torch.Tensor, gram: torch.Tensor, keep: Sequence[int] | torch.Tensor, damping: float,
                *, bias: torch.Tensor | None = None, input_sum: torch.Tensor | None = None,
                num_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Re-fit `weight` (d_out x d_in) on the kept input columns; return (new weight d_out x |keep|, new bias).

    With `input_sum` and `num_tokens` (the inputs' column sums and count) an intercept is fitted as
    well: the returned bias replaces `bias` (zero when None). Without them the bias is returned as
    given (None stays None).
    """
    keep = torch.as_tensor(keep, dtype=torch.long)
    w = weight.detach().double()
    g = gram.detach().double()
    d_in = w.shape[1]
    if g.shape != (d_in, d_in):
        raise ValueError(f"Gram matrix of shape {tuple(g.shape)} does not match a weight with {d_in} inputs")
    lam = damping_value(g, damping)
    removed_mask = torch.ones(d_in, dtype=torch.bool)
    removed_mask[keep] = False
    removed = torch.nonzero(removed_mask).flatten()
    intercept = input_sum is not None
    if intercept:
        if num_tokens is None or num_tokens <= 0:
            raise ValueError("an intercept needs num_tokens > 0 with input_sum")
        s = input_sum.detach().double().reshape(-1, 1)
        g = torch.cat([torch.cat([g, s], 1), torch.cat([s.T, torch.tensor([[float(num_tokens)]], dtype=g.dtype)], 1)])
        b = torch.zeros(w.shape[0], dtype=w.dtype) if bias is None else bias.detach().double()
        w = torch.cat([w, b.reshape(-1, 1)], 1)
        keep = torch.cat([keep, torch.tensor([d_in])])
    if not len(removed):
        new = w[:, keep]
    else:
        g_kk = g[keep][:, keep].clone()
        ridge = torch.full((len(keep),), lam, dtype=g.dtype)
        if intercept:
            ridge[-1] = 0.0  # the constant input is not damped
        g_kk.diagonal().add_(ridge)
        cross = w[:, removed] @ g[removed][:, keep]  # d_out x |keep|
        update = torch.linalg.solve(g_kk, cross.T).T  # solve on the right: cross @ g_kk^-1 (g_kk symmetric)
        new = w[:, keep] + update
    if intercept:
        return new[:, :-1].contiguous(), new[:, -1].contiguous()
    return new.contiguous(), None if bias is None else bias.detach().double()


@dataclass(frozen=True)
class ObsOrder:
    """Greedy structured-OBS removal order of a layer's units and the output error each step adds."""

    order: list[int]  # unit indices, first removed first
    errors: list[float]  # errors[k]: squared output error added by removing order[k] (after the updates)


def obs_removal_order(weight: torch.Tensor, gram: torch.Tensor, units: Sequence[Sequence[int]],
                      damping: float) -> ObsOrder:
    """Remove units one at a time, each time the one whose removal (with the optimal update of the
    remaining columns) adds the least output error: dE_M = tr(W_M (Hinv[M, M])^-1 W_M^T).

    `units[u]` lists the input columns unit u owns (one FFN channel, or a head's / KV group's columns).
    Every unit is ordered (the last one too), so a score can be read for each.
    """
    w = weight.detach().double().clone()
    g = gram.detach().double()
    lam = damping_value(g, damping)
    h = g.clone()
    h.diagonal().add_(lam)
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    columns = [torch.as_tensor(list(u), dtype=torch.long, device=w.device) for u in units]
    order: list[int] = []
    errors: list[float] = []
    if all(len(c) == 1 for c in columns):
        return _obs_single_columns(w, h_inv, torch.cat(columns))
    remaining = list(range(len(columns)))
    while remaining:
        cost, unit = float("inf"), remaining[0]
        for u in remaining:
            m = columns[u]
            value = float(torch.einsum("ij,jk,ik->", w[:, m], torch.linalg.inv(h_inv[m][:, m]), w[:, m]))
            if value < cost:
                cost, unit = value, u
        m = columns[unit]
        block_inv = torch.linalg.inv(h_inv[m][:, m])
        rows = h_inv[m]  # |m| x d_in
        w -= w[:, m] @ block_inv @ rows
        h_inv -= rows.T @ block_inv @ rows
        w[:, m] = 0.0
        h_inv[m, :] = 0.0
        h_inv[:, m] = 0.0
        remaining.remove(unit)
        order.append(unit)
        errors.append(max(cost, 0.0))
    return ObsOrder(order=order, errors=errors)


OBS_MAX_STEPS = 128  # one-column units are removed in at most this many batched steps (SlimGPT-style)


@torch.no_grad()
def _obs_single_columns(w: torch.Tensor, h_inv: torch.Tensor, unit_columns: torch.Tensor) -> ObsOrder:
    """Greedy OBS when every unit is one column (FFN channels), batched as SlimGPT does: each step
    removes the ceil(n / OBS_MAX_STEPS) cheapest units together with their exact joint update (one
    matrix product instead of that many rank-1 updates), and the removed columns are dropped from
    W and Hinv as they go (exact: what is left of Hinv is the inverse of H on the remaining columns).
    With at most OBS_MAX_STEPS units every step removes one: the exact greedy order."""
    wt = w.T.contiguous()  # one row per input column: contiguous reductions
    alive_units = torch.arange(len(unit_columns), device=w.device)
    positions = unit_columns.clone()  # current row of wt / h_inv of each alive unit
    batch = max(1, math.ceil(len(unit_columns) / OBS_MAX_STEPS))
    order: list[int] = []
    errors: list[float] = []
    while len(alive_units):
        costs = wt[positions].pow(2).sum(1) / torch.diagonal(h_inv)[positions]
        count = min(batch, len(alive_units))
        chosen_costs, chosen = torch.topk(costs, count, largest=False, sorted=True)
        order += alive_units[chosen].tolist()
        errors += [max(c, 0.0) for c in chosen_costs.tolist()]
        rows_index = positions[chosen]
        block_inv = torch.linalg.inv(h_inv[rows_index][:, rows_index])
        rows = h_inv[rows_index]  # count x d
        wt -= rows.T @ (block_inv @ wt[rows_index])
        h_inv -= rows.T @ (block_inv @ rows)
        kept = torch.ones(h_inv.shape[0], dtype=torch.bool, device=w.device)
        kept[rows_index] = False
        new_index = torch.cumsum(kept, 0) - 1
        wt, h_inv = wt[kept], h_inv[kept][:, kept]
        alive = torch.ones(len(alive_units), dtype=torch.bool, device=w.device)
        alive[chosen] = False
        alive_units, positions = alive_units[alive], new_index[positions[alive]]
    return ObsOrder(order=order, errors=errors)


def scores_from_order(result: ObsOrder, num_units: int) -> torch.Tensor:
    """Per-unit scores whose ascending order is the greedy order: the running maximum of the errors
    (a later unit never scores below an earlier one), so the planner removes the greedy prefix."""
    scores = torch.empty(num_units, dtype=torch.float64)
    previous = -math.inf
    for unit, error in zip(result.order, result.errors, strict=True):
        previous = max(error, math.nextafter(previous, math.inf))  # strictly increasing: no ties to reorder
        scores[unit] = previous
    return scores


# ---- model level: collect the Gram matrices, re-fit, remove ----

METHODS = RECONSTRUCTIONS
MODES = RECONSTRUCTION_MODES


@dataclass
class LayerRefit:
    """A projection's new kept-column weights (full width: removed columns untouched), its new bias
    (None: no bias is added) and the relative output error on calibration tokens before/after."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    error_pruned: float
    error_refit: float


def _relative_error(weight: torch.Tensor, new_full: torch.Tensor, bias_delta: torch.Tensor | None,
                    acc: GramAccumulator) -> float:
    """||W X - (W~ X + b)||^2 / ||W X||^2 from the Gram matrix (W~ zero on removed columns)."""
    w = weight.double()
    diff = w - new_full
    g = acc.gram
    error = torch.einsum("ij,jk,ik->", diff, g, diff)
    if bias_delta is not None:
        error = error - 2 * bias_delta @ (diff @ acc.total) + acc.count * bias_delta.pow(2).sum()
    reference = torch.einsum("ij,jk,ik->", w, g, w)
    return float(error / reference) if reference > 0 else 0.0


def refit_projection(linear: nn.Linear, acc: GramAccumulator, removed: torch.Tensor, method: str,
                     damping: float) -> LayerRefit:
    """The new weights (and bias) of one projection that loses input columns `removed`."""
    weight = linear.weight.detach().double().cpu()
    d_in = weight.shape[1]
    keep_mask = torch.ones(d_in, dtype=torch.bool)
    keep_mask[removed] = False
    keep = torch.nonzero(keep_mask).flatten()
    gram = acc.gram.cpu()
    total = acc.total.cpu()
    acc_cpu = GramAccumulator()
    acc_cpu.gram, acc_cpu.total, acc_cpu.count = gram, total, acc.count
    pruned = weight.clone()
    pruned[:, removed] = 0.0
    bias = None
    new = pruned.clone()
    if method == "bias":
        bias = weight[:, removed] @ (total[removed] / acc.count)
    elif method in ("least_squares", "least_squares_bias"):
        intercept = method == "least_squares_bias"
        kept_weight, fitted_bias = ridge_refit(weight, gram, keep, damping,
                                               input_sum=total if intercept else None,
                                               num_tokens=acc.count if intercept else None)
        new[:, keep] = kept_weight
        bias = fitted_bias if intercept else None
    elif method != "none":
        raise ValueError(f"reconstruction method {method!r}; allowed: {', '.join(METHODS)}")
    return LayerRefit(
        weight=new, bias=bias,
        error_pruned=_relative_error(weight, pruned, None, acc_cpu),
        error_refit=_relative_error(weight, new, bias, acc_cpu),
    )


@dataclass
class ReconstructionResult:
    """What the prune stage records: parameters removed (measured) and per-projection errors."""

    params_removed: int
    params_added: int
    errors: list[dict] = field(default_factory=list)  # {layer, projection, error_pruned, error_refit}

    def mean_errors(self) -> dict[str, float]:
        out = {}
        for projection in PROJECTIONS:
            rows = [e for e in self.errors if e["projection"] == projection]
            for key in ("error_pruned", "error_refit"):
                out[f"{projection}_{key}"] = sum(r[key] for r in rows) / len(rows) if rows else 0.0
        return out


def _removed_columns(plan, layer_index: int, projection: str, size: int) -> torch.Tensor:
    if projection == "o_proj":
        heads = plan.removed_query_heads[layer_index]
        if not heads:
            return torch.empty(0, dtype=torch.long)
        return torch.cat([torch.arange(h * size, (h + 1) * size) for h in heads])
    return torch.tensor(plan.removed_ffn_channels[layer_index], dtype=torch.long)


def _write_kept(linear: nn.Linear, refit: LayerRefit) -> None:
    with torch.no_grad():
        linear.weight.copy_(refit.weight.to(linear.weight.device, linear.weight.dtype))


def prune_and_reconstruct(model: nn.Module, plan, *, method: str, mode: str, damping: float,
                          calibration_ids: torch.Tensor | None, batch_size: int,
                          device: torch.device | str = "cpu",
                          activations: Mapping[str, torch.Tensor] | None = None,
                          layer_weights: LayerWeights | None = None) -> ReconstructionResult:
    """Apply `plan` in place, re-fitting o_proj / down_proj of every pruned layer by `method`.

    parallel: every layer is re-fitted on the dense model's inputs (the activation cache's Gram
    matrices, or one forward pass when it holds none);
    sequential: layer by layer from the bottom, each on the inputs the already pruned and re-fitted
    layers below produce (attention before the MLP of the same layer, whose input it changes).
    Biases (methods `bias`, `least_squares_bias`) are switched on in the config at the end.
    With `layer_weights` (`pruneflow.layerwise`) the forward passes bring one layer at a time to `device`.
    """
    from pruneflow.architectures import count_parameters, head_dim
    from pruneflow.checkpoint import record_layer_shapes
    from pruneflow.pruning import add_compensation_biases, apply_pruning, check_bias_compensation

    if method not in METHODS:
        raise ValueError(f"reconstruction method {method!r}; allowed: {', '.join(METHODS)}")
    if mode not in MODES:
        raise ValueError(f"reconstruction mode {mode!r}; allowed: {', '.join(MODES)}")
    if method == "none":
        return ReconstructionResult(params_removed=apply_pruning(model, plan), params_added=0)
    adds_bias = method in BIAS_RECONSTRUCTIONS
    if adds_bias:
        check_bias_compensation(getattr(model.config, "model_type", None), f"prune.reconstruction={method!r}")
    if calibration_ids is None and mode == "sequential":
        raise ValueError(f"sequential reconstruction {method!r} needs calibration ids")
    size = head_dim(model)
    blocks = decoder_layers(model)
    targets = [(i, p) for i in plan.layers for p in PROJECTIONS if len(_removed_columns(plan, i, p, size))]
    result = ReconstructionResult(params_removed=0, params_added=0)
    biases: dict[tuple[int, str], torch.Tensor] = {}

    def record(target: tuple[int, str], refit: LayerRefit) -> None:
        result.errors.append({"layer": target[0], "projection": target[1],
                              "error_pruned": refit.error_pruned, "error_refit": refit.error_refit})
        if refit.bias is not None:
            biases[target] = refit.bias

    if mode == "parallel":
        def refit_target(target: tuple[int, str], acc: GramAccumulator) -> None:
            linear = projection_of(blocks[target[0]], target[1])
            refit = refit_projection(linear, acc, _removed_columns(plan, target[0], target[1], size), method, damping)
            _write_kept(linear, refit)
            record(target, refit)

        # each layer re-fitted once its Gram matrices are complete (layer by layer: as soon as it has run)
        gram_matrices(model, targets, activations=activations, calibration_ids=calibration_ids,
                      batch_size=batch_size, device=device, layer_weights=layer_weights, consume=refit_target)
        result.params_removed = apply_pruning(model, plan)
    else:
        _sequential(model, plan, method, damping, calibration_ids, batch_size, device, size, record, biases,
                    layer_weights)
        record_layer_shapes(model)
        result.params_removed = plan.params_before - count_parameters(model)
        if result.params_removed != plan.expected_params_removed:
            raise RuntimeError(f"pruning removed {result.params_removed:,} parameters but the plan predicted "
                               f"{plan.expected_params_removed:,}")
    if adds_bias:
        deltas = {}
        for i in plan.layers:
            o_bias = biases.get((i, "o_proj"))
            down_bias = biases.get((i, "down_proj"))
            hidden = projection_of(blocks[i], 'o_proj').out_features
            deltas[i] = (o_bias if o_bias is not None else torch.zeros(hidden, dtype=torch.float64),
                         down_bias if down_bias is not None else torch.zeros(hidden, dtype=torch.float64))
        result.params_added = add_compensation_biases(model, deltas)
    return result


def _run_layer(layer: nn.Module, batches: list[tuple[torch.Tensor, dict]], stop_at: nn.Module | None,
               acc: GramAccumulator | None) -> list[torch.Tensor]:
    """Run one decoder layer on cached inputs; with `stop_at`, feed its input to `acc` and stop there."""
    outputs = []
    handle = None
    if stop_at is not None:
        def hook(_module: nn.Module, args: tuple) -> None:
            acc.add(args[0])
            raise StopForward

        handle = stop_at.register_forward_pre_hook(hook)
    try:
        for hidden, kwargs in batches:
            with contextlib.suppress(StopForward):
                out = layer(hidden, **kwargs)
                outputs.append(out[0] if isinstance(out, tuple) else out)
    finally:
        if handle is not None:
            handle.remove()
    return outputs


@torch.no_grad()
def _sequential(model, plan, method, damping, calibration_ids, batch_size, device, size, record, biases,
                layer_weights: LayerWeights | None) -> None:
    """Bottom-up: each layer's projections are re-fitted on the inputs the pruned layers below give.

    The inputs of the lowest pruned layer come from the layers below it run one at a time on each
    layer's own keyword arguments (mask and rotary table: Gemma's local and global layers differ), the
    same code whether the model is on the device or its layers visit it (`layer_weights`)."""
    layers = sorted(plan.layers)
    weights = layer_weights if layer_weights is not None else InPlace()
    with layerwise.outside_on(model, weights, device):
        inputs = layerwise.capture_inputs(model, calibration_ids, batch_size=batch_size, device=device)
        hidden = layerwise.run_layers(model, inputs, weights, device, layers=range(layers[0]))
        _refit_bottom_up(decoder_layers(model), plan, method, damping, size, record, biases, hidden,
                         dict(enumerate(inputs.arguments)), weights, device)


def _refit_bottom_up(blocks, plan, method, damping, size, record, biases, hidden: list[torch.Tensor],
                     arguments: Mapping[int, list[dict]], weights: LayerWeights,
                     device: torch.device | str | None = None) -> None:
    from pruneflow.pruning import prune_layer

    layers = sorted(plan.layers)
    batches = list(zip(hidden, arguments[layers[0]], strict=True))
    hidden.clear()  # consumed: the callers' list would otherwise keep the lowest layer's inputs alive throughout
    hooks = []
    try:
        for i in range(layers[0], layers[-1] + 1):
            block = blocks[i]
            weights.load(i, block, device)
            try:
                if i in plan.layers:
                    for projection in PROJECTIONS:
                        removed = _removed_columns(plan, i, projection, size)
                        if len(removed):
                            acc = GramAccumulator()
                            _run_layer(block, batches, projection_of(block, projection), acc)
                            refit = refit_projection(projection_of(block, projection), acc, removed, method, damping)
                            _write_kept(projection_of(block, projection), refit)
                            record((i, projection), refit)
                        shape = layer_shape_of(block, size)
                        if projection == "o_proj":
                            prune_layer(block, plan.kept_attention_groups[i], plan.kept_query_heads[i],
                                        range(shape.intermediate_size), size)
                        else:
                            prune_layer(block, range(shape.num_key_value_heads), range(shape.num_attention_heads),
                                        plan.kept_ffn_channels[i], size)
                        if (i, projection) in biases:  # what follows must see the bias the checkpoint will hold
                            bias = biases[(i, projection)]
                            hooks.append(projection_of(block, projection).register_forward_hook(
                                lambda _m, _a, out, b=bias: out + b.to(out.device, out.dtype)))
                if i < layers[-1]:
                    outputs = _run_layer(block, batches, None, None)
                    batches = list(zip(outputs, arguments[i + 1], strict=True))  # the next layer's own mask and rope
            finally:
                weights.unload(i, block)
    finally:
        for hook in hooks:
            hook.remove()
