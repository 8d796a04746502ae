"""The whole DAG through Snakemake and through DVC on a tiny model, and what reruns after a change."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from .kill_hook import kill_hook_env, tree_bytes, visible_entries
from .tiny_project import (
    dvc_planned_stages,
    dvc_ran_stages,
    init_git_and_dvc,
    make_tiny_project,
    run,
    run_stages_in_process,
    set_param,
    snakemake_planned_jobs,
    stage_chain,
)
from .trace_hook import read_traces, trace_hook_env

pytestmark = pytest.mark.integration

ALL_STAGES = {"prepare_model", "calibrate", "cache_activations", "score", "prune", "recover", "evaluate_dense",
              "evaluate_pruned", "evaluate_recovered", "report", "evaluate_servable", "export_gguf"}  # prune_servable: "prune"


def _touch_source(root, relative: str) -> None:
    path = root / relative
    path.write_text(path.read_text() + "\n# edited by the rerun test\n")


def _check_outputs(root) -> None:
    results = (root / "reports/results.md").read_text()
    for model_id in ("dense", "pruned/taylor_element1/0.3", "pruned/l2_magnitude/0.3", "recovered/taylor_element1/0.3",
                     "servable/l2_magnitude/0.3"):
        assert f"| {model_id} |" in results, model_id
        metrics = json.loads((root / f"reports/metrics/{model_id}.json").read_text())
        assert metrics["perplexity"]["wikitext2"]["ppl"] > 1
        assert metrics["perplexity"]["wikitext2"]["seq_len"] == 32  # the first length is the headline
        assert metrics["perplexity_by_seq_len"]["64"]["ptb"]["ppl"] > 1
        assert metrics["efficiency"]["generation_tokens_per_s"] > 0
        assert 0 <= metrics["zeroshot"]["arc_easy"]["acc"] <= 1
        assert metrics["provenance"][-1]["stage"] == "evaluate"
    servable = json.loads((root / "data/servable/l2_magnitude/0.3/config.json").read_text())
    assert servable["model_type"] == "llama" and servable["intermediate_size"] % 16 == 0  # vanilla, one width
    assert (root / "data/gguf/servable/l2_magnitude/0.3.gguf").stat().st_size > 1000
    pruned = json.loads((root / "reports/metrics/pruned/taylor_element1/0.3.json").read_text())
    dense = json.loads((root / "reports/metrics/dense.json").read_text())
    summary = pruned["summaries"]["pruning"]
    assert summary["params_before"] == dense["params"]
    assert summary["params_after"] == pruned["params"]
    assert summary["achieved_ratio"] == pytest.approx(0.3, abs=0.02)
    assert [s["stage"] for s in pruned["provenance"]] == ["prepare_model", "score", "prune", "evaluate"]
    assert (root / "reports/plots/ppl_vs_ratio.png").stat().st_size > 1000
    assert (root / "reports/plots/quality_vs_throughput.png").stat().st_size > 1000
    # its Table-1 row (ls: the refit; distill+LoRA: the default objective with the tiny project's LoRA)
    assert re.search(r"\| 30% / \d+\.\d% \| taylor_element1\+ls \| distill\+LoRA \|", results)
    recovered = root / "data/recovered/taylor_element1/0.3"
    assert (recovered / "adapter/adapter_model.safetensors").is_file()
    recovery = json.loads((recovered / "recovery_summary.json").read_text())
    assert recovery["optimizer_steps"] == 2 and recovery["objective"] == "distill" and recovery["teacher_seconds"] > 0
    assert {"loss", "lm_loss"} <= set(recovery["history"][1]) and "val_lm_loss" in recovery["history"][0]
    # the layout search ran (attention_unit: auto) and its trials are recorded
    trials = json.loads((root / "data/pruned/taylor_element1/0.3/pruning_summary.json").read_text())["layout_search"]
    assert [t["layout"] for t in trials] == ["ffn", "kv_group+ffn", "query_head+ffn"]
    assert (root / "reports/results.csv").read_text().count("\n") == 6


def _check_mlflow(root, engine: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pruneflow")
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    parents = [r for r in runs if r.data.tags.get("pruneflow.kind") == "pipeline"]
    stages = [r for r in runs if r.data.tags.get("pruneflow.kind") == "stage"]
    assert len(parents) == 1, [r.data.tags for r in parents]
    assert parents[0].data.tags.get("pruneflow.engine") == engine
    assert {r.data.tags["mlflow.parentRunId"] for r in stages} == {parents[0].info.run_id}
    assert {r.data.tags["pruneflow.stage"] for r in stages} == {s.split("_")[0] if s.startswith("evaluate") else s
                                                              for s in ALL_STAGES}
    evaluate = [r for r in stages if r.data.tags["pruneflow.stage"] == "evaluate"]
    assert len(evaluate) == 5 and all("perplexity.wikitext2" in r.data.metrics for r in evaluate)


def _check_one_shot(root, out_dir) -> None:
    """One model without the DAG -- `pruneflow prune` and `pruneflow.prune` -- gives the DAG's checkpoint
    for the same settings (params.yaml): the same tensors and config, per-layer and servable."""
    import pruneflow
    from pruneflow.modeling import load_tokenizer
    from pruneflow.text_data import read_rows

    from .test_cli import same_tensors

    for criterion, flags, dag in (("taylor_element1", [], "data/pruned/taylor_element1/0.3"),
                                  ("l2_magnitude", ["--servable"], "data/servable/l2_magnitude/0.3")):
        out = out_dir / criterion
        run(["pruneflow", "prune", "data/models/dense", "--criterion", criterion, "--ratio", "0.3", "--out", str(out),
             *flags], root)
        assert same_tensors(root / dag, out), dag
        assert json.loads((out / "config.json").read_text()) == json.loads((root / dag / "config.json").read_text())
        one_shot, built = (json.loads((p / "pruning_summary.json").read_text()) for p in (out, root / dag))
        assert {k: v for k, v in one_shot.items() if k != "command"} == {k: v for k, v in built.items() if k != "command"}
    model = pruneflow.load_pruned(root / "data/models/dense")
    texts = read_rows(root / "data/raw/wikitext-2/train.txt", "calibration.source")
    pruneflow.prune(model, load_tokenizer(root / "data/models/dense"), texts, criterion="taylor_element1", ratio=0.3,
                    params=root / "params.yaml")
    pruneflow.save_pruned(model, out_dir / "api")
    assert same_tensors(root / "data/pruned/taylor_element1/0.3", out_dir / "api")


def _snakemake_ran(output: str) -> set[str]:
    """The rules a `snakemake` run executed (from its log on stdout)."""
    return set(re.findall(r"^(?:local)?rule (\w+):", output, flags=re.M)) - {"all"}


def test_snakemake_runs_the_dag_and_reruns_only_affected_stages(tmp_path):
    root = make_tiny_project(tmp_path / "project")
    init_git_and_dvc(root)  # a DVC project: the run records its outputs in dvc.lock
    traces = tmp_path / "traces"  # every stage process records what it opened and imported
    # `pruneflow run` is Snakemake with --cores all and the options given
    run(["pruneflow", "run", "--resources", "gpu=2"], root,
        extra_env=trace_hook_env(tmp_path / "trace_hook", traces, pythonpath=str(root / "src")))
    _check_outputs(root)
    _check_mlflow(root, "snakemake")
    _check_one_shot(root, tmp_path / "one_shot")
    assert "up to date" in run(["dvc", "status"], root).stdout, "Snakemake's outputs must be recorded in dvc.lock"
    _check_input_hashes(root)
    _check_file_access(root, read_traces(traces))
    set_param(root, "mlflow.enabled", False)  # checked above; no stage reads it, and it costs seconds per job

    assert snakemake_planned_jobs(root) == {}, "a second run with nothing changed must do nothing"

    # a changed setting reruns its stage and everything after it ...
    set_param(root, "recover.lora_dropout", 0.1)
    assert snakemake_planned_jobs(root) == {"recover": 1, "evaluate_recovered": 1, "report": 1}
    # ... and when that job is killed, the earlier result stays whole and nothing looks up to date
    recovered = root / "data/recovered/taylor_element1/0.3"
    earlier = {path: tree_bytes(root / path) for path in (
        "data/recovered/taylor_element1/0.3", "reports/metrics/recovered/taylor_element1/0.3.json",
        "reports/results.md")}
    hook = kill_hook_env(tmp_path / "hook", str(recovered), pythonpath=str(root / "src"))
    killed = run(["snakemake", "--cores", "all", "--resources", "gpu=2"], root, check=False, extra_env=hook)
    assert killed.returncode != 0 and "kill_hook: SIGKILL while writing" in _logs(root)
    assert {path: tree_bytes(root / path) for path in earlier} == earlier
    assert visible_entries(recovered.parent) == {"0.3"}
    assert snakemake_planned_jobs(root) == {"recover": 1, "evaluate_recovered": 1, "report": 1}
    assert "up to date" not in run(["dvc", "status"], root).stdout
    # a refusal only the job can make (LoRA wider than the pruned layers) keeps it as well
    set_param(root, "recover.lora_r", 64)
    refused = run(["snakemake", "--cores", "all", "--resources", "gpu=2"], root, check=False)
    assert refused.returncode != 0 and "recover.lora_r=64 is not allowed for this model" in _logs(root)
    assert {path: tree_bytes(root / path) for path in earlier} == earlier
    set_param(root, "recover.lora_r", 8)

    set_param(root, "laptop.evaluate.zeroshot_limit", 5)
    assert snakemake_planned_jobs(root) == {"evaluate_dense": 1, "evaluate_pruned": 2, "evaluate_recovered": 1,
                                            "evaluate_servable": 1, "recover": 1, "report": 1}
    set_param(root, "laptop.evaluate.zeroshot_limit", 6)

    # an intermediate output that is gone while its settings change: the chain after it still reruns
    shutil.rmtree(recovered)
    set_param(root, "recover.lora_dropout", 0.05)
    assert snakemake_planned_jobs(root) == {"recover": 1, "evaluate_recovered": 1, "report": 1}

    # an edit of a module a stage imports: that stage and everything after it (the edit undone: nothing,
    # whatever the file time says, since the content and the records match again)
    prune_source = root / "src/pruneflow/stages/prune.py"
    original = prune_source.read_text()
    _touch_source(root, "src/pruneflow/stages/prune.py")
    assert snakemake_planned_jobs(root) == {"prune": 2, "evaluate_pruned": 2, "recover": 1,
                                            "evaluate_recovered": 1, "report": 1, "prune_servable": 1,
                                            "evaluate_servable": 1, "export_gguf": 1}
    prune_source.write_text(original)
    assert snakemake_planned_jobs(root) == {"recover": 1, "evaluate_recovered": 1, "report": 1}

    # the plain rerun does exactly those three jobs and every other output keeps its bytes and time
    dense_metrics = (root / "reports/metrics/dense.json").read_bytes()
    scores = (root / "data/scores/taylor_element1.safetensors").stat().st_mtime_ns
    rerun = run(["snakemake", "--cores", "all", "--resources", "gpu=2"], root)
    assert _snakemake_ran(rerun.stdout) == {"recover", "evaluate_recovered", "report"}
    assert (root / "reports/metrics/dense.json").read_bytes() == dense_metrics
    assert (root / "data/scores/taylor_element1.safetensors").stat().st_mtime_ns == scores
    metrics = json.loads((root / "reports/metrics/recovered/taylor_element1/0.3.json").read_text())
    assert metrics["provenance"][-2]["params"]["recover.lora_dropout"] == 0.05
    assert snakemake_planned_jobs(root) == {}
    assert "up to date" in run(["dvc", "status"], root).stdout

    # outputs lost (or switched with git checkout) come back from DVC's cache, and Snakemake
    # sees them as up to date: the checkout dates them in pipeline order
    shutil.rmtree(root / "data/pruned/taylor_element1/0.3")
    (root / "data/scores/l2_magnitude.safetensors").unlink()
    run(["python", "-m", "pruneflow.pipeline.versioning", "checkout"], root)
    assert (root / "data/pruned/taylor_element1/0.3/config.json").is_file()
    assert snakemake_planned_jobs(root) == {}
    assert "up to date" in run(["dvc", "status"], root).stdout


# files a stage may open that are no pipeline input: its settings, its own outputs, the engines' and
# trackers' state
_NOT_INPUTS = ("params.yaml", "dvc.yaml", "dvc.lock", "mlflow.db", ".pruneflow/", ".snakemake/", ".dvc/", ".git/",
               "logs/", "src/")


def _dry_run_jobs(root) -> list[dict]:
    out = run(["pruneflow", "run", "--dry-run", "--forceall", "--cores", "1"], root).stdout  # the caller's --cores
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        match = re.match(r"(?:local)?rule (\w+):", block)
        if match and match.group(1) != "all":
            fields = dict(re.findall(r"^    (\w+): (.*)$", block, flags=re.M))
            jobs.append({"rule": match.group(1), "input": fields["input"].split(", "),
                         "output": [o.removesuffix(" (update)") for o in fields["output"].split(", ")]})
    return jobs


def _covered(path: str, declared) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in declared)


def _check_file_access(root, traces) -> None:
    """Every file a stage process opened is a declared input of its job in both engines (or its own
    output, or engine/tracker state), every data file both declare was read, and every project module
    it imported is among its declared source files."""
    from dvc.repo import Repo

    jobs = _dry_run_jobs(root)
    with Repo(str(root)) as repo:
        dvc_deps = {out.def_path: [dep.def_path for dep in stage.deps if type(dep).__name__ != "ParamsDependency"]
                    for stage in repo.index.stages for out in stage.outs}
    stage_traces = [t for t in traces if re.search(r"pruneflow/stages/\w+\.py$", t["argv"][0])]
    assert len(stage_traces) == len(jobs) == 16, [t["argv"][:2] for t in stage_traces]
    project = os.path.realpath(root)
    for trace in stage_traces:
        argv = trace["argv"]
        out = argv[argv.index("--out") + 1]
        (job,) = [j for j in jobs if out in j["output"]]
        outputs = job["output"]
        opened = set()
        for path in trace["opened"]:
            real = os.path.realpath(path)
            # folders are opened to fsync them; a path that does not exist was only tried (and failed)
            if real.startswith(project + os.sep) and os.path.isfile(real):
                relative = os.path.relpath(real, project)
                hidden_temporary = any(os.path.basename(relative).startswith("." + Path(o).name + ".")
                                       for o in outputs)
                if not (_covered(relative, outputs) or hidden_temporary or relative.startswith(_NOT_INPUTS)):
                    opened.add(relative)
        snake_inputs = [p for p in job["input"] if not p.startswith((".pruneflow/", "src/"))]
        for path in opened:
            assert _covered(path, snake_inputs), (job["rule"], path, "not an input of the Snakemake rule")
            assert _covered(path, dvc_deps[outputs[0]]), (job["rule"], path, "not a dependency of the DVC stage")
        upstream_outputs = {o for j in jobs for o in j["output"]}
        data = [p for p in snake_inputs if p not in upstream_outputs]
        assert [p for p in data if not any(_covered(o, [p]) for o in opened)] == [], (job["rule"], "declared, unread")
        assert set(data) <= set(dvc_deps[outputs[0]]), job["rule"]
        imported = {os.path.relpath(os.path.realpath(m), project) for m in trace["modules"]
                    if os.path.realpath(m).startswith(os.path.join(project, "src", "pruneflow") + os.sep)}
        assert imported, job["rule"]
        code = {p for p in job["input"] if p.startswith("src/")}
        assert imported <= code, (job["rule"], sorted(imported - code))
        assert code == {p for p in dvc_deps[outputs[0]] if p.startswith("src/")}, job["rule"]


def _check_input_hashes(root) -> None:
    """Each stage run names its inputs with the hash dvc.lock holds for them."""
    import yaml
    from mlflow.tracking import MlflowClient

    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    recorded = {out["path"]: out["md5"] for stage in lock.values() for out in stage.get("outs", [])}
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pruneflow")
    prune_runs = client.search_runs([experiment.experiment_id], "tags.`pruneflow.stage` = 'prune'")
    assert prune_runs
    for prune_run in prune_runs:
        tags = prune_run.data.tags
        assert tags["pruneflow.input.model.dvc_md5"] == recorded["data/models/dense"]
        assert tags["pruneflow.input.scores.dvc_md5"] == recorded[tags["pruneflow.input.scores"]]
        assert len(tags["pruneflow.git_commit"]) == 40


# loads each checkpoint with transformers alone (no pruneflow import: its Auto registrations would hide
# a folder that only loads with them) and prints its class and logits on fixed token ids
_PLAIN_TRANSFORMERS_LOAD = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
ids = torch.arange(3, 27).reshape(2, 12)
out = {}
for folder, remote in json.loads(sys.argv[1]).items():
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote, dtype=torch.float32).eval()
    with torch.no_grad():
        out[folder] = [type(model).__name__, model(ids).logits.tolist()]
print("RESULT" + json.dumps(out))
"""


