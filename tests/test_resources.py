"""Cluster resources from config.json (pruneflow.pipeline.resources): parameter counts against the
published totals and the real modules, memory and GPU counts against the arithmetic written out here,
and the refusals of settings that cannot fit."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from pruneflow.config import params_from_mapping
from pruneflow.errors import ConfigError
from pruneflow.pipeline.resources import (
    FALLBACK,
    GIB,
    MIB,
    STARTUP_MINUTES,
    USABLE_FRACTION,
    ClusterPlan,
    ClusterSettings,
    Derivation,
    ModelShape,
    Workload,
    estimate_workload,
    launcher,
    plan_resources,
    slurm_extra,
)

from .conftest import PROJECT_ROOT

# the published shapes (Hugging Face config.json of meta-llama/Llama-2-7b-hf and Meta-Llama-3-70B)
LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
             "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "max_position_embeddings": 4096, "tie_word_embeddings": False,
             "torch_dtype": "float16"}
LLAMA3_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 8192,
              "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
              "num_key_value_heads": 8, "max_position_embeddings": 8192, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16"}
SMOLLM2_135M = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
                "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "tie_word_embeddings": True}
# a fixed workload, so that the arithmetic below does not depend on the data files
WORK = Workload(calibration_tokens=512 * 128, train_tokens=1_000_000, validation_tokens=100_000,
                perplexity_tokens=400_000, zeroshot_tokens=0, evaluation_passes=3, largest_pass_tokens=300_000)


@pytest.fixture(scope="module")
def params():
    """The project's params at full scale (obs and flap scored, obs recovered with full distillation)."""
    import yaml

    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    return params_from_mapping({**raw, "scale": "full"})


def _with(params, section: str, **changes):
    return dataclasses.replace(params, **{section: dataclasses.replace(getattr(params, section), **changes)})


@pytest.mark.parametrize(("config", "total"), [(LLAMA2_7B, 6_738_415_616), (LLAMA3_70B, 70_553_706_496),
                                               (SMOLLM2_135M, 134_515_008)])
def test_parameter_counts_are_the_published_ones(config, total):
    count = ModelShape.from_config(config).parameters()
    assert count.total == total
    # GQA: Llama-3-70B's k/v projections have 8 heads of 128, a tenth of q's width each
    if config is LLAMA3_70B:
        assert count.attention == 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024)
    assert count.lm_head == (0 if config["tie_word_embeddings"] else config["vocab_size"] * config["hidden_size"])


@pytest.mark.parametrize("family", ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3",
                                    "phi4_mini", "olmo2"])
def test_parameter_count_equals_the_modules_of_every_family(family):
    """Biases (Qwen 2), extra norms (Gemma), q/k norms (Qwen 3, OLMo 2), fused projections (Phi-3)."""
    from pruneflow.architectures import count_parameters
    from pruneflow.tiny_models import tiny_model

    model = tiny_model(family, vocab_size=64)
    assert ModelShape.from_config(model.config.to_dict()).parameters().total == count_parameters(model)


def test_parameter_count_with_llama_biases_and_untied_head():
    from pruneflow.architectures import count_parameters
    from pruneflow.tiny_models import tiny_model

    model = tiny_model("llama", vocab_size=64, attention_bias=True, mlp_bias=True, tie_word_embeddings=False)
    assert ModelShape.from_config(model.config.to_dict()).parameters().total == count_parameters(model)


def test_a_config_without_widths_is_refused():
    with pytest.raises(ConfigError, match="lacks hidden_size, intermediate_size"):
        ModelShape.from_config({"vocab_size": 10, "num_hidden_layers": 2, "num_attention_heads": 2})


@pytest.mark.parametrize(("key", "value", "shown"), [
    ("hidden_size", -4096, "-4096"),  # would plan negative memory
    ("num_attention_heads", 0, "0"),  # would divide by zero
    ("hidden_size", "4096", '"4096"'),  # a quoted number is not a width (and not missing either)
    ("num_hidden_layers", True, "true"),
    ("intermediate_size", 11008.0, "11008.0"),
    ("vocab_size", 0, "0"),
    ("num_key_value_heads", -8, "-8"),
    ("head_dim", 0, "0"),
])
def test_a_width_that_is_not_a_positive_integer_is_refused(key, value, shown):
    with pytest.raises(ConfigError) as refused:
        ModelShape.from_config({**LLAMA2_7B, key: value}, "models/x/config.json")
    message = str(refused.value)
    assert message.startswith(f"models/x/config.json: {key}={shown} is not allowed; allowed: positive integers"), \
        message
    assert "lacks" not in message


