"""Weight reconstruction and structured OBS, each against an independent computation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pruneflow.gram import GramAccumulator
from pruneflow.reconstruction import (
    damping_value,
    obs_removal_order,
    ridge_refit,
    scores_from_order,
)


def _layer(seed: int = 0, d_out: int = 5, d_in: int = 8, tokens: int = 40):
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(d_out, d_in))
    # correlated inputs with a non-zero mean: what makes a refit (and an intercept) matter
    mixing = rng.normal(size=(d_in, d_in))
    x = rng.normal(size=(tokens, d_in)) @ mixing + rng.normal(size=d_in)
    return weight, x


def _gram(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.T @ x)


def test_ridge_refit_without_damping_is_the_least_squares_solution():
    weight, x = _layer()
    keep = [0, 2, 3, 5, 7]
    new, bias = ridge_refit(torch.from_numpy(weight), _gram(x), keep, damping=0.0)
    # independent: solve min ||x W^T - x_S B^T|| with numpy's lstsq
    expected, *_ = np.linalg.lstsq(x[:, keep], x @ weight.T, rcond=None)
    np.testing.assert_allclose(new.numpy(), expected.T, rtol=1e-9, atol=1e-9)
    assert bias is None


def test_ridge_refit_with_damping_pulls_towards_the_old_weights():
    weight, x = _layer(seed=1)
    keep = [1, 2, 4, 6]
    damping = 0.05
    gram = _gram(x)
    lam = damping_value(gram, damping)
    new, _ = ridge_refit(torch.from_numpy(weight), gram, keep, damping)
    # independent: ridge towards W_S as an augmented least-squares system
    a = np.vstack([x[:, keep], np.sqrt(lam) * np.eye(len(keep))])
    b = np.vstack([x @ weight.T, np.sqrt(lam) * weight[:, keep].T])
    expected, *_ = np.linalg.lstsq(a, b, rcond=None)
    np.testing.assert_allclose(new.numpy(), expected.T, rtol=1e-8, atol=1e-9)
    assert lam == pytest.approx(damping * np.mean(np.diag(x.T @ x)))


def test_ridge_refit_with_intercept_fits_the_bias_too():
    weight, x = _layer(seed=2)
    bias = np.random.default_rng(3).normal(size=weight.shape[0])
    keep = [0, 1, 5]
    new, new_bias = ridge_refit(torch.from_numpy(weight), _gram(x), keep, 0.0, bias=torch.from_numpy(bias),
                                input_sum=torch.from_numpy(x.sum(0)), num_tokens=x.shape[0])
    design = np.hstack([x[:, keep], np.ones((x.shape[0], 1))])
    expected, *_ = np.linalg.lstsq(design, x @ weight.T + bias, rcond=None)
    np.testing.assert_allclose(new.numpy(), expected[:-1].T, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(new_bias.numpy(), expected[-1], rtol=1e-8, atol=1e-9)


def test_ridge_refit_keeping_everything_changes_nothing():
    weight, x = _layer(seed=4)
    new, _ = ridge_refit(torch.from_numpy(weight), _gram(x), list(range(8)), 0.01)
    np.testing.assert_array_equal(new.numpy(), weight)


def _refit_error(weight: np.ndarray, x: np.ndarray, removed: list[int]) -> float:
    """Brute force: the smallest ||x W^T - x_S B^T||^2 over B, by lstsq."""
    keep = [j for j in range(x.shape[1]) if j not in removed]
    target = x @ weight.T
    if not keep:
        return float((target ** 2).sum())
    solution, *_ = np.linalg.lstsq(x[:, keep], target, rcond=None)
    return float(((target - x[:, keep] @ solution) ** 2).sum())


@pytest.mark.parametrize("units", [
    [[j] for j in range(8)],                 # FFN channels: one column each
    [[0, 1], [2, 3], [4, 5], [6, 7]],        # heads: a block of columns each
])
def test_obs_greedy_order_and_errors_match_brute_force(units):
    weight, x = _layer(seed=5)
    result = obs_removal_order(torch.from_numpy(weight), _gram(x), units, damping=0.0)
    removed: list[int] = []
    done: list[int] = []
    for step, (unit, error) in enumerate(zip(result.order, result.errors, strict=True)):
        base = _refit_error(weight, x, removed)
        candidates = {u: _refit_error(weight, x, removed + list(units[u])) - base
                      for u in range(len(units)) if u not in done}
        best = min(candidates, key=candidates.get)
        assert unit == best, f"step {step}: OBS removed unit {unit}, brute force picks {best} ({candidates})"
        assert error == pytest.approx(candidates[best], rel=1e-6, abs=1e-8)
        removed += list(units[unit])
        done.append(unit)
    assert sorted(result.order) == list(range(len(units)))


def test_obs_first_choice_is_the_cheapest_of_all_single_removals():
    weight, x = _layer(seed=6, d_in=6)
    result = obs_removal_order(torch.from_numpy(weight), _gram(x), [[j] for j in range(6)], damping=0.0)
    costs = [_refit_error(weight, x, [j]) for j in range(6)]
    assert result.order[0] == int(np.argmin(costs))
    # and removing the first two greedily is never worse than the worst pair
    pair = _refit_error(weight, x, result.order[:2])
    assert pair <= max(_refit_error(weight, x, list(p)) for p in itertools.combinations(range(6), 2))


def test_scores_from_order_reproduce_the_greedy_order_under_a_stable_sort():
    weight, x = _layer(seed=7)
    result = obs_removal_order(torch.from_numpy(weight), _gram(x), [[j] for j in range(8)], damping=1e-3)
    scores = scores_from_order(result, 8)
    assert torch.argsort(scores, stable=True).tolist() == result.order
    # equal errors still keep the greedy order
    from pruneflow.reconstruction import ObsOrder

    tied = scores_from_order(ObsOrder(order=[3, 1, 0, 2], errors=[1.0, 1.0, 0.5, 1.0]), 4)
    assert torch.argsort(tied, stable=True).tolist() == [3, 1, 0, 2]


def test_gram_accumulator_equals_one_big_product():
    _, x = _layer(seed=8, tokens=30)
    acc = GramAccumulator()
    tensor = torch.from_numpy(x).float()
    for part in tensor.split(7):
        acc.add(part)
    np.testing.assert_allclose(acc.gram.numpy(), x.astype(np.float32).astype(np.float64).T
                               @ x.astype(np.float32).astype(np.float64), rtol=1e-5)
    np.testing.assert_allclose(acc.total.numpy(), x.sum(0), rtol=1e-5)
    assert acc.count == 30


# ---- on tiny random models ----

from pruneflow.architectures import count_parameters  # noqa: E402
from pruneflow.checkpoint import load_pruned, save_pruned  # noqa: E402
from pruneflow.importance import ScoringInputs, get_criterion  # noqa: E402
from pruneflow.pruning import apply_pruning, plan_pruning  # noqa: E402
from pruneflow.reconstruction import METHODS, MODES, prune_and_reconstruct  # noqa: E402
from pruneflow.tiny_models import tiny_model  # noqa: E402


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _tiny(tokenizer, family="llama"):
    return tiny_model(family, vocab_size=len(tokenizer), num_attention_heads=8, num_key_value_heads=2, head_dim=8)


def _plan(model, ids, ratio, criterion="l2_magnitude", **kwargs):
    scores = get_criterion(criterion).score(model, ScoringInputs(calibration_ids=ids))
    return plan_pruning(model, scores, ratio, range(1, 4), **kwargs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_ratio_zero_changes_no_logit(method, mode, tokenizer, token_ids):
    model = _tiny(tokenizer)
    before = _logits(model, token_ids)
    plan = _plan(model, token_ids, 0.0)
    prune_and_reconstruct(model, plan, method=method, mode=mode, damping=1e-3, calibration_ids=token_ids,
                          batch_size=2)
    torch.testing.assert_close(_logits(model, token_ids), before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", ["bias", "least_squares", "least_squares_bias"])
def test_reconstruction_removes_what_the_plan_says_and_reloads(method, mode, tokenizer, token_ids, tmp_path):
    model = _tiny(tokenizer)
    total = count_parameters(model)
    plan = _plan(model, token_ids, 0.3, attention_unit="query_head")
    result = prune_and_reconstruct(model, plan, method=method, mode=mode, damping=1e-3, calibration_ids=token_ids,
                                   batch_size=2)
    assert result.params_removed == plan.expected_params_removed
    assert count_parameters(model) == total - result.params_removed + result.params_added
    assert (result.params_added > 0) == (method != "least_squares")
    # a re-fit never does worse than plain removal on the tokens it was fitted on
    for row in result.errors:
        assert row["error_refit"] <= row["error_pruned"] + 1e-12, row
    save_pruned(model, tmp_path / "ckpt", tokenizer=tokenizer)
    assert torch.equal(_logits(load_pruned(tmp_path / "ckpt"), token_ids), _logits(model, token_ids))


def _captured_inputs(model, layer_index, ids):
    captured = []
    handle = model.model.layers[layer_index].mlp.down_proj.register_forward_pre_hook(
        lambda _m, args: captured.append(args[0].detach().reshape(-1, args[0].shape[-1]).double()))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return torch.cat(captured).numpy()


def test_parallel_least_squares_equals_numpy_lstsq_on_the_dense_inputs(tokenizer, token_ids):
    model = _tiny(tokenizer)
    layer = 2
    x = _captured_inputs(model, layer, token_ids)
    dense_weight = model.model.layers[layer].mlp.down_proj.weight.detach().double().numpy()
    plan = _plan(model, token_ids, 0.3, structures=("ffn",))
    keep = plan.kept_ffn_channels[layer]
    damping = 1e-9  # tiny: the ridge solution is then the plain least-squares one
    prune_and_reconstruct(model, plan, method="least_squares", mode="parallel", damping=damping,
                          calibration_ids=token_ids, batch_size=2)
    expected, *_ = np.linalg.lstsq(x[:, keep], x @ dense_weight.T, rcond=None)
    np.testing.assert_allclose(model.model.layers[layer].mlp.down_proj.weight.detach().double().numpy(),
                               expected.T, rtol=1e-3, atol=1e-4)


def _lstsq_refit(model, layer, keep, ids):
    x = _captured_inputs(model, layer, ids)
    weight = model.model.layers[layer].mlp.down_proj.weight.detach().double().numpy()
    solution, *_ = np.linalg.lstsq(x[:, keep], x @ weight.T, rcond=None)
    return solution.T


def test_sequential_refits_on_the_pruned_inputs(tokenizer, token_ids):
    """Sequential mode: layer 2's refit must match lstsq on the inputs the pruned layer 1 produces."""
    from pruneflow.pruning import prune_layer

    reference = _tiny(tokenizer)
    model = _tiny(tokenizer)
    plan = _plan(model, token_ids, 0.3, structures=("ffn",))
    prune_and_reconstruct(model, plan, method="least_squares", mode="sequential", damping=1e-9,
                          calibration_ids=token_ids, batch_size=2)
    # independent: lstsq-refit and cut layer 1 by hand, then fit layer 2 on what it now receives
    keep1 = plan.kept_ffn_channels[1]
    refit1 = _lstsq_refit(reference, 1, keep1, token_ids)
    block = reference.model.layers[1]
    prune_layer(block, range(2), range(8), keep1, 8)
    with torch.no_grad():
        block.mlp.down_proj.weight.copy_(torch.from_numpy(refit1))
    expected = _lstsq_refit(reference, 2, plan.kept_ffn_channels[2], token_ids)
    np.testing.assert_allclose(model.model.layers[2].mlp.down_proj.weight.detach().double().numpy(), expected,
                               rtol=1e-3, atol=1e-4)