def test_gemma3_dag_through_snakemake_then_dvc(tmp_path):
    """A family other than Llama end to end: Gemma 3 (multi-query attention: its one KV head cannot go,
    so attention loses query heads or nothing; pre- and post-sublayer norms, q/k norms, local/global
    layers, tied embeddings) through Snakemake, then DVC finds the run recorded and reruns only what a
    changed setting affects. llama.cpp's graphs of the exporter do not cover Gemma: no export_gguf."""
    import torch

    from pruneflow.checkpoint import load_pruned

    overrides = {"grid": {"criteria": ["taylor_element1", "obs"], "ratios": [0.3],
                          "recovered_criteria": ["taylor_element1"], "servable_criteria": ["obs"]},
                 "mlflow": {"enabled": False}}  # tracking is checked by the Llama DAG tests
    root = make_tiny_project(tmp_path / "project", overrides, family="gemma3")
    init_git_and_dvc(root)
    assert snakemake_planned_jobs(root) == {"prepare_model": 1, "calibrate": 1, "cache_activations": 1, "score": 2,
                                            "prune": 2, "prune_servable": 1, "recover": 1, "evaluate_dense": 1,
                                            "evaluate_pruned": 2, "evaluate_recovered": 1, "evaluate_servable": 1,
                                            "report": 1}  # no export_gguf
    run(["pruneflow", "run", "--resources", "gpu=2"], root)
    # recording the run in dvc.lock links the outputs to DVC's cache: they keep their times, or Snakemake
    # would rerun whatever reads a file above its 1 MB checksum limit (this model's activations)
    assert snakemake_planned_jobs(root) == {}, "a second run with nothing changed must do nothing"

    results = (root / "reports/results.md").read_text()
    for model_id in ("dense", "pruned/taylor_element1/0.3", "pruned/obs/0.3", "recovered/taylor_element1/0.3",
                     "servable/obs/0.3"):
        assert f"| {model_id} |" in results, model_id
        metrics = json.loads((root / f"reports/metrics/{model_id}.json").read_text())
        assert metrics["perplexity"]["wikitext2"]["ppl"] > 1 and 0 <= metrics["zeroshot"]["arc_easy"]["acc"] <= 1
    assert not (root / "data/gguf").exists()
    for name in ("taylor_element1", "obs"):
        summary = json.loads((root / f"data/pruned/{name}/0.3/pruning_summary.json").read_text())
        assert summary["achieved_ratio"] == pytest.approx(0.3, abs=0.02), name
        # auto: whole KV groups are no candidate with one KV head per layer
        assert summary["attention_unit"] == "query_head" or summary["structures"] == ["ffn"], summary["attention_unit"]
        assert [t["layout"] for t in summary["layout_search"]] == ["ffn", "query_head+ffn"]
        assert all(shape["num_key_value_heads"] == 1 for shape in summary["layer_shapes_after"])

    # per-layer widths: the family's per-layer classes (shipped code); servable: Gemma 3's own classes.
    # pruneflow's loader and transformers alone give the same model
    folders = {"data/pruned/taylor_element1/0.3": True, "data/pruned/obs/0.3": True,
               "data/recovered/taylor_element1/0.3": True, "data/servable/obs/0.3": False}
    for folder, per_layer in folders.items():
        config = json.loads((root / folder / "config.json").read_text())
        assert config["model_type"] == ("pruneflow_gemma3_text" if per_layer else "gemma3_text"), folder
        assert (root / folder / "modeling_pruneflow.py").is_file() == per_layer, folder
    plain = run(["python", "-c", _PLAIN_TRANSFORMERS_LOAD, json.dumps(folders)], root).stdout
    loaded = json.loads(plain.split("RESULT", 1)[1])
    ids = torch.arange(3, 27).reshape(2, 12)
    for folder, per_layer in folders.items():
        model = load_pruned(root / folder)
        assert loaded[folder][0] == ("PruneflowGemma3ForCausalLM" if per_layer else "Gemma3ForCausalLM"), folder
        with torch.no_grad():
            logits = model(ids).logits
        assert torch.allclose(logits, torch.tensor(loaded[folder][1]), atol=1e-4), folder

    # Snakemake's run is recorded in dvc.lock; a changed LoRA setting reruns its chain in DVC only
    assert "up to date" in run(["dvc", "status"], root).stdout, "Snakemake's outputs must be recorded in dvc.lock"
    set_param(root, "recover.lora_dropout", 0.1)
    assert dvc_planned_stages(root) == ["recover@taylor_element1-0.3"]  # what follows waits for its output
    pruned = (root / "data/pruned/taylor_element1/0.3/model.safetensors").stat().st_mtime_ns
    assert dvc_ran_stages(root) == ["evaluate_recovered@taylor_element1-0.3", "recover@taylor_element1-0.3",
                                    "report"]
    assert (root / "data/pruned/taylor_element1/0.3/model.safetensors").stat().st_mtime_ns == pruned
    metrics = json.loads((root / "reports/metrics/recovered/taylor_element1/0.3.json").read_text())
    assert metrics["provenance"][-2]["params"]["recover.lora_dropout"] == 0.1
    assert "up to date" in run(["dvc", "status"], root).stdout


