"""Checkpoints outside pruneflow: Hugging Face's own loader (trust_remote_code), lm-eval's CLI, servable
widths, GGUF for llama.cpp, model cards and the source dtype."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pruneflow.architectures import count_parameters, layer_shapes
from pruneflow.checkpoint import LAYER_SHAPES_KEY, load_pruned, placeholder_model, save_pruned
from pruneflow.errors import ConfigError, ModelError
from pruneflow.importance import ScoringInputs, get_criterion
from pruneflow.pruning import apply_pruning, plan_pruning
from pruneflow.tiny_models import TINY_CONFIGS, TINY_FAMILIES, tiny_model, write_tiny_checkpoint

from .tiny_project import make_tiny_project, run_stages_in_process, set_param

# relative error of the logits (max |difference| / max |logit|) a GGUF tensor type keeps on the tiny models;
# measured 0 (f32), 2.8e-4 (f16), 2.0e-3 (bf16), 6.6e-3 (q8_0): each bound about 3x the measurement
GGUF_TOLERANCE = {"f32": 1e-6, "f16": 1e-3, "bf16": 6e-3, "q8_0": 2e-2}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _pruned(family, tokenizer, ids, layers=range(1, 3), ratio=0.25, structures=("attention", "ffn"), **plan):
    model = tiny_model(family, vocab_size=len(tokenizer))
    scores = get_criterion("l2_magnitude").score(model, ScoringInputs(calibration_ids=ids))
    apply_pruning(model, plan_pruning(model, scores, ratio, list(layers), structures, **plan))
    return model


def _clean_env() -> dict[str, str]:
    """A process that has never imported pruneflow and cannot (no source path): a user's Python."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_MODULES_CACHE=env.get("HF_MODULES_CACHE", ""))
    if not env["HF_MODULES_CACHE"]:
        env.pop("HF_MODULES_CACHE")
    return env