def test_bad_widths_are_refused_all_at_once_naming_the_model_source():
    bad = {**LLAMA2_7B, "hidden_size": -4096, "num_attention_heads": 0}
    with pytest.raises(ConfigError, match=r"^the config\.json of model\.source='org/m': hidden_size=-4096, "
                                          r"num_attention_heads=0 are not allowed"):
        ModelShape.from_config(bad, "model.source='org/m'")
    assert ModelShape.from_config({**LLAMA2_7B, "num_key_value_heads": None, "head_dim": None}).head_dim == 128
    with pytest.raises(ConfigError, match="num_attention_heads=32 with hidden_size=16 and no head_dim is not allowed"):
        ModelShape.from_config({**LLAMA2_7B, "hidden_size": 16})
    assert ModelShape.from_config({**LLAMA2_7B, "hidden_size": 16, "head_dim": 4}).head_dim == 4


def test_the_resources_cli_refuses_a_bad_width(tmp_path, capsys):
    from pruneflow.pipeline.resources import main

    config = tmp_path / "config.json"
    config.write_text(json.dumps({**LLAMA2_7B, "num_attention_heads": 0}))
    with pytest.raises(SystemExit) as exited:
        main(["--params", str(PROJECT_ROOT / "params.yaml"), "--config-json", str(config)])
    assert exited.value.code == 2
    assert f"error: {config}: num_attention_heads=0 is not allowed" in capsys.readouterr().err


def _activations(config, micro_batch: int, cutoff: int) -> int:
    """Per micro-batch: 2 bytes x L x (10h + 4f) per token kept for the backward, 20 V of logits."""
    per_token = 2 * config["num_hidden_layers"] * (10 * config["hidden_size"] + 4 * config["intermediate_size"])
    return micro_batch * cutoff * (per_token + 20 * config["vocab_size"])


def _lora_adapters_70b() -> int:
    return 8 * 80 * (2 * (8192 + 8192) + 2 * (8192 + 1024) + 3 * (8192 + 28672))  # r x layers x (in + out)


def test_7b_full_distillation_does_not_fit_an_80gb_gpu(params):
    """Data parallel: every GPU holds the whole teacher and training state, so more GPUs do not help."""
    dense = 6_738_415_616
    student = dense * 0.8
    need = 2 * dense + 18 * student + _activations(LLAMA2_7B, 4, 256)  # bf16 teacher, fp32 state + bf16 copy
    assert 116e9 < need < 118e9 and need > 80 * GIB * USABLE_FRACTION  # about 117 GB
    derivation = Derivation(ModelShape.from_config(LLAMA2_7B), params, WORK)
    with pytest.raises(ConfigError) as refused:
        derivation.rule("recover", "obs", 0.2)
    message = str(refused.value)
    assert message.startswith("recover.method='full' is not allowed for model.source (5.4B parameters) after pruning, "
                              "6.7B as the teacher: recovery is data-parallel (each GPU holds the whole teacher and "
                              "training state)")
    assert f"every GPU needs {need / GIB:.1f} GiB" in message and "72.0 GiB usable" in message
    assert ("allowed: recover.sharding: fsdp (on 2 GPUs), recover.method: lora, recover.objective: lm (no teacher), "
            "recover.gradient_checkpointing: true (saves 4.9 GiB), GPUs with more memory (--config gpu_memory_gb), "
            "grid.recovered_criteria: [] (no recovery)") in message
    # without a teacher the state alone (90.4 GiB) is still too much; LoRA fits
    with pytest.raises(ConfigError, match=r"needs 96\.2 GiB \(training state 90\.4 GiB"):
        Derivation(ModelShape.from_config(LLAMA2_7B), _with(params, "recover", objective="lm"), WORK).rule(
            "recover", "obs", 0.2)


