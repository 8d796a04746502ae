"""Every criterion against a hand computation on the tiny Llama, and the criterion settings."""

from __future__ import annotations

import pytest
import torch

from pruneflow.activations import collect_activation_stats
from pruneflow.config import params_from_mapping
from pruneflow.errors import ConfigError
from pruneflow.importance import CRITERIA, ScoringInputs, get_criterion


def _per_sample_gradients(model, ids):
    grads = []
    for sample in ids.split(1):
        model.zero_grad()
        for param in model.parameters():
            param.requires_grad_(True)
        model(input_ids=sample, labels=sample).loss.backward()
        mlp = model.model.layers[2].mlp
        grads.append({name: getattr(mlp, name).weight.grad.detach().clone() for name in ("gate_proj", "up_proj", "down_proj")})
    model.zero_grad()
    return grads


def test_taylor_element2_matches_manual_fisher(llama, token_ids):
    scores = get_criterion("taylor_element2").score(llama, ScoringInputs(calibration_ids=token_ids))
    grads = _per_sample_gradients(llama, token_ids)
    mlp, channel = llama.model.layers[2].mlp, 7
    manual = 0.0
    for name, index in (("gate_proj", (channel, slice(None))), ("up_proj", (channel, slice(None))),
                        ("down_proj", (slice(None), channel))):
        weight = getattr(mlp, name).weight.detach()[index]
        gradient = torch.stack([g[name][index] for g in grads]).mean(0)
        fisher = torch.stack([g[name][index].pow(2) for g in grads]).mean(0)
        manual += (weight * gradient - 0.5 * weight.pow(2) * fisher).abs().sum()
    torch.testing.assert_close(scores.ffn[2][channel].float(), manual.float(), rtol=1e-4, atol=1e-8)
    assert all(p.grad is None for p in llama.parameters())


def test_taylor_vector_takes_the_absolute_sum_per_matrix(llama, token_ids):
    scores = get_criterion("taylor_vector").score(llama, ScoringInputs(calibration_ids=token_ids))
    llama.zero_grad()
    for param in llama.parameters():
        param.requires_grad_(True)
    llama(input_ids=token_ids, labels=token_ids).loss.backward()
    mlp, channel = llama.model.layers[1].mlp, 3
    manual = (
        (mlp.gate_proj.weight[channel] * mlp.gate_proj.weight.grad[channel]).sum().abs()
        + (mlp.up_proj.weight[channel] * mlp.up_proj.weight.grad[channel]).sum().abs()
        + (mlp.down_proj.weight[:, channel] * mlp.down_proj.weight.grad[:, channel]).sum().abs()
    )
    torch.testing.assert_close(scores.ffn[1][channel].float(), manual.detach().float(), rtol=1e-4, atol=1e-8)
    element1 = get_criterion("taylor_element1").score(llama, ScoringInputs(calibration_ids=token_ids))
    assert (scores.ffn[1] <= element1.ffn[1] + 1e-9).all()  # |sum| <= sum |.|


def test_aggregations_reduce_the_matrices_differently(llama, token_ids):
    inputs = ScoringInputs(calibration_ids=token_ids)
    by_matrix = {}
    for how in ("sum", "product", "max", "last"):
        by_matrix[how] = get_criterion("l1_magnitude", params_from_mapping({"score": {"aggregation": how}}).score
                                       ).score(llama, inputs).ffn[1]
    mlp = llama.model.layers[1].mlp
    gate = mlp.gate_proj.weight.abs().sum(1).double()
    up = mlp.up_proj.weight.abs().sum(1).double()
    down = mlp.down_proj.weight.abs().sum(0).double()
    close = {"rtol": 1e-5, "atol": 1e-7}  # float32 row sums vs double
    torch.testing.assert_close(by_matrix["sum"], gate + up + down, **close)
    torch.testing.assert_close(by_matrix["product"], gate * up * down, **close)
    torch.testing.assert_close(by_matrix["max"], torch.maximum(torch.maximum(gate, up), down), **close)
    torch.testing.assert_close(by_matrix["last"], down, **close)