def test_per_layer_checkpoints_load_with_from_pretrained_outside_pruneflow(tokenizer, token_ids, tmp_path):
    """Every family: trust_remote_code=True gives identical logits in a process without pruneflow;
    without it, transformers stops and names trust_remote_code (not a size mismatch)."""
    for family in TINY_FAMILIES:
        model = _pruned(family, tokenizer, token_ids)
        assert len(set(layer_shapes(model))) > 1
        save_pruned(model, tmp_path / family, tokenizer=tokenizer)
        config = json.loads((tmp_path / family / "config.json").read_text())
        assert config["model_type"] == f"pruneflow_{family}" and len(config[LAYER_SHAPES_KEY]) == 4
        assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
        save_file({"ids": token_ids, "logits": _logits(model, token_ids)}, tmp_path / f"{family}.expected")
    script = f"""
import sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
for family in {list(TINY_FAMILIES)!r}:
    path = {str(tmp_path)!r} + "/" + family
    expected = load_file(path + ".expected")
    try:
        AutoModelForCausalLM.from_pretrained(path)
        raise SystemExit(family + ": loaded without trust_remote_code")
    except ValueError as exc:
        assert "trust_remote_code=True" in str(exc), str(exc)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=expected["ids"]).logits
    assert torch.equal(logits, expected["logits"]), family + ": logits differ"
    assert type(model).__name__.startswith("Pruneflow"), type(model).__name__
assert not any(name.startswith("pruneflow") for name in sys.modules), "pruneflow was imported"
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_clean_env(), capture_output=True,
                            text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr[-3000:]


def test_lm_eval_cli_runs_on_a_per_layer_checkpoint_and_agrees_with_pruneflow(tokenizer, token_ids, tmp_path):
    """lm-eval's own command line (model built by from_pretrained with trust_remote_code) scores the same
    documents to the same accuracy as pruneflow's in-process evaluation of the same checkpoint."""
    from pruneflow.zeroshot import TASK_PREFIX, _task_config, evaluate_zeroshot

    from .conftest import PROJECT_ROOT

    model = _pruned("llama", tokenizer, token_ids)
    save_pruned(model, tmp_path / "ckpt", tokenizer=tokenizer)
    data = tmp_path / "data" / "zeroshot"
    data.mkdir(parents=True)
    lines = (PROJECT_ROOT / "data/raw/zeroshot/piqa.jsonl").read_text().splitlines()[:6]
    (data / "piqa.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "piqa.yaml").write_text(yaml.safe_dump(
        _task_config("piqa", data / "piqa.jsonl", tmp_path / "cache"), sort_keys=False))
    result = subprocess.run(
        ["lm_eval", "--model", "hf", "--model_args", f"pretrained={tmp_path / 'ckpt'},trust_remote_code=True,"
         "dtype=float32", "--tasks", TASK_PREFIX + "piqa", "--include_path", str(tmp_path / "tasks"),
         "--device", "cpu", "--batch_size", "2", "--output_path", str(tmp_path / "out")],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    [results_file] = (tmp_path / "out").rglob("results_*.json")
    cli = json.loads(results_file.read_text())["results"][TASK_PREFIX + "piqa"]
    ours = evaluate_zeroshot(load_pruned(tmp_path / "ckpt"), tokenizer, ["piqa"], tmp_path / "data", limit=None,
                             batch_size=2, device="cpu")["piqa"]
    assert ours["n"] == 6
    assert cli["acc,none"] == pytest.approx(ours["acc"]) and cli["acc_norm,none"] == pytest.approx(ours["acc_norm"])


def test_load_pruned_takes_from_pretrained_arguments(tokenizer, token_ids, tmp_path):
    model = _pruned("qwen2", tokenizer, token_ids)
    save_pruned(model, tmp_path / "ckpt", tokenizer=tokenizer, dtype=torch.bfloat16)
    stored = load_pruned(tmp_path / "ckpt", dtype="auto", device_map="cpu", attn_implementation="eager")
    assert next(stored.parameters()).dtype == torch.bfloat16
    assert stored.config._attn_implementation == "eager"
    assert layer_shapes(stored) == layer_shapes(model)
    assert next(model.parameters()).dtype == torch.bfloat16  # saving casts in place, as documented
    upcast = load_pruned(tmp_path / "ckpt").state_dict()  # float32 by default: the stored bf16 values, upcast
    assert all(upcast[k].dtype == torch.float32 and torch.equal(upcast[k], v.float())
               for k, v in model.state_dict().items())
    with pytest.raises(TypeError):
        load_pruned(tmp_path / "ckpt", not_an_argument=1)


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("multiple", [16, 32])
def test_servable_widths_are_one_multiple_everywhere_and_load_plainly(family, multiple, tokenizer, token_ids,
                                                                        tmp_path):
    model = _pruned(family, tokenizer, token_ids, layers=range(4), ratio=0.3, width_multiple=multiple)
    shapes = layer_shapes(model)
    assert len(set(shapes)) == 1 and shapes[0].intermediate_size % multiple == 0
    assert shapes[0].intermediate_size < 96  # something was removed
    save_pruned(model, tmp_path / "ckpt", tokenizer=tokenizer)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == family and "auto_map" not in config and LAYER_SHAPES_KEY not in config
    assert config["intermediate_size"] == shapes[0].intermediate_size
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    assert type(plain).__name__ == {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                    "qwen2": "Qwen2ForCausalLM"}[family]
    assert torch.equal(_logits(plain, token_ids), _logits(model, token_ids))


def test_width_multiple_rounds_to_the_nearest_multiple(llama, token_ids):
    scores = get_criterion("l2_magnitude").score(llama, ScoringInputs(calibration_ids=token_ids))
    total = count_parameters(llama)
    exact = plan_pruning(llama, scores, 0.2, range(4), ("ffn",))
    rounded = plan_pruning(llama, scores, 0.2, range(4), ("ffn",), width_multiple=16)
    kept = 96 - len(exact.removed_ffn_channels[0])
    assert len(rounded.kept_ffn_channels[0]) == round(kept / 16) * 16
    assert abs(rounded.expected_params_removed - 0.2 * total) <= 4 * 8 * 3 * 64  # half a multiple per layer
    with pytest.raises(ConfigError, match="allocation='uniform'"):
        plan_pruning(llama, scores, 0.2, range(4), width_multiple=16, allocation="global")


def test_prune_servable_stage_and_gguf_export_stage(staged_project, tmp_path):
    """The servable stage writes a vanilla, multiple-of-N checkpoint with a card; export_gguf turns it into
    a GGUF file transformers reloads within the q8_0 tolerance, and records it for freshness checks."""
    from pruneflow.pipeline.records import read_record

    root = tmp_path / "project"
    shutil.copytree(staged_project, root)
    set_param(root, "export.gguf_type", "q8_0")
    common = ["--model", "data/models/dense", "--scores", "data/scores/l2_magnitude.safetensors", "--activations",
              "data/activations/activations.safetensors", "--calibration", "data/calibration/calibration.safetensors",
              "--criterion", "l2_magnitude", "--ratio", "0.3"]
    run_stages_in_process(root, commands=[
        ("prune", [*common, "--servable", "--out", "data/servable/l2_magnitude/0.3"]),
        ("export_gguf", ["--model", "data/servable/l2_magnitude/0.3", "--out", "data/gguf/servable/l2_magnitude/0.3.gguf"]),
    ])
    folder = root / "data/servable/l2_magnitude/0.3"
    summary = json.loads((folder / "pruning_summary.json").read_text())
    assert summary["servable"] and summary["width_multiple"] == 16 and summary["pruned_layers"] == [0, 1, 2, 3]
    assert len({json.dumps(s) for s in summary["layer_shapes_after"]}) == 1
    assert summary["layer_shapes_after"][0]["intermediate_size"] % 16 == 0
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    card = ModelCard.load(folder / "README.md")
    assert "servable" in card.text and "multiple of 16" in card.text
    gguf_file = root / "data/gguf/servable/l2_magnitude/0.3.gguf"
    assert read_record(gguf_file)["instance"] == "export_gguf/l2_magnitude/0.3"
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = _logits(load_pruned(folder), ids)
    gguf = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    error = ((_logits(gguf.eval(), ids) - expected).abs().max() / expected.abs().max()).item()
    assert error <= GGUF_TOLERANCE["q8_0"]


@pytest.mark.parametrize("family,structures", [("llama", ("attention", "ffn")), ("mistral", ("attention", "ffn")),
                                               ("qwen2", ("ffn",))])
def test_gguf_export_reloads_within_the_tolerance_of_each_type(family, structures, tokenizer, token_ids, tmp_path):
    from pruneflow.gguf_export import export_gguf

    model = _pruned(family, tokenizer, token_ids, layers=range(4), structures=structures, width_multiple=16)
    save_pruned(model, tmp_path / "ckpt", tokenizer=tokenizer)
    expected = _logits(model, token_ids)
    sizes = {}
    for gguf_type, tolerance in GGUF_TOLERANCE.items():
        out = export_gguf(tmp_path / "ckpt", tmp_path / "gguf" / f"model-{gguf_type}.gguf", gguf_type, name="tiny")
        sizes[gguf_type] = out.stat().st_size
        reloaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
        error = ((_logits(reloaded, token_ids) - expected).abs().max() / expected.abs().max()).item()
        assert error <= tolerance, (gguf_type, error)
        if gguf_type == "f32":
            assert error == 0.0
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]
    reread = AutoTokenizer.from_pretrained(tmp_path / "gguf", gguf_file="model-f32.gguf")
    text = "The quick brown fox jumps over the lazy dog. Answer: Paris 123"
    assert reread(text)["input_ids"] == tokenizer(text)["input_ids"]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_per_layer_checkpoints_export_as_llama_cpp_deci_arrays(family, tokenizer, token_ids, tmp_path):
    """Per-layer widths go into llama.cpp's `deci` arrays (transformers has no `deci` reader: the arrays,
    tensor shapes and the rotary row order are checked here; llama.cpp itself runs them in
    benchmarks/gguf_llama_cpp.py and in the next test where its binding is installed)."""
    from gguf import GGUFReader

    from pruneflow.gguf_export import _permute, export_gguf

    model = _pruned(family, tokenizer, token_ids)
    save_pruned(model, tmp_path / "ckpt", tokenizer=tokenizer)
    out = export_gguf(tmp_path / "ckpt", tmp_path / "model.gguf", "f32")
    reader = GGUFReader(str(out))

    def array(key):
        field = reader.fields[key]
        return [int(field.parts[i][0]) for i in field.data]

    shapes = layer_shapes(model)
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "deci"
    assert array("deci.attention.head_count") == [s.num_attention_heads for s in shapes]
    assert array("deci.attention.head_count_kv") == [s.num_key_value_heads for s in shapes]
    assert array("deci.feed_forward_length") == [s.intermediate_size for s in shapes]
    tensors = {t.name: t for t in reader.tensors}
    for index, shape in enumerate(shapes):  # GGUF lists dimensions innermost first
        attn = model.model.layers[index].self_attn
        assert tuple(int(d) for d in tensors[f"blk.{index}.attn_q.weight"].shape) == (64, 16 * shape.num_attention_heads)
        assert tuple(int(d) for d in tensors[f"blk.{index}.ffn_down.weight"].shape) == (shape.intermediate_size, 64)
        k_rows = np.asarray(tensors[f"blk.{index}.attn_k.weight"].data).reshape(-1, 64)
        assert np.array_equal(k_rows, _permute(attn.k_proj.weight.detach().numpy(), shape.num_key_value_heads))
        assert (f"blk.{index}.attn_q.bias" in tensors) == (attn.q_proj.bias is not None)