def test_sequential_without_refit_equals_plain_pruning(tokenizer, token_ids):
    plain = _tiny(tokenizer)
    model = _tiny(tokenizer)
    plan = _plan(model, token_ids, 0.3)
    apply_pruning(plain, plan)
    prune_and_reconstruct(model, plan, method="none", mode="sequential", damping=1e-3, calibration_ids=token_ids,
                          batch_size=2)
    assert torch.equal(_logits(model, token_ids), _logits(plain, token_ids))


def test_obs_criterion_scores_follow_the_greedy_order_on_the_real_inputs(tokenizer, token_ids):
    model = _tiny(tokenizer)
    scores = get_criterion("obs").score(model, ScoringInputs(calibration_ids=token_ids, forward_batch_size=2))
    x = _captured_inputs(model, 1, token_ids)
    weight = model.model.layers[1].mlp.down_proj.weight.detach()
    expected = obs_removal_order(weight, torch.from_numpy(x.T @ x), [[c] for c in range(weight.shape[1])], 1e-3)
    assert torch.argsort(scores.ffn[1], stable=True).tolist() == expected.order
    assert len(scores.attention[1]) == 2 and len(scores.attention_heads[1]) == 8


# ---- attention_unit: auto ----

from pruneflow.errors import ConfigError  # noqa: E402
from pruneflow.layout_search import Layout, calibration_loss, choose_layout, layouts_to_try  # noqa: E402


