"""Turn metrics.json files into the results table and plots.

One row per evaluated model, one column per metric; zero-shot columns show each task's headline
metric (named in the header), and the provenance section gives the commands behind every row.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from pruneflow.config import GridParams, format_ratio

VARIANT_ORDER = {"dense": 0, "pruned": 1, "recovered": 2, "custom": 3}
TASK_LABELS = {
    "boolq": "BoolQ",
    "piqa": "PIQA",
    "winogrande": "WinoGrande",
    "arc_easy": "ARC-e",
    "arc_challenge": "ARC-c",
    "openbookqa": "OBQA",
    "lambada": "LAMBADA",
}
PPL_LABELS = {"wikitext2": "WikiText-2", "ptb": "PTB", "ptb_test": "PTB test"}


def expected_model_ids(grid: GridParams) -> list[str]:
    """The models a grid evaluates, in report order."""
    ids = ["dense"]
    ids += [f"pruned/{c}/{format_ratio(r)}" for c in grid.criteria for r in grid.ratios]
    ids += [f"recovered/{c}/{format_ratio(r)}" for c in grid.recovered_criteria for r in grid.ratios]
    return ids


def metrics_path(metrics_dir: str | Path, model_id: str) -> Path:
    return Path(metrics_dir) / f"{model_id}.json"


def load_metrics(paths: Iterable[Path]) -> list[dict[str, Any]]:
    return [json.loads(Path(p).read_text()) for p in paths]


def results_frame(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """A tidy table: one row per model."""
    rows = []
    for rec in records:
        pruning = rec.get("summaries", {}).get("pruning", {})
        row: dict[str, Any] = {
            "model": rec["model_id"],
            "variant": rec.get("variant"),
            "criterion": rec.get("criterion") or "-",
            "ratio": rec.get("ratio"),
            "achieved_ratio": pruning.get("achieved_ratio", 0.0 if rec.get("variant") == "dense" else None),
            "params_m": rec["params"] / 1e6,
        }
        for name, value in rec.get("perplexity", {}).items():
            row[f"ppl_{name}"] = value["ppl"]
        for task, value in rec.get("zeroshot", {}).items():
            metric = rec.get("zeroshot_headline_metric", {}).get(task, "acc")
            row[f"{task}"] = value.get(metric)
        row["zeroshot_average"] = rec.get("zeroshot_average")
        eff = rec.get("efficiency", {})
        row["latency_ms_bs1"] = eff.get("latency_ms_bs1")
        row["throughput_tokens_per_s"] = eff.get("throughput_tokens_per_s")
        row["macs_per_token_m"] = eff["macs_per_token"] / 1e6 if eff.get("macs_per_token") else None
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["_order"] = frame["variant"].map(VARIANT_ORDER).fillna(9)
    return frame.sort_values(["_order", "criterion", "ratio"]).drop(columns="_order").reset_index(drop=True)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(frame: pd.DataFrame, records: Sequence[dict[str, Any]]) -> str:
    tasks = [t for t in TASK_LABELS if t in frame.columns]
    ppls = [c.removeprefix("ppl_") for c in frame.columns if c.startswith("ppl_")]
    headline = {}
    for rec in records:
        headline.update(rec.get("zeroshot_headline_metric", {}))
    header = ["model", "ratio (req / got)", "params (M)"]
    header += [f"{PPL_LABELS.get(p, p)} ppl" for p in ppls]
    header += [f"{TASK_LABELS[t]} ({headline.get(t, 'acc')})" for t in tasks]
    header += ["avg", "latency bs1 (ms)", "tokens/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for _, row in frame.iterrows():
        ratio = "0 / 0" if row["variant"] == "dense" else f"{_fmt(row['ratio'])} / {_fmt(row['achieved_ratio'], 3)}"
        cells = [row["model"], ratio, _fmt(row["params_m"], 1)]
        cells += [_fmt(row.get(f"ppl_{p}")) for p in ppls]
        cells += [_fmt(100 * row[t] if row.get(t) is not None else None, 1) for t in tasks]
        avg = row.get("zeroshot_average")
        cells += [_fmt(100 * avg if avg is not None else None, 1), _fmt(row.get("latency_ms_bs1"), 1),
                  _fmt(row.get("throughput_tokens_per_s"), 0)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def setting_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for rec in records[:1]:
        setting = rec.get("setting", {})
        ev = setting.get("evaluate", {})
        lines.append(f"- scale: `{setting.get('scale')}`; device `{setting.get('device')}`, dtype `{setting.get('dtype')}`")
        for name, value in rec.get("perplexity", {}).items():
            lines.append(
                f"- {PPL_LABELS.get(name, name)}: {value['split']}, windows of {value['seq_len']} tokens, "
                f"{value['windows']} of {value['total_windows']} windows"
                + (" (full set)" if value["windows"] == value["total_windows"] else " (fixed subset: the first windows)")
            )
        limit = ev.get("evaluate.zeroshot_limit")
        tasks = ", ".join(TASK_LABELS.get(t, t) for t in rec.get("zeroshot", {}))
        if tasks:
            lines.append(
                f"- zero-shot (lm-eval, local task files in data/raw/zeroshot): {tasks}; "
                + ("full sets" if limit is None else f"the first {limit} documents of each task")
                + "; accuracies in %"
            )
    return lines


def provenance_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for rec in records:
        lines.append(f"- **{rec['model_id']}**")
        for step in rec.get("provenance", []):
            lines.append(f"  - {step['stage']}: `{step['command']}`")
    return lines


def plot_vs_ratio(frame: pd.DataFrame, column: str, ylabel: str, out: Path, log: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    dense = frame[frame["variant"] == "dense"]
    for (variant, criterion), group in frame[frame["variant"].isin(["pruned", "recovered"])].groupby(
        ["variant", "criterion"]
    ):
        group = pd.concat([dense.assign(variant=variant, criterion=criterion), group]).sort_values("ratio")
        if column not in group or group[column].isna().all():
            continue
        style = "-o" if variant == "pruned" else "--s"
        ax.plot(group["ratio"], group[column], style, label=f"{criterion} ({variant})")
    if not dense.empty and column in dense and not dense[column].isna().all():
        ax.axhline(float(dense[column].iloc[0]), color="gray", lw=0.8, ls=":", label="dense")
    ax.set_xlabel("fraction of parameters removed")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