def test_flap_is_weighted_input_fluctuation(llama, token_ids):
    stats = collect_activation_stats(llama, token_ids, batch_size=2, max_tokens=16, seed=0)
    scores = get_criterion("flap").score(llama, ScoringInputs(calibration_ids=token_ids, activations=stats))
    captured = []
    handle = llama.model.layers[2].mlp.down_proj.register_forward_pre_hook(
        lambda _m, args: captured.append(args[0].detach().reshape(-1, args[0].shape[-1]).double()))
    with torch.no_grad():
        llama(input_ids=token_ids)
    handle.remove()
    x = torch.cat(captured)
    manual = x.var(dim=0, unbiased=False) * llama.model.layers[2].mlp.down_proj.weight.double().pow(2).sum(0)
    torch.testing.assert_close(scores.ffn[2], manual, rtol=1e-6, atol=1e-9)
    heads = scores.attention_heads[2]
    torch.testing.assert_close(scores.attention[2], heads.reshape(2, -1).sum(1))


def test_wanda_sp_is_weight_times_input_norm(llama, token_ids):
    stats = collect_activation_stats(llama, token_ids, batch_size=2, max_tokens=16, seed=0)
    scores = get_criterion("wanda_sp").score(llama, ScoringInputs(calibration_ids=token_ids, activations=stats))
    mlp = llama.model.layers[1].mlp
    norm_in = stats["layers.1.mlp_in.sq_sum"].sqrt()
    norm_down = stats["layers.1.down_proj_in.sq_sum"].sqrt()
    manual = ((mlp.gate_proj.weight.double().abs() * norm_in).sum(1) + (mlp.up_proj.weight.double().abs() * norm_in).sum(1)
              + mlp.down_proj.weight.double().abs().sum(0) * norm_down)
    torch.testing.assert_close(scores.ffn[1], manual)


@pytest.mark.parametrize("name", ["wanda_sp", "flap", "mutual_information"])
def test_activation_criteria_need_the_cache(name, llama, token_ids):
    with pytest.raises(ConfigError, match=f"{name}.*needs cached activations"):
        get_criterion(name).score(llama, ScoringInputs(calibration_ids=token_ids))


def test_every_criterion_is_deterministic(llama, token_ids):
    stats = collect_activation_stats(llama, token_ids, batch_size=2, max_tokens=16, seed=0)
    for name in CRITERIA:
        inputs = ScoringInputs(calibration_ids=token_ids, activations=stats)
        first = get_criterion(name).score(llama, inputs)
        second = get_criterion(name).score(llama, inputs)
        for a, b in zip(first.attention + first.ffn, second.attention + second.ffn, strict=True):
            assert torch.equal(a, b), name


@pytest.mark.parametrize(("key", "value", "message"), [
    ("aggregation", "mean", r"score.aggregation='mean'.*'sum', 'product', 'max', 'last'"),
    ("mi_alpha", 1.0, r"score.mi_alpha"),
    ("mi_bandwidth", "scott", r"score.mi_bandwidth"),
    ("mi_tokens", 1, r"score.mi_tokens"),
])
def test_bad_criterion_settings_are_named(key, value, message):
    with pytest.raises(ConfigError, match=message):
        params_from_mapping({"score": {key: value}})



def test_mi_tokens_beyond_the_cache_are_rejected():
    with pytest.raises(ConfigError, match=r"score.mi_tokens=600.*activations.max_tokens=512"):
        params_from_mapping({"grid": {"criteria": ["mutual_information"], "recovered_criteria": []},
                             "score": {"mi_tokens": 600}})


def test_torch_free_criterion_registry_matches_the_implementations():
    """Config validation reads `pruneflow.criteria` (no torch); scoring reads `pruneflow.importance`."""
    import sys

    from pruneflow.criteria import CRITERIA as INFO
    from pruneflow.importance import AGGREGATED, CRITERIA

    assert list(INFO) == list(CRITERIA)
    for name, cls in CRITERIA.items():
        assert (INFO[name].needs_gradients, INFO[name].needs_activations) == (cls.needs_gradients,
                                                                              cls.needs_activations), name
    assert set(AGGREGATED) == {"l1_magnitude", "l2_magnitude", "taylor_vector", "taylor_element1", "taylor_element2",
                               "wanda_sp"}
    import subprocess

    probe = subprocess.run([sys.executable, "-c", "import sys, pruneflow.config, pruneflow.criteria, "
                            "pruneflow.pipeline.preflight, pruneflow.pipeline.records, pruneflow.pipeline.plan; "
                            "print('torch' in sys.modules)"], capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "False", "planning must not import torch"
