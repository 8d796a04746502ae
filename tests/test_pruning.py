"""Pruning invariants on tiny random GQA models of every supported family."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pruneflow.architectures import count_parameters, layer_shapes
from pruneflow.checkpoint import LAYER_SHAPES_KEY, load_pruned, save_pruned
from pruneflow.errors import ConfigError, DataError, ModelError
from pruneflow.importance import CRITERIA, GroupScores, ScoringInputs, get_criterion
from pruneflow.pruning import apply_pruning, plan_pruning
from pruneflow.tiny_models import TINY_FAMILIES, tiny_model

FAMILIES = TINY_FAMILIES


def _scores(model, ids, name="taylor_element1"):
    return get_criterion(name).score(model, ScoringInputs(calibration_ids=ids))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_zero_gives_identical_logits(family, tokenizer, token_ids):
    model = tiny_model(family, vocab_size=len(tokenizer))
    before = _logits(model, token_ids)
    params_before = count_parameters(model)
    plan = plan_pruning(model, _scores(model, token_ids), 0.0, range(1, 3))
    assert apply_pruning(model, plan) == 0
    assert count_parameters(model) == params_before
    assert torch.equal(_logits(model, token_ids), before)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.4])
def test_parameter_drop_matches_plan_and_request(family, ratio, tokenizer, token_ids):
    model = tiny_model(family, vocab_size=len(tokenizer))
    total = count_parameters(model)
    plan = plan_pruning(model, _scores(model, token_ids, "l2_magnitude"), ratio, range(0, 4))
    removed = apply_pruning(model, plan)
    assert removed == total - count_parameters(model) == plan.expected_params_removed
    # the FFN fills what whole attention groups cannot: within one channel per pruned layer
    channel = 3 * model.config.hidden_size  # Qwen2's biases sit on attention, not the MLP
    assert abs(removed - ratio * total) <= 4 * channel


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_model_equals_dense_model_with_removed_groups_zeroed(family, tokenizer, token_ids):
    """Removing a group must be exactly the same function as silencing it in the dense model."""
    dense = tiny_model(family, vocab_size=len(tokenizer))
    pruned = tiny_model(family, vocab_size=len(tokenizer))
    plan = plan_pruning(pruned, _scores(pruned, token_ids), 0.3, range(1, 3))
    apply_pruning(pruned, plan)
    head = dense.config.head_dim
    per_group = dense.config.num_attention_heads // dense.config.num_key_value_heads
    with torch.no_grad():
        for i in plan.layers:
            layer = dense.model.layers[i]
            for group in plan.removed_attention_groups[i]:
                columns = slice(group * per_group * head, (group + 1) * per_group * head)
                layer.self_attn.o_proj.weight[:, columns] = 0
            for channel in plan.removed_ffn_channels[i]:
                layer.mlp.down_proj.weight[:, channel] = 0
    assert any(plan.removed_attention_groups[i] for i in plan.layers)
    torch.testing.assert_close(_logits(pruned, token_ids), _logits(dense, token_ids), rtol=1e-5, atol=1e-5)


def test_lowest_scored_groups_are_removed(llama, token_ids):
    shapes = layer_shapes(llama)
    attention = [torch.arange(s.num_key_value_heads, dtype=torch.float64) for s in shapes]
    ffn = [torch.arange(s.intermediate_size, dtype=torch.float64).flip(0) for s in shapes]
    scores = GroupScores(attention=attention, ffn=ffn)
    plan = plan_pruning(llama, scores, 0.3, [1, 2])
    for i in (1, 2):
        assert plan.removed_attention_groups[i] == [0]
        removed = plan.removed_ffn_channels[i]
        width = shapes[i].intermediate_size
        assert removed == list(range(width - len(removed), width))  # highest index = lowest score
    assert 0 not in plan.kept_attention_groups and 3 not in plan.kept_ffn_channels  # outside the range


@pytest.mark.parametrize("family", FAMILIES)
def test_nonuniform_checkpoint_reloads_to_identical_logits(family, tokenizer, token_ids, tmp_path):
    model = tiny_model(family, vocab_size=len(tokenizer))
    apply_pruning(model, plan_pruning(model, _scores(model, token_ids), 0.25, range(1, 3)))
    save_pruned(model, tmp_path / "ckpt", tokenizer=tokenizer)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert len(config[LAYER_SHAPES_KEY]) == 4
    assert not list((tmp_path / "ckpt").glob("*.bin")) and not list((tmp_path / "ckpt").glob("*.pt"))
    reloaded = load_pruned(tmp_path / "ckpt")
    assert layer_shapes(reloaded) == layer_shapes(model)
    assert torch.equal(_logits(reloaded, token_ids), _logits(model, token_ids))
    # outside pruneflow (no registered classes): tests/test_checkpoints.py


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_checkpoint_loads_with_plain_from_pretrained(family, tokenizer, token_ids, tmp_path):
    model = tiny_model(family, vocab_size=len(tokenizer))
    apply_pruning(model, plan_pruning(model, _scores(model, token_ids), 0.3, range(0, 4)))
    assert len(set(layer_shapes(model))) == 1
    save_pruned(model, tmp_path / "ckpt", tokenizer=tokenizer)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert LAYER_SHAPES_KEY not in config and "auto_map" not in config
    assert config["model_type"] == family and not (tmp_path / "ckpt" / "modeling_pruneflow.py").exists()
    assert config["intermediate_size"] == layer_shapes(model)[0].intermediate_size
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert torch.equal(_logits(plain, token_ids), _logits(model, token_ids))


def test_pruned_model_generates_with_kv_cache(llama, token_ids, tmp_path):
    apply_pruning(llama, plan_pruning(llama, _scores(llama, token_ids), 0.3, range(1, 3)))
    save_pruned(llama, tmp_path / "ckpt")
    model = load_pruned(tmp_path / "ckpt")
    out = model.generate(token_ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def test_taylor_matches_manual_gradient(llama, token_ids):
    """Element^1 of one FFN channel equals sum |w * dL/dw| computed by hand."""
    scores = _scores(llama, token_ids)
    model = llama
    model.zero_grad()
    for param in model.parameters():
        param.requires_grad_(True)
    loss = model(input_ids=token_ids, labels=token_ids).loss
    loss.backward()
    mlp = model.model.layers[2].mlp
    channel = 5
    manual = (
        (mlp.gate_proj.weight[channel] * mlp.gate_proj.weight.grad[channel]).abs().sum()
        + (mlp.up_proj.weight[channel] * mlp.up_proj.weight.grad[channel]).abs().sum()
        + (mlp.down_proj.weight[:, channel] * mlp.down_proj.weight.grad[:, channel]).abs().sum()
    )
    torch.testing.assert_close(scores.ffn[2][channel].float(), manual.detach().float(), rtol=1e-4, atol=1e-7)


def test_taylor_micro_batches_do_not_change_scores(llama, token_ids):
    whole = get_criterion("taylor_element1").score(llama, ScoringInputs(calibration_ids=token_ids, micro_batch_size=4))
    parts = get_criterion("taylor_element1").score(llama, ScoringInputs(calibration_ids=token_ids, micro_batch_size=1))
    for a, b in zip(whole.ffn + whole.attention, parts.ffn + parts.attention, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)
    assert all(p.grad is None for p in llama.parameters())


def test_every_criterion_scores_every_group(llama, token_ids):
    from pruneflow.activations import collect_activation_stats

    stats = collect_activation_stats(llama, token_ids, batch_size=2, max_tokens=16, seed=0)
    for name in CRITERIA:
        scores = get_criterion(name).score(llama, ScoringInputs(calibration_ids=token_ids, activations=stats))
        for shape, att, ffn in zip(layer_shapes(llama), scores.attention, scores.ffn, strict=True):
            assert att.shape == (shape.num_key_value_heads,) and ffn.shape == (shape.intermediate_size,)
            assert torch.isfinite(att).all() and torch.isfinite(ffn).all()
        if name != "random":
            assert not torch.equal(scores.ffn[1], scores.ffn[2])


def test_scores_roundtrip_and_determinism(llama, token_ids, tmp_path):
    first = _scores(llama, token_ids)
    first.metadata["criterion"] = "taylor_element1"
    first.save(tmp_path / "s.safetensors")
    again = _scores(llama, token_ids)
    again.save(tmp_path / "t.safetensors")
    assert (tmp_path / "s.safetensors").read_bytes()[-2000:] == (tmp_path / "t.safetensors").read_bytes()[-2000:]
    loaded = GroupScores.load(tmp_path / "s.safetensors")
    assert loaded.metadata["criterion"] == "taylor_element1"
    for a, b in zip(first.ffn, loaded.ffn, strict=True):
        assert torch.equal(a, b)


def test_ratio_too_large_for_range_names_the_maximum(llama, token_ids):
    with pytest.raises(ConfigError, match=r"ratio=0.7 .* allowed here: ratio <="):
        plan_pruning(llama, _scores(llama, token_ids), 0.7, [1])


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_ratio_outside_unit_interval_is_rejected(llama, token_ids, bad):
    with pytest.raises(ConfigError, match=r"ratio=.* allowed: a number in \[0, 1\)"):
        plan_pruning(llama, _scores(llama, token_ids), bad, [1])


def test_scores_of_another_model_are_rejected(llama, token_ids, tokenizer):
    other = tiny_model("llama", vocab_size=len(tokenizer), intermediate_size=64)
    with pytest.raises(DataError, match="rerun the score stage"):
        plan_pruning(llama, _scores(other, token_ids), 0.2, [1])


def test_nan_scores_are_rejected(llama, token_ids):
    scores = _scores(llama, token_ids)
    scores.ffn[1][3] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        plan_pruning(llama, scores, 0.2, [1, 2])


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    from pruneflow.architectures import decoder_layers

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ModelError, match="LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        decoder_layers(model)