def test_dvc_repro_runs_the_dag_and_reruns_only_affected_stages(tmp_path):
    root = make_tiny_project(tmp_path / "project")
    init_git_and_dvc(root)
    run(["dvc", "repro"], root)
    _check_outputs(root)
    _check_mlflow(root, "dvc")
    assert "up to date" in run(["dvc", "status"], root).stdout
    set_param(root, "mlflow.enabled", False)  # checked above; no stage reads it, and it costs seconds per job

    assert dvc_planned_stages(root) == [], "a second repro with nothing changed must do nothing"

    _touch_source(root, "src/pruneflow/stages/report.py")
    assert dvc_planned_stages(root) == ["report"]
    assert dvc_ran_stages(root) == ["report"]

    # instruction data outside the project: a declared dependency once params.yaml names it
    outside = tmp_path / "elsewhere/alpaca.json"
    outside.parent.mkdir()
    shutil.copy(root / "data/raw/instruct/gsm_8k_train.json", outside)
    set_param(root, "recover.data", [str(outside)])
    set_param(root, "recover.lora_dropout", 0.1)
    recovered = root / "data/recovered/taylor_element1/0.3"
    earlier = tree_bytes(recovered)
    # the first stage DVC starts finds dvc.yaml out of step with params.yaml, renders it and stops
    stopped = run(["dvc", "repro"], root, check=False)
    assert stopped.returncode != 0
    assert f"dvc.yaml did not match params.yaml and the source (recover: +{outside}" in stopped.stdout
    assert "run `dvc repro` again" in stopped.stdout
    assert str(outside) in (root / "dvc.yaml").read_text() and tree_bytes(recovered) == earlier
    # killed while writing: the earlier model stays whole
    hook = kill_hook_env(tmp_path / "hook", str(recovered), pythonpath=str(root / "src"))
    killed = run(["dvc", "repro"], root, check=False, extra_env=hook)
    assert killed.returncode != 0 and "kill_hook: SIGKILL while writing" in killed.stdout
    assert tree_bytes(recovered) == earlier and visible_entries(recovered.parent) == {"0.3"}
    assert dvc_ran_stages(root) == ["evaluate_recovered@taylor_element1-0.3", "recover@taylor_element1-0.3",
                                    "report"]
    assert "up to date" in run(["dvc", "status"], root).stdout
    # an edit of that outside file is seen by both engines
    outside.write_text(outside.read_text().replace('"instruction"', '"instruction" ', 1))
    assert "recover@taylor_element1-0.3" in run(["dvc", "status"], root).stdout
    assert snakemake_planned_jobs(root) == {"recover": 1, "evaluate_recovered": 1, "report": 1}
    metrics = run(["dvc", "metrics", "show", "--json"], root).stdout
    assert "perplexity" in metrics

    # DVC experiments on the same project: a ratio sweep and another criterion (without recovery, which
    # the edit above left stale), compared with the baseline commit like any two revisions
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "baseline results"], root)
    no_recovery = ["-S", "grid.recovered_criteria=[]", "-S", "grid.servable_criteria=[]"]
    run(["dvc", "exp", "run", "-n", "ratio-02", "-S", "grid.ratios=[0.2]", "-S", "grid.criteria=[l2_magnitude]",
         *no_recovery], root)
    run(["dvc", "exp", "run", "-n", "crit-random", "-S", "grid.ratios=[0.3]", "-S", "grid.criteria=[random]",
         *no_recovery], root)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], root).stdout)
    experiments = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for revision in exp["revs"]:
                experiments[exp.get("name") or revision.get("name")] = revision["data"]
    assert {"ratio-02", "crit-random"} <= set(experiments), list(experiments)
    grids = {name: data["params"]["params.yaml"]["data"]["grid"] for name, data in experiments.items()}
    assert grids["ratio-02"]["ratios"] == [0.2] and grids["crit-random"]["criteria"] == ["random"]
    swept = experiments["ratio-02"]["metrics"]
    assert swept["reports/metrics/pruned/l2_magnitude/0.2.json"]["data"]["perplexity"]["wikitext2"]["ppl"] > 1
    diff = json.loads(run(["dvc", "metrics", "diff", "HEAD", "ratio-02", "--json"], root).stdout)
    assert "reports/metrics/pruned/l2_magnitude/0.2.json" in diff
    assert "reports/metrics/dense.json" not in diff  # the dense model was not re-evaluated
    run(["dvc", "plots", "diff", "HEAD", "ratio-02", "crit-random", "-o", "plots_diff"], root)
    page = (root / "plots_diff/index.html").read_text()
    assert "results.csv" in page and "ratio-02" in page and "crit-random" in page


