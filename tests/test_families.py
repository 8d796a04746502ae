"""Every decoder family on its tiny random configs: the invariants Llama is held to, per family.

The configs are scaled down from each family's published config.json shapes (the comments of
`pruneflow/families/<family>.py` name them): Llama 3.x (tied, llama3 rope scaling), Qwen3 (per-head
q/k norms, head_dim independent of hidden), Gemma 2 (soft-capping, sliding windows, pre/post norms),
Gemma 3 (MQA, q/k norms, local/global layers), Phi-3 and Phi-4-mini (fused qkv_proj / gate_up_proj),
OLMo 2 (q/k norms over the whole projection). Llama, Mistral and Qwen2 run the same invariants in
test_pruning.py, test_structures.py and test_checkpoints.py.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM

from pruneflow.activations import collect_activation_stats
from pruneflow.architectures import (
    FusedLinear,
    count_parameters,
    decoder_layers,
    fuse_projections,
    layer_shapes,
    projection,
)
from pruneflow.checkpoint import LAYER_SHAPES_KEY, LAYOUT_KEY, load_pruned, save_pruned
from pruneflow.errors import ConfigError, ModelError
from pruneflow.families import BY_MODEL_TYPE, TINY_CONFIGS
from pruneflow.importance import CRITERIA, ScoringInputs, get_criterion
from pruneflow.pruning import apply_pruning, plan_pruning
from pruneflow.reconstruction import prune_and_reconstruct
from pruneflow.tiny_models import TINY_FAMILIES, tiny_model

NEW = tuple(name for name in TINY_CONFIGS if name not in TINY_FAMILIES)
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name, tokenizer, seed=0):
    return tiny_model(name, seed=seed, vocab_size=len(tokenizer))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _family(model):
    return BY_MODEL_TYPE[model.config.model_type]


def _units(model) -> tuple[str, ...]:
    """The attention units a model allows: whole KV groups need more than one KV head, single query
    heads more than one query head per KV head."""
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    return tuple(unit for unit, applies in (("kv_group", kv_heads > 1), ("query_head", heads > kv_heads)) if applies)


def _stats(model, ids):
    return collect_activation_stats(model, ids, batch_size=2, max_tokens=64, seed=0, gram_matrices=True)


def test_the_new_configs_have_the_structures_they_stand_for(tokenizer):
    """The tiny configs keep what makes each family different (else the matrix below proves little)."""
    assert set(NEW) == {"llama3", "qwen3", "gemma2", "gemma3", "phi3", "phi4_mini", "olmo2"}
    models = {name: _model(name, tokenizer) for name in NEW}
    assert models["llama3"].config.rope_parameters["rope_type"] == "llama3"
    for name in ("qwen3", "gemma2", "gemma3"):  # heads x head_dim != hidden
        config = models[name].config
        assert config.num_attention_heads * config.head_dim != config.hidden_size, name
    assert models["gemma2"].config.attn_logit_softcapping and models["gemma2"].config.final_logit_softcapping
    assert "sliding_attention" in models["gemma3"].config.layer_types
    assert models["gemma3"].config.num_key_value_heads == 1  # MQA
    for name in ("phi3", "phi4_mini"):
        assert isinstance(models[name].model.layers[0].self_attn.qkv_proj, nn.Linear)
    assert models["phi4_mini"].config.partial_rotary_factor == 0.75
    assert models["phi4_mini"].config.rope_parameters["rope_type"] == "longrope"
    assert models["olmo2"].model.layers[0].self_attn.q_norm.weight.numel() == 4 * 16  # whole q projection
    for name in ("llama3", "qwen3", "gemma2", "gemma3", "phi4_mini"):
        assert models[name].lm_head.weight is models[name].model.embed_tokens.weight, name


@pytest.mark.parametrize("name", NEW)
def test_ratio_zero_and_splitting_fused_projections_change_no_logit(name, tokenizer, token_ids):
    model = _model(name, tokenizer)
    before = _logits(model, token_ids)
    params_before = count_parameters(model)
    for layer in decoder_layers(model):  # split (fused families) ...
        projection(layer, "q_proj")
    assert torch.equal(_logits(model, token_ids), before)
    scores = get_criterion("l2_magnitude").score(model, ScoringInputs(calibration_ids=token_ids))
    for unit in _units(model):
        plan = plan_pruning(model, scores, 0.0, range(1, 3), attention_unit=unit)
        assert apply_pruning(model, plan) == 0
    fuse_projections(model)  # ... and fused again
    assert count_parameters(model) == params_before
    assert torch.equal(_logits(model, token_ids), before)


def _zeroed_reference(dense: nn.Module, plan) -> nn.Module:
    """The dense model with the removed units silenced, written out by hand (no pruneflow code): the
    removed heads' o_proj columns and the removed channels' down_proj columns are zero. For OLMo 2,
    whose q/k norms take their statistic over the whole projection, the kept heads are normalised over
    the kept rows, as in the pruned model."""
    config = dense.config
    head = config.head_dim
    for i in plan.layers:
        layer = dense.model.layers[i]
        attention, mlp = layer.self_attn, layer.mlp
        with torch.no_grad():
            for h in plan.removed_query_heads[i]:
                attention.o_proj.weight[:, h * head:(h + 1) * head] = 0
            mlp.down_proj.weight[:, plan.removed_ffn_channels[i]] = 0
        if config.model_type == "olmo2":
            rows = {"q_norm": plan.kept_query_heads[i], "k_norm": plan.kept_attention_groups[i]}
            for norm, heads in rows.items():
                kept = torch.cat([torch.arange(h * head, (h + 1) * head) for h in heads])
                setattr(attention, norm, _KeptRowsNorm(getattr(attention, norm), kept))
    return dense


class _KeptRowsNorm(nn.Module):
    """RMSNorm whose mean square runs over the kept rows only (the removed rows' outputs are unused)."""

    def __init__(self, norm: nn.Module, kept: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.eps, self.kept = norm.weight, norm.variance_epsilon, kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x[..., self.kept].float().pow(2).mean(-1, keepdim=True)
        return (self.weight * (x.float() * torch.rsqrt(variance + self.eps))).to(x.dtype)


@pytest.mark.parametrize("name", NEW)
def test_pruning_equals_zeroing_the_removed_units(name, tokenizer, token_ids):
    """Per attention unit: the pruned model is the dense model with the removed heads and channels
    silenced, so every criterion measures what pruning removes."""
    for unit in _units(_model(name, tokenizer)):
        pruned = _model(name, tokenizer)
        scores = get_criterion("taylor_element1").score(pruned, ScoringInputs(calibration_ids=token_ids))
        plan = plan_pruning(pruned, scores, 0.25, range(1, 4), attention_unit=unit)
        apply_pruning(pruned, plan)
        fuse_projections(pruned)
        assert any(plan.removed_query_heads[i] for i in plan.layers), unit
        assert any(plan.removed_ffn_channels[i] for i in plan.layers), unit
        reference = _zeroed_reference(_model(name, tokenizer), plan)
        torch.testing.assert_close(_logits(pruned, token_ids), _logits(reference, token_ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NEW)
def test_every_criterion_and_unit_removes_what_the_plan_says(name, tokenizer, token_ids):
    """Every criterion scores every group of the family; pruned by each attention unit and a global
    allocation, the measured parameter drop is the plan's and within one unit of the request."""
    base = _model(name, tokenizer)
    stats = _stats(base, token_ids)
    total = count_parameters(base)
    for criterion in CRITERIA:
        model = copy.deepcopy(base)
        scores = get_criterion(criterion).score(model, ScoringInputs(calibration_ids=token_ids, activations=stats))
        shapes = layer_shapes(model)
        assert [s.numel() for s in scores.attention] == [s.num_key_value_heads for s in shapes], criterion
        assert [s.numel() for s in scores.ffn] == [s.intermediate_size for s in shapes], criterion
        assert not any(torch.isnan(s).any() for s in scores.ffn + scores.attention), criterion
        for unit in _units(model):
            for allocation in ("uniform", "global"):
                trial = copy.deepcopy(model)
                plan = plan_pruning(trial, scores, 0.3, range(1, 4), attention_unit=unit, allocation=allocation)
                removed = apply_pruning(trial, plan)
                assert removed == total - count_parameters(trial) == plan.expected_params_removed
                assert abs(removed - 0.3 * total) <= 4 * 3 * model.config.hidden_size + 64 * model.config.hidden_size


def test_taylor_on_fused_projections_equals_the_gradient_of_the_fused_matrix(tokenizer, token_ids):
    """Phi-3's split parts are scored from the gradient the fused qkv_proj / gate_up_proj would get."""
    model = _model("phi4_mini", tokenizer)
    scores = get_criterion("taylor_element1").score(copy.deepcopy(model), ScoringInputs(calibration_ids=token_ids))
    model.zero_grad()
    model(input_ids=token_ids, labels=token_ids).loss.backward()
    attention, mlp = model.model.layers[2].self_attn, model.model.layers[2].mlp
    head, heads, kv_heads = 16, 6, 2
    per_group = heads // kv_heads
    q_rows, kv_rows = heads * head, kv_heads * head
    qkv = (attention.qkv_proj.weight * attention.qkv_proj.weight.grad).abs()
    o = (attention.o_proj.weight * attention.o_proj.weight.grad).abs()
    group = 1
    q = slice(group * per_group * head, (group + 1) * per_group * head)
    k = slice(q_rows + group * head, q_rows + (group + 1) * head)
    v = slice(q_rows + kv_rows + group * head, q_rows + kv_rows + (group + 1) * head)
    manual = qkv[q].sum() + qkv[k].sum() + qkv[v].sum() + o[:, q].sum()
    torch.testing.assert_close(scores.attention[2][group].float(), manual.detach().float(), rtol=1e-4, atol=1e-7)
    width = mlp.down_proj.in_features
    gate_up = (mlp.gate_up_proj.weight * mlp.gate_up_proj.weight.grad).abs()
    down = (mlp.down_proj.weight * mlp.down_proj.weight.grad).abs()
    channel = 7
    manual = gate_up[channel].sum() + gate_up[width + channel].sum() + down[:, channel].sum()
    torch.testing.assert_close(scores.ffn[2][channel].float(), manual.detach().float(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", NEW)
def test_reconstruction_lowers_the_error_and_the_checkpoints_reload(name, tokenizer, token_ids, tmp_path):
    """Both re-fit modes (and bias compensation where the family's config can hold output biases),
    saved with per-layer widths (the family's remote code) and with uniform widths (a vanilla config):
    each reloads to identical logits."""
    family = BY_MODEL_TYPE[_model(name, tokenizer).config.model_type]
    methods = ["least_squares", "least_squares_bias"] if family.output_bias_flags else ["least_squares"]
    for method in methods:
        for mode in ("parallel", "sequential"):
            model = _model(name, tokenizer)
            stats = _stats(model, token_ids)
            scores = get_criterion("obs").score(model, ScoringInputs(calibration_ids=token_ids, activations=stats))
            plan = plan_pruning(model, scores, 0.3, range(1, 3), attention_unit=_units(model)[0])
            result = prune_and_reconstruct(model, plan, method=method, mode=mode, damping=0.01,
                                           calibration_ids=token_ids, batch_size=2, activations=stats)
            errors = result.mean_errors()
            assert errors["down_proj_error_refit"] < errors["down_proj_error_pruned"], (method, mode)
            expected = _logits(model, token_ids)
            out = save_pruned(model, tmp_path / f"{method}-{mode}", tokenizer=tokenizer)
            config = json.loads((out / "config.json").read_text())
            assert config["model_type"] == family.pruned_model_type and LAYOUT_KEY in config
            assert config["architectures"] == [family.pruned_architecture]
            torch.testing.assert_close(_logits(load_pruned(out), token_ids), expected, rtol=0, atol=0)
            if method.endswith("bias"):
                assert all(config[flag] for flag in family.output_bias_flags)
    # uniform widths: the family's own config, loaded by plain from_pretrained (FFN only: the head count
    # stays a divisor of the hidden size, which Llama's and Gemma's configs insist on; see below)
    for structures in (("ffn",), ("attention", "ffn")):
        model = _model(name, tokenizer)
        scores = get_criterion("l2_magnitude").score(model, ScoringInputs(calibration_ids=token_ids))
        apply_pruning(model, plan_pruning(model, scores, 0.3, range(0, 4), structures,
                                          attention_unit=_units(model)[0]))
        heads = layer_shapes(model)[0].num_attention_heads
        expected = _logits(model, token_ids)
        out = save_pruned(model, tmp_path / "uniform", tokenizer=tokenizer)
        config = json.loads((out / "config.json").read_text())
        torch.testing.assert_close(_logits(load_pruned(out), token_ids), expected, rtol=0, atol=0)
        if config["model_type"] == family.pruned_model_type:  # only where the family's own config refuses
            assert "attention" in structures, heads  # Llama/Gemma: hidden % heads; Phi-3 longrope: rotary width
            vanilla = getattr(transformers, family.config_class)
            with pytest.raises(Exception, match="hidden size|short_factor"):
                vanilla(**{k: v for k, v in config.items() if k not in (
                    "model_type", "architectures", "auto_map", "transformers_version", LAYER_SHAPES_KEY, LAYOUT_KEY)})
            continue
        assert config["model_type"] == family.model_type and "auto_map" not in config
        assert LAYER_SHAPES_KEY not in config and LAYOUT_KEY not in config
        assert not (out / "modeling_pruneflow.py").exists()
        plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert type(plain).__name__ == family.architecture
        torch.testing.assert_close(_logits(plain, token_ids), expected, rtol=0, atol=0)


def test_uniform_widths_the_family_config_refuses_are_written_with_the_per_layer_classes(tokenizer, token_ids,
                                                                                        tmp_path):
    """Llama's config insists that hidden_size is a multiple of num_attention_heads; one query head per
    group less (8 -> 6 heads on hidden 64, as 32 -> 24 on Llama-3.2-1B's 2048) breaks that, so the
    uniform checkpoint uses the per-layer classes, which skip that check, and reloads exactly."""
    model = _model("llama3", tokenizer)
    scores = get_criterion("l2_magnitude").score(model, ScoringInputs(calibration_ids=token_ids))
    plan = plan_pruning(model, scores, 0.03, range(0, 4), ("attention",), attention_unit="query_head")
    apply_pruning(model, plan)
    assert {s.num_attention_heads for s in layer_shapes(model)} == {6}
    expected = _logits(model, token_ids)
    out = save_pruned(model, tmp_path / "ckpt", tokenizer=tokenizer)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "pruneflow_llama" and config["num_attention_heads"] == 6
    with pytest.raises(Exception, match="hidden size"):  # what the vanilla class says (a strict-dataclass error)
        from transformers import LlamaConfig

        LlamaConfig(**{k: v for k, v in config.items() if k not in ("model_type", "auto_map", "architectures")})
    torch.testing.assert_close(_logits(load_pruned(out), token_ids), expected, rtol=0, atol=0)


def test_config_facts_of_each_family_survive_pruning(tokenizer, token_ids, tmp_path):
    """Rope scaling, soft-capping, sliding windows, layer types, partial rotary, tied embeddings: what
    pruning does not touch is written back unchanged."""
    kept = ("rope_parameters", "attn_logit_softcapping", "final_logit_softcapping", "sliding_window", "layer_types",
            "partial_rotary_factor", "tie_word_embeddings", "query_pre_attn_scalar", "rms_norm_eps", "head_dim",
            "original_max_position_embeddings")
    for name in NEW:
        model = _model(name, tokenizer)
        before = {key: getattr(model.config, key) for key in kept if hasattr(model.config, key)}
        scores = get_criterion("l2_magnitude").score(model, ScoringInputs(calibration_ids=token_ids))
        apply_pruning(model, plan_pruning(model, scores, 0.2, range(1, 3), attention_unit=_units(model)[-1]))
        long_ids = torch.arange(80).reshape(1, 80) % len(tokenizer)  # past Phi-4-mini's original 64 positions
        expected = _logits(model, long_ids)
        loaded = load_pruned(save_pruned(model, tmp_path / name, tokenizer=tokenizer))
        assert {key: getattr(loaded.config, key) for key in before} == before, name
        torch.testing.assert_close(_logits(loaded, long_ids), expected, rtol=0, atol=0)
        if before.get("tie_word_embeddings"):
            assert loaded.lm_head.weight is loaded.model.embed_tokens.weight, name


def test_per_layer_checkpoints_of_every_family_load_outside_pruneflow(tokenizer, token_ids, tmp_path):
    """The checkpoint's own code (torch and transformers only) restores every family, in a process
    that never imports pruneflow."""
    for name in NEW:
        model = _model(name, tokenizer)
        scores = get_criterion("l2_magnitude").score(model, ScoringInputs(calibration_ids=token_ids))
        apply_pruning(model, plan_pruning(model, scores, 0.3, range(1, 3), attention_unit=_units(model)[-1]))
        assert len(set(layer_shapes(model))) > 1
        save_pruned(model, tmp_path / name, tokenizer=tokenizer)
        torch.save({"ids": token_ids, "logits": _logits(model, token_ids)}, tmp_path / f"{name}.expected")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
for name in {list(NEW)!r}:
    expected = torch.load({str(tmp_path)!r} + "/" + name + ".expected")
    model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/" + name, trust_remote_code=True,
                                                 dtype=torch.float32).eval()
    assert type(model).__name__.startswith("Pruneflow"), type(model).__name__
    with torch.no_grad():
        logits = model(input_ids=expected["ids"]).logits
        assert torch.equal(logits, expected["logits"]), name + ": logits differ"
        model.generate(expected["ids"][:1, :5], max_new_tokens=3, do_sample=False)
assert not any(module.startswith("pruneflow") for module in sys.modules), "pruneflow was imported"
print("ok")
"""
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr[-3000:]


@pytest.mark.parametrize("name", ["qwen3", "gemma3", "phi4_mini", "olmo2"])
def test_recovery_and_evaluation_on_a_pruned_checkpoint(name, tokenizer, token_ids, tmp_path):
    """LoRA distillation from the dense teacher and full fine-tuning both train the pruned model (LoRA
    on Phi-3 targets its fused matrices), keep its widths, and the result saves, reloads and is scored."""
    from pruneflow.config import RecoverParams
    from pruneflow.perplexity import perplexity
    from pruneflow.recovery import load_instruction_data, recover

    records = [{"instruction": f"Say the number {i}.", "output": f"The number is {i}."} for i in range(24)]
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(records))
    teacher = _model(name, tokenizer)
    model = _model(name, tokenizer)
    scores = get_criterion("l2_magnitude").score(model, ScoringInputs(calibration_ids=token_ids))
    apply_pruning(model, plan_pruning(model, scores, 0.3, range(1, 3), attention_unit=_units(model)[-1]))
    pruned = load_pruned(save_pruned(model, tmp_path / "pruned", tokenizer=tokenizer))
    shapes = layer_shapes(pruned)
    for method, objective in (("lora", "distill"), ("full", "lm")):
        params = RecoverParams(objective=objective, method=method, data=(str(data),), batch_size=4,
                               micro_batch_size=2, cutoff_len=64, learning_rate=1e-3, warmup_steps=1,
                               eval_every_steps=2, max_steps=3, val_size=4)
        train, val = load_instruction_data([data], val_size=params.val_size, seed=0)
        student = copy.deepcopy(pruned)
        before = _logits(student, token_ids)
        result = recover(student, tokenizer, train, val, params, seed=0, device=CPU, dtype=torch.float32,
                         teacher=teacher if objective == "distill" else None, progress=False)
        recovered = result.model
        assert type(recovered) is type(pruned) and layer_shapes(recovered) == shapes
        out = save_pruned(recovered, tmp_path / f"recovered-{method}", tokenizer=tokenizer)
        reloaded = load_pruned(out)
        after = _logits(reloaded, token_ids)
        assert not torch.equal(after, before), method
        ppl = perplexity(reloaded, token_ids.reshape(-1), seq_len=24, batch_size=2).ppl
        assert ppl > 1.0 and ppl == ppl


@pytest.mark.parametrize("name", NEW)
def test_activation_statistics_are_the_inputs_of_the_family_modules(name, tokenizer, token_ids):
    """The statistics activation criteria and the re-fit read are the inputs of the modules the family
    stores (o_proj after any attention norm, down_proj after the gate), captured here by plain hooks."""
    model = _model(name, tokenizer)
    fused = bool(_family(model).fused)
    paths = {"attn_in": "self_attn.qkv_proj" if fused else "self_attn.q_proj", "o_proj_in": "self_attn.o_proj",
             "mlp_in": "mlp.gate_up_proj" if fused else "mlp.gate_proj", "down_proj_in": "mlp.down_proj"}
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for index, layer in enumerate(model.model.layers):
        for key, path in paths.items():
            def hook(_module, args, name=f"layers.{index}.{key}"):
                x = args[0].detach().double().reshape(-1, args[0].shape[-1])
                sums[name] = sums.get(name, 0) + x.sum(0)
            handles.append(layer.get_submodule(path).register_forward_pre_hook(hook))
    _logits(model, token_ids)
    for handle in handles:
        handle.remove()
    stats = _stats(copy.deepcopy(model), token_ids)
    assert len(sums) == 4 * len(model.model.layers)
    for key, total in sums.items():
        torch.testing.assert_close(stats[f"{key}.sum"], total, rtol=1e-6, atol=1e-6)


def test_lora_targets_on_fused_families_are_the_fused_matrices(tokenizer):
    from pruneflow.config import RecoverParams
    from pruneflow.recovery import check_lora_targets

    model = _model("phi3", tokenizer)
    targets = check_lora_targets(model, RecoverParams(target_modules=("q_proj", "v_proj", "up_proj")))
    assert sorted({t.split(".")[-1] for t in targets}) == ["gate_up_proj", "qkv_proj"]
    assert len(targets) == 2 * 4
    with pytest.raises(ConfigError, match="recover.lora_r=512"):
        check_lora_targets(model, RecoverParams(lora_r=512))


def test_one_kv_head_refuses_whole_groups_and_auto_takes_query_heads(tokenizer, token_ids):
    """Gemma 3's MQA: kv_group is refused with the reason; `auto` never tries it."""
    from pruneflow import prune

    model = _model("gemma3", tokenizer)
    scores = get_criterion("l2_magnitude").score(model, ScoringInputs(calibration_ids=token_ids))
    with pytest.raises(ConfigError, match=r"layer 1 has one KV head \(multi-query attention\).*'query_head'"):
        plan_pruning(model, scores, 0.2, range(1, 3), attention_unit="kv_group")
    texts = ["The quick brown fox jumps over the lazy dog. " * 8] * 8
    result = prune(model, tokenizer, texts, criterion="l2_magnitude", ratio=0.3,
                   params={"calibration": {"num_samples": 4, "seq_len": 24}, "activations": {"max_tokens": 64},
                           "prune": {"attention_unit": "auto", "reconstruction": "none", "layer_start": 1,
                                     "layer_end": -1}})
    tried = [trial["attention_unit"] for trial in result.summary["layout_search"] if "attention" in trial["structures"]]
    assert tried == ["query_head"]
    assert result.summary["attention_unit"] in ("query_head", None)  # None: the FFN-only layout won
    assert all(s["num_key_value_heads"] == 1 for s in result.summary["layer_shapes_after"])


def test_the_api_hands_back_a_fused_model(tokenizer, token_ids):
    from pruneflow import prune

    model = _model("phi4_mini", tokenizer)
    names = [name for name, _ in model.named_parameters()]
    texts = ["Pruning removes attention heads and channels. " * 8] * 8
    prune(model, tokenizer, texts, criterion="taylor_element1", ratio=0.2,
          params={"calibration": {"num_samples": 4, "seq_len": 24}, "activations": {"max_tokens": 64},
                  "prune": {"layer_start": 1, "layer_end": -1}})
    assert [name for name, _ in model.named_parameters()] == names
    assert not any(isinstance(module, FusedLinear) for module in model.modules())
    assert model(input_ids=token_ids).logits.shape[-1] == len(tokenizer)


def test_an_unexpected_module_in_a_layer_stops_before_scoring(tokenizer):
    from pruneflow import prune

    model = _model("qwen3", tokenizer)
    model.model.layers[2].self_attn.extra_gate = nn.Linear(4, 4)
    with pytest.raises(ModelError, match=r"layer 2 holds the module 'self_attn.extra_gate' \(Linear\), which the "
                                         r"qwen3 layout does not list"):
        prune(model, tokenizer, ["some text " * 40] * 4, criterion="taylor_element1", ratio=0.2,
              params={"calibration": {"num_samples": 2, "seq_len": 16}})
    assert all(p.grad is None for p in model.parameters())  # nothing was scored


def test_an_unsupported_family_names_every_supported_one():
    from transformers import GPT2Config, GPT2LMHeadModel

    from pruneflow.architectures import check_supported

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ModelError) as error:
        check_supported(model)
    for family in BY_MODEL_TYPE.values():
        assert family.architecture in str(error.value)


def test_per_layer_checkpoints_without_a_layout_load_as_llama(tokenizer, token_ids, tmp_path):
    """Checkpoints written before layouts were recorded (no `pruneflow_layout`) mean Llama's layout."""
    model = tiny_model("llama", vocab_size=len(tokenizer))
    scores = get_criterion("l2_magnitude").score(model, ScoringInputs(calibration_ids=token_ids))
    apply_pruning(model, plan_pruning(model, scores, 0.3, range(1, 3)))
    expected = _logits(model, token_ids)
    out = save_pruned(model, tmp_path / "old", tokenizer=tokenizer)
    config = json.loads((out / "config.json").read_text())
    assert config.pop(LAYOUT_KEY) == _family(model).stored_layout()
    (out / "config.json").write_text(json.dumps(config))
    torch.testing.assert_close(_logits(load_pruned(out), token_ids), expected, rtol=0, atol=0)


@pytest.mark.parametrize(("name", "unit", "message"), [
    ("gemma3", "kv_group", r"has one KV head \(multi-query attention\)"),
    ("phi3", "query_head", r"has one query head per KV head \(multi-head attention\)"),
])
def test_attention_units_a_model_cannot_use_are_refused_at_plan_time_and_in_the_planner(
        name, unit, message, tokenizer, token_ids, tmp_path):
    """From config.json alone, before any job starts (the pipeline's plan), and by the planner itself."""
    from pruneflow.config import params_from_mapping
    from pruneflow.pipeline.preflight import check_model
    from pruneflow.tiny_models import write_tiny_checkpoint

    folder = write_tiny_checkpoint(tmp_path / name, family=name)
    layers = {"layer_start": 1, "layer_end": -1}
    params = params_from_mapping({"model": {"source": str(folder)}, "prune": {"attention_unit": unit, **layers}})
    with pytest.raises(ConfigError, match=f"model.source='{folder}' {message}.*allowed"):
        check_model(params, tmp_path)
    fine = {"model": {"source": str(folder)}, "prune": {"attention_unit": "auto", **layers},
            "evaluate": {"ppl_seq_lens": [128]}}
    assert check_model(params_from_mapping(fine), tmp_path)["model_type"] == _family(_model(name, tokenizer)).model_type
    model = _model(name, tokenizer)
    scores = get_criterion("l2_magnitude").score(model, ScoringInputs(calibration_ids=token_ids))
    with pytest.raises(ConfigError, match=f"layer 1 {message}"):
        plan_pruning(model, scores, 0.2, range(1, 3), attention_unit=unit)


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_sequential_refit_runs_each_layer_with_its_own_mask_and_rope(name, tokenizer, token_ids):
    """Local and global layers get different masks (and, in Gemma 3, rotary tables): layers run on cached
    inputs, as the sequential re-fit runs them, reproduce the model's own forward pass across types."""
    from pruneflow.layerwise import capture_inputs
    from pruneflow.reconstruction import _run_layer

    model = _model(name, tokenizer)
    assert len(set(model.config.layer_types)) == 2 and token_ids.shape[1] > model.config.sliding_window
    blocks = model.model.layers
    inputs = capture_inputs(model, token_ids, batch_size=2, device=CPU)
    arguments = inputs.arguments
    batches = list(zip(inputs.hidden, arguments[0], strict=True))
    with torch.no_grad():
        for i in range(4):
            outputs = _run_layer(blocks[i], batches, None, None)
            if i < 3:
                batches = list(zip(outputs, arguments[i + 1], strict=True))
        logits = model.lm_head(model.model.norm(torch.cat(outputs)))
        if model.config.final_logit_softcapping:
            cap = model.config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
    torch.testing.assert_close(logits, _logits(model, token_ids), rtol=1e-5, atol=1e-5)


def test_a_refusal_after_scoring_hands_the_model_back_as_it_came(tokenizer):
    """Phi-3 (one query head per KV head) with query_head: refused before any forward pass; and a
    refusal raised later (servable head counts) still leaves the caller's fused modules, dtype and mode."""
    from pruneflow import prune

    texts = ["Pruning removes attention heads and channels. " * 8] * 8
    model = _model("phi3", tokenizer).to(torch.bfloat16).train()
    names = [name for name, _ in model.named_parameters()]
    settings = {"calibration": {"num_samples": 4, "seq_len": 24}, "activations": {"max_tokens": 64},
                "prune": {"layer_start": 1, "layer_end": -1}}
    with pytest.raises(ConfigError, match="one query head per KV head"):
        prune(model, tokenizer, texts, criterion="taylor_element1", ratio=0.2,
              params={**settings, "prune": {**settings["prune"], "attention_unit": "query_head"}})
    model = _model("llama3", tokenizer).to(torch.bfloat16).train()
    names = [name for name, _ in model.named_parameters()]
    with pytest.raises(ConfigError, match="would leave 6 query heads, which LlamaConfig refuses"):
        prune(model, tokenizer, texts, criterion="taylor_element1", ratio=0.03, servable=True,
              params={**settings, "prune": {"attention_unit": "query_head", "structures": ["attention"],
                                            "reconstruction": "none"}})
    assert [name for name, _ in model.named_parameters()] == names
    assert next(model.parameters()).dtype == torch.bfloat16 and model.training
    phi = _model("phi4_mini", tokenizer).to(torch.bfloat16)
    fused_names = [name for name, _ in phi.named_parameters()]
    with pytest.raises(ConfigError, match="would leave"):
        prune(phi, tokenizer, texts, criterion="l2_magnitude", ratio=0.03, servable=True,
              params={**settings, "prune": {"attention_unit": "query_head", "structures": ["attention"],
                                            "reconstruction": "none"}})
    assert [name for name, _ in phi.named_parameters()] == fused_names  # split for scoring, fused back
    assert not any(isinstance(module, FusedLinear) for module in phi.modules())
    assert next(phi.parameters()).dtype == torch.bfloat16


def test_servable_head_counts_are_checked_against_the_family_class_after_a_per_layer_prune(tokenizer, token_ids):
    """Once a per-layer prune has given the config the per-layer class (laxer about head counts), a
    servable plan is still held to what the family's own class accepts."""
    model = _model("llama3", tokenizer)
    scores = get_criterion("l2_magnitude").score(model, ScoringInputs(calibration_ids=token_ids))
    apply_pruning(model, plan_pruning(model, scores, 0.1, range(1, 3), ("ffn",)))
    assert type(model.config).__name__ == "PruneflowLlamaConfig"
    scores = get_criterion("l2_magnitude").score(model, ScoringInputs(calibration_ids=token_ids))
    with pytest.raises(ConfigError, match="would leave 6 query heads, which LlamaConfig refuses"):
        plan_pruning(model, scores, 0.03, range(0, 4), ("attention",), attention_unit="query_head", width_multiple=16)
