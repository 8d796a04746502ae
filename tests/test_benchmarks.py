"""The benchmark scripts' own logic on tiny inputs (their real runs write reports/benchmarks/)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys

import pytest
import torch
import yaml

from pruneflow.errors import ConfigError

from .conftest import PROJECT_ROOT


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", PROJECT_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_module_breakdown_adds_up(llama):
    efficiency = _load("efficiency")
    parts = efficiency.module_breakdown(llama, batch_size=2, seq_len=8, device=torch.device("cpu"), repeats=2)
    assert set(parts) == {"attention", "mlp", "lm_head", "other", "total"}
    assert all(parts[k] > 0 for k in ("attention", "mlp", "lm_head", "total"))
    assert parts["attention"] + parts["mlp"] + parts["lm_head"] <= parts["total"] + 1e-6
    widths = efficiency.width_report(llama)
    assert widths["intermediate_sizes"] == [llama.config.intermediate_size]


def test_families_benchmark_prunes_a_published_shape_and_reports_it():
    """One decoder layer of Qwen3-0.6B's published widths: pruned, saved and reloaded exactly."""
    import argparse

    families = _load("families")
    args = argparse.Namespace(layers=1, samples=2, seq_len=32, ratio=0.2, vocab=512, threads=1,
                              calibration_source=PROJECT_ROOT / "data/raw/wikitext-2/train.txt")
    row = families.run_one("Qwen3-0.6B", "l2_magnitude", args)
    assert row["reload_identical_logits"] and row["checkpoint_model_type"] in ("qwen3", "pruneflow_qwen3")
    assert row["achieved_ratio"] == pytest.approx(0.2, abs=0.005)
    assert row["params_before"] - row["params_after"] == pytest.approx(0.2 * row["params_before"], rel=0.03)
    assert row["layer_shapes_after"][0]["intermediate_size"] < 3072
    table = families._markdown([row, {"model": "gemma-2-2b", "criterion": "flap", "error": "boom"}], "cmd", "cpu", 512)
    assert "| Qwen3-0.6B | l2_magnitude | 16 / 8 / 3072 |" in table and "failed: boom" in table