def test_layouts_to_try_follow_the_allowed_structures():
    assert layouts_to_try(["attention", "ffn"], "query_head") == [Layout(("attention", "ffn"), "query_head")]
    assert [c.label for c in layouts_to_try(["attention", "ffn"], "auto")] == ["ffn", "kv_group+ffn",
                                                                               "query_head+ffn"]
    assert [c.label for c in layouts_to_try(["ffn"], "auto")] == ["ffn"]
    assert [c.label for c in layouts_to_try(["attention"], "auto")] == ["kv_group", "query_head"]


def test_auto_layout_is_the_argmin_of_an_independent_loss(tokenizer, token_ids):
    model = _tiny(tokenizer)
    scores = get_criterion("l2_magnitude").score(model, ScoringInputs(calibration_ids=token_ids))

    def prune(target, layout):
        plan = plan_pruning(target, scores, 0.2, range(1, 4), layout.structures, attention_unit=layout.attention_unit)
        return prune_and_reconstruct(target, plan, method="least_squares", mode="parallel", damping=1e-3,
                                     calibration_ids=token_ids, batch_size=2)

    candidates = layouts_to_try(["attention", "ffn"], "auto")
    chosen, trials = choose_layout(model, candidates, prune, lambda m: calibration_loss(m, token_ids, 2, 2))
    # independent: each layout on its own copy, mean next-token loss by hand over the first 2 sequences
    losses = {}
    for layout in candidates:
        copy_ = _tiny(tokenizer)
        prune(copy_, layout)
        with torch.no_grad():
            logits = copy_(input_ids=token_ids[:2]).logits[:, :-1]
        losses[layout] = float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                                 token_ids[:2, 1:].reshape(-1)))
    assert chosen == min(losses, key=losses.get)
    assert [t.layout for t in trials] == candidates
    for trial in trials:
        assert trial.loss == pytest.approx(losses[trial.layout], rel=1e-5)
    assert len(set(losses.values())) == 3  # the layouts really differ
    assert torch.equal(_logits(model, token_ids), _logits(_tiny(tokenizer), token_ids))  # the input is untouched


def test_auto_layout_skips_a_layout_that_cannot_reach_the_ratio(tokenizer, token_ids):
    model = _tiny(tokenizer)
    scores = get_criterion("l2_magnitude").score(model, ScoringInputs(calibration_ids=token_ids))
    ratio = 0.45  # more than the FFN of layers 1..3 holds (0.391), less than attention + FFN

    def prune(target, layout):
        plan_pruning(target, scores, ratio, range(1, 4), layout.structures, attention_unit=layout.attention_unit)

    chosen, trials = choose_layout(model, layouts_to_try(["attention", "ffn"], "auto"), prune,
                                   lambda m: float(count_parameters(m)))
    assert trials[0].error and "hold only" in trials[0].error and trials[0].loss is None
    assert chosen != Layout(("ffn",), "kv_group")
    with pytest.raises(ConfigError, match="hold only"):
        choose_layout(model, [Layout(("ffn",), "kv_group"), Layout(("ffn",), "query_head")], prune,
                      lambda m: 0.0)
    single, none_tried = choose_layout(model, [Layout(("ffn",), "kv_group")], prune, lambda m: 0.0)
    assert single == Layout(("ffn",), "kv_group") and none_tried == []