def test_gguf_files_run_in_llama_cpp(tokenizer, token_ids, tmp_path):
    """llama.cpp itself (its Python binding, where installed: it compiles llama.cpp) on the per-layer
    `deci` and the one-width `llama` files: logits within f32 / q8_0 tolerance of transformers'."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from pruneflow.gguf_export import export_gguf

    ids = token_ids[0].tolist()
    for name, model in (("per-layer", _pruned("llama", tokenizer, token_ids)),
                        ("one-width", _pruned("qwen2", tokenizer, token_ids, layers=range(4), width_multiple=16))):
        save_pruned(model, tmp_path / name, tokenizer=tokenizer)
        expected = _logits(model, token_ids[:1])[0].double().numpy()
        for gguf_type, tolerance in (("f32", 1e-3), ("q8_0", 3e-2)):
            out = export_gguf(tmp_path / name, tmp_path / f"{name}-{gguf_type}.gguf", gguf_type, name="tiny")
            llm = llama_cpp.Llama(model_path=str(out), logits_all=True, n_ctx=64, verbose=False)
            llm.eval(ids)
            got = np.array(llm.scores[: len(ids)], dtype=np.float64)
            llm.close()
            assert np.abs(got - expected).max() / np.abs(expected).max() <= tolerance, (name, gguf_type)


def test_gguf_export_refuses_bad_input(tokenizer, token_ids, tmp_path):
    from pruneflow.gguf_export import export_gguf

    save_pruned(_pruned("llama", tokenizer, token_ids), tmp_path / "llama", tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="gguf_type='q4' is not allowed; allowed: f32, bf16, f16, q8_0"):
        export_gguf(tmp_path / "llama", tmp_path / "x.gguf", "q4")
    (tmp_path / "llama" / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="no tokenizer.json"):
        export_gguf(tmp_path / "llama", tmp_path / "x.gguf", "f32")
    assert not (tmp_path / "x.gguf").exists()


def test_model_card_parses_and_carries_the_results(tmp_path, tokenizer, token_ids):
    from pruneflow.model_card import main, write_model_card
    from pruneflow.provenance import step, write_chain

    dense = write_tiny_checkpoint(tmp_path / "dense")
    ModelCard("---\nlicense: mit\nbase_model: org/tiny\n---\n# tiny\n").save(dense / "README.md")
    pruned = tmp_path / "pruned"
    save_pruned(_pruned("llama", tokenizer, token_ids), pruned, tokenizer=tokenizer)
    summary = {"criterion": "obs", "requested_ratio": 0.25, "achieved_ratio": 0.2512, "params_before": 1000,
               "params_after": 749, "attention_unit": "kv_group", "allocation": "uniform", "pruned_layers": [1, 2],
               "reconstruction": "least_squares"}
    (pruned / "pruning_summary.json").write_text(json.dumps(summary))
    write_chain(pruned, [step("prune", "python -m pruneflow.stages.prune --ratio 0.25", {})])
    metrics = {"perplexity": {"wikitext2": {"ppl": 84.42, "seq_len": 128, "windows": 48}},
               "zeroshot": {"piqa": {"acc": 0.59, "acc_norm": 0.58, "n": 100, "headline_metric": "acc"}}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    write_model_card(pruned, parent=dense, title="pruned obs 0.25")
    assert ModelCard.load(pruned / "README.md").data.eval_results is None  # nothing measured yet
    main([str(pruned), "--metrics", str(tmp_path / "metrics.json"), "--out", str(tmp_path / "share")])
    assert ModelCard.load(pruned / "README.md").data.eval_results is None  # the stage output is untouched
    assert (tmp_path / "share" / "model.safetensors").read_bytes() == (pruned / "model.safetensors").read_bytes()
    card = ModelCard.load(tmp_path / "share" / "README.md")
    assert card.text.strip().startswith("# pruned obs 0.25")
    assert card.data.license == "mit" and card.data.base_model == "org/tiny"
    assert "custom_code" in card.data.tags
    results = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {("wikitext", "perplexity"): 84.42, ("piqa", "acc"): 0.59}
    assert "0.2512" in card.text and "trust_remote_code=True" in card.text
    assert "python -m pruneflow.stages.prune --ratio 0.25" in card.text
    with pytest.raises(SystemExit, match="exists"):
        main([str(pruned), "--metrics", str(tmp_path / "metrics.json"), "--out", str(tmp_path / "share")])
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(SystemExit, match="holds no 'perplexity' or 'zeroshot' results"):
        main([str(pruned), "--metrics", str(tmp_path / "empty.json")])


def test_bf16_source_gives_bf16_checkpoints_with_cards(tmp_path):
    """prepare_model keeps the source's bf16 and prune writes bf16, license carried over into every card."""
    root = make_tiny_project(tmp_path / "project")
    source = root / "models/tiny-llama"
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    model.save_pretrained(source)
    ModelCard("---\nlicense: apache-2.0\n---\n# tiny\n").save(source / "README.md")
    set_param(root, "mlflow.enabled", False)
    run_stages_in_process(root, criteria=["l2_magnitude"], ratio=0.3)
    for folder in (root / "data/models/dense", root / "data/pruned/l2_magnitude/0.3"):
        assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
        with safe_open(folder / "model.safetensors", "pt") as weights:
            assert {weights.get_slice(k).get_dtype() for k in weights.keys()}  # noqa: SIM118 (safe_open is no dict) == {"BF16"}
        card = ModelCard.load(folder / "README.md")
        assert card.data.license == "apache-2.0" and "bfloat16" in card.text


