"""Mutual-information redundancy criterion (arXiv 2406.00030).

Two FFN neurons whose activations carry the same information about the calibration tokens are
redundant: one of them can go. The mutual information is estimated without densities, with the
matrix-based Renyi alpha-order entropy over n sampled tokens:

    K_ij = exp(-||z_i - z_j||^2 / (2 sigma^2)),   A = K / tr(K),
    S_a(A) = log2(tr(A^a)) / (1 - a),
    I(Z_k; Z_l) = S_a(A_k) + S_a(A_l) - S_a(A_k o A_l / tr(A_k o A_l))      (o: Hadamard product)

all in bits. A KV group is one multivariate variable (the o_proj inputs of all its query heads);
the kernel works on the vectors directly.

The paper prunes one neuron of each sampled pair whose MI exceeds a threshold until the target
ratio is reached. The pruner here picks the count itself, so the procedure is turned into a full
removal order per layer (`redundancy_order`): repeatedly take the remaining pair with the highest
MI (above the threshold, if one is set), remove its lower-energy member (energy = sum of squares
over all cached tokens), drop that member from all pairs; when no such pair is left, the rest follow
by ascending energy. The score of a unit is its position in that order (0 = removed first), so
lower scores are removed first as the pruner expects. Positions do not compare across layers.

For alpha = 2 all pairs have a closed form: with a Gaussian kernel diag(K) = 1, so tr(K) = n,
tr(A_k o A_l) = 1/n and tr(A_kl^2) = sum_ij K_k,ij^2 K_l,ij^2 / n^2, which for all pairs is one
Gram matrix F F^T of the squared kernels F = [N, n(n-1)/2] (upper triangles, the diagonal adds n).
Any other alpha needs an eigendecomposition (or matrix power, for integer alpha) of every joint
matrix, O(n^3) per pair; it is therefore only offered over sampled pairs (`pairs_per_neuron`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from pruneflow.architectures import decoder_layers, head_dim, layer_shape
from pruneflow.criteria import BANDWIDTH_RULES, check_mutual_information_settings
from pruneflow.errors import ConfigError, DataError
from pruneflow.importance.base import GroupScores, ScoringInputs
from pruneflow.progress import progress

# working memory of one block of squared kernels / joint matrices (bounds the peak, CPU or GPU)
DEFAULT_MEMORY_BYTES = 512 * 2**20
# kernel entries below exp(-20) ~ 2e-9 are set to 0: their squares' products would be float32
# denormals (very slow on CPUs); the traces change by < 1e-17 relative
KERNEL_CUTOFF = 20.0
# 1 / sigma^2 beyond this is clamped, so a constant variable (sigma = 0) gets an all-ones kernel
_MAX_INV_SIGMA_SQ = 1e30


def _as_variables(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, n] (scalar variables) or [N, n, d] -> [N, n, d] in `dtype`."""
    if x.dim() == 2:
        x = x.unsqueeze(-1)
    if x.dim() != 3:
        raise ValueError(f"variables must be [N, n] or [N, n, d], got shape {tuple(x.shape)}")
    return x.to(dtype)


def _check_alpha(alpha: float) -> None:
    if not (alpha > 0 and alpha != 1 and math.isfinite(alpha)):
        raise ValueError(f"alpha={alpha!r} is not allowed; allowed: a finite number > 0 and != 1")