def test_7b_full_distillation_on_a_141gb_gpu(params):
    job = Derivation(ModelShape.from_config(LLAMA2_7B), params, WORK, ClusterSettings(gpu_memory_gb=141)).rule(
        "recover", "obs", 0.2)
    dense = 6_738_415_616
    student = dense * 0.8
    per_gpu = 2 * dense + 18 * student + _activations(LLAMA2_7B, 4, 256)
    assert job.gpu_mem_mb == math.ceil(per_gpu / MIB / 1000) * 1000
    # time: (6 P_s + 2 P) per training token, 2 (P_s + P) per validation token, at 120 TFLOP/s, plus reading
    # both models (fp16) and writing a checkpoint (16 P_s bytes) at 1 GB/s, x 2, + startup: 23 min, one GPU
    flops = (6 * student + 2 * dense) * WORK.train_tokens + 2 * (student + dense) * WORK.validation_tokens
    seconds = flops / 120e12 + (2 * (student + dense) + 16 * student) / 1e9
    assert job.runtime == max(15, math.ceil(2 * seconds / 60) + STARTUP_MINUTES) == 23
    assert job.gpu == 1 and job.execution == "whole_model" and launcher(job.gpu) == "python"
    # host: the bf16 student and teacher loaded once, the fp32 best weights, 4 GiB for the process
    assert job.mem_mb == math.ceil((4 * GIB + 2 * (student + dense) + 4 * student) / MIB / 1000) * 1000
    assert job.checkpoint_seconds == max(300, math.ceil((16 * student / 1e9 + 120) / 60) * 60)


def test_7b_lora_distillation_fits_one_80gb_gpu(params):
    job = Derivation(ModelShape.from_config(LLAMA2_7B), _with(params, "recover", method="lora"), WORK).rule(
        "recover", "obs", 0.2)
    dense, student = 6_738_415_616, 0.8 * 6_738_415_616
    adapters = 8 * 32 * 7 * (4096 + 4096) + 8 * 32 * 3 * (4096 + 11008)  # r x layers x (in + out) of 7 projections
    per_gpu = 2 * dense + 2 * student + 16 * adapters + _activations(LLAMA2_7B, 4, 256)
    assert (job.gpu, job.execution) == (1, "whole_model")
    assert job.gpu_mem_mb == math.ceil(per_gpu / MIB / 1000) * 1000
    assert job.checkpoint_seconds == 300  # 16 bytes per adapter parameter: 0.1 GB


@pytest.mark.parametrize(("batch_size", "gpus_per_node", "gpus"), [(64, 8, 8), (24, 8, 6), (24, 4, 3), (20, 8, 5),
                                                                    (4, 8, 1)])
def test_a_long_recovery_asks_for_gpus_that_divide_the_batch(params, batch_size, gpus_per_node, gpus):
    """One GPU would take about 11 hours: ceil(11 h / 60 min) = 11 GPUs are worth having, at most
    gpus_per_node, and the most of them for which batch_size is a multiple of micro_batch_size (4) x N."""
    long = dataclasses.replace(WORK, train_tokens=50_000_000)
    settings = ClusterSettings(gpus_per_node=gpus_per_node)
    lora = _with(params, "recover", method="lora", batch_size=batch_size)
    job = Derivation(ModelShape.from_config(LLAMA2_7B), lora, long, settings).rule("recover", "obs", 0.2)
    one = Derivation(ModelShape.from_config(LLAMA2_7B), lora, long, ClusterSettings(gpus_per_node=1)).rule(
        "recover", "obs", 0.2)
    assert one.gpu == 1 and math.ceil(one.runtime / 60) > 8
    assert job.gpu == gpus and batch_size % (4 * gpus) == 0
    assert job.gpu_mem_mb == one.gpu_mem_mb  # every GPU holds the same: data parallel
    assert job.execution == ("data_parallel" if gpus > 1 else "whole_model")
    dense, student = 6_738_415_616, 0.8 * 6_738_415_616
    flops = (4 * student + 2 * dense) * long.train_tokens + 2 * (student + dense) * long.validation_tokens
    adapters = 8 * 32 * 7 * (4096 + 4096) + 8 * 32 * 3 * (4096 + 11008)
    seconds = flops / (gpus * 120e12) + (2 * (student + dense) + 16 * adapters) / 1e9
    assert job.runtime == math.ceil(2 * seconds / 60) + STARTUP_MINUTES
    assert job.cpus_per_task == 8 * gpus
    # every process loads the bf16 student and teacher through host memory
    assert job.mem_mb == math.ceil((gpus * (4 * GIB + 2 * (student + dense)) + 4 * adapters) / MIB / 1000) * 1000
    if gpus > 1:
        assert launcher(job.gpu, job.checkpoint_seconds) == (
            f"env TORCH_ELASTIC_SHUTDOWN_TIMEOUT=300 torchrun --standalone --nproc_per_node {gpus}")
        assert slurm_extra(job) == "--signal=TERM@300"  # --requeue: the profile's slurm-requeue