@pytest.mark.parametrize("family", TINY_CONFIGS)
def test_placeholder_model_is_the_loaded_model_without_its_weights(family, tmp_path):
    """What the other processes of a sharded recovery hold: the loaded model's parameters (names, shapes,
    dtypes, ties, trainable flags) and buffers, the weights not read; a state dict loaded into it gives
    the loaded model's logits."""
    folder = write_tiny_checkpoint(tmp_path / family, family)
    loaded = load_pruned(folder, dtype=torch.bfloat16)
    placeholder = placeholder_model(folder, dtype=torch.bfloat16)
    assert type(placeholder) is type(loaded) and not placeholder.training
    mine, theirs = dict(placeholder.named_parameters()), dict(loaded.named_parameters())
    assert {k: (p.shape, p.dtype, p.device.type, p.requires_grad) for k, p in mine.items()} == \
        {k: (p.shape, p.dtype, p.device.type, p.requires_grad) for k, p in theirs.items()}
    head, embeddings = placeholder.get_output_embeddings().weight, placeholder.get_input_embeddings().weight
    assert (head is embeddings) == (loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight)
    buffers = dict(loaded.named_buffers())
    assert {k: torch.equal(b, buffers[k]) for k, b in placeholder.named_buffers()} == {k: True for k in buffers}
    placeholder.load_state_dict(loaded.state_dict())
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        assert torch.equal(placeholder(ids).logits, loaded(ids).logits)