def _every_criterion_overrides(**prune) -> dict:
    from pruneflow.importance import CRITERIA

    # MLflow off: tracking is checked by the two DAG tests above, and costs seconds per stage process
    return {"grid": {"criteria": list(CRITERIA), "ratios": [0.3], "servable_criteria": []}, "score": {"mi_tokens": 32}, "prune": prune,
            "mlflow": {"enabled": False}}


def _output_times(root) -> dict[str, int]:
    """Modification times of every visible pipeline output (not the raw data), by relative path."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted((root / "data").rglob("*"))
            if p.is_file() and "raw" not in p.parts and not any(part.startswith(".") for part in p.parts)}


def _logs(root) -> str:
    return "\n".join(p.read_text() for p in sorted((root / "logs").rglob("*.log")))


def _check_pruned(root, criteria, allocation: str) -> None:
    from pruneflow.checkpoint import load_pruned
    from pruneflow.config import load_params

    settings = load_params(root / "params.yaml").prune

    for name in criteria:
        folder = root / f"data/pruned/{name}/0.3"
        summary = json.loads((folder / "pruning_summary.json").read_text())
        assert summary["allocation"] == allocation
        assert summary["achieved_ratio"] == pytest.approx(0.3, abs=0.02), name
        assert (summary["reconstruction"], summary["reconstruction_mode"]) == (settings.reconstruction,
                                                                             settings.reconstruction_mode)
        errors = summary["reconstruction_errors"]
        if settings.reconstruction != "none":  # the re-fit lowered the layers' output error where it could
            assert errors["down_proj_error_refit"] < errors["down_proj_error_pruned"], (name, errors)
        assert load_pruned(folder) is not None


def test_every_criterion_with_global_allocation(tmp_path):
    """Every criterion's score and prune stages with global allocation: three of them (a gradient, an
    activation and a second-order criterion) through Snakemake, whose prune job for one is SIGKILLed
    while writing, the others by the same stage mains in this process from Snakemake's upstream outputs
    (a stage process costs ~10 s of imports; the rule is the same for every criterion)."""
    from pruneflow.importance import CRITERIA

    root = make_tiny_project(tmp_path / "project", _every_criterion_overrides(allocation="global"))
    through_snakemake = ["taylor_element1", "mutual_information", "obs"]
    # targets first: --resources takes every following word
    command = ["snakemake", *(f"data/pruned/{c}/0.3" for c in through_snakemake), "--cores", "all",
               "--resources", "gpu=2"]

    # a prune job SIGKILLed while writing its checkpoint: nothing that looks complete is left ...
    killed_output = root / "data/pruned/taylor_element1/0.3"
    hook = kill_hook_env(tmp_path / "hook", str(killed_output), pythonpath=str(root / "src"))
    killed = run(command, root, check=False, extra_env=hook)
    assert killed.returncode != 0 and "kill_hook: SIGKILL while writing" in _logs(root)
    assert not killed_output.exists()
    finished = _output_times(root)
    assert "data/models/dense/model.safetensors" in finished
    # ... and the plain rerun finishes the work without touching what had finished
    run(command, root)
    assert {path: (root / path).stat().st_mtime_ns for path in finished} == finished

    in_process = [c for c in CRITERIA if c not in through_snakemake]
    run_stages_in_process(root, commands=[(stage, argv) for stage, argv in stage_chain(in_process, 0.3)
                                          if stage in ("score", "prune")])
    _check_pruned(root, CRITERIA, "global")


def test_query_head_pruning_through_dvc(tmp_path):
    criteria = ["taylor_element1", "obs"]  # every criterion is pruned in the test above
    # the other reconstruction mode than the Snakemake test's (the default), with FLAP's bias term
    overrides = _every_criterion_overrides(attention_unit="query_head", reconstruction="least_squares_bias",
                                           reconstruction_mode="sequential")
    overrides["grid"]["criteria"] = criteria
    root = make_tiny_project(tmp_path / "project", overrides)
    init_git_and_dvc(root)
    # the pruning of one criterion is SIGKILLed while writing; the rerun does only what is left
    killed_output = root / "data/pruned/taylor_element1/0.3"
    hook = kill_hook_env(tmp_path / "hook", str(killed_output), pythonpath=str(root / "src"))
    killed = run(["dvc", "repro", "prune"], root, check=False, extra_env=hook)
    assert killed.returncode != 0 and "kill_hook: SIGKILL while writing" in killed.stdout
    assert not killed_output.exists()
    finished = _output_times(root)
    rerun = run(["dvc", "repro", "prune"], root).stdout
    assert "Running stage 'prune@taylor_element1-0.3'" in rerun
    assert "Running stage 'prepare_model'" not in rerun and "Running stage 'score@taylor_element1'" not in rerun
    assert {path: (root / path).stat().st_mtime_ns for path in finished} == finished
    _check_pruned(root, criteria, "uniform")
    summary = json.loads((root / "data/pruned/taylor_element1/0.3/pruning_summary.json").read_text())
    assert summary["attention_unit"] == "query_head"
    assert all(shape["num_key_value_heads"] == 2 for shape in summary["layer_shapes_after"])

    # the default local remote round-trips the artifacts: push, lose outputs and cache, pull
    run(["dvc", "push"], root)
    assert (root / ".dvc-remote/files/md5").is_dir()
    outputs = ["data/pruned", "data/scores", "data/models/dense"]
    before = {p: p.read_bytes() for out in outputs for p in (root / out).rglob("*") if p.is_file()}
    for out in [*outputs, ".dvc/cache"]:
        shutil.rmtree(root / out)
    run(["dvc", "pull", "prune", "--with-deps"], root)
    assert {p: p.read_bytes() for out in outputs for p in (root / out).rglob("*") if p.is_file()} == before
    assert "up to date" in run(["dvc", "status", "prune", "--with-deps"], root).stdout