def _sq_distances(x: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between the tokens of each variable: [c, n, d] -> [c, n, n]."""
    if x.shape[-1] == 1:
        v = x[..., 0]
        return (v.unsqueeze(2) - v.unsqueeze(1)).square_()
    sq = x.square().sum(-1)
    dist = (sq.unsqueeze(2) + sq.unsqueeze(1)).sub_(torch.bmm(x, x.transpose(1, 2)), alpha=2).clamp_min_(0)
    dist.diagonal(dim1=1, dim2=2).zero_()
    return dist


def _sq_distances_upper(x: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """The strict upper triangles of `_sq_distances` (index pairs `upper` [2, P]): [c, P]."""
    if x.shape[-1] == 1:
        v = x[..., 0]
        return (v[:, upper[0]] - v[:, upper[1]]).square_()
    return _sq_distances(x)[:, upper[0], upper[1]]


def _gaussian(sq_dist: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """exp(-d^2 / (2 sigma^2)) per variable (first axis); in float32 entries below
    exp(-KERNEL_CUTOFF) -> 0."""
    inv = (0.5 / sigma.double().square()).clamp(max=_MAX_INV_SIGMA_SQ).to(sq_dist.dtype)
    z = sq_dist.mul_(inv.view(-1, *([1] * (sq_dist.dim() - 1))))
    if sq_dist.dtype != torch.float32:
        return z.neg_().exp_()
    far = z >= KERNEL_CUTOFF
    return z.clamp_max_(KERNEL_CUTOFF).neg_().exp_().masked_fill_(far, 0.0)


def _rows_per_block(bytes_per_row: int, memory_bytes: int) -> int:
    return max(1, memory_bytes // max(1, bytes_per_row))


def bandwidths(x: torch.Tensor, rule: str = "silverman", scale: float = 1.0, *,
               memory_bytes: int = DEFAULT_MEMORY_BYTES) -> torch.Tensor:
    """Kernel width per variable, from the variable's own spread ([N, n(, d)] -> [N], x's device).

    "silverman": 1.06 * s * n^(-1/5), s = the standard deviation; for a vector s = sqrt(sum of its
    features' variances), so the width grows with the distances (~ sqrt(d)) instead of collapsing
    every off-diagonal kernel entry to 0 as the per-feature multivariate rule does for large d.
    "median": the median pairwise token distance (the mean where the median is 0, e.g. for a
    mostly-constant neuron). Either is multiplied by `scale`. A constant variable gets 0, which
    gives an all-ones kernel (entropy 0).
    """
    x = _as_variables(x)
    num, n, _ = x.shape
    if rule == "silverman":
        spread = x.var(dim=1, correction=1).sum(-1).sqrt() if n > 1 else x.new_zeros(num)
        sigma = 1.06 * spread * n ** -0.2
    elif rule == "median":
        upper = torch.triu_indices(n, n, 1, device=x.device)
        rows = _rows_per_block(4 * (3 * upper.shape[1] + 2 * n * n), memory_bytes)
        parts = []
        for lo in range(0, num, rows):
            dist = _sq_distances_upper(x[lo:lo + rows], upper).sqrt_()
            median = dist.median(dim=1).values
            parts.append(torch.where(median > 0, median, dist.mean(dim=1)))
        sigma = torch.cat(parts) if parts else x.new_zeros(0)
    else:
        raise ValueError(f"bandwidth rule {rule!r} is not allowed; allowed: {', '.join(BANDWIDTH_RULES)}")
    return sigma * scale


def gram_matrices(x: torch.Tensor, sigma: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unit-trace Gaussian Gram matrices A = K / tr(K) of each variable: [N, n(, d)] -> [N, n, n]."""
    x = _as_variables(x, dtype)
    kernel = _gaussian(_sq_distances(x), sigma.to(x.device))
    return kernel / kernel.diagonal(dim1=1, dim2=2).sum(-1).view(-1, 1, 1)


def renyi_entropy(a: torch.Tensor, alpha: float) -> torch.Tensor:
    """S_alpha(A) = log2(tr(A^alpha)) / (1 - alpha) in bits of unit-trace PSD matrices [..., n, n].

    alpha = 2: tr(A^2) = sum of squared entries; other integers: matrix powers; otherwise the
    eigenvalues (negative round-off clamped to 0). Computed in float64.
    """
    _check_alpha(alpha)
    a = a.double()
    if alpha == 2:
        power_trace = a.square().sum((-2, -1))
    elif float(alpha).is_integer():
        power_trace = torch.linalg.matrix_power(a, int(alpha)).diagonal(dim1=-2, dim2=-1).sum(-1)
    else:
        power_trace = torch.linalg.eigvalsh(a).clamp_min(0).pow(alpha).sum(-1)
    return torch.log2(power_trace) / (1 - alpha)


def sample_pairs(num_variables: int, per_variable: int, generator: torch.Generator) -> torch.Tensor:
    """`per_variable` distinct random partners for every variable, as unique pairs [P, 2] with k < l.

    Pairs are unordered (k, l) = (l, k) counted once, so MI is computed once and is symmetric.
    With per_variable >= num_variables - 1 this is every pair.
    """
    per = min(per_variable, num_variables - 1)
    if per <= 0:
        return torch.zeros(0, 2, dtype=torch.long)
    if per == num_variables - 1:
        return torch.triu_indices(num_variables, num_variables, 1).T.contiguous()
    parts = []
    rows = max(1, (16 * 2**20) // (4 * num_variables))
    for lo in range(0, num_variables, rows):
        hi = min(num_variables, lo + rows)
        keys = torch.rand(hi - lo, num_variables, generator=generator)
        keys[torch.arange(hi - lo), torch.arange(lo, hi)] = 2.0  # never its own partner
        partners = keys.topk(per, dim=1, largest=False).indices
        parts.append(torch.stack([torch.arange(lo, hi).repeat_interleave(per), partners.reshape(-1)], 1))
    return torch.unique(torch.cat(parts).sort(dim=1).values, dim=0)


def pairwise_mutual_information(x: torch.Tensor, sigma: torch.Tensor, *, alpha: float = 2.0,
                                pairs: torch.Tensor | None = None,
                                memory_bytes: int = DEFAULT_MEMORY_BYTES) -> torch.Tensor:
    """I(X_k; X_l) in bits as a symmetric [N, N] float64 CPU matrix, computed on x's device.

    `pairs` [P, 2] restricts the computation to those pairs (others are NaN); None = every pair,
    which is offered for alpha = 2 only (closed form, one blocked matmul). The diagonal holds the
    estimator's I(X_k; X_k) = 2 S(A_k) - S(A_k o A_k); for continuous data it is below S(A_k)
    (A_k o A_k is the kernel of width sigma / sqrt(2)), equal only for a 0/1 kernel.
    """
    _check_alpha(alpha)
    x = _as_variables(x)
    sigma = sigma.to(x.device)
    num = x.shape[0]
    if pairs is None and alpha != 2:
        raise ValueError("every pair is only offered for alpha=2; pass sampled `pairs` for other alpha")
    if pairs is not None:
        pairs = pairs.reshape(-1, 2).long().cpu()
        if pairs.numel() and (pairs.min() < 0 or pairs.max() >= num):
            raise ValueError(f"pairs index variables outside 0..{num - 1}")
    if alpha == 2:
        mi = _mi_alpha2(x, sigma, pairs, memory_bytes)
    else:
        mi = _mi_general(x, sigma, alpha, pairs, memory_bytes)
    return mi.cpu()


def _mi_alpha2(x: torch.Tensor, sigma: torch.Tensor, pairs: torch.Tensor | None, memory_bytes: int) -> torch.Tensor:
    """alpha = 2 from squared kernels F_k = K_k[i<j]^2: sum_ij K_k^2 K_l^2 = n + 2 <F_k, F_l>."""
    num, n, _ = x.shape
    upper = torch.triu_indices(n, n, 1, device=x.device)
    width = upper.shape[1]
    extra = 2 * n * n if x.shape[-1] > 1 else 0  # full distance matrices for vectors

    def features(index: torch.Tensor | slice) -> torch.Tensor:
        return _gaussian(_sq_distances_upper(x[index], upper), sigma[index]).square_()

    def log_trace(products: torch.Tensor) -> torch.Tensor:
        # log2 of tr(A^2) (marginal, products = sum F_k) or tr(A_kl^2) (joint, products = <F_k, F_l>)
        return torch.log2((n + 2 * products.double()) / (n * n))

    device = x.device
    sums = torch.zeros(num, dtype=torch.float64, device=device)
    if pairs is None:
        rows = min(num, 256, _rows_per_block(4 * (4 * width + extra), memory_bytes))
        bounds = [(lo, min(num, lo + rows)) for lo in range(0, num, rows)]
        cached = [features(slice(lo, hi)) for lo, hi in bounds] if num * width * 4 <= memory_bytes else None
        products = torch.empty(num, num, dtype=torch.float64, device=device)
        for i, (lo, hi) in enumerate(bounds):
            block = cached[i] if cached is not None else features(slice(lo, hi))
            sums[lo:hi] = block.sum(1, dtype=torch.float64)
            for j in range(i, len(bounds)):
                lo2, hi2 = bounds[j]
                other = block if j == i else (cached[j] if cached is not None else features(slice(lo2, hi2)))
                dots = (block @ other.T).double()
                products[lo:hi, lo2:hi2] = dots
                products[lo2:hi2, lo:hi] = dots.T
        marginal = log_trace(sums)
        return log_trace(products) - marginal.unsqueeze(0) - marginal.unsqueeze(1)

    rows = _rows_per_block(4 * (3 * width + extra), memory_bytes)
    for lo in range(0, num, rows):
        sums[lo:lo + rows] = features(slice(lo, lo + rows)).sum(1, dtype=torch.float64)
    marginal = log_trace(sums)
    everything = torch.cat([pairs, torch.arange(num).unsqueeze(1).expand(num, 2)]).to(device)
    batch = _rows_per_block(4 * (7 * width + 2 * extra), memory_bytes)
    mi = torch.full((num, num), float("nan"), dtype=torch.float64, device=device)
    for lo in range(0, everything.shape[0], batch):
        first, second = everything[lo:lo + batch].unbind(1)
        dots = (features(first) * features(second)).sum(1, dtype=torch.float64)
        values = log_trace(dots) - marginal[first] - marginal[second]
        mi[first, second] = values
        mi[second, first] = values
    return mi


def _mi_general(x: torch.Tensor, sigma: torch.Tensor, alpha: float, pairs: torch.Tensor,
                memory_bytes: int) -> torch.Tensor:
    """Any alpha: batched joint matrices, entropies by eigenvalues / matrix powers (O(n^3) each).

    Kernels in float64 here: for alpha < 1 the round-off of float32 kernels in the many tiny
    eigenvalues shifts the entropies by ~1e-4 bits; next to the O(n^3) per pair it costs nothing.
    """
    num, n, _ = x.shape
    x = x.double()
    device = x.device
    rows = _rows_per_block(8 * 4 * n * n, memory_bytes)
    entropy = torch.cat([renyi_entropy(gram_matrices(x[lo:lo + rows], sigma[lo:lo + rows], x.dtype), alpha)
                         for lo in range(0, num, rows)])
    everything = torch.cat([pairs, torch.arange(num).unsqueeze(1).expand(num, 2)]).to(device)
    batch = _rows_per_block(8 * 8 * n * n, memory_bytes)
    mi = torch.full((num, num), float("nan"), dtype=torch.float64, device=device)
    for lo in range(0, everything.shape[0], batch):
        first, second = everything[lo:lo + batch].unbind(1)
        joint = gram_matrices(x[first], sigma[first], x.dtype) * gram_matrices(x[second], sigma[second], x.dtype)
        joint /= joint.diagonal(dim1=1, dim2=2).sum(-1).view(-1, 1, 1)
        values = entropy[first] + entropy[second] - renyi_entropy(joint, alpha)
        mi[first, second] = values
        mi[second, first] = values
    return mi


def redundancy_order(mi: torch.Tensor, energy: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """The removal order [N] of N variables from their MI matrix [N, N] (NaN = pair not computed).

    Repeatedly: the remaining pair with the highest MI (> threshold, if set) loses its lower-energy
    member (equal energy: the higher index), which leaves every pair. Then the unpaired rest, by
    ascending energy. Runs on the CPU: N steps, each O(N) plus re-scanning rows whose best partner
    was just removed.
    """
    m = mi.detach().double().cpu().numpy().copy()
    num = m.shape[0]
    if m.shape != (num, num) or energy.numel() != num:
        raise ValueError(f"mi must be [N, N] and energy [N]; got {tuple(mi.shape)} and {tuple(energy.shape)}")
    e = energy.detach().double().cpu().numpy().reshape(-1)
    invalid = ~np.isfinite(m)
    if threshold is not None:
        invalid |= m <= threshold
    m[invalid] = -np.inf
    m = np.fmax(m, m.T)
    np.fill_diagonal(m, -np.inf)
    alive = np.ones(num, dtype=bool)
    partner = m.argmax(axis=1) if num else np.zeros(0, dtype=np.int64)
    best = m[np.arange(num), partner]
    order: list[int] = []
    while num:
        k = int(best.argmax())
        if best[k] == -np.inf:
            break
        other = int(partner[k])
        victim = k if (e[k], -k) < (e[other], -other) else other
        order.append(victim)
        alive[victim] = False
        m[victim, :] = -np.inf
        m[:, victim] = -np.inf
        best[victim] = -np.inf
        stale = np.flatnonzero(alive & (partner == victim))
        if stale.size:
            partner[stale] = m[stale].argmax(axis=1)
            best[stale] = m[stale, partner[stale]]
    rest = np.flatnonzero(alive)
    order.extend(rest[np.lexsort((-rest, e[rest]))].tolist())
    return torch.as_tensor(order, dtype=torch.long)


def scores_from_order(order: torch.Tensor) -> torch.Tensor:
    """Position in the removal order as a float64 score: the first removed gets 0 (lowest)."""
    scores = torch.empty(order.numel(), dtype=torch.float64)
    scores[order] = torch.arange(order.numel(), dtype=torch.float64)
    return scores


class MutualInformation:
    """Redundancy between FFN channels (and between KV groups / query heads) by mutual information.

    alpha: Renyi order; 2 has the all-pairs closed form, any other needs `pairs_per_neuron`.
    bandwidth / bandwidth_scale: kernel width rule ("silverman" or "median") and its factor.
    max_tokens: cached sample rows used (a seeded subsample, the same rows for every variable of a
    layer since MI compares them token by token); cost grows with max_tokens^2 (alpha 2) or ^3.
    threshold: only pairs with MI above it (bits) count as redundant; None = all pairs.
    pairs_per_neuron: sampled partners per FFN channel (None = all pairs, alpha 2 only); attention
    groups and query heads are few, so all their pairs are always used.
    seed: token subsample and pair sampling (None: the pipeline's seed, `inputs.seed`).
    """

    name: ClassVar[str] = "mutual_information"
    needs_gradients: ClassVar[bool] = False
    needs_activations: ClassVar[bool] = True

    def __init__(self, alpha: float = 2.0, bandwidth: str = "silverman", bandwidth_scale: float = 1.0,
                 max_tokens: int = 256, threshold: float | None = None, pairs_per_neuron: int | None = None,
                 seed: int | None = None, memory_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        check_mutual_information_settings(alpha, bandwidth, bandwidth_scale, max_tokens, threshold, pairs_per_neuron)
        self.alpha = float(alpha)
        self.bandwidth = bandwidth
        self.bandwidth_scale = float(bandwidth_scale)
        self.max_tokens = max_tokens
        self.threshold = None if threshold is None else float(threshold)
        self.pairs_per_neuron = pairs_per_neuron
        self.seed = seed
        self.memory_bytes = memory_bytes

    def metadata(self) -> dict[str, str]:
        return {
            "criterion": self.name,
            "mi_alpha": str(self.alpha),
            "mi_bandwidth": self.bandwidth,
            "mi_bandwidth_scale": str(self.bandwidth_scale),
            "mi_tokens": str(self.max_tokens),
            "mi_threshold": "none" if self.threshold is None else str(self.threshold),
            "mi_pairs_per_neuron": "all" if self.pairs_per_neuron is None else str(self.pairs_per_neuron),
            "mi_seed": str(self.seed),
            "mi_score": "position in the redundancy removal order, 0 = removed first",
        }

    def _order(self, variables: torch.Tensor, energy: torch.Tensor, pairs: torch.Tensor | None) -> torch.Tensor:
        sigma = bandwidths(variables, self.bandwidth, self.bandwidth_scale, memory_bytes=self.memory_bytes)
        if pairs is None and self.alpha != 2:  # few variables (attention): every pair, explicitly
            pairs = sample_pairs(variables.shape[0], variables.shape[0], torch.Generator())
        mi = pairwise_mutual_information(variables, sigma, alpha=self.alpha, pairs=pairs,
                                         memory_bytes=self.memory_bytes)
        return scores_from_order(redundancy_order(mi, energy, self.threshold))

    @torch.no_grad()
    def score(self, model: nn.Module, inputs: ScoringInputs) -> GroupScores:
        if inputs.activations is None:
            raise ConfigError(f"criterion {self.name!r} needs cached activations; run cache_activations and pass "
                              "--activations")
        activations = inputs.activations
        device = torch.device(inputs.device)
        size = head_dim(model)
        generator = torch.Generator().manual_seed(inputs.seed if self.seed is None else self.seed)
        attention, ffn, heads = [], [], []
        layers = decoder_layers(model)
        for index, layer in progress(enumerate(layers), desc="mutual information", total=len(layers), unit="layer"):
            shape = layer_shape(layer, size)
            ffn_sample, ffn_energy = _cached(activations, index, "down_proj_in", shape.intermediate_size)
            att_sample, att_energy = _cached(activations, index, "o_proj_in", shape.num_attention_heads * size)
            rows = _token_subsample(ffn_sample.shape[0], self.max_tokens, generator)
            att_rows = rows if att_sample.shape[0] == ffn_sample.shape[0] else _token_subsample(
                att_sample.shape[0], self.max_tokens, generator)

            channels = ffn_sample[rows].to(device).T.contiguous()  # [channels, tokens]
            pairs = None if self.pairs_per_neuron is None else sample_pairs(
                shape.intermediate_size, self.pairs_per_neuron, generator)
            ffn.append(self._order(channels, ffn_energy, pairs))

            tokens = att_sample[att_rows].to(device)
            per_group = shape.num_attention_heads // shape.num_key_value_heads
            groups = tokens.reshape(-1, shape.num_key_value_heads, per_group * size).permute(1, 0, 2)
            group_energy = att_energy.reshape(shape.num_key_value_heads, -1).sum(1)
            attention.append(self._order(groups, group_energy, None))
            query_heads = tokens.reshape(-1, shape.num_attention_heads, size).permute(1, 0, 2)
            heads.append(self._order(query_heads, att_energy.reshape(shape.num_attention_heads, -1).sum(1), None))
        return GroupScores(attention=attention, ffn=ffn, metadata=self.metadata(), attention_heads=heads)


def _cached(activations: Mapping[str, torch.Tensor], index: int, name: str,
            width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's sampled rows [tokens, width] and per-feature energy [width], checked."""
    sample_key, energy_key = f"layers.{index}.{name}.sample", f"layers.{index}.{name}.sq_sum"
    for key in (sample_key, energy_key):
        if key not in activations:
            raise DataError(f"activation cache lacks {key!r}; rerun cache_activations for this model")
    sample, energy = activations[sample_key], activations[energy_key]
    if sample.dim() != 2 or sample.shape[1] != width or energy.numel() != width:
        raise DataError(
            f"activation cache {sample_key!r} has shape {tuple(sample.shape)} ({energy.numel()} energies) but layer "
            f"{index} has {width} features; it was cached for another model: rerun cache_activations")
    if sample.shape[0] < 2:
        raise DataError(f"activation cache {sample_key!r} has {sample.shape[0]} token rows; mutual information "
                        "needs at least 2: rerun cache_activations with more tokens")
    if not torch.isfinite(sample).all():
        raise DataError(f"activation cache {sample_key!r} contains NaN or inf; rerun cache_activations "
                        "(fp16 is known to overflow: use bfloat16 or float32)")
    return sample.float(), energy.double().reshape(-1)


def _token_subsample(num_rows: int, max_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """At most max_tokens row indices, seeded, sorted (the same rows serve all variables of a layer)."""
    if num_rows <= max_tokens:
        return torch.arange(num_rows)
    return torch.randperm(num_rows, generator=generator)[:max_tokens].sort().values
