"""Speed/size measurements and the Table-1-shaped report, on tiny random models."""

from __future__ import annotations

import copy

import pytest
import torch

from pruneflow.architectures import count_parameters
from pruneflow.efficiency import macs_per_token, measure_efficiency, time_generation, weights_mib
from pruneflow.pruning import apply_pruning, plan_pruning
from pruneflow.reporting import (
    efficiency_table,
    markdown_table,
    method_label,
    results_frame,
    setting_lines,
    zeroshot_average_note,
)
from pruneflow.tiny_models import tiny_model

from .test_pruning import _scores


def test_measure_efficiency_on_a_pruned_non_uniform_model(llama, token_ids):
    plan = plan_pruning(llama, _scores(llama, token_ids), 0.3, range(1, 3), allocation="global")
    apply_pruning(llama, plan)
    result = measure_efficiency(llama, device=torch.device("cpu"), repeats=1, seq_len=16,
                                throughput_batch_size=2, generation_tokens=5)
    assert result["params"] == count_parameters(llama)
    assert result["macs_per_token"] == macs_per_token(llama, 16)
    for key in ("latency_ms_bs1", "throughput_tokens_per_s", "generation_tokens_per_s"):
        assert result[key] > 0, key
    assert result["weights_mib"] == pytest.approx(
        sum(p.numel() * p.element_size() for p in llama.parameters()) / 2**20
        + sum(b.numel() * b.element_size() for b in llama.buffers()) / 2**20)
    assert result["peak_memory_mib"] >= result["weights_mib"]
    assert result["generation_tokens"] == 5 and result["throughput_batch_size"] == 2


def test_generation_makes_exactly_the_requested_tokens(llama):
    calls = []
    original = llama.generate

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out.shape)
        return out

    llama.generate = spy
    time_generation(llama, prompt_len=8, new_tokens=6, repeats=2, device=torch.device("cpu"),
                    vocab_size=llama.config.vocab_size)
    assert calls == [torch.Size([1, 14])] * 3  # warm-up + 2 repeats


def test_macs_and_weights_drop_with_pruning(llama, token_ids):
    dense_macs, dense_mib = macs_per_token(llama, 32), weights_mib(llama)
    pruned = copy.deepcopy(llama)
    apply_pruning(pruned, plan_pruning(pruned, _scores(pruned, token_ids), 0.25, range(1, 3)))
    removed = count_parameters(llama) - count_parameters(pruned)
    # every removed parameter belonged to a linear layer of the decoder: one MAC per token each, plus the
    # attention products of the removed heads
    assert dense_macs - macs_per_token(pruned, 32) >= removed
    assert dense_mib - weights_mib(pruned) == pytest.approx(removed * 4 / 2**20)


def _record(model_id: str, variant: str, criterion, ratio, ppl: float, speed: float, **pruning) -> dict:
    return {
        "model_id": model_id, "variant": variant, "criterion": criterion, "ratio": ratio, "params": 1_000_000,
        "perplexity": {"wikitext2": {"ppl": ppl, "seq_len": 128, "windows": 4, "total_windows": 9,
                                     "split": "test"}},
        "perplexity_by_seq_len": {
            "128": {"wikitext2": {"ppl": ppl, "seq_len": 128, "windows": 4, "total_windows": 9, "split": "test"}},
            "2048": {"wikitext2": {"ppl": ppl / 2, "seq_len": 2048, "windows": 1, "total_windows": 1,
                                   "split": "test"}},
        },
        "zeroshot": {"arc_easy": {"acc": 0.5, "acc_norm": 0.25}, "boolq": {"acc": 0.75, "acc_norm": None}},
        "zeroshot_headline_metric": {"arc_easy": "acc_norm", "boolq": "acc"},
        "zeroshot_average": 0.5,
        "efficiency": {"macs_per_token": 2_000_000, "latency_ms_bs1": 10.0, "throughput_tokens_per_s": speed,
                       "generation_tokens_per_s": 50.0, "peak_memory_mib": 12.0, "seq_len": 128,
                       "throughput_batch_size": 16, "generation_tokens": 64, "peak_memory_method": "test"},
        "summaries": {"pruning": {"achieved_ratio": ratio or 0.0, **pruning}} if variant != "dense" else {},
        "setting": {"scale": "full", "device": "cpu", "dtype": "float32", "evaluate": {}},
    }


