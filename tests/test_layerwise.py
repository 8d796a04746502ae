"""Layer-by-layer execution (`pruneflow.layerwise`) gives exactly what a whole-model pass gives.

On the CPU the same kernels run on the same inputs in both paths, so every comparison is exact
(torch.equal): logits, perplexity, every activation statistic, the pruned model's weights and summary.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pruneflow import layerwise
from pruneflow.activations import collect_activation_stats
from pruneflow.checkpoint import load_pruned, save_pruned
from pruneflow.config import Params
from pruneflow.errors import ConfigError, ModelError
from pruneflow.importance import ScoringInputs, get_criterion
from pruneflow.layerwise import CheckpointWeights, ResidentWeights, open_layer_by_layer
from pruneflow.perplexity import perplexity
from pruneflow.surgery import prune_scored
from pruneflow.tiny_models import write_tiny_checkpoint

# Llama (GQA), Llama 3 (tied head), Gemma 3 (local and global layers, MQA), Phi-3 (fused projections)
FAMILIES = ["llama", "llama3", "gemma3", "phi3"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("layerwise")
    return {name: write_tiny_checkpoint(root / name, name) for name in FAMILIES}


def _ids(tokenizer, rows=6, length=16, seed=5):
    return torch.randint(0, len(tokenizer), (rows, length), generator=torch.Generator().manual_seed(seed))


def _whole_logits(model, ids, batch_size):
    with torch.no_grad():
        return torch.cat([model(input_ids=chunk, use_cache=False).logits for chunk in ids.split(batch_size)])


def _layerwise_logits(model, ids, batch_size, weights):
    out = {}
    layerwise.forward(model, ids, batch_size=batch_size, device="cpu", weights=weights,
                      logits=lambda b, _ids, logits: out.__setitem__(b, logits))
    return torch.cat([out[b] for b in sorted(out)])


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_perplexity_equal_the_whole_model(family, folders, tokenizer, one_thread):
    ids = _ids(tokenizer)
    whole = load_pruned(folders[family])
    expected = _whole_logits(whole, ids, 4)
    # layers read from disk one at a time: between uses they are meta tensors (no memory)
    skeleton, from_disk = open_layer_by_layer(folders[family], dtype=torch.float32, device="cpu")
    assert all(p.device.type == "meta" for p in skeleton.model.layers.parameters())
    assert torch.equal(_layerwise_logits(skeleton, ids, 4, from_disk), expected)
    assert all(p.device.type == "meta" for p in skeleton.model.layers.parameters())
    # the model in host memory, a layer at a time on the device
    assert torch.equal(_layerwise_logits(whole, ids, 4, ResidentWeights()), expected)

    flat = ids.reshape(-1)
    reference = perplexity(whole, flat, seq_len=12, batch_size=3)
    streamed = perplexity(skeleton, flat, seq_len=12, batch_size=3, layer_weights=from_disk)
    assert streamed.to_dict() == reference.to_dict()


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_activation_statistics_equal_the_whole_model(family, folders, tokenizer, one_thread):
    ids = _ids(tokenizer, rows=5)
    settings = dict(batch_size=2, max_tokens=23, seed=3, gram_matrices=True)
    expected = collect_activation_stats(load_pruned(folders[family]), ids, **settings)
    skeleton, from_disk = open_layer_by_layer(folders[family], dtype=torch.float32, device="cpu")
    got = collect_activation_stats(skeleton, ids, layer_weights=from_disk, **settings)
    assert sorted(got) == sorted(expected)
    different = [key for key in expected if not torch.equal(got[key], expected[key])]
    assert not different, different


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_pruning_plan_and_checkpoint_equal_the_whole_model(mode, folders, tokenizer, tmp_path, one_thread):
    """Scores from the same statistics, the same plan, the same re-fitted weights, the same summary."""
    import dataclasses

    ids = _ids(tokenizer, rows=6)
    params = Params()
    params = dataclasses.replace(params, prune=dataclasses.replace(
        params.prune, reconstruction="least_squares", reconstruction_mode=mode, layer_start=1, layer_end=4,
        attention_unit="auto", structures=("attention", "ffn"), search_samples=4),
        activations=dataclasses.replace(params.activations, batch_size=2, gram_matrices=False))
    outputs = {}
    for path in ("whole", "layer_by_layer"):
        model = load_pruned(folders["gemma3" if mode == "sequential" else "llama"])
        weights = ResidentWeights() if path == "layer_by_layer" else None
        stats = collect_activation_stats(model, ids, batch_size=2, max_tokens=16, seed=0, layer_weights=weights)
        scores = get_criterion("wanda_sp").score(model, ScoringInputs(calibration_ids=ids, activations=stats))
        summary = prune_scored(model, scores, 0.25, params, calibration_ids=ids, activations=stats,
                               layer_weights=weights)
        summary.pop("surgery_seconds")
        out = save_pruned(model, tmp_path / path, tokenizer=tokenizer)
        outputs[path] = (scores, summary, load_file(str(out / "model.safetensors")),
                         json.loads((out / "config.json").read_text()))
    (scores_a, summary_a, weights_a, config_a), (scores_b, summary_b, weights_b, config_b) = outputs.values()
    for kind in ("attention", "attention_heads", "ffn"):
        a, b = getattr(scores_a, kind) or [], getattr(scores_b, kind) or []
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), kind
    assert summary_a == summary_b
    assert summary_a["reconstruction_errors"]  # something was re-fitted on forward-pass inputs
    assert config_a == config_b
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_gram_matrices_stop_at_the_last_target(folders, tokenizer):
    from pruneflow.gram import collect_grams

    ids = _ids(tokenizer, rows=4)
    model = load_pruned(folders["llama"])
    targets = [(0, "down_proj"), (1, "o_proj")]
    expected = collect_grams(model, ids, targets, batch_size=3)
    skeleton, from_disk = open_layer_by_layer(folders["llama"], dtype=torch.float32, device="cpu")
    loaded = []
    original = from_disk.load

    def counting_load(index, layer, device):
        loaded.append(index)
        original(index, layer, device)

    from_disk.load = counting_load
    got = collect_grams(skeleton, ids, targets, batch_size=3, layer_weights=from_disk)
    assert loaded == [0, 1]  # layers above the last target are never read
    assert all(torch.equal(got[t].gram, expected[t].gram) for t in targets)

    # consumed as each layer finishes (the parallel re-fit): one layer's sums wait, in the targets' order
    from pruneflow.gram import gram_matrices

    loaded.clear()
    consumed = []
    result = gram_matrices(skeleton, targets, activations=None, calibration_ids=ids, batch_size=3,
                           layer_weights=from_disk,
                           consume=lambda target, acc: consumed.append((target, len(loaded), acc.gram.device.type)))
    assert result == {} and loaded == [0, 1]
    assert consumed == [((0, "down_proj"), 1, "cpu"), ((1, "o_proj"), 2, "cpu")]


@pytest.mark.parametrize("criterion", ["taylor_vector", "taylor_element1", "taylor_element2"])
@pytest.mark.parametrize("family", ["llama", "gemma3", "phi3"])
def test_layer_by_layer_gradients_give_the_same_taylor_scores(criterion, family, folders, tokenizer, one_thread):
    """Gradients (and the per-sample Fisher) taken one layer at a time, re-running each layer on its stored
    inputs with the gradient from above, equal one backward pass through the whole model."""
    ids = _ids(tokenizer, rows=5)
    expected = get_criterion(criterion).score(load_pruned(folders[family]),
                                              ScoringInputs(calibration_ids=ids, micro_batch_size=2))
    skeleton, from_disk = open_layer_by_layer(folders[family], dtype=torch.float32, device="cpu")
    got = get_criterion(criterion).score(skeleton, ScoringInputs(calibration_ids=ids, micro_batch_size=2,
                                                                 layer_weights=from_disk))
    for kind in ("attention", "attention_heads", "ffn"):
        pairs = list(zip(getattr(expected, kind), getattr(got, kind), strict=True))
        assert pairs and all(torch.equal(a, b) for a, b in pairs), kind
    assert all(p.device.type == "meta" and p.grad is None for p in skeleton.model.layers.parameters())


def test_the_automatic_choice_and_refusals_follow_the_memory_arithmetic(folders, monkeypatch):
    from pruneflow.checkpoint import model_skeleton

    skeleton = model_skeleton(folders["llama"])
    config = skeleton.config
    need = layerwise.memory_need(skeleton, torch.bfloat16, tokens=100)
    # by hand: bf16 weights; one layer (attention q,k,v,o + MLP gate,up,down + two norms)
    hidden, ffn, heads, kv = config.hidden_size, config.intermediate_size, config.num_attention_heads, \
        config.num_key_value_heads
    head = config.head_dim
    layer = hidden * head * (heads + 2 * kv) + heads * head * hidden + 3 * hidden * ffn + 2 * hidden
    outside = config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2) + hidden
    assert need.largest_layer == 2 * layer and need.outside_layers == 2 * outside
    assert need.hidden_states == 100 * hidden * 2 * 2
    assert need.layer_by_layer == int((2 * outside + 2 * layer + need.hidden_states) * layerwise.HEADROOM)
    assert need.whole_model == int((2 * outside + config.num_hidden_layers * 2 * layer + need.hidden_states)
                                   * layerwise.HEADROOM)
    fisher = layerwise.memory_need(skeleton, torch.bfloat16, tokens=100, gradients="fisher")
    projections = layer - 2 * hidden
    assert fisher.largest_layer == 2 * layer + projections * (2 + 8 + 8)
    mean = layerwise.memory_need(skeleton, torch.bfloat16, tokens=100, gradients="mean")
    assert mean.whole_model == int((2 * outside + config.num_hidden_layers * (2 * layer + 2 * projections)
                                    + 8 * projections + need.hidden_states) * layerwise.HEADROOM)

    cpu = torch.device("cpu")
    monkeypatch.setattr(layerwise, "free_memory_bytes", lambda _device: need.whole_model)
    assert layerwise.choose_execution("auto", skeleton, torch.bfloat16, cpu, tokens=100) == "whole_model"
    monkeypatch.setattr(layerwise, "free_memory_bytes", lambda _device: need.whole_model - 1)
    assert layerwise.choose_execution("auto", skeleton, torch.bfloat16, cpu, tokens=100) == "layer_by_layer"
    with pytest.raises(ConfigError, match=r"runtime.execution='whole_model' does not fit.*allowed: 'layer_by_layer'"):
        layerwise.choose_execution("whole_model", skeleton, torch.bfloat16, cpu, tokens=100)
    monkeypatch.setattr(layerwise, "free_memory_bytes", lambda _device: need.layer_by_layer - 1)
    with pytest.raises(ConfigError, match="even one layer at a time does not fit.*largest layer"):
        layerwise.choose_execution("auto", skeleton, torch.bfloat16, cpu, tokens=100, what="score taylor_vector")
    with pytest.raises(ConfigError, match="runtime.execution='streamed'.*layer_by_layer"):
        layerwise.choose_execution("streamed", skeleton, torch.float32, cpu)
    from pruneflow.oneshot import params_from_mapping

    with pytest.raises(ConfigError, match="runtime.execution.*'streamed'.*'auto', 'whole_model', 'layer_by_layer'"):
        params_from_mapping({"runtime": {"execution": "streamed"}})

    monkeypatch.setattr(layerwise, "free_memory_bytes", lambda _device: need.layer_by_layer * 4)
    model, weights = layerwise.open_model(folders["llama"], execution="layer_by_layer", dtype=torch.float32,
                                          device=cpu)
    assert isinstance(weights, CheckpointWeights) and next(model.model.layers.parameters()).is_meta
    # on a CPU the resident model and what runs on the "device" are one memory
    loaded = model_skeleton(folders["llama"], dtype=torch.float32, buffers=True)  # what open_model measures
    resident = layerwise.memory_need(loaded, torch.float32, tokens=0, resident=True)
    assert resident.host_layer_by_layer == layerwise.weight_bytes(loaded, torch.float32)
    monkeypatch.setattr(layerwise, "free_memory_bytes", lambda _device: resident.layer_by_layer_one_memory - 1)
    with pytest.raises(ConfigError, match="even one layer at a time does not fit.*what waits in host memory"):
        layerwise.open_model(folders["llama"], execution="layer_by_layer", dtype=torch.float32, device=cpu,
                             resident=True)
    monkeypatch.setattr(layerwise, "free_memory_bytes", lambda _device: resident.layer_by_layer_one_memory)
    model, weights = layerwise.open_model(folders["llama"], execution="layer_by_layer", dtype=torch.float32,
                                          device=cpu, resident=True)
    assert isinstance(weights, ResidentWeights) and not next(model.parameters()).is_meta
    monkeypatch.setattr(layerwise, "free_memory_bytes", lambda _device: need.whole_model * 4)
    model, weights = layerwise.open_model(folders["llama"], execution="whole_model", dtype=torch.float32,
                                          device=cpu)
    assert weights is None and not next(model.parameters()).is_meta


def test_gram_sums_and_host_memory_are_counted_and_refused_by_name(folders, monkeypatch):
    """Gram sums: every layer's on the device whole, one layer's layer by layer (the rest in host memory);
    with a GPU, what layer by layer keeps in host memory (stored hidden states, sums) is checked against
    the host's available memory."""
    from pruneflow.checkpoint import model_skeleton

    skeleton = model_skeleton(folders["llama"])
    config = skeleton.config
    hidden, ffn, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    o_width = config.num_attention_heads * config.head_dim
    plain = layerwise.memory_need(skeleton, torch.bfloat16, tokens=100)
    grams = layerwise.memory_need(skeleton, torch.bfloat16, tokens=100, grams="saved")
    per_layer = 8 * (o_width ** 2 + o_width + ffn ** 2 + ffn)
    assert grams.gram_sums == layers * per_layer
    product = 12 * max(o_width, ffn) ** 2  # one batch's float32 x^T x and its float64 copy
    states = 100 * hidden * 2 * 2
    assert grams.whole_model == int((layerwise.weight_bytes(skeleton, torch.bfloat16) + layers * per_layer + product
                                     + states) * layerwise.HEADROOM)
    assert grams.largest_layer == plain.largest_layer + per_layer + product
    assert grams.host_layer_by_layer == plain.host_layer_by_layer + layers * (per_layer + per_layer // 2)
    consumed = layerwise.memory_need(skeleton, torch.bfloat16, tokens=100, grams="consumed")  # one layer waits
    assert consumed.host_layer_by_layer == plain.host_layer_by_layer + 2 * per_layer
    assert (consumed.whole_model, consumed.layer_by_layer) == (grams.whole_model, grams.layer_by_layer)
    # the sequential re-fit: one projection's sums at a time, the largest (down_proj's here), whole or not
    one = layerwise.memory_need(skeleton, torch.bfloat16, tokens=100, grams="one_projection")
    largest_sums = 8 * (max(o_width, ffn) ** 2 + max(o_width, ffn))
    assert one.gram_sums == largest_sums and one.largest_layer == plain.largest_layer + largest_sums + product
    assert one.whole_model == int((layerwise.weight_bytes(skeleton, torch.bfloat16) + largest_sums + product
                                   + states) * layerwise.HEADROOM)
    taylor = layerwise.memory_need(skeleton, torch.bfloat16, tokens=100, gradients="mean")
    assert taylor.host_layer_by_layer == plain.host_layer_by_layer + layers * 100 * hidden * 2

    gpu = torch.device("cuda")  # only compared, never used: the free memory is patched
    room = {"cuda": taylor.layer_by_layer, "cpu": taylor.host_layer_by_layer - 1}
    monkeypatch.setattr(layerwise, "free_memory_bytes", lambda device: room[device.type])
    with pytest.raises(ConfigError, match=r"keeps about .* in host memory .*input hidden states.*allowed: a machine "
                                          r"with more memory, fewer calibration tokens \(calibration.num_samples\)"):
        layerwise.choose_execution("auto", skeleton, torch.bfloat16, gpu, tokens=100, gradients="mean",
                                   remedies=["fewer calibration tokens (calibration.num_samples)"])
    room["cpu"] += 1
    assert layerwise.choose_execution("auto", skeleton, torch.bfloat16, gpu, tokens=100,
                                      gradients="mean") == "layer_by_layer"
    room["cuda"] = taylor.layer_by_layer - 1
    with pytest.raises(ConfigError, match=r"even one layer.*allowed: a device with more free memory, "
                                          r"runtime.dtype='bfloat16'"):
        layerwise.choose_execution("auto", skeleton, torch.bfloat16, gpu, tokens=100, gradients="mean",
                                   remedies=layerwise.dtype_remedy(torch.float32))
    assert layerwise.dtype_remedy(torch.bfloat16) == []
    # a model already on the device: its weights count as free (the Python API's model on its device)
    room["cuda"] = plain.whole_model - layerwise.weight_bytes(skeleton, torch.bfloat16)
    with pytest.raises(ConfigError, match="'whole_model' does not fit"):
        layerwise.choose_execution("whole_model", skeleton, torch.bfloat16, gpu, tokens=100)
    assert layerwise.choose_execution("auto", skeleton, torch.bfloat16, gpu, tokens=100,
                                      on_device=layerwise.weight_bytes(skeleton, torch.bfloat16)) == "whole_model"
    # ... but not layer by layer, whose estimate holds one layer of it on the device, not the model
    room["cuda"] = taylor.layer_by_layer - 1
    with pytest.raises(ConfigError, match="even one layer at a time does not fit"):
        layerwise.choose_execution("layer_by_layer", skeleton, torch.bfloat16, gpu, tokens=100, gradients="mean",
                                   on_device=layerwise.weight_bytes(skeleton, torch.bfloat16))
    from pruneflow.oneshot import _same_device

    cuda, cuda0, cuda1 = torch.device("cuda"), torch.device("cuda:0"), torch.device("cuda:1")
    assert _same_device(cuda0, cuda) and _same_device(cuda0, cuda0) and _same_device(torch.device("cpu"), torch.device("cpu"))
    cpu = torch.device("cpu")
    assert not _same_device(cuda1, cuda0) and not _same_device(cpu, cuda) and not _same_device(cuda0, cpu)


def test_a_finished_layer_leaves_the_device_before_the_next_runs(folders, tokenizer, monkeypatch):
    """Layer by layer, each batch's output replaces its input (one copy of the hidden states), and a
    layer's Gram sums move to host memory as soon as it has run, before the next layer is read."""
    import gc
    import weakref

    from pruneflow.gram import GramAccumulator

    events = []
    skeleton, from_disk = open_layer_by_layer(folders["llama"], dtype=torch.float32, device="cpu")
    loads = from_disk.load
    monkeypatch.setattr(from_disk, "load", lambda index, *a: (events.append(("load", index)), loads(index, *a)))
    moves = GramAccumulator.to
    monkeypatch.setattr(GramAccumulator, "to", lambda self, device: (events.append(("to", str(device))),
                                                                     moves(self, device))[1])
    collect_activation_stats(skeleton, _ids(tokenizer), batch_size=2, max_tokens=8, seed=0,
                             gram_matrices=True, layer_weights=from_disk)
    layers = skeleton.config.num_hidden_layers
    expected = []
    for index in range(layers):
        expected += [("load", index), ("to", "cpu"), ("to", "cpu")]  # o_proj and down_proj sums
    assert events == expected

    outside = layerwise.capture_inputs(skeleton, _ids(tokenizer), batch_size=2, device="cpu")
    embeddings = [weakref.ref(h) for h in outside.hidden]
    alive = []

    def after_layer(index):
        gc.collect()
        alive.append(sum(ref() is not None for ref in embeddings))

    final = layerwise.run_layers(skeleton, outside, from_disk, "cpu", after_layer=after_layer)
    assert final is outside.hidden and alive == [0] * layers


def test_a_checkpoint_missing_a_layer_tensor_is_named(folders, tmp_path):
    import shutil

    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    shutil.copytree(folders["llama"], broken)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    skeleton, weights = open_layer_by_layer(broken, dtype=torch.float32, device="cpu")
    with pytest.raises(ModelError, match="model.layers.1.mlp.up_proj.weight"):
        layerwise.forward(skeleton, torch.zeros(1, 4, dtype=torch.long), batch_size=1, device="cpu",
                          weights=weights)
    # a truncated file: the tensor past its end is named
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelError, match="truncated"):
        open_layer_by_layer(broken, dtype=torch.float32, device="cpu")


