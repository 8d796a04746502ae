"""LLM-Pruner's Table 1 for one model, produced by the pipeline itself, plus what each stage cost.

Runs the real Snakemake DAG in a separate work directory (its own params.yaml = the project's with
the grid and any `--set` overrides applied; workflow/, src/ and data/raw linked, never
copied), so the project's own outputs are untouched, then copies the report (results.md/csv, plots,
every metrics.json) into OUT_DIR and writes OUT_DIR/README.md with the command, the device, the
per-stage wall times Snakemake recorded, and the evaluation / recovery costs extrapolated to the
full setting (full test sets, all documents, LLM-Pruner's 2-epoch LoRA) from the measured rates.

Full setting on a GPU:
    python benchmarks/table1.py --set scale=full
Reduced CPU scale (what the committed CPU report used) -- see OUT_DIR/README.md for the exact line.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from pruneflow.config import ZEROSHOT_TASKS, params_from_mapping
from pruneflow.errors import ConfigError
from pruneflow.importance import CRITERIA
from pruneflow.pipeline.atomic import write_text

ROOT = Path(__file__).resolve().parents[1]
LINKED = ("workflow", "src", "dvc.yaml")
# what every benchmark subprocess runs with: offline, quiet tokenizers, no DVC analytics
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "DVC_NO_ANALYTICS": "1"}
ZEROSHOT_FILE = {"openbookqa": "openbook_qa.jsonl", "lambada": "lambada_openai.jsonl"}


def set_dotted(mapping: dict, dotted: str, value: Any) -> None:
    node = mapping
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def build_params(base: dict, criteria: list[str], ratio: float, recovered: list[str], overrides: list[str]) -> dict:
    """The project's params with the Table-1 grid and `key=value` overrides (values parsed as YAML), validated."""
    params = json.loads(json.dumps(base))
    set_dotted(params, "grid.criteria", criteria)
    set_dotted(params, "grid.ratios", [ratio])
    set_dotted(params, "grid.recovered_criteria", recovered)
    set_dotted(params, "grid.servable_criteria", [])  # Table 1 compares the per-layer models
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} is not allowed; allowed: KEY=VALUE with a dotted params key")
        set_dotted(params, key, yaml.safe_load(raw))
    params_from_mapping(params)  # the pipeline's own validation, before anything runs
    return params