def test_report_is_shaped_like_llm_pruner_table_1():
    records = [
        _record("dense", "dense", None, 0.0, 20.0, 1000.0),
        _record("pruned/flap/0.2", "pruned", "flap", 0.2, 30.0, 1200.0, allocation="global",
                bias_compensation=True),
        _record("recovered/flap/0.2", "recovered", "flap", 0.2, 25.0, 1250.0, allocation="global"),
    ]
    frame = results_frame(records)
    assert list(frame["model"]) == ["dense", "pruned/flap/0.2", "recovered/flap/0.2"]
    assert frame.loc[1, "ppl_wikitext2@2048"] == 15.0
    assert list(frame["throughput_speedup"]) == pytest.approx([1.0, 1.2, 1.25])
    table = markdown_table(frame, records).splitlines()
    assert table[0] == ("| ratio (req / got) | method | recovered | params (M) | WikiText-2 ↓ | WikiText-2 @2048 ↓ "
                        "| BoolQ (acc) | ARC-e (acc_norm) | average |")
    assert table[2] == "| 0% | dense | - | 1.0 | 20.00 | 10.00 | 75.0 | 25.0 | 50.0 |"
    assert table[3].startswith("| 20% / 20.0% | flap+global+bias-comp | no |")
    assert table[4].startswith("| 20% / 20.0% | flap+global | LoRA |")
    distilled = _record("recovered/flap/0.2", "recovered", "flap", 0.2, 25.0, 1250.0, allocation="global")
    distilled["summaries"]["recovery"] = {"objective": "distill", "method": "full"}
    assert markdown_table(results_frame([distilled]), [distilled]).splitlines()[2].startswith(
        "| 20% / 20.0% | flap+global | distill |")
    speed = efficiency_table(frame)
    assert "| pruned/flap/0.2 | 1.0 | 2.0 | 10.0 | 1,200 | 1.20x | 50.0 | 12 |" in speed
    settings = "\n".join(setting_lines(records))
    assert "acc_norm for ARC-e; acc for BoolQ" in settings
    assert "2048 tokens, 1 of 1 windows (full set)" in settings


def _with_tasks(record: dict, tasks: list[str], headline: dict[str, str] | None = None) -> dict:
    headline = {t: "acc" for t in tasks} | (headline or {})
    return {**record, "zeroshot": {t: {"acc": 0.5, "acc_norm": 0.25, "exact_match": 0.1} for t in tasks},
            "zeroshot_tasks": tasks, "zeroshot_headline_metric": headline}


def test_report_names_the_tasks_behind_the_average_and_how_they_differ_from_the_paper():
    default = ["boolq", "piqa", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "lambada"]
    paper = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
    dense = _record("dense", "dense", None, 0.0, 20.0, 1000.0)
    pruned = _record("pruned/flap/0.2", "pruned", "flap", 0.2, 30.0, 1200.0)
    assert zeroshot_average_note([_with_tasks(dense, default), _with_tasks(pruned, default)]) == (
        "Zero-shot average over boolq, piqa, winogrande, arc_easy, arc_challenge, openbookqa, lambada — "
        "not LLM-Pruner's seven: hellaswag missing, lambada added.")
    assert zeroshot_average_note([_with_tasks(dense, paper)]) == (
        "Zero-shot average over boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa — "
        "LLM-Pruner's seven.")
    assert zeroshot_average_note([dense]).endswith("arc_easy, boolq — not LLM-Pruner's seven: piqa, hellaswag, "
                                                   "winogrande, arc_challenge, openbookqa missing.")  # older records
    mixed = zeroshot_average_note([_with_tasks(dense, paper), _with_tasks(pruned, ["piqa"])])
    assert "(for dense)" in mixed and "average over piqa (for pruned/flap/0.2)" in mixed
    assert zeroshot_average_note([{**dense, "zeroshot": {}, "zeroshot_tasks": []}]) is None

    # a task outside the built-in ones gets its own column, labelled with its headline metric
    records = [_with_tasks(r, ["boolq", "hellaswag", "my_task"], {"hellaswag": "acc_norm", "my_task": "exact_match"})
               for r in (dense, pruned)]
    header = markdown_table(results_frame(records), records).splitlines()[0]
    assert header.endswith("| BoolQ (acc) | HellaSwag (acc_norm) | my_task (exact_match) | average |")
    assert "exact_match for my_task" in "\n".join(setting_lines(records))


