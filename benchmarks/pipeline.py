"""The whole pipeline for one criterion at one ratio, against the scripts a user would run instead.

1. pruneflow: the real Snakemake DAG (prepare, calibrate, cache activations, score, prune, LoRA
   recovery, evaluation of dense / pruned / recovered, report) in its own work directory, with the
   wall time and peak RSS of every job (Snakemake `benchmark:` files), the peak GPU memory each stage
   recorded in MLflow, and the GPU busy fraction sampled with nvidia-smi while it runs.
2. A LoRA setting changed (recover.lora_dropout): the jobs Snakemake plans, then the rerun's wall time.
3. The reference path on the same dense model, calibration ids and parameter count: Torch-Pruning's
   LLM pruning (benchmarks/torch_pruning_reference.py, MLP-only Taylor, the setting that finishes on
   GQA), then a separate LoRA run (benchmarks/reference_lora.py: LLM-Pruner's post_training.py flow
   with the Hugging Face Trainer), then the same evaluate command for its pruned and recovered models.

Writes OUT.json and OUT.md. Full setting on a GPU:
    python benchmarks/pipeline.py --set scale=full
Reduced CPU scale: the laptop preset (the default params.yaml), see OUT.md for the exact line.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from pruneflow.config import format_ratio, params_from_mapping
from pruneflow.errors import ConfigError
from pruneflow.pipeline.atomic import write_json, write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from table1 import (  # noqa: E402
    OFFLINE_ENV,
    ROOT,
    _device,
    build_params,
    prepare_work_dir,
    stage_table,
    stage_times,
)

REFERENCE_SETTING = "taylor_mlp_only"


class GpuSampler:
    """nvidia-smi utilisation and memory every `interval_ms` while the pipeline runs (None without a GPU)."""

    def __init__(self, interval_ms: int = 500) -> None:
        self.samples: list[tuple[float, float]] = []
        self._process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        if shutil.which("nvidia-smi") is None:
            return
        self._process = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
             f"-lms={interval_ms}"], stdout=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) >= 2:
                try:
                    self.samples.append((float(parts[0]), float(parts[1])))
                except ValueError:
                    continue

    def stop(self) -> dict[str, Any] | None:
        if self._process is None:
            return None
        self._process.terminate()
        self._process.wait(timeout=10)
        if not self.samples:
            return None
        return {"samples": len(self.samples),
                "busy_fraction": sum(util > 0 for util, _ in self.samples) / len(self.samples),
                "mean_utilization_pct": sum(util for util, _ in self.samples) / len(self.samples),
                "peak_memory_used_mib": max(mem for _, mem in self.samples)}


def timed(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, env={**os.environ, **OFFLINE_ENV}, check=True)
    return time.perf_counter() - started


def planned_jobs(work_dir: Path) -> dict[str, int]:
    """Jobs a Snakemake dry run would execute, by rule."""
    out = subprocess.run([sys.executable, "-m", "snakemake", "--dry-run", "--cores", "1"], cwd=work_dir,
                         env={**os.environ, **OFFLINE_ENV}, check=True, stdout=subprocess.PIPE, text=True).stdout
    jobs: dict[str, int] = {}
    in_table = False
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("job ") and "count" in line:
            in_table = True
        elif in_table and parts and parts[0] == "total":
            break
        elif in_table and len(parts) == 2 and parts[1].isdigit():
            jobs[parts[0]] = int(parts[1])
    jobs.pop("all", None)
    return jobs


def stage_gpu_memory(work_dir: Path) -> dict[str, float]:
    """Peak GPU memory (MiB) each stage run logged to MLflow (score, recover, evaluate on CUDA)."""
    db = work_dir / "mlflow.db"
    if not db.exists():
        return {}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("pruneflow")
    if experiment is None:
        return {}
    peaks = {}
    for run in client.search_runs([experiment.experiment_id], "tags.`pruneflow.kind` = 'stage'", max_results=500):
        for key in ("peak_memory_mib", "peak_gpu_memory_mib", "efficiency.peak_memory_mib"):
            if key in run.data.metrics:
                peaks[run.info.run_name] = run.data.metrics[key]
    return peaks


def reference_path(work_dir: Path, params: dict, criterion: str, ratio: float, time_limit: int) -> dict[str, Any]:
    """Torch-Pruning + separate LoRA + the same evaluation, timed step by step."""
    ratio_dir = format_ratio(ratio)
    summary = json.loads((work_dir / f"data/pruned/{criterion}/{ratio_dir}/pruning_summary.json").read_text())
    reference = work_dir / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    layer_start, layer_end = params["prune"]["layer_start"], params["prune"]["layer_end"]
    steps: dict[str, float] = {}
    steps["prune (Torch-Pruning)"] = timed(
        [sys.executable, str(ROOT / "benchmarks/torch_pruning_reference.py"), "--model", "data/models/dense",
         "--calibration", "data/calibration/calibration.safetensors", "--target-params",
         str(summary["params_after"]), "--setting", REFERENCE_SETTING, "--out", "reference/tp",
         "--time-limit", str(time_limit), "--layer-start", str(layer_start), "--layer-end", str(layer_end)],
        work_dir)
    result = json.loads((reference / f"tp/{REFERENCE_SETTING}/result.json").read_text())
    if result.get("status") != "ok":
        return {"steps": steps, "status": result.get("status"), "detail": result}
    pruned = reference / f"tp/{REFERENCE_SETTING}/model"
    steps["recover (LoRA, HF Trainer)"] = timed(
        [sys.executable, str(ROOT / "benchmarks/reference_lora.py"), "--params", "params.yaml", "--model",
         str(pruned.relative_to(work_dir)), "--out", "reference/lora"], work_dir)
    metrics = {}
    for name, model in (("pruned", pruned), ("recovered", reference / "lora")):
        out = reference / f"metrics_{name}.json"
        steps[f"evaluate {name}"] = timed(
            [sys.executable, "-m", "pruneflow.stages.evaluate", "--params", "params.yaml", "--model",
             str(model.relative_to(work_dir)), "--model-id", f"reference/{name}", "--data-dir", "data/raw",
             "--out", str(out.relative_to(work_dir))], work_dir)
        metrics[name] = json.loads(out.read_text())
    lora = json.loads((reference / "lora/reference_lora_summary.json").read_text())
    return {"status": "ok", "steps": steps, "params_after": result.get("params_after"),
            "lora": lora, "quality": {name: _quality(m) for name, m in metrics.items()}}


def _quality(metrics: dict[str, Any]) -> dict[str, Any]:
    return {"wikitext2": metrics["perplexity"]["wikitext2"]["ppl"], "ptb": metrics["perplexity"]["ptb"]["ppl"],
            "zeroshot_average": metrics.get("zeroshot_average")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--criterion", default="taylor_element1")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--reference-time-limit", type=int, default=900)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "data/benchmarks/pipeline")
    parser.add_argument("--out", type=Path, default=ROOT / "reports/benchmarks/pipeline")
    args = parser.parse_args(argv)
    try:
        params = build_params(yaml.safe_load(args.params.read_text()), [args.criterion], args.ratio,
                              [args.criterion], args.overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    shutil.rmtree(args.work_dir, ignore_errors=True)  # a clean start: every stage runs and is timed
    prepare_work_dir(args.work_dir, params)
    snakemake = [sys.executable, "-m", "snakemake", "--cores", "all", "--resources", f"gpu={args.gpus}"]

    sampler = GpuSampler()
    pipeline_wall = timed(snakemake, args.work_dir)
    gpu = sampler.stop()
    stages = stage_times(args.work_dir)
    gpu_memory = stage_gpu_memory(args.work_dir) if gpu is not None else {}  # CPU runs record estimates only
    ratio_dir = format_ratio(args.ratio)
    ours = {name: _quality(json.loads((args.work_dir / f"reports/metrics/{name}/{args.criterion}/{ratio_dir}.json")
                                      .read_text())) for name in ("pruned", "recovered")}

    edited = dict(params)
    edited["recover"] = {**params["recover"], "lora_dropout": round(params["recover"]["lora_dropout"] + 0.01, 4)}
    params_from_mapping(edited)
    (args.work_dir / "params.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
    rerun_plan = planned_jobs(args.work_dir)
    rerun_wall = timed(snakemake, args.work_dir)

    reference = reference_path(args.work_dir, params, args.criterion, args.ratio, args.reference_time_limit)
    by_job = {row["job"]: row["seconds"] for row in stages}
    same_work = {k: v for k, v in by_job.items()
                 if k.startswith(("score/", "prune/", "recover/", "evaluate/pruned/", "evaluate/recovered/"))}
    payload = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "device": _device(),
        "scale": params_from_mapping(params).scale,
        "overrides": args.overrides,
        "criterion": args.criterion,
        "ratio": args.ratio,
        "pipeline_wall_s": pipeline_wall,
        "stages": stages,
        "stage_peak_gpu_memory_mib": gpu_memory,
        "gpu": gpu,
        "ours_same_work_s": sum(same_work.values()),
        "ours_same_work_jobs": sorted(same_work),
        "ours_quality": ours,
        "rerun_after_lora_param": {"planned_jobs": rerun_plan, "wall_s": rerun_wall},
        "reference": reference,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out.with_suffix(".json"), payload)
    write_text(args.out.with_suffix(".md"), render(payload))
    print(render(payload))
    return 0


def render(p: dict[str, Any]) -> str:
    ref = p["reference"]
    ref_total = sum(ref["steps"].values())
    lines = [
        f"# Pipeline benchmark: {p['criterion']} at {p['ratio']:.0%}, pruneflow vs the reference scripts",
        "",
        f"Command: `{p['command']}`  ",
        f"Device: {p['device']}; scale `{p['scale']}`"
        + (f"; overrides `{' '.join(p['overrides'])}`" if p["overrides"] else "") + ".",
        "",
        f"Whole pipeline (Snakemake, clean start, every stage incl. dense evaluation and report): "
        f"**{p['pipeline_wall_s'] / 60:.1f} min** wall.",
        "",
        *stage_table(p["stages"]),
    ]
    gpu = p["gpu"]
    lines += ["", "GPU: " + ("no GPU on this machine (figures to measure on the H100)" if gpu is None else
                             f"busy {gpu['busy_fraction']:.0%} of {gpu['samples']} samples (nvidia-smi, 0.5 s), "
                             f"mean utilisation {gpu['mean_utilization_pct']:.0f}%, peak memory used "
                             f"{gpu['peak_memory_used_mib']:,.0f} MiB")]
    if p["stage_peak_gpu_memory_mib"]:
        lines += ["", "| stage run | peak GPU memory (MiB, torch allocator) |", "|---|---:|"]
        lines += [f"| {name} | {mib:,.0f} |" for name, mib in sorted(p["stage_peak_gpu_memory_mib"].items())]
    rerun = p["rerun_after_lora_param"]
    lines += ["", "## A LoRA setting changed (recover.lora_dropout + 0.01)", "",
              f"Snakemake planned: {', '.join(f'{k} x{v}' for k, v in sorted(rerun['planned_jobs'].items()))}; "
              f"the rerun took {rerun['wall_s'] / 60:.1f} min.",
              "", "## Same work, side by side", "",
              "| path | step | seconds |", "|---|---|---:|"]
    lines += [f"| pruneflow | {job} | {dict((r['job'], r['seconds']) for r in p['stages'])[job]:.1f} |"
              for job in p["ours_same_work_jobs"]]
    lines += [f"| reference | {step} | {seconds:.1f} |" for step, seconds in ref["steps"].items()]
    lines += ["", f"Total for score/prune + recover + evaluate (pruned and recovered): pruneflow "
              f"**{p['ours_same_work_s'] / 60:.1f} min**, reference **{ref_total / 60:.1f} min**"
              + ("" if ref.get("status") == "ok" else f" (reference stopped: {ref.get('status')})") + "."]
    if ref.get("status") == "ok":
        lines += ["", "| model | WikiText-2 | PTB | zero-shot avg |", "|---|---:|---:|---:|"]
        for source, quality in (("pruneflow", p["ours_quality"]), ("reference", ref["quality"])):
            for name, q in quality.items():
                avg = "-" if q["zeroshot_average"] is None else f"{100 * q['zeroshot_average']:.1f}"
                lines.append(f"| {source} {name} | {q['wikitext2']:.2f} | {q['ptb']:.2f} | {avg} |")
    lines += ["", "The reference's pruning runs in a child process with its own model load (as a separate "
              "script does); both paths use the same evaluate command, so evaluation time differs only by noise. "
              "pruneflow's score/prune/recover/evaluate jobs and the reference steps ran one at a time on the "
              "same machine."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
