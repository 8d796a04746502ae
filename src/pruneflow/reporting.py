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

from pruneflow.config import PAPER_ZEROSHOT_TASKS, GridParams, format_ratio

VARIANT_ORDER = {"dense": 0, "pruned": 1, "servable": 2, "recovered": 3, "custom": 4}
TASK_LABELS = {
    "boolq": "BoolQ",
    "piqa": "PIQA",
    "hellaswag": "HellaSwag",
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
    ids += [f"servable/{c}/{format_ratio(r)}" for c in grid.servable_criteria for r in grid.ratios]
    ids += [f"recovered/{c}/{format_ratio(r)}" for c in grid.recovered_criteria for r in grid.ratios]
    return ids


def metrics_path(metrics_dir: str | Path, model_id: str) -> Path:
    return Path(metrics_dir) / f"{model_id}.json"


def load_metrics(paths: Iterable[Path]) -> list[dict[str, Any]]:
    return [json.loads(Path(p).read_text()) for p in paths]


def method_label(rec: dict[str, Any]) -> str:
    """The Table-1 "method" cell: the criterion, with the structure settings that are not the default."""
    if rec.get("variant") == "dense":
        return "dense"
    pruning = rec.get("summaries", {}).get("pruning", {})
    parts = [rec.get("criterion") or rec.get("model_id", "?")]
    if pruning.get("servable"):
        parts.append(f"servable/{pruning.get('width_multiple')}")
    if pruning.get("allocation") not in (None, "uniform"):
        parts.append(str(pruning["allocation"]))
    if pruning.get("attention_unit") not in (None, "kv_group"):
        parts.append(str(pruning["attention_unit"]))
    reconstruction = pruning.get("reconstruction")
    if reconstruction not in (None, "none"):
        parts.append(RECONSTRUCTION_LABELS.get(reconstruction, str(reconstruction)))
        if pruning.get("reconstruction_mode") == "sequential":
            parts.append("seq")
    elif pruning.get("bias_compensation"):  # summaries written before prune.reconstruction existed
        parts.append("bias-comp")
    return "+".join(parts)


RECONSTRUCTION_LABELS = {"bias": "bias-comp", "least_squares": "ls", "least_squares_bias": "ls+bias"}
# (recover.objective, recover.method) -> the "recovered" column; summaries without them were LoRA on lm
RECOVERY_LABELS = {("lm", "lora"): "LoRA", ("lm", "full"): "full", ("distill", "lora"): "distill+LoRA",
                   ("distill", "full"): "distill"}


def recovery_label(rec: dict[str, Any]) -> str:
    """How a model was recovered ("no" for a pruned one), from its recovery summary."""
    if rec.get("variant") != "recovered":
        return "no"
    summary = rec.get("summaries", {}).get("recovery", {})
    return RECOVERY_LABELS.get((summary.get("objective", "lm"), summary.get("method", "lora")), "yes")


def results_frame(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """A tidy table: one row per model.

    Perplexity columns: `ppl_<dataset>` at the headline window length, `ppl_<dataset>@<len>` at the others.
    """
    rows = []
    for rec in records:
        pruning = rec.get("summaries", {}).get("pruning", {})
        row: dict[str, Any] = {
            "model": rec["model_id"],
            "variant": rec.get("variant"),
            "method": method_label(rec),
            "criterion": rec.get("criterion") or "-",
            "recovered": rec.get("variant") == "recovered",
            "recovery": recovery_label(rec),
            "ratio": rec.get("ratio"),
            "achieved_ratio": pruning.get("achieved_ratio", 0.0 if rec.get("variant") == "dense" else None),
            "params_m": rec["params"] / 1e6,
        }
        headline_len = next(iter(rec.get("perplexity", {}).values()), {}).get("seq_len")
        for name, value in rec.get("perplexity", {}).items():
            row[f"ppl_{name}"] = value["ppl"]
        for length, by_name in rec.get("perplexity_by_seq_len", {}).items():
            for name, value in by_name.items():
                if value.get("seq_len") != headline_len:
                    row[f"ppl_{name}@{length}"] = value["ppl"]
        for task, value in rec.get("zeroshot", {}).items():
            metric = rec.get("zeroshot_headline_metric", {}).get(task, "acc")
            row[f"{task}"] = value.get(metric)
        row["zeroshot_average"] = rec.get("zeroshot_average")
        eff = rec.get("efficiency", {})
        for key in ("latency_ms_bs1", "throughput_tokens_per_s", "generation_tokens_per_s", "peak_memory_mib",
                    "weights_mib"):
            row[key] = eff.get(key)
        row["macs_per_token_m"] = eff["macs_per_token"] / 1e6 if eff.get("macs_per_token") else None
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["_order"] = frame["variant"].map(VARIANT_ORDER).fillna(9)
    frame = frame.sort_values(["ratio", "_order", "method"]).drop(columns="_order").reset_index(drop=True)
    dense = frame[frame["variant"] == "dense"]
    if not dense.empty and dense["throughput_tokens_per_s"].notna().all():
        frame["throughput_speedup"] = frame["throughput_tokens_per_s"] / float(dense["throughput_tokens_per_s"].iloc[0])
    return frame


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _percent(fraction: Any) -> float | None:
    """A fraction as a percentage; None and NaN stay missing."""
    return None if fraction is None or pd.isna(fraction) else 100 * fraction


def _ppl_label(column: str) -> str:
    name, _, length = column.removeprefix("ppl_").partition("@")
    return PPL_LABELS.get(name, name) + (f" @{length}" if length else "")


def _headline_metrics(records: Sequence[dict[str, Any]]) -> dict[str, str]:
    headline: dict[str, str] = {}
    for rec in records:
        headline.update(rec.get("zeroshot_headline_metric", {}))
    return headline


def zeroshot_tasks_of(rec: dict[str, Any]) -> list[str]:
    """The tasks behind a metrics record's zero-shot average (older records: the keys of its scores)."""
    return list(rec.get("zeroshot_tasks") or rec.get("zeroshot", {}))


def _report_tasks(frame: pd.DataFrame, records: Sequence[dict[str, Any]]) -> list[str]:
    """Task columns: the built-in ones in LLM-Pruner's order, then any other task as the records list it."""
    others = [t for rec in records for t in zeroshot_tasks_of(rec) if t not in TASK_LABELS]
    return [t for t in [*TASK_LABELS, *dict.fromkeys(others)] if t in frame.columns]


def paper_task_difference(tasks: Sequence[str]) -> str:
    """How a task list differs from LLM-Pruner's seven zero-shot tasks, in words."""
    missing = [t for t in PAPER_ZEROSHOT_TASKS if t not in tasks]
    added = [t for t in tasks if t not in PAPER_ZEROSHOT_TASKS]
    if not missing and not added:
        return "LLM-Pruner's seven"
    return "not LLM-Pruner's seven: " + ", ".join(
        [f"{', '.join(missing)} missing"] * bool(missing) + [f"{', '.join(added)} added"] * bool(added))


def zeroshot_average_note(records: Sequence[dict[str, Any]]) -> str | None:
    """Which tasks the average column means, and whether they are the paper's seven (None: no zero-shot).

    An average over other tasks is not comparable with LLM-Pruner's, so the report says so next to it."""
    models_by_tasks: dict[tuple[str, ...], list[str]] = {}
    for rec in records:
        tasks = tuple(zeroshot_tasks_of(rec))
        if tasks:
            models_by_tasks.setdefault(tasks, []).append(str(rec.get("model_id")))
    parts = []
    for tasks, models in models_by_tasks.items():
        which = "" if len(models_by_tasks) == 1 else f" (for {', '.join(models)})"
        parts.append(f"average over {', '.join(tasks)}{which} — {paper_task_difference(tasks)}")
    return "Zero-shot " + "; ".join(parts) + "." if parts else None


def markdown_table(frame: pd.DataFrame, records: Sequence[dict[str, Any]]) -> str:
    """Quality in the shape of LLM-Pruner's Table 1: ratio, method, recovered, perplexities, each task, average."""
    tasks = _report_tasks(frame, records)
    ppls = [c for c in frame.columns if c.startswith("ppl_")]
    headline = _headline_metrics(records)
    header = ["ratio (req / got)", "method", "recovered", "params (M)"]
    header += [f"{_ppl_label(p)} ↓" for p in ppls]
    header += [f"{TASK_LABELS.get(t, t)} ({headline.get(t, 'acc')})" for t in tasks]
    header += ["average"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---", "---"] + ["---:"] * (len(header) - 3)) + "|"]
    for _, row in frame.iterrows():
        ratio = ("0%" if row["variant"] == "dense"
                 else f"{_percent(row['ratio']):.0f}% / {_fmt(_percent(row['achieved_ratio']), 1)}%")
        recovered = "-" if row["variant"] == "dense" else row["recovery"]
        cells = [ratio, row["method"], recovered, _fmt(row["params_m"], 1)]
        cells += [_fmt(row.get(p)) for p in ppls]
        cells += [_fmt(_percent(row.get(t)), 1) for t in tasks]
        cells += [_fmt(_percent(row.get("zeroshot_average")), 1)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def efficiency_table(frame: pd.DataFrame) -> str:
    """Size and speed per model, with the forward-throughput speedup over the dense model."""
    header = ["model", "params (M)", "MACs/token (M)", "latency bs1 (ms)", "throughput (tok/s)", "speedup",
              "generation (tok/s)", "peak memory (MiB)"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for _, row in frame.iterrows():
        speedup = row.get("throughput_speedup")
        cells = [row["model"], _fmt(row["params_m"], 1), _fmt(row.get("macs_per_token_m"), 1),
                 _fmt(row.get("latency_ms_bs1"), 1), _fmt(row.get("throughput_tokens_per_s"), 0),
                 _fmt(speedup, 2) + ("x" if speedup is not None and not pd.isna(speedup) else ""),
                 _fmt(row.get("generation_tokens_per_s"), 1), _fmt(row.get("peak_memory_mib"), 0)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def setting_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for rec in records[:1]:
        setting = rec.get("setting", {})
        ev = setting.get("evaluate", {})
        lines.append(f"- scale: `{setting.get('scale')}`; device `{setting.get('device')}`, dtype `{setting.get('dtype')}`")
        by_seq_len = rec.get("perplexity_by_seq_len") or {"": rec.get("perplexity", {})}
        for by_name in by_seq_len.values():
            for name, value in by_name.items():
                lines.append(
                    f"- {PPL_LABELS.get(name, name)}: {value['split']}, non-overlapping windows of {value['seq_len']} "
                    f"tokens, {value['windows']} of {value['total_windows']} windows"
                    + (" (full set)" if value["windows"] == value["total_windows"]
                       else " (fixed subset: the first windows)")
                )
        limit = ev.get("evaluate.zeroshot_limit")
        tasks = ", ".join(TASK_LABELS.get(t, t) for t in rec.get("zeroshot", {}))
        if tasks:
            headline = rec.get("zeroshot_headline_metric", {})
            by_metric: dict[str, list[str]] = {"acc_norm": [], "acc": []}
            for task, metric in headline.items():
                by_metric.setdefault(metric, []).append(TASK_LABELS.get(task, task))
            lines.append(
                f"- zero-shot (lm-eval; built-in tasks read local files in data/raw/zeroshot): {tasks}; "
                + ("full sets" if limit is None else f"the first {limit} documents of each task")
                + "; accuracies in %. Columns show LLM-Pruner's convention: "
                + "; ".join(f"{metric} for {', '.join(names)}" for metric, names in by_metric.items() if names)
                + " (both acc and acc_norm are in every metrics.json and in MLflow); average = mean of the columns"
            )
        eff = rec.get("efficiency", {})
        if eff:
            generation = ("" if eff.get("generation_tokens") is None else
                          f"; generation = greedy tokens/s at batch 1 ({eff['generation_tokens']} new tokens after a "
                          f"{eff.get('seq_len')}-token prompt, KV cache)")
            memory = "" if eff.get("peak_memory_method") is None else f"; peak memory: {eff['peak_memory_method']}"
            lines.append(
                f"- speed: latency = one forward pass of {eff.get('seq_len')} tokens at batch 1; throughput = forward "
                f"tokens/s at batch {eff.get('throughput_batch_size')}{generation}{memory}. "
                "Each model is timed in its own evaluate job, and "
                "jobs may run side by side: for a controlled dense-vs-pruned comparison use "
                "`benchmarks/efficiency.py` (one process, same device, interleaved)"
            )
    return lines


def provenance_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for rec in records:
        lines.append(f"- **{rec['model_id']}**")
        for step in rec.get("provenance", []):
            lines.append(f"  - {step['stage']}: `{step['command']}`")
    return lines


def plot_quality_vs_throughput(frame: pd.DataFrame, out: Path, batch_size: int | None = None) -> None:
    """WikiText-2 perplexity and zero-shot average against forward throughput, one point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, column, label, log in ((axes[0], "ppl_wikitext2", "WikiText-2 perplexity", True),
                                   (axes[1], "zeroshot_average", "zero-shot average accuracy", False)):
        for _, row in frame.iterrows():
            if column not in row or pd.isna(row.get(column)) or pd.isna(row.get("throughput_tokens_per_s")):
                continue
            marker = {"dense": "*", "pruned": "o", "servable": "^", "recovered": "s"}.get(row["variant"], "x")
            ax.scatter(row["throughput_tokens_per_s"], row[column], marker=marker, s=60 if marker == "*" else 30)
            ax.annotate(row["model"].removeprefix("pruned/").removeprefix("recovered/"),  # servable/ stays
                        (row["throughput_tokens_per_s"], row[column]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel(f"forward throughput (tokens/s, batch {batch_size})")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_title("* dense   o pruned   ^ servable   s recovered", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_vs_ratio(frame: pd.DataFrame, column: str, ylabel: str, out: Path, log: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    dense = frame[frame["variant"] == "dense"]
    for (variant, method), group in frame[frame["variant"].isin(["pruned", "servable", "recovered"])].groupby(
        ["variant", "method"]
    ):
        group = pd.concat([dense.assign(variant=variant, method=method), group]).sort_values("ratio")
        if column not in group or group[column].isna().all():
            continue
        style = {"pruned": "-o", "servable": "-.^"}.get(variant, "--s")
        ax.plot(group["ratio"], group[column], style, label=f"{method} ({variant})")
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