def test_method_label_names_non_default_structures():
    assert method_label({"variant": "dense"}) == "dense"
    assert method_label({"variant": "pruned", "criterion": "taylor_element1",
                         "summaries": {"pruning": {"allocation": "uniform", "attention_unit": "query_head"}}}) \
        == "taylor_element1+query_head"


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_efficiency_on_other_families(family, tokenizer):
    model = tiny_model(family, vocab_size=len(tokenizer))
    result = measure_efficiency(model, device=torch.device("cpu"), repeats=1, seq_len=8, throughput_batch_size=2,
                                generation_tokens=3)
    assert result["generation_tokens_per_s"] > 0


@pytest.mark.parametrize("only", ["perplexity", "zeroshot"])
def test_report_of_a_perplexity_only_or_zero_shot_only_run(tmp_path, monkeypatch, only):
    """`evaluate.ppl_datasets: []` or `evaluate.zeroshot_tasks: []`: the report stage still writes every output."""
    import json

    import yaml

    from pruneflow.stages import report

    from .conftest import PROJECT_ROOT

    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["grid"] = {"criteria": ["flap"], "ratios": [0.2], "recovered_criteria": [], "servable_criteria": []}
    params["mlflow"]["enabled"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for model_id, variant, criterion, ratio in (("dense", "dense", None, 0.0), ("pruned/flap/0.2", "pruned", "flap", 0.2)):
        record = _record(model_id, variant, criterion, ratio, 20.0, 1000.0)
        if only == "zeroshot":
            record.update(perplexity={}, perplexity_by_seq_len={})
        else:
            record.update(zeroshot={}, zeroshot_headline_metric={}, zeroshot_average=None)
        path = tmp_path / "reports/metrics" / f"{model_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))
    monkeypatch.chdir(tmp_path)
    report.main(["--out", "reports/results.md", "--csv", "reports/results.csv", "--plots-dir", "reports/plots"])
    table = (tmp_path / "reports/results.md").read_text()
    assert ("WikiText-2" in table) == (only == "perplexity") and ("ARC-e" in table) == (only == "zeroshot")
    assert ("Zero-shot average over arc_easy, boolq — not LLM-Pruner's seven" in table) == (only == "zeroshot")
    assert {p.name for p in (tmp_path / "reports/plots").iterdir()} >= {"ppl_vs_ratio.png", "quality_vs_throughput.png",
                                                                       "pruneflow_record.json"}


@pytest.mark.parametrize("only", ["perplexity", "zeroshot"])
def test_evaluate_a_perplexity_only_or_zero_shot_only_setting(staged_project, tmp_path, monkeypatch, only):
    """`evaluate.ppl_datasets: []` once ended in KeyError; either list may now be empty."""
    import json
    import shutil

    from pruneflow.stages import evaluate

    from .tiny_project import set_param

    root = tmp_path / "p"
    shutil.copytree(staged_project, root)
    set_param(root, "laptop.evaluate.ppl_datasets", ["wikitext2"] if only == "perplexity" else [])
    set_param(root, "laptop.evaluate.zeroshot_tasks", [] if only == "perplexity" else ["arc_easy"])
    set_param(root, "laptop.evaluate.zeroshot_limit", 2)
    monkeypatch.chdir(root)
    evaluate.main(["--model", "data/models/dense", "--model-id", "dense", "--out", "reports/metrics/dense.json"])
    metrics = json.loads((root / "reports/metrics/dense.json").read_text())
    assert bool(metrics["perplexity"]) == (only == "perplexity")
    assert bool(metrics["zeroshot"]) == (only == "zeroshot")
    assert (metrics["zeroshot_average"] is None) == (only == "perplexity")
    assert metrics["zeroshot_tasks"] == ([] if only == "perplexity" else ["arc_easy"])  # what the report names
    assert metrics["pruneflow_record"]["instance"] == "evaluate_dense"