def test_table1_params_use_the_pipeline_validation():
    table1 = _load("table1")
    base = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params = table1.build_params(base, ["flap", "random"], 0.2, ["flap"], ["laptop.evaluate.zeroshot_limit=7",
                                                                         "evaluate.ppl_seq_lens=[128, 512]"])
    assert params["grid"] == {"criteria": ["flap", "random"], "ratios": [0.2], "recovered_criteria": ["flap"],
                              "servable_criteria": []}
    assert params["laptop"]["evaluate"]["zeroshot_limit"] == 7
    assert params["evaluate"]["ppl_seq_lens"] == [128, 512]
    assert base["grid"]["criteria"] != ["flap", "random"]  # the project's own params are not touched
    with pytest.raises(ConfigError, match="did you mean 'zeroshot_limit'"):
        table1.build_params(base, ["flap"], 0.2, [], ["laptop.evaluate.zeroshot_limt=7"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        table1.build_params(base, ["flap"], 0.2, [], ["laptop.evaluate.zeroshot_limit"])


def test_table1_extrapolates_evaluation_cost_from_measured_rates():
    table1 = _load("table1")
    ppl = {"ppl": 10.0, "seq_len": 128, "windows": 10, "total_windows": 100, "split": "test"}
    metrics = {
        "seconds": 30.0,
        "timing": {"load_s": 1.0, "perplexity_s": 10.0, "zeroshot_s": 14.0, "efficiency_s": 5.0},
        "perplexity_by_seq_len": {"128": {"wikitext2": ppl}},
        "zeroshot": {"arc_easy": {"n": 7}, "piqa": {"n": 7}},
    }
    cost = table1.evaluation_cost(metrics)
    full_docs = sum(table1._task_documents(t) for t in table1.ZEROSHOT_TASKS)
    assert cost["zeroshot_documents_full_all_tasks"] == full_docs == 15576
    assert cost["estimated_full_s"] == pytest.approx(1.0 + 10.0 * 10 + 1.0 * full_docs + 5.0)
    json.dumps(cost)  # what cost.json stores


def test_pipeline_benchmark_report_compares_the_same_work():
    pipeline = _load("pipeline")
    stages = [{"job": "score/flap", "seconds": 10.0, "max_rss_mib": 900.0},
              {"job": "prune/flap/0.2", "seconds": 5.0, "max_rss_mib": None},
              {"job": "evaluate/dense", "seconds": 50.0, "max_rss_mib": 1000.0}]
    quality = {"pruned": {"wikitext2": 100.0, "ptb": 140.0, "zeroshot_average": 0.5}}
    payload = {
        "command": "python benchmarks/pipeline.py", "device": "cpu", "scale": "laptop", "overrides": [],
        "criterion": "flap", "ratio": 0.2, "pipeline_wall_s": 120.0, "stages": stages,
        "stage_peak_gpu_memory_mib": {}, "gpu": None, "ours_same_work_s": 15.0,
        "ours_same_work_jobs": ["prune/flap/0.2", "score/flap"], "ours_quality": quality,
        "rerun_after_lora_param": {"planned_jobs": {"recover": 1, "report": 1}, "wall_s": 60.0},
        "reference": {"status": "ok", "steps": {"prune (Torch-Pruning)": 30.0, "evaluate pruned": 30.0},
                      "quality": {"pruned": {"wikitext2": 130.0, "ptb": 160.0, "zeroshot_average": None}}},
    }
    text = pipeline.render(payload)
    assert "| evaluate/dense | 50.0 | 1000 |" in text and "| prune/flap/0.2 | 5.0 | - |" in text
    assert "pruneflow **0.2 min**, reference **1.0 min**" in text  # dense evaluation is not the same work
    assert "Snakemake planned: recover x1, report x1" in text
    assert "| reference pruned | 130.00 | 160.00 | - |" in text and "no GPU on this machine" in text


def test_determinism_benchmark_finds_no_drift_on_the_cpu(tmp_path, monkeypatch):
    from .tiny_project import make_tiny_project, run_stages_in_process, set_param

    determinism = _load("determinism")
    root = make_tiny_project(tmp_path / "project")
    set_param(root, "mlflow.enabled", False)
    set_param(root, "score.mi_tokens", 32)
    run_stages_in_process(root, criteria=[], ratio=0.3)  # dense model, calibration, activations
    monkeypatch.chdir(root)
    assert determinism.main(["--criteria", "taylor_element1", "mutual_information", "--ratio", "0.3",
                             "--out", str(tmp_path / "det")]) == 0
    rows = json.loads((tmp_path / "det.json").read_text())["rows"]
    assert [r["criterion"] for r in rows] == ["taylor_element1", "mutual_information"]
    for row in rows:
        assert row["same_groups_removed"]
        assert row["max_abs_score_diff"] == row["max_abs_logit_diff"] == 0.0
    assert "| taylor_element1 | 0 | 0 | yes | 0 |" in (tmp_path / "det.md").read_text()


def test_reconstruction_benchmark_compares_settings_on_the_same_windows(tmp_path, tiny_checkpoint):
    from .tiny_project import write_tiny_data

    write_tiny_data(tmp_path / "raw")
    bench = _load("reconstruction")
    out = tmp_path / "reconstruction"
    bench.main(["--model", str(tiny_checkpoint), "--data-dir", str(tmp_path / "raw"), "--calibration-source",
                str(tmp_path / "raw/wikitext-2/train.txt"), "--samples", "4", "--seq-len", "16", "--criteria",
                "obs", "--settings", "ffn|uniform|kv_group|none|parallel", "ffn|uniform|kv_group|least_squares|parallel",
                "ffn|uniform|kv_group|least_squares|parallel|0.001|9-12", "--layers", "1-3", "--ratio", "0.1",
                "--windows", "4", "--out", str(out)])
    payload = json.loads(out.with_suffix(".json").read_text())
    dense, plain, refit, bad = payload["rows"]
    assert dense["method"] == "dense" and plain["params"] == refit["params"] < dense["params"]
    # the refit lowers the error it minimises; a layer range outside the model is reported, not fatal
    assert refit["errors"]["down_proj_error_refit"] < refit["errors"]["down_proj_error_pruned"]
    assert plain["errors"]["down_proj_error_refit"] == 0.0  # `none` measures nothing
    assert "error" in bad
    assert "| obs | ffn | uniform" in out.with_suffix(".md").read_text()


def test_recovery_benchmark_compares_recipes_at_equal_steps_and_equal_time(tmp_path, tiny_checkpoint):
    from pruneflow.config import load_params

    from .tiny_project import TINY_OVERRIDES, _merge, write_tiny_data

    write_tiny_data(tmp_path / "raw")
    params = _merge(yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text()), TINY_OVERRIDES)
    params["mlflow"]["enabled"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    text = str(tmp_path / "raw/wikitext-2/train.txt")
    instructions = str(tmp_path / "raw/instruct/gsm_8k_train.json")
    bench = _load("recovery")
    out = tmp_path / "recovery"
    bench.main(["--pruned", str(tiny_checkpoint), "--dense", str(tiny_checkpoint), "--params", str(tmp_path / "params.yaml"),
                "--data-dir", str(tmp_path / "raw"), "--windows", "2", "--out", str(out), "--settings",
                f"kd:objective=distill,method=full,data={text},max_steps=3,learning_rate=1e-3",
                f"lm:objective=lm,method=lora,data={instructions},max_steps=2",
                f"lm-time:objective=lm,method=lora,data={instructions},max_steps=time:kd/lm"])
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["dense", "pruned, no recovery", "kd", "lm", "lm-time"]
    kd, lm, lm_time = rows[2:]
    assert kd["settings"]["objective"] == "distill" and kd["teacher_seconds"] > 0 and lm["teacher_seconds"] == 0
    assert kd["optimizer_steps"] == 3 and lm["optimizer_steps"] == 2
    per_step = lm["train_seconds"] / lm["optimizer_steps"]
    assert lm_time["optimizer_steps"] == max(1, round(kd["train_seconds"] / per_step))
    # the teacher is the model itself here: distillation starts at KL 0 and a step cannot lower it
    assert kd["initial_val_loss"] == pytest.approx(0.0, abs=1e-6)
    text_md = out.with_suffix(".md").read_text()
    assert "| kd | distill | full | train.txt | 0.001 | 3 |" in text_md
    with pytest.raises(SystemExit, match="unknown recover key 'lora_rank'"):
        bench.recover_params(load_params(tmp_path / "params.yaml").recover, {"lora_rank": "4"}, None)


def test_scaling_benchmark_arithmetic_and_table():
    """The 7B / 70B table is memory_need on the published shapes; the report renders measured rows."""
    scaling = _load("scaling")
    rows = scaling.large_model_arithmetic(calibration_tokens=65536, ppl_tokens=340_000)
    by = {(r["model"], r["pass"]): r for r in rows}
    seven = by[("Llama-2-7B", "cache_activations")]
    assert seven["params"] == 6_738_415_616
    # (bf16 weights + hidden states in and out of a layer) x 1.25
    assert seven["whole_model"] == round((2 * 6_738_415_616 + 65536 * 4096 * 2 * 2) * 1.25 / 1e9, 2)
    assert seven["whole_model_fits_80gb"] and seven["layer_by_layer_fits_80gb"]
    grams = by[("Llama-2-7B", "cache_activations with Gram matrices")]  # float64 x x^T and x, o_proj + down_proj
    assert grams["gram_sums"] == round(8 * (4096**2 + 4096 + 11008**2 + 11008) * 32 / 1e9, 2)
    assert grams["layer_by_layer"] < seven["layer_by_layer"] + grams["gram_sums"] / 10 < grams["whole_model"]
    seventy = by[("Llama-3-70B", "score taylor (mean gradient)")]
    assert not seventy["whole_model_fits_80gb"] and seventy["layer_by_layer_fits_80gb"]
    assert seventy["layer_by_layer"] < seventy["whole_model"] / 10
    report = {"command": "cmd", "device": "cpu", "samples": 2, "seq_len": 8, "criterion": "taylor_element1",
              "large_models": rows,
              "rows": [{"layers": 2, "params": 2 * 10**8, "same_output": {"activations": True, "scores": False},
                        "stages": {"whole_model": {s: {"peak_rss_gb": 1.5, "seconds": 2.0} for s in scaling.STAGES},
                                   "layer_by_layer": {"cache_activations": {"error": "boom"}}}}]}
    table = scaling._markdown(report)
    assert "| 2 | 0.20 | cache_activations | 1.5 / 2.0 | failed: boom |" in table
    assert "2 layers: activations yes, scores NO" in table
    assert "| Llama-3-70B (70.6B) | score taylor (mean gradient) | 65536 |" in table
    # a real checkpoint on a GPU: the peak GPU memory of each stage leads each cell
    on_gpu = {**report, "gpu": True, "dtype": "bfloat16", "model": "/models/llama-1b", "model_type": "llama",
              "prune_layers": "4..13",
              "rows": [{"layers": 16, "params": 1_235_814_400, "stages": {
                  "whole_model": {s: {"peak_gpu_gb": 3.1, "peak_rss_gb": 9.0, "seconds": 4.0} for s in scaling.STAGES},
                  "layer_by_layer": {s: {"peak_gpu_gb": 0.6, "peak_rss_gb": 7.5, "seconds": 6.0}
                                     for s in scaling.STAGES}}}]}
    table = scaling._markdown(on_gpu)
    assert "| layers | params (B) | stage | whole model: peak GPU GB / peak RSS GB / s |" in table
    assert "| 16 | 1.24 | score | 3.1 / 9.0 / 4.0 | 0.6 / 7.5 / 6.0 |" in table
    assert "The checkpoint `/models/llama-1b` (llama, layers 4..13 pruned" in table and "bfloat16" in table
    assert scaling._prune_layers({"num_hidden_layers": 16}) == "4..13"  # params.yaml: 4 .. -2


def test_scaling_benchmark_counts_a_checkpoints_parameters(tiny_checkpoint, tmp_path):
    """From config.json alone (no weights read, none needed): what the loaded model counts (its tied head
    once)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    loaded = sum(p.numel() for p in model.parameters())
    scaling = _load("scaling")
    assert scaling.checkpoint_parameters(tiny_checkpoint) == loaded
    shutil.copy(tiny_checkpoint / "config.json", tmp_path / "config.json")  # no weights in this folder
    assert scaling.checkpoint_parameters(tmp_path) == loaded
