"""Query-head pruning inside GQA groups, global (non-uniform) allocation and FLAP bias compensation."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pruneflow.activations import collect_activation_stats
from pruneflow.architectures import count_parameters, layer_shapes
from pruneflow.checkpoint import LAYER_SHAPES_KEY, load_pruned, save_pruned
from pruneflow.errors import ConfigError, DataError
from pruneflow.importance import GroupScores, ScoringInputs, get_criterion
from pruneflow.pruning import apply_pruning, plan_pruning, prune_layer
from pruneflow.reconstruction import prune_and_reconstruct
from pruneflow.tiny_models import TINY_FAMILIES, tiny_model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _scores(model, ids, name="taylor_element1", activations=None):
    return get_criterion(name).score(model, ScoringInputs(calibration_ids=ids, activations=activations))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_query_head_pruning_keeps_gqa_valid_and_reloads(family, tokenizer, token_ids, tmp_path):
    model = tiny_model(family, vocab_size=len(tokenizer), num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    total = count_parameters(model)
    plan = plan_pruning(model, _scores(model, token_ids), 0.3, range(0, 4), attention_unit="query_head")
    removed = apply_pruning(model, plan)
    assert removed == total - count_parameters(model)
    for shape in layer_shapes(model):
        assert shape.num_key_value_heads == 2  # KV heads stay; query heads go evenly per group
        assert shape.num_attention_heads < 8 and shape.num_attention_heads % 2 == 0
    save_pruned(model, tmp_path / "ckpt", tokenizer=tokenizer)
    reloaded = load_pruned(tmp_path / "ckpt")
    assert torch.equal(_logits(reloaded, token_ids), _logits(model, token_ids))


def test_query_head_removal_equals_zeroing_those_heads(tokenizer, token_ids):
    dense = tiny_model("llama", vocab_size=len(tokenizer), num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    pruned = tiny_model("llama", vocab_size=len(tokenizer), num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    plan = plan_pruning(pruned, _scores(pruned, token_ids), 0.3, [1, 2], attention_unit="query_head")
    apply_pruning(pruned, plan)
    assert all(plan.removed_query_heads[i] for i in (1, 2))
    with torch.no_grad():
        for i in plan.layers:
            for head in plan.removed_query_heads[i]:
                dense.model.layers[i].self_attn.o_proj.weight[:, head * 8:(head + 1) * 8] = 0
            for channel in plan.removed_ffn_channels[i]:
                dense.model.layers[i].mlp.down_proj.weight[:, channel] = 0
    torch.testing.assert_close(_logits(pruned, token_ids), _logits(dense, token_ids), rtol=1e-5, atol=1e-5)


def test_query_heads_are_removed_lowest_first_within_each_group(llama, token_ids):
    shapes = layer_shapes(llama)  # 4 query heads, 2 KV groups: heads 0,1 -> group 0; 2,3 -> group 1
    scores = GroupScores(
        attention=[torch.zeros(s.num_key_value_heads, dtype=torch.float64) for s in shapes],
        ffn=[torch.arange(s.intermediate_size, dtype=torch.float64) for s in shapes],
        attention_heads=[torch.tensor([5.0, 1.0, 0.5, 9.0], dtype=torch.float64) for _ in shapes],
    )
    plan = plan_pruning(llama, scores, 0.02, [1], structures=("attention",), attention_unit="query_head")
    assert plan.removed_query_heads[1] == [1, 2]  # the lowest of each group, never two from one group


def test_prune_layer_rejects_uneven_heads_per_group(llama):
    with pytest.raises(ValueError, match="same"):
        prune_layer(llama.model.layers[1], [0, 1], [0, 1, 2], list(range(96)), 16)


def test_query_head_mode_needs_head_scores(llama, token_ids):
    scores = _scores(llama, token_ids)
    scores.attention_heads = None
    with pytest.raises(DataError, match="query_head"):
        plan_pruning(llama, scores, 0.2, [1, 2], attention_unit="query_head")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_global_allocation_gives_nonuniform_widths_that_reload(family, tokenizer, token_ids, tmp_path):
    model = tiny_model(family, vocab_size=len(tokenizer), num_hidden_layers=6, intermediate_size=128)
    total = count_parameters(model)
    ratio = 0.2
    plan = plan_pruning(model, _scores(model, token_ids), ratio, range(1, 5), allocation="global")
    removed = apply_pruning(model, plan)
    assert plan.per_layer_fraction is None
    assert removed <= ratio * total  # greedy never overshoots, and stops within the smallest unit
    assert ratio * total - removed < 3 * model.config.hidden_size + 2
    widths = {s.intermediate_size for s in layer_shapes(model)[1:5]}
    assert len(widths) > 1, "global ranking should prune layers unevenly"
    save_pruned(model, tmp_path / "ckpt", tokenizer=tokenizer)
    assert LAYER_SHAPES_KEY in json.loads((tmp_path / "ckpt" / "config.json").read_text())
    reloaded = load_pruned(tmp_path / "ckpt")
    assert layer_shapes(reloaded) == layer_shapes(model)
    assert torch.equal(_logits(reloaded, token_ids), _logits(model, token_ids))


def test_global_allocation_prunes_where_scores_are_lowest(llama, token_ids):
    shapes = layer_shapes(llama)
    ffn = [torch.full((s.intermediate_size,), 10.0, dtype=torch.float64) for s in shapes]
    ffn[2] = torch.linspace(0.0, 1.0, shapes[2].intermediate_size, dtype=torch.float64)  # layer 2 is weak
    scores = GroupScores(attention=[torch.ones(s.num_key_value_heads, dtype=torch.float64) for s in shapes], ffn=ffn)
    plan = plan_pruning(llama, scores, 0.1, [1, 2], structures=("ffn",), allocation="global")
    assert len(plan.removed_ffn_channels[2]) > 0 and plan.removed_ffn_channels[1] == []


def test_global_and_query_head_combine(tokenizer, token_ids, tmp_path):
    model = tiny_model("qwen2", vocab_size=len(tokenizer), num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    plan = plan_pruning(model, _scores(model, token_ids, "flap",
                                       collect_activation_stats(model, token_ids, batch_size=2, max_tokens=16, seed=0)),
                        0.25, range(0, 4), allocation="global", attention_unit="query_head")
    apply_pruning(model, plan)
    save_pruned(model, tmp_path / "ckpt")
    assert torch.equal(_logits(load_pruned(tmp_path / "ckpt"), token_ids), _logits(model, token_ids))


def _bias_compensated(model, plan, stats, ids):
    return prune_and_reconstruct(model, plan, method="bias", mode="parallel", damping=1e-3, calibration_ids=ids,
                                 batch_size=2, activations=stats)


def test_bias_compensation_preserves_the_mean_output_of_pruned_matrices(llama, token_ids):
    stats = collect_activation_stats(llama, token_ids, batch_size=2, max_tokens=16, seed=0)
    dense_down = llama.model.layers[1].mlp.down_proj.weight.detach().clone().double()
    dense_o = llama.model.layers[1].self_attn.o_proj.weight.detach().clone().double()
    plan = plan_pruning(llama, _scores(llama, token_ids, "flap", stats), 0.3, [1, 2])
    added = _bias_compensated(llama, plan, stats, token_ids).params_added
    tokens = float(stats["num_tokens"][0])
    down_mean = stats["layers.1.down_proj_in.sum"] / tokens
    o_mean = stats["layers.1.o_proj_in.sum"] / tokens
    mlp, attn = llama.model.layers[1].mlp, llama.model.layers[1].self_attn
    kept = torch.tensor(plan.kept_ffn_channels[1])
    pruned_mean = mlp.down_proj.weight.double() @ down_mean[kept] + mlp.down_proj.bias.double()
    torch.testing.assert_close(pruned_mean, dense_down @ down_mean, rtol=1e-5, atol=1e-6)
    heads = plan.kept_query_heads[1]
    columns = torch.cat([torch.arange(h * 16, (h + 1) * 16) for h in heads])
    pruned_o = attn.o_proj.weight.double() @ o_mean[columns] + attn.o_proj.bias.double()
    torch.testing.assert_close(pruned_o, dense_o @ o_mean, rtol=1e-5, atol=1e-6)
    assert added == count_parameters(llama) - (plan.params_before - plan.expected_params_removed)
    assert llama.config.attention_bias and llama.config.mlp_bias


def test_bias_compensated_checkpoint_loads_with_plain_from_pretrained(llama, token_ids, tokenizer, tmp_path):
    stats = collect_activation_stats(llama, token_ids, batch_size=2, max_tokens=16, seed=0)
    plan = plan_pruning(llama, _scores(llama, token_ids, "flap", stats), 0.3, range(0, 4))
    _bias_compensated(llama, plan, stats, token_ids)
    save_pruned(llama, tmp_path / "ckpt", tokenizer=tokenizer)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert torch.equal(_logits(plain, token_ids), _logits(llama, token_ids))


def test_bias_compensation_refuses_families_without_output_biases(tokenizer, token_ids):
    model = tiny_model("qwen2", vocab_size=len(tokenizer))
    stats = collect_activation_stats(model, token_ids, batch_size=2, max_tokens=16, seed=0)
    plan = plan_pruning(model, _scores(model, token_ids, "flap", stats), 0.2, [1, 2])
    with pytest.raises(ConfigError, match=r"reconstruction='bias'.*model_type='qwen2'.*allowed for: llama"):
        _bias_compensated(model, plan, stats, token_ids)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("unit", ["kv_group", "query_head"])
def test_ratio_zero_is_identity_in_every_mode(allocation, unit, llama, token_ids):
    before = _logits(llama, token_ids)
    plan = plan_pruning(llama, _scores(llama, token_ids), 0.0, range(0, 4), allocation=allocation, attention_unit=unit)
    assert apply_pruning(llama, plan) == 0
    assert torch.equal(_logits(llama, token_ids), before)


def test_bad_allocation_and_unit_are_named(llama, token_ids):
    scores = _scores(llama, token_ids)
    with pytest.raises(ConfigError, match=r"prune.allocation='globl'.*'uniform', 'global'|prune.allocation='globl'"):
        plan_pruning(llama, scores, 0.2, [1], allocation="globl")
    with pytest.raises(ConfigError, match=r"prune.attention_unit='head'"):
        plan_pruning(llama, scores, 0.2, [1], attention_unit="head")