def prepare_work_dir(work_dir: Path, params: dict) -> None:
    work_dir.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        link = work_dir / name
        if not link.exists():
            link.symlink_to(ROOT / name)
    (work_dir / "data").mkdir(exist_ok=True)
    if not (work_dir / "data/raw").exists():
        (work_dir / "data/raw").symlink_to(ROOT / "data/raw")
    (work_dir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stage_times(work_dir: Path) -> list[dict[str, Any]]:
    """Wall seconds and peak RSS of every job, from Snakemake's `benchmark:` files."""
    rows = []
    for path in sorted((work_dir / "logs/benchmarks").rglob("*.tsv")):
        with path.open() as handle:
            record = next(csv.DictReader(handle, delimiter="\t"))
        rows.append({"job": str(path.relative_to(work_dir / "logs/benchmarks")).removesuffix(".tsv"),
                     "seconds": float(record["s"]), "max_rss_mib": _number(record.get("max_rss"))})
    return rows


def stage_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: one row per job with its wall seconds and peak RSS."""
    lines = ["| job | seconds | peak RSS (MiB) |", "|---|---:|---:|"]
    for row in rows:
        rss = "-" if row["max_rss_mib"] is None else f"{row['max_rss_mib']:.0f}"
        lines.append(f"| {row['job']} | {row['seconds']:.1f} | {rss} |")
    return lines


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "", "NA", "-") else None
    except ValueError:
        return None


@functools.cache
def _task_documents(task: str) -> int:
    path = ROOT / "data/raw/zeroshot" / ZEROSHOT_FILE.get(task, f"{task}.jsonl")
    with path.open() as handle:
        return sum(1 for line in handle if line.strip())


def evaluation_cost(metrics: dict[str, Any]) -> dict[str, Any]:
    """Measured seconds per part of one evaluate job and the same work scaled to full sets and all tasks."""
    timing = metrics.get("timing", {})
    windows = sum(v["windows"] * v["seq_len"] for by in metrics["perplexity_by_seq_len"].values() for v in by.values())
    all_windows = sum(v["total_windows"] * v["seq_len"]
                      for by in metrics["perplexity_by_seq_len"].values() for v in by.values())
    docs = sum(v["n"] for v in metrics["zeroshot"].values())
    per_doc = timing.get("zeroshot_s", 0.0) / docs if docs else None
    full_docs = sum(_task_documents(t) for t in ZEROSHOT_TASKS)
    full = (timing.get("load_s", 0.0) + timing.get("perplexity_s", 0.0) * all_windows / max(windows, 1)
            + (per_doc * full_docs if per_doc is not None else 0.0) + timing.get("efficiency_s", 0.0))
    return {"measured_s": metrics["seconds"], **timing, "ppl_tokens": windows, "ppl_tokens_full": all_windows,
            "zeroshot_documents": docs, "zeroshot_documents_full_all_tasks": full_docs,
            "estimated_full_s": full}


def recovery_cost(summary: dict[str, Any], batch_size: int, full_params: Any) -> dict[str, Any]:
    """Measured recovery (run at `batch_size`) and LLM-Pruner's 2-epoch recipe estimated from seconds per example."""
    examples = summary["optimizer_steps"] * batch_size
    steps_full = max(1, math.ceil(full_params.num_epochs * summary["train_examples"] / full_params.batch_size))
    tokens = sum(h.get("tokens", 0) for h in summary.get("history", []) if "loss" in h)
    return {"measured_s": summary["seconds"], "optimizer_steps": summary["optimizer_steps"],
            "examples_seen": examples or None, "tokens_seen": tokens, "train_examples": summary["train_examples"],
            "full_recipe_steps": steps_full, "full_recipe_examples": steps_full * full_params.batch_size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA))
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--recovered", nargs="*", default=["taylor_element1"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="params override, dotted key, YAML value (repeatable)")
    parser.add_argument("--cores", default="all")
    parser.add_argument("--gpus", type=int, default=1, help="--resources gpu=N for Snakemake")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "data/benchmarks/table1")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "reports/table1")
    args = parser.parse_args(argv)

    try:
        params = build_params(yaml.safe_load(args.params.read_text()), args.criteria, args.ratio, args.recovered,
                              args.overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    prepare_work_dir(args.work_dir, params)
    env = {**os.environ, **OFFLINE_ENV}
    command = [sys.executable, "-m", "snakemake", "--cores", str(args.cores), "--resources", f"gpu={args.gpus}",
               "--rerun-incomplete", "--printshellcmds"]
    started = time.perf_counter()
    subprocess.run(command, cwd=args.work_dir, env=env, check=True)
    wall = time.perf_counter() - started

    reports = args.work_dir / "reports"
    staging = args.out_dir.with_name(args.out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in ("results.md", "results.csv"):
        shutil.copy2(reports / name, staging / name)
    shutil.copytree(reports / "plots", staging / "plots")
    shutil.copytree(reports / "metrics", staging / "metrics")

    validated = params_from_mapping(params)
    full = params_from_mapping({**params, "scale": "full"})
    evaluations = {}
    for path in sorted((staging / "metrics").rglob("*.json")):
        metrics = json.loads(path.read_text())
        evaluations[metrics["model_id"]] = evaluation_cost(metrics)
    recoveries = {}
    for path in sorted((args.work_dir / "data/recovered").rglob("recovery_summary.json")):
        summary = json.loads(path.read_text())
        recoveries[str(path.parent.relative_to(args.work_dir / "data/recovered"))] = recovery_cost(
            summary, validated.recover.batch_size, full.recover)
    payload = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "device": _device(),
        "scale": validated.scale,
        "overrides": args.overrides,
        "pipeline_wall_s": wall,
        "stages": stage_times(args.work_dir),
        "evaluation": evaluations,
        "recovery": recoveries,
    }
    (staging / "cost.json").write_text(json.dumps(payload, indent=2))
    write_text(staging / "README.md", render(payload))
    if args.out_dir.exists():
        shutil.rmtree(args.out_dir)
    staging.rename(args.out_dir)
    print(render(payload))
    return 0


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def render(payload: dict[str, Any]) -> str:
    lines = [
        "# Table 1 run: how it was made and what each stage cost",
        "",
        f"Command: `{payload['command']}`  ",
        f"Device: {payload['device']}; scale `{payload['scale']}`"
        + (f"; overrides `{' '.join(payload['overrides'])}`" if payload["overrides"] else "")
        + f"; whole pipeline {payload['pipeline_wall_s'] / 60:.1f} min wall.",
        "",
        "The table itself: [results.md](results.md) (rows, settings, the command behind every row).",
        "",
        "## Wall time per job (Snakemake benchmark files)",
        "",
        *stage_table(payload["stages"]),
    ]
    lines += [
        "",
        "## Evaluating one model",
        "",
        "Measured parts of each evaluate job, and the same work scaled to the full setting (every window of "
        "each perplexity text at each length, every document of all seven zero-shot tasks) at the measured "
        "rates -- an estimate, labelled as one.",
        "",
        "| model | measured (s) | load | perplexity | zero-shot | speed | ppl tokens (used / full) | "
        "zero-shot docs (used / full, 7 tasks) | full setting, estimated (min) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model_id, cost in payload["evaluation"].items():
        lines.append(
            f"| {model_id} | {cost['measured_s']:.0f} | {cost.get('load_s', 0):.0f} | {cost.get('perplexity_s', 0):.0f} "
            f"| {cost.get('zeroshot_s', 0):.0f} | {cost.get('efficiency_s', 0):.0f} | "
            f"{cost['ppl_tokens']:,} / {cost['ppl_tokens_full']:,} | {cost['zeroshot_documents']:,} / "
            f"{cost['zeroshot_documents_full_all_tasks']:,} | {cost['estimated_full_s'] / 60:.1f} |")
    if payload["recovery"]:
        lines += ["", "## Recovery", "",
                  "| model | measured (s) | optimizer steps | tokens seen | LLM-Pruner recipe: steps (2 epochs, "
                  "batch 64) | estimated (min) at the measured s/example |",
                  "|---|---:|---:|---:|---:|---:|"]
        for model_id, cost in payload["recovery"].items():
            per_example = cost["measured_s"] / cost["examples_seen"] if cost["examples_seen"] else None
            estimate = "-" if per_example is None else f"{per_example * cost['full_recipe_examples'] / 60:.0f}"
            lines.append(f"| {model_id} | {cost['measured_s']:.0f} | {cost['optimizer_steps']} | "
                         f"{cost['tokens_seen']:,} | {cost['full_recipe_steps']} | {estimate} |")
        lines += ["", "The recovery estimate scales seconds per example linearly; the full recipe's examples are "
                  "longer (cutoff 256 tokens instead of the reduced run's cutoff) -- a lower bound on the CPU."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