def test_70b_recovery_does_not_fit_80gb_gpus_data_parallel(params):
    """The frozen bf16 student alone is 113 GB: no LoRA or objective makes data-parallel recovery fit an
    80 GB GPU; the refusal names the sharded alternative and its GPU count."""
    dense = 70_553_706_496
    student = 0.8 * dense
    assert 2 * student > 80 * GIB
    for recover in ({"method": "lora"}, {"method": "lora", "objective": "lm", "gradient_checkpointing": True}):
        settings = _with(_with(params, "recover", **recover), "activations", gram_matrices=False)
        with pytest.raises(ConfigError, match=r"recover.method='lora' is not allowed for model.source \(56.4B "
                                              r"parameters\).*recovery is data-parallel.*allowed: recover.sharding: "
                                              r"fsdp( with recover.gradient_checkpointing: true)? \(on \d GPUs\).*"
                                              r"grid.recovered_criteria: \[\]"):
            Derivation(ModelShape.from_config(LLAMA3_70B), settings, WORK).rule("recover", "obs", 0.2)


def _held_whole(config, student: float, *, full: bool, teacher: bool) -> float:
    """What FSDP holds unsharded on each GPU: the student's running and prefetched units (a decoder layer
    or the embeddings, the larger) and its head group in the training dtype; full training adds one
    unit's fp32 gradients and the bf16 autocast copies of every weight; the teacher's embeddings and head
    (gathered through its forward pass) and two of its layers in bf16."""
    h, f, layers, vocab = (config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    embedding = head = vocab * h  # untied in both models here
    dense_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h  # q, o, k, v, MLP, two norms
    unit = max((student - embedding - head) / layers, embedding)
    width = 4 if full else 2
    held = width * (head + 2 * unit) + (4 * unit + 2 * student if full else 0)
    return held + (2 * (embedding + head + 2 * dense_layer) if teacher else 0)


def test_7b_full_distillation_sharded_over_two_80gb_gpus(params):
    """FSDP: each GPU holds half of the teacher and the fp32 state, the activations and what stays whole."""
    dense = 6_738_415_616
    student = dense * 0.8
    settings = _with(params, "recover", sharding="fsdp")
    job = Derivation(ModelShape.from_config(LLAMA2_7B), settings, WORK).rule("recover", "obs", 0.2)
    per_gpu = (2 * dense + 16 * student) / 2 + _activations(LLAMA2_7B, 4, 256) \
        + _held_whole(LLAMA2_7B, student, full=True, teacher=True)
    assert 70e9 < per_gpu <= 80 * GIB * USABLE_FRACTION < (2 * dense + 18 * student)  # one GPU would not do
    assert (job.gpu, job.execution) == (2, "fsdp")
    assert job.gpu_mem_mb == math.ceil(per_gpu / MIB / 1000) * 1000 == 68000
    # the main process reads both models (the student cast to fp32); the other holds placeholders
    host = 2 * 4 * GIB + 4 * student + 2 * dense + 4 * student
    assert job.mem_mb == math.ceil(host / MIB / 1000) * 1000
    assert launcher(job.gpu, job.checkpoint_seconds).endswith("torchrun --standalone --nproc_per_node 2")


def test_70b_lora_distillation_sharded_over_one_80gb_node(params):
    """LoRA distillation of 70B: 113 GB frozen student + 141 GB teacher, sharded over the 8 GPUs of a node
    with gradient checkpointing (64 = 4 x 8 x 2); without it, 9 GPUs; full training, whose bf16 autocast
    copy alone is 113 GB on every GPU, fits no number of 80 GB GPUs."""
    dense = 70_553_706_496
    student = 0.8 * dense
    settings = _with(_with(params, "recover", method="lora", sharding="fsdp", gradient_checkpointing=True),
                     "activations", gram_matrices=False)
    job = Derivation(ModelShape.from_config(LLAMA3_70B), settings, WORK).rule("recover", "obs", 0.2)
    shared = 2 * dense + 2 * student + 16 * _lora_adapters_70b()
    checkpointed = 4 * 256 * (2 * 80 * 8192 + 20 * 128_256)
    whole = _held_whole(LLAMA3_70B, student, full=False, teacher=True)
    per_gpu = shared / 8 + checkpointed + whole
    assert shared / 4 + checkpointed + whole > 80 * GIB * USABLE_FRACTION >= per_gpu  # 4 GPUs: too few
    assert (job.gpu, job.execution, job.gpu_mem_mb) == (8, "fsdp", math.ceil(per_gpu / MIB / 1000) * 1000)
    assert job.gpu_mem_mb == 48000
    unchecked = _with(settings, "recover", gradient_checkpointing=False)
    with pytest.raises(ConfigError, match=r"recovery is sharded \(FSDP\).*that needs 9 GPUs, more than "
                                          r"gpus_per_node=8"):
        Derivation(ModelShape.from_config(LLAMA3_70B), unchecked, WORK).rule("recover", "obs", 0.2)
    full = _with(_with(params, "recover", sharding="fsdp"), "activations", gram_matrices=False)
    with pytest.raises(ConfigError, match=r"recover.method='full' is not allowed .*recovery is sharded \(FSDP\).*"
                                          r"more than any number of GPUs"):
        Derivation(ModelShape.from_config(LLAMA3_70B), full, WORK).rule("recover", "obs", 0.2)


def test_forward_stages_of_70b_run_layer_by_layer_on_one_gpu(params):
    settings = _with(params, "activations", gram_matrices=False)
    derivation = Derivation(ModelShape.from_config(LLAMA3_70B), settings, WORK)
    for job in (derivation.rule("cache_activations"), derivation.rule("score", "obs"),
                derivation.rule("evaluate_dense"), derivation.rule("evaluate_pruned", "obs", 0.2)):
        assert job.gpu == 1 and job.execution == "layer_by_layer"
        assert job.gpu_mem_mb < 80 * 1024
        assert job.mem_mb * MIB >= 2 * 0.8 * 70_553_706_496  # every weight in host memory
    seven = Derivation(ModelShape.from_config(LLAMA2_7B), params, WORK)
    assert seven.rule("evaluate_dense").execution == "whole_model"
    # fp32 surgery: the model in host memory, forward passes layer by layer on one GPU, float64 solves on the
    # CPU: 2 x 80 x (8192^3 + 28672^3) FLOPs at 200 GFLOP/s, x 2 = 644 minutes of the job's time
    prune = derivation.rule("prune", "obs", 0.2)
    assert (prune.gpu, prune.execution) == (1, "layer_by_layer") and prune.gpu_mem_mb < 80 * 1024
    assert prune.mem_mb * MIB >= 4 * 70_553_706_496
    solves = math.ceil(2 * 2 * 80 * (8192**3 + 28672**3) / 200e9 / 60)
    assert solves == 644 and solves + STARTUP_MINUTES < prune.runtime < solves + 60


def test_settings_that_cannot_fit_are_refused_all_at_once(params):
    settings = _with(_with(params, "grid", criteria=("taylor_element1", "obs")), "runtime", execution="whole_model")
    derivation = Derivation(ModelShape.from_config(LLAMA3_70B), settings, WORK)
    jobs = [("cache_activations", {}), ("score", {"criterion": "taylor_element1"}), ("recover", {"criterion": "obs",
            "ratio": "0.2"}), ("evaluate_dense", {})]
    with pytest.raises(ConfigError) as refused:
        plan_resources(derivation, jobs)
    message = str(refused.value)
    assert "activations.gram_matrices=True is not allowed for model.source (70.6B parameters)" in message
    assert "grid.criteria: 'taylor_element1' is not allowed" in message
    assert "(runtime.execution: whole_model)" in message and "allowed: runtime.execution 'auto' or 'layer_by_layer'" \
        in message
    assert "recover.method='full' is not allowed for model.source (56.4B parameters)" in message
    assert "recovery is data-parallel (each GPU holds the whole teacher and training state)" in message
    assert "more than 80 GB per GPU (--config gpu_memory_gb) allows" in message
    assert "allowed: recover.method: lora" in message
    assert "runtime.execution='whole_model' is not allowed" in message
    assert len(message.splitlines()) == 4


def test_cluster_settings_are_checked():
    assert ClusterSettings.from_config({"gpu_memory_gb": 141, "gpus_per_node": 4}) == ClusterSettings(141, 4)
    with pytest.raises(ConfigError, match=r"gpu_memory_gb=0 is not allowed; allowed: a number > 0.*"
                                          r"gpus_per_node=1.5 is not allowed; allowed: an integer >= 1"):
        ClusterSettings.from_config({"gpu_memory_gb": 0, "gpus_per_node": 1.5})
    with pytest.raises(ConfigError, match="runtime_margin=0.5 is not allowed; allowed: a number >= 1"):
        ClusterSettings.from_config({"runtime_margin": 0.5})


def test_workload_from_steps_or_from_the_data_size(params):
    capped = _with(params, "recover", max_steps=40, batch_size=8, cutoff_len=128)
    assert estimate_workload(capped, 10**9, {}, {}).train_tokens == 40 * 8 * 128
    rec = params.recover  # 2 epochs of (bytes / 4 / cutoff_len - val_size) examples
    examples = 10_000_000 // 4 // rec.cutoff_len - rec.val_size
    work = estimate_workload(params, 10_000_000, {"wikitext2": 1_200_000}, {"piqa": (500_000, 1000)})
    assert work.train_tokens == math.ceil(rec.num_epochs * examples / rec.batch_size) * rec.batch_size * rec.cutoff_len
    assert work.largest_pass_tokens == 300_000  # the whole text at every length, no window cap
    assert work.zeroshot_tokens == 500_000 // 4 * 4


def test_an_unreadable_config_falls_back_to_the_fixed_resources(tmp_path, params):
    offline_hub = dataclasses.replace(params, model=dataclasses.replace(params.model, source="nobody/not-cached"))
    plan = ClusterPlan.build(offline_hub, tmp_path, ClusterSettings())
    assert plan.derivation is None and "not-cached" in plan.reason
    job = plan.job("recover", {"criterion": "obs", "ratio": "0.2"})
    assert (job.gpu, job.mem_mb, job.runtime) == (1, FALLBACK["recover"]["mem_mb"], FALLBACK["recover"]["runtime"])
    assert plan.job("report", {}).gpu == 0


def test_gradient_scoring_of_a_70b_model_goes_layer_by_layer(params):
    """Taylor on 70B: the whole backward pass (282 GB of bf16 weights and gradients) fits no 80 GB GPU;
    one layer at a time with its gradient does, the hidden states of every layer waiting in host memory."""
    derivation = Derivation(ModelShape.from_config(LLAMA3_70B), params, WORK)
    for criterion in ("taylor_element1", "taylor_element2"):
        job = derivation.rule("score", criterion)
        assert job.execution == "layer_by_layer" and job.gpu == 1
        assert 2 * 856_000_000 < job.gpu_mem_mb * MIB < 40 * 2**30  # one 0.86B-parameter layer and more, < 40 GiB
    tokens = WORK.calibration_tokens
    assert derivation.rule("score", "taylor_element1").mem_mb * MIB >= 2 * 81 * tokens * 8192
    seven = Derivation(ModelShape.from_config(LLAMA2_7B), params, WORK)
    assert seven.rule("score", "taylor_element1").execution == "whole_model"


def test_gram_sums_of_finished_layers_are_asked_in_host_memory_layer_by_layer(params):
    """cache_activations layer by layer keeps one layer's float64 Gram sums on the GPU and every finished
    layer's in host memory (pruneflow.activations moves them there): Llama-2-7B on a 40 GB GPU."""
    job = Derivation(ModelShape.from_config(LLAMA2_7B), params, WORK, ClusterSettings(gpu_memory_gb=40)).rule(
        "cache_activations")
    h, f, layers = 4096, 11008, 32
    sums = 8 * (h * h + f * f) * layers  # 35.3 GB, float64, every layer
    assert job.execution == "layer_by_layer"
    assert job.gpu_mem_mb * MIB < 8 * 2**30  # one layer's sums (1.1 GB) with the layer and hidden states
    assert job.mem_mb * MIB >= sums + 4 * (h * h + f * f) * layers  # + the float32 copies that are saved
    whole = Derivation(ModelShape.from_config(LLAMA2_7B), params, WORK).rule("cache_activations")
    assert whole.execution == "whole_model" and whole.gpu_mem_mb * MIB >= sums


def test_layer_by_layer_gradients_hold_the_hidden_states_of_every_calibration_token(params):
    """layerwise_scores keeps every micro-batch's hidden states on the GPU, two copies (a layer's inputs and
    outputs, then the gradients from above and to below): 4 x the calibration tokens more ask for 2 x 2 bytes
    x 3 x 65,536 more tokens x 8192 = 6,144 MiB more (to the 1000 MiB the plan rounds to)."""
    more = dataclasses.replace(WORK, calibration_tokens=4 * WORK.calibration_tokens)
    before = Derivation(ModelShape.from_config(LLAMA3_70B), params, WORK).rule("score", "taylor_element1")
    after = Derivation(ModelShape.from_config(LLAMA3_70B), params, more).rule("score", "taylor_element1")
    assert before.execution == after.execution == "layer_by_layer"
    added = 2 * 2 * 3 * WORK.calibration_tokens * 8192 / MIB
    assert added == 6144 and abs(after.gpu_mem_mb - before.gpu_mem_mb - added) <= 1000