def test_stages_write_the_same_outputs_layer_by_layer(staged_project, tmp_path, one_thread):
    """cache_activations, score (a gradient and a weight criterion), prune and evaluate run with
    runtime.execution: layer_by_layer give what the whole-model runs of the staged project gave."""
    import shutil

    from pruneflow.tensor_files import read_metadata

    from .tiny_project import run_stages_in_process, set_param

    root = tmp_path / "project"
    shutil.copytree(staged_project, root, symlinks=True)
    set_param(root, "evaluate.zeroshot_tasks", [])
    dense, cal = "data/models/dense", "data/calibration/calibration.safetensors"
    act, scores = "data/activations/activations.safetensors", "data/scores/{}.safetensors"

    def commands(tag: str) -> list[tuple[str, list[str]]]:
        return [
            ("cache_activations", ["--model", dense, "--calibration", cal, "--out", f"{tag}/act.safetensors"]),
            ("score", ["--model", dense, "--calibration", cal, "--activations", act, "--criterion",
                       "taylor_element1", "--out", f"{tag}/taylor.safetensors"]),
            ("prune", ["--model", dense, "--scores", scores.format("l2_magnitude"), "--activations",
                       f"{tag}/act.safetensors", "--calibration", cal, "--criterion", "l2_magnitude", "--ratio", "0.3",
                       "--out", f"{tag}/pruned"]),
            ("evaluate", ["--model", dense, "--model-id", "dense", "--out", f"{tag}/metrics.json"]),
        ]

    set_param(root, "runtime.execution", "whole_model")
    run_stages_in_process(root, commands=commands("whole"))
    set_param(root, "runtime.execution", "layer_by_layer")
    run_stages_in_process(root, commands=commands("streamed"))

    for name in ("act.safetensors", "taylor.safetensors"):
        a, b = load_file(str(root / "whole" / name)), load_file(str(root / "streamed" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert read_metadata(root / "streamed" / "act.safetensors")["execution"] == "layer_by_layer"
    assert read_metadata(root / "streamed" / "taylor.safetensors")["execution"] == "layer_by_layer"
    a, b = (load_file(str(root / tag / "pruned" / "model.safetensors")) for tag in ("whole", "streamed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summaries = [json.loads((root / tag / "pruned" / "pruning_summary.json").read_text()) for tag in ("whole", "streamed")]
    assert summaries[0]["removed_ffn_channels"] == summaries[1]["removed_ffn_channels"]
    metrics = [json.loads((root / tag / "metrics.json").read_text()) for tag in ("whole", "streamed")]
    assert metrics[0]["perplexity_by_seq_len"] == metrics[1]["perplexity_by_seq_len"]
    assert metrics[0]["perplexity_by_seq_len"]  # perplexity was measured
    assert [m["setting"]["execution"] for m in metrics] == ["whole_model", "layer_by_layer"]
    assert metrics[0]["params"] == metrics[1]["params"]


def test_the_python_api_prunes_layer_by_layer_to_the_same_model(folders, tokenizer, one_thread):
    """`pruneflow.prune` with runtime.execution: layer_by_layer (a Taylor criterion and a re-fit with
    its own forward passes) gives the model the whole-model run gives."""
    import pruneflow

    texts = [" ".join(f"w{(i * 7 + j) % 50}" for j in range(40)) for i in range(12)]
    results = {}
    for execution in ("whole_model", "layer_by_layer"):
        model = load_pruned(folders["llama"])
        overrides = {"runtime": {"execution": execution}, "calibration": {"num_samples": 4, "seq_len": 16},
                     "activations": {"gram_matrices": False},
                     "prune": {"layer_start": 1, "layer_end": 3, "reconstruction_mode": "sequential"}}
        result = pruneflow.prune(model, tokenizer, texts, criterion="taylor_element1", ratio=0.25, params=overrides)
        results[execution] = (result.summary, model.state_dict())
    (summary_a, state_a), (summary_b, state_b) = results.values()
    for summary in (summary_a, summary_b):
        summary.pop("surgery_seconds", None)
    assert summary_a == summary_b and summary_a["reconstruction_errors"]
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_the_python_api_counts_a_model_on_its_device_as_fitting(folders, tokenizer, monkeypatch):
    """A model already on the target device needs no room for its weights: with free memory short of
    the whole need by exactly the weights, auto and whole_model run there instead of being refused."""
    import pruneflow

    texts = [" ".join(f"w{(i * 7 + j) % 50}" for j in range(40)) for i in range(12)]
    overrides = {"runtime": {"device": "cpu"}, "calibration": {"num_samples": 4, "seq_len": 16},
                 "prune": {"layer_start": 1, "layer_end": 3, "reconstruction": "none"}}
    model = load_pruned(folders["llama"])
    need = layerwise.memory_need(model, torch.float32, tokens=4 * 16)
    weights = layerwise.weight_bytes(model, torch.float32)
    monkeypatch.setattr(layerwise, "free_memory_bytes", lambda _device: need.whole_model - weights)
    for execution in ("auto", "whole_model"):
        model = load_pruned(folders["llama"])
        overrides["runtime"]["execution"] = execution
        result = pruneflow.prune(model, tokenizer, texts, criterion="l2_magnitude", ratio=0.25, params=overrides)
        assert result.summary["params_after"] < result.summary["params_before"]
    monkeypatch.setattr(layerwise, "free_memory_bytes", lambda _device: need.whole_model - weights - 1)
    with pytest.raises(ConfigError, match="'whole_model' does not fit"):
        pruneflow.prune(load_pruned(folders["llama"]), tokenizer, texts, criterion="l2_magnitude", ratio=0.25,
                        params=overrides)


def test_layers_read_under_inference_mode_can_take_gradients_later(folders, tokenizer, one_thread):
    """Perplexity (under torch.inference_mode) then Taylor scoring on the same layer-by-layer model:
    weights read or moved during the first pass stay ordinary tensors, so the second can differentiate."""
    ids = _ids(tokenizer, rows=4)
    skeleton, from_disk = open_layer_by_layer(folders["llama"], dtype=torch.bfloat16, device="cpu")
    perplexity(skeleton, ids.reshape(-1), seq_len=16, batch_size=2, layer_weights=from_disk)
    got = get_criterion("taylor_element1").score(skeleton, ScoringInputs(calibration_ids=ids, layer_weights=from_disk))
    expected = get_criterion("taylor_element1").score(load_pruned(folders["llama"], dtype=torch.bfloat16),
                                                      ScoringInputs(calibration_ids=ids))
    assert all(torch.equal(a, b) for a, b in zip(expected.ffn, got.ffn, strict=True))
