"""The mutual-information redundancy criterion: estimator against a plain reference, its properties,
and the scores it gives on a tiny model's real activations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pruneflow.activations import collect_activation_stats
from pruneflow.errors import ConfigError, DataError
from pruneflow.importance.base import ScoringInputs
from pruneflow.importance.mutual_information import (
    MutualInformation,
    bandwidths,
    gram_matrices,
    pairwise_mutual_information,
    redundancy_order,
    renyi_entropy,
    sample_pairs,
    scores_from_order,
)
from pruneflow.tiny_models import tiny_model


def reference_gram(values: np.ndarray, sigma: float) -> np.ndarray:
    values = values.reshape(len(values), -1)
    sq = np.array([[((values[i] - values[j]) ** 2).sum() for j in range(len(values))] for i in range(len(values))])
    kernel = np.exp(-sq / (2 * sigma * sigma))
    return kernel / np.trace(kernel)


def reference_entropy(a: np.ndarray, alpha: float) -> float:
    eigenvalues = np.clip(np.linalg.eigvalsh(a), 0, None)
    return float(np.log2((eigenvalues ** alpha).sum()) / (1 - alpha))


def reference_mi(x: torch.Tensor, sigma: torch.Tensor, alpha: float) -> np.ndarray:
    """Explicit loops over all pairs, explicit Gram matrices, eigenvalues, float64."""
    data, widths = x.double().numpy(), sigma.double().numpy()
    grams = [reference_gram(data[k], widths[k]) for k in range(len(data))]
    entropies = [reference_entropy(a, alpha) for a in grams]
    result = np.zeros((len(data), len(data)))
    for k in range(len(data)):
        for m in range(len(data)):
            joint = grams[k] * grams[m]
            joint /= np.trace(joint)
            result[k, m] = entropies[k] + entropies[m] - reference_entropy(joint, alpha)
    return result


def random_variables(num: int = 10, tokens: int = 32, dims: int | None = None, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (num, tokens) if dims is None else (num, tokens, dims)
    x = torch.randn(shape, generator=generator)
    x[num - 1] = x[1].square()  # dependent, not identical
    x[num // 2] = x[0]  # duplicate
    return x


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def stats(model) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 384, (4, 24), generator=torch.Generator().manual_seed(0))
    return collect_activation_stats(model, ids, batch_size=2, max_tokens=64, seed=0)


def inputs_for(activations) -> ScoringInputs:
    return ScoringInputs(calibration_ids=torch.zeros(1, 1, dtype=torch.long), activations=activations)


@pytest.mark.parametrize("rule", ["silverman", "median"])
def test_alpha2_fast_path_matches_reference(rule):
    x = random_variables()
    sigma = bandwidths(x, rule, 1.3)
    expected = reference_mi(x, sigma, 2.0)
    assert np.abs(pairwise_mutual_information(x, sigma).numpy() - expected).max() < 1e-5
    # blocks that do not fit the memory budget are recomputed instead of cached
    tiny_budget = pairwise_mutual_information(x, sigma, memory_bytes=3 * 4 * 32 * 31 // 2)
    assert np.abs(tiny_budget.numpy() - expected).max() < 1e-5
    # sampled pairs take another code path; every pair listed must give the same numbers
    every = pairwise_mutual_information(x, sigma, pairs=sample_pairs(10, 9, torch.Generator()))
    assert np.abs(every.numpy() - expected).max() < 1e-5


def test_alpha2_vector_variables_match_reference():
    x = random_variables(num=4, tokens=30, dims=6)
    sigma = bandwidths(x, "silverman", 2.0)
    assert np.abs(pairwise_mutual_information(x, sigma).numpy() - reference_mi(x, sigma, 2.0)).max() < 1e-5


@pytest.mark.parametrize("alpha", [1.5, 0.7, 3.0])
def test_other_alpha_on_sampled_pairs_matches_reference(alpha):
    x = random_variables(num=8, tokens=24)
    sigma = bandwidths(x, "median")
    pairs = sample_pairs(8, 3, torch.Generator().manual_seed(1))
    mi = pairwise_mutual_information(x, sigma, alpha=alpha, pairs=pairs)
    computed = ~torch.isnan(mi)
    assert computed.diagonal().all() and computed.sum() == 8 + 2 * len(pairs)
    expected = reference_mi(x, sigma, alpha)
    assert np.abs(mi.numpy()[computed.numpy()] - expected[computed.numpy()]).max() < 1e-5
    with pytest.raises(ValueError, match="alpha=2"):
        pairwise_mutual_information(x, sigma, alpha=alpha)


def test_entropy_matches_eigenvalues_for_every_alpha_path():
    x = random_variables(num=3, tokens=20)
    grams = gram_matrices(x, bandwidths(x))
    assert torch.allclose(grams.diagonal(dim1=1, dim2=2).sum(-1), torch.ones(3))
    for alpha in (2.0, 3.0, 0.5, 1.7):
        expected = [reference_entropy(a, alpha) for a in grams.double().numpy()]
        assert np.allclose(renyi_entropy(grams, alpha).numpy(), expected, atol=1e-9)


def test_mutual_information_properties():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 256, generator=generator)
    x[2] = x[0]
    sigma = bandwidths(x)
    mi = pairwise_mutual_information(x, sigma)
    assert torch.equal(mi, mi.T)
    entropy = renyi_entropy(gram_matrices(x, sigma), 2.0).double()
    # the Hadamard square of a Gaussian kernel is the kernel of width sigma/sqrt(2): I(X;X) <= S(X)
    assert (mi.diagonal() <= entropy + 1e-9).all()
    assert mi[0, 2] == pytest.approx(mi[0, 0].item(), abs=1e-9)
    # independent variables: close to 0 next to the duplicates' MI
    assert 0 <= mi[0, 1] < 0.1 * mi[0, 2]
    # a 0/1 kernel (well separated clusters) is its own Hadamard square: I(X;X) = S(X) exactly
    clusters = (torch.arange(60) % 3).float().mul(100.0).unsqueeze(0)
    ones = torch.ones(1)
    self_information = pairwise_mutual_information(clusters, ones)[0, 0].item()
    assert self_information == pytest.approx(renyi_entropy(gram_matrices(clusters, ones), 2.0).item(), abs=1e-6)
    assert self_information == pytest.approx(np.log2(3), abs=1e-6)


def test_constant_variable_has_no_information():
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    x[1] = 4.0
    for rule in ("silverman", "median"):
        mi = pairwise_mutual_information(x, bandwidths(x, rule))
        assert torch.isfinite(mi).all()
        assert mi[1, 1] == pytest.approx(0.0, abs=1e-6) and mi[0, 1] == pytest.approx(0.0, abs=1e-6)


def test_sample_pairs_are_unique_unordered_and_cover_every_variable():
    pairs = sample_pairs(50, 4, torch.Generator().manual_seed(0))
    assert (pairs[:, 0] < pairs[:, 1]).all()
    assert len(torch.unique(pairs, dim=0)) == len(pairs)
    partners = torch.bincount(pairs.reshape(-1), minlength=50)
    assert (partners >= 4).all()
    assert torch.equal(pairs, sample_pairs(50, 4, torch.Generator().manual_seed(0)))
    assert len(sample_pairs(5, 10, torch.Generator())) == 10


def test_redundancy_order_greedy_then_energy():
    nan = float("nan")
    mi = torch.tensor([
        [0.0, 0.9, 0.1, 0.2, nan],
        [0.9, 0.0, 0.8, 0.1, nan],
        [0.1, 0.8, 0.0, 0.3, nan],
        [0.2, 0.1, 0.3, 0.0, nan],
        [nan, nan, nan, nan, 0.0],
    ], dtype=torch.float64)
    energy = torch.tensor([5.0, 1.0, 2.0, 3.0, 0.5])
    # (0,1): 1 goes; then (2,3) at 0.3: 2 goes; then (0,3) at 0.2: 3 goes; then 0 and 4 unpaired by energy
    assert redundancy_order(mi, energy).tolist() == [1, 2, 3, 4, 0]
    # above a threshold only (0,1) and (1,2) count; 1 goes and no pair is left
    assert redundancy_order(mi, energy, threshold=0.5).tolist() == [1, 4, 2, 3, 0]
    assert scores_from_order(torch.tensor([2, 0, 1])).tolist() == [1.0, 2.0, 0.0]


def test_scores_are_a_removal_order_per_layer(model, stats):
    scores = MutualInformation().score(model, inputs_for(stats))
    assert len(scores.ffn) == len(scores.attention) == len(scores.attention_heads) == 4
    for ffn, attention, heads in zip(scores.ffn, scores.attention, scores.attention_heads, strict=True):
        assert ffn.dtype == torch.float64 and ffn.device.type == "cpu"
        assert torch.equal(ffn.sort().values, torch.arange(96, dtype=torch.float64))
        assert torch.equal(attention.sort().values, torch.arange(2, dtype=torch.float64))
        assert torch.equal(heads.sort().values, torch.arange(4, dtype=torch.float64))
    assert scores.metadata["criterion"] == "mutual_information"
    assert all(isinstance(value, str) for value in scores.metadata.values())


def test_duplicate_neuron_is_removed_first(model, stats):
    for layer, (source, copy) in [(0, (5, 40)), (2, (17, 3))]:
        activations = dict(stats)
        sample = stats[f"layers.{layer}.down_proj_in.sample"].clone()
        sample[:, copy] = sample[:, source]
        activations[f"layers.{layer}.down_proj_in.sample"] = sample
        scores = MutualInformation().score(model, inputs_for(activations)).ffn[layer]
        assert int(scores.argmin()) in (source, copy)


def test_scores_are_deterministic(model, stats):
    for settings in ({}, {"pairs_per_neuron": 5, "max_tokens": 40, "bandwidth": "median"}):
        first = MutualInformation(**settings).score(model, inputs_for(stats))
        again = MutualInformation(**settings).score(model, inputs_for(stats))
        for a, b in zip(first.ffn + first.attention, again.ffn + again.attention, strict=True):
            assert torch.equal(a, b)


def test_non_integer_alpha_scores_with_sampled_pairs(model, stats):
    scores = MutualInformation(alpha=1.5, pairs_per_neuron=3, max_tokens=32, threshold=0.05).score(
        model, inputs_for(stats))
    assert torch.equal(scores.ffn[1].sort().values, torch.arange(96, dtype=torch.float64))
    assert scores.metadata["mi_alpha"] == "1.5"


@pytest.mark.parametrize(("settings", "key"), [
    ({"alpha": 1.0}, "score.mi_alpha"),
    ({"alpha": -2.0}, "score.mi_alpha"),
    ({"alpha": float("nan")}, "score.mi_alpha"),
    ({"bandwidth": "scott"}, "score.mi_bandwidth"),
    ({"bandwidth_scale": 0.0}, "score.mi_bandwidth_scale"),
    ({"max_tokens": 1}, "score.mi_tokens"),
    ({"max_tokens": 2.5}, "score.mi_tokens"),
    ({"threshold": -0.1}, "score.mi_threshold"),
    ({"pairs_per_neuron": 0}, "score.mi_pairs_per_neuron"),
    ({"alpha": 1.5}, "score.mi_pairs_per_neuron"),
])
def test_bad_settings_name_the_key(settings, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + "="):
        MutualInformation(**settings)


def test_missing_activations_are_a_config_error(model):
    with pytest.raises(ConfigError, match="'mutual_information' needs cached activations"):
        MutualInformation().score(model, inputs_for(None))


def test_bad_cache_is_a_data_error(model, stats):
    narrow = dict(stats)
    narrow["layers.1.down_proj_in.sample"] = stats["layers.1.down_proj_in.sample"][:, :90]
    with pytest.raises(DataError, match="rerun cache_activations"):
        MutualInformation().score(model, inputs_for(narrow))
    missing = {k: v for k, v in stats.items() if k != "layers.2.o_proj_in.sample"}
    with pytest.raises(DataError, match="lacks 'layers.2.o_proj_in.sample'"):
        MutualInformation().score(model, inputs_for(missing))
