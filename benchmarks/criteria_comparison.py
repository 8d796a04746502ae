"""Side by side: every pruneflow criterion and structure against Torch-Pruning, same model, same data.

For each criterion the scores are computed once (own process: time and peak memory are its own),
then every method (criterion x allocation x attention unit x bias compensation) is pruned to each
ratio of ALL parameters removed, without recovery, and evaluated identically: perplexity at 128
tokens on WikiText-2 (raw test) and PTB (LLM-Pruner's validation split) and lm-eval zero-shot tasks.
Torch-Pruning's LLM recipe (benchmarks/torch_pruning_reference.py) runs on the same dense model and
calibration ids, targeting the parameter count our pruner reached at each ratio, under a time limit;
a hang is a result. Writes OUT.json, OUT.md and OUT.png.

Reduced CPU scale (what the committed CPU report used):
    python benchmarks/criteria_comparison.py --ppl-windows 64 --zeroshot-ratios 0.2 --zeroshot-limit 100 \
        --zeroshot-tasks arc_easy piqa
Full scale (GPU): python benchmarks/criteria_comparison.py --zeroshot-tasks boolq piqa winogrande arc_easy \
    arc_challenge openbookqa lambada
Inputs are the pipeline's own outputs (`snakemake data/activations/activations.safetensors` makes them).
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import platform
import resource
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pruneflow.config import load_params
from pruneflow.pipeline.atomic import write_json, write_text

HERE = Path(__file__).resolve().parent
# a reference row counts only when it lands within this fraction of our parameter count
TARGET_TOLERANCE = 0.01


@dataclass(frozen=True)
class Method:
    """One way of pruning: a criterion and the structure settings it is applied with."""

    criterion: str
    allocation: str = "uniform"
    attention_unit: str = "kv_group"
    reconstruction: str = "none"
    reconstruction_mode: str = "parallel"

    @property
    def label(self) -> str:
        from pruneflow.reporting import RECONSTRUCTION_LABELS

        parts = [self.criterion]
        if self.allocation != "uniform":
            parts.append(self.allocation)
        if self.attention_unit != "kv_group":
            parts.append(self.attention_unit)
        if self.reconstruction != "none":
            parts.append(RECONSTRUCTION_LABELS[self.reconstruction])
            if self.reconstruction_mode != "parallel":
                parts.append("seq")
        return "+".join(parts)


def default_methods(criteria: list[str], extras_too: bool = True,
                    reconstructions: tuple[tuple[str, str], ...] = (("none", "parallel"),),
                    attention_unit: str = "kv_group") -> list[Method]:
    """Each criterion with each (reconstruction, mode); FLAP also with its own bias compensation."""
    methods = [Method(name, attention_unit=attention_unit, reconstruction=r, reconstruction_mode=m)
               for name in criteria for r, m in reconstructions]
    if "flap" in criteria and ("bias", "parallel") not in reconstructions:
        methods.append(Method("flap", attention_unit=attention_unit, reconstruction="bias"))
    if not extras_too:
        return methods
    extras = [
        Method("taylor_element1", allocation="global"),
        Method("taylor_element2", allocation="global"),
        Method("taylor_element1", attention_unit="query_head"),
        Method("flap", allocation="global", reconstruction="bias"),  # FLAP's own setting
        Method("wanda_sp", allocation="global"),
    ]
    return methods + [m for m in extras if m.criterion in criteria]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _score_child(model_dir: str, criterion: str, calibration: str, activations: str, params_path: str,
                 out: str, queue) -> None:
    """Score one criterion in a fresh process so its time and peak memory are its own."""
    try:
        from safetensors.torch import load_file

        from pruneflow.checkpoint import load_pruned
        from pruneflow.importance import ScoringInputs, get_criterion
        from pruneflow.runtime import resolve_device, resolve_dtype
        from pruneflow.stages.calibrate import load_calibration

        params = load_params(params_path)
        device = resolve_device(params.runtime.device)
        dtype = resolve_dtype(params.runtime.dtype, device)
        criterion_obj = get_criterion(criterion, params.score)
        stats = load_file(activations) if criterion_obj.needs_activations else None
        model = load_pruned(model_dir, dtype=dtype, device=device)
        rss_loaded = _rss_mib()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        started = time.perf_counter()
        scores = criterion_obj.score(model, ScoringInputs(
            calibration_ids=load_calibration(Path(calibration)), activations=stats,
            micro_batch_size=params.score.micro_batch_size, seed=params.seed, device=device, dtype=dtype))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        scores.metadata["criterion"] = criterion
        scores.save(out)
        result = {"criterion": criterion, "seconds": seconds, "device": str(device), "dtype": str(dtype),
                  "peak_rss_mib": _rss_mib(), "rss_after_load_mib": rss_loaded}
        if device.type == "cuda":
            result["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            result["peak_gpu_over_model_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        queue.put(result)
    except Exception as exc:  # reported, not hidden: the table shows the failure
        queue.put({"criterion": criterion, "error": f"{type(exc).__name__}: {exc}"})


def score_all(criteria: list[str], args, scores_dir: Path) -> dict[str, dict[str, Any]]:
    context = multiprocessing.get_context("spawn")
    results = {}
    for name in criteria:
        queue = context.Queue()
        out = scores_dir / f"{name}.safetensors"
        process = context.Process(target=_score_child, args=(str(args.model), name, str(args.calibration),
                                                              str(args.activations), str(args.params), str(out), queue))
        process.start()
        result = queue.get()
        process.join()
        result["scores"] = str(out)
        results[name] = result
        print(f"score {name:20s} {result.get('seconds', float('nan')):7.1f} s  "
              f"peak RSS {result.get('peak_rss_mib', float('nan')):7.0f} MiB {result.get('error', '')}", flush=True)
    return results


def evaluate_model(model, tokenizer, texts: dict[str, torch.Tensor], args, device, with_zeroshot: bool) -> dict:
    from pruneflow.perplexity import perplexity
    from pruneflow.zeroshot import evaluate_zeroshot, zeroshot_average, zeroshot_average_stderr

    result: dict[str, Any] = {"perplexity": {}}
    for name, ids in texts.items():
        ppl = perplexity(model, ids, seq_len=128, batch_size=args.ppl_batch_size, max_windows=args.ppl_windows,
                         device=device)
        result["perplexity"][name] = {"ppl": ppl.ppl, "windows": ppl.windows, "total_windows": ppl.total_windows}
    if with_zeroshot and args.zeroshot_tasks:
        zeroshot = evaluate_zeroshot(model, tokenizer, args.zeroshot_tasks, args.data_dir, limit=args.zeroshot_limit,
                                     batch_size=args.zeroshot_batch_size, device=device)
        result["zeroshot"] = zeroshot
        result["zeroshot_average"] = zeroshot_average(zeroshot)
        result["zeroshot_average_stderr"] = zeroshot_average_stderr(zeroshot)
    return result


def _require_torch_pruning() -> None:
    """Refuse at once, not after the pruneflow rows have run, when the peer to compare with is absent."""
    import importlib.util  # noqa: PLC0415

    from torch_pruning_reference import SETTINGS, TORCH_PRUNING_PIN  # noqa: PLC0415

    if importlib.util.find_spec("torch_pruning") is None:
        raise SystemExit(f"--torch-pruning-settings needs Torch-Pruning in this environment: "
                         f"pip install {TORCH_PRUNING_PIN} --no-deps (or drop the option); settings: "
                         f"{', '.join(SETTINGS)}")


def prune_method(dense, scores, method: Method, ratio: float, layers: list[int], params, stats, calibration_ids,
                 device):
    """Plan, remove and re-fit exactly as the prune stage does (pruneflow.reconstruction; attention_unit
    auto searches the layouts as pruneflow.layout_search does there)."""
    from pruneflow.architectures import count_parameters
    from pruneflow.layout_search import calibration_loss, choose_layout, layouts_to_try
    from pruneflow.pruning import plan_pruning
    from pruneflow.reconstruction import prune_and_reconstruct

    def prune_with(target, layout):
        plan = plan_pruning(target, scores, ratio, layers, layout.structures, allocation=method.allocation,
                            attention_unit=layout.attention_unit)
        return prune_and_reconstruct(target, plan, method=method.reconstruction, mode=method.reconstruction_mode,
                                     damping=params.prune.damping, calibration_ids=calibration_ids,
                                     batch_size=params.activations.batch_size, device=device, activations=stats)

    model = copy.deepcopy(dense)
    started = time.perf_counter()
    layout, trials = choose_layout(
        model, layouts_to_try(params.prune.structures, method.attention_unit), prune_with,
        lambda trial: calibration_loss(trial, calibration_ids, params.prune.search_samples,
                                       params.activations.batch_size, device))
    result = prune_with(model, layout)
    return model, count_parameters(model), {"surgery_seconds": time.perf_counter() - started,
                                            "layout": layout.label, "layout_search": [t.to_dict() for t in trials],
                                            **result.mean_errors()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("data/models/dense"))
    parser.add_argument("--calibration", type=Path, default=Path("data/calibration/calibration.safetensors"))
    parser.add_argument("--activations", type=Path, default=Path("data/activations/activations.safetensors"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="score/prune/runtime settings (the pipeline's); the grid is ignored")
    parser.add_argument("--data-dir", type=Path, default=Path("data/raw"))
    parser.add_argument("--criteria", nargs="+", default=None, help="default: every criterion")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--ppl-windows", type=int, default=None, help="first N windows per text (default: all)")
    parser.add_argument("--ppl-batch-size", type=int, default=16)
    parser.add_argument("--zeroshot-tasks", nargs="*", default=["arc_easy", "piqa"])
    parser.add_argument("--zeroshot-ratios", nargs="*", type=float, default=None, help="default: every ratio")
    parser.add_argument("--zeroshot-limit", type=int, default=None)
    parser.add_argument("--zeroshot-batch-size", type=int, default=32)
    parser.add_argument("--torch-pruning-settings", nargs="*",
                        default=["taylor_heads_mlp", "magnitude_heads_mlp", "taylor_mlp_only", "magnitude_mlp_only",
                                 "taylor_mlp_only_global"])
    parser.add_argument("--torch-pruning-time-limit", type=int, default=600)
    parser.add_argument("--work-dir", type=Path, default=Path("data/benchmarks/criteria"))
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/criteria_comparison"))
    parser.add_argument("--reconstructions", nargs="+", default=["none:parallel"],
                        help="RECONSTRUCTION:MODE pairs every criterion is pruned with (e.g. least_squares:parallel)")
    parser.add_argument("--no-extras", action="store_true",
                        help="only each criterion's own setting (no global / query-head variants)")
    parser.add_argument("--rerender", action="store_true",
                        help="rebuild findings, markdown and plot from OUT.json (no model work)")
    args = parser.parse_args(argv)
    command = " ".join(["python", "benchmarks/criteria_comparison.py", *map(shlex.quote, argv or sys.argv[1:])])
    if args.rerender:
        import json

        payload = json.loads(args.out.with_suffix(".json").read_text())
        for row in payload["rows"]:
            validate_reference_row(row)
        payload["findings"] = findings(payload["rows"], payload["ratios"])
        write_json(args.out.with_suffix(".json"), payload)
        write_text(args.out.with_suffix(".md"), render_markdown(payload))
        plot(payload, args.out.with_suffix(".png"))
        return 0

    from safetensors.torch import load_file

    from pruneflow.architectures import count_parameters
    from pruneflow.checkpoint import load_pruned
    from pruneflow.importance import CRITERIA, GroupScores
    from pruneflow.modeling import load_tokenizer
    from pruneflow.perplexity import tokenize_text
    from pruneflow.runtime import resolve_device, resolve_dtype
    from pruneflow.text_data import evaluation_text

    if args.torch_pruning_settings:
        _require_torch_pruning()
    params = load_params(args.params)
    criteria = args.criteria or list(CRITERIA)
    zeroshot_ratios = set(args.ratios if args.zeroshot_ratios is None else args.zeroshot_ratios)
    device = resolve_device(params.runtime.device)
    dtype = resolve_dtype(params.runtime.dtype, device)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    scoring = score_all(criteria, args, args.work_dir)
    dense = load_pruned(args.model, dtype=dtype, device=device)
    tokenizer = load_tokenizer(args.model)
    stats = load_file(str(args.activations))
    from pruneflow.stages.calibrate import load_calibration

    calibration_ids = load_calibration(args.calibration)
    reconstructions = tuple(tuple(pair.split(":")) for pair in args.reconstructions)
    texts = {name: tokenize_text(evaluation_text(name, args.data_dir), tokenizer) for name in ("wikitext2", "ptb")}
    layers = list(params.prune.layer_range(len(dense.model.layers)))
    params_dense = count_parameters(dense)

    rows: list[dict[str, Any]] = []
    dense_eval = evaluate_model(dense, tokenizer, texts, args, device, with_zeroshot=True)
    rows.append({"method": "dense", "source": "-", "ratio": 0.0, "params": params_dense, **dense_eval})
    print(f"dense: {dense_eval['perplexity']['wikitext2']['ppl']:.2f}", flush=True)
    target_params: dict[float, int] = {}
    for method in default_methods(criteria, extras_too=not args.no_extras, reconstructions=reconstructions,
                                  attention_unit=params.prune.attention_unit):
        if "error" in scoring.get(method.criterion, {"error": "not scored"}):
            continue
        scores = GroupScores.load(scoring[method.criterion]["scores"])
        for ratio in args.ratios:
            row: dict[str, Any] = {"method": method.label, "source": "pruneflow", "ratio": ratio,
                                   "criterion": method.criterion, "allocation": method.allocation,
                                   "attention_unit": method.attention_unit,
                                   "reconstruction": method.reconstruction,
                                   "reconstruction_mode": method.reconstruction_mode}
            try:
                model, params_after, surgery = prune_method(dense, scores, method, ratio, layers, params, stats,
                                                            calibration_ids, device)
                row["surgery"] = surgery
            except Exception as exc:
                rows.append({**row, "status": f"error: {exc}"})
                continue
            target_params.setdefault(ratio, params_after)
            row.update(params=params_after, achieved_ratio=1 - params_after / params_dense, status="ok")
            row.update(evaluate_model(model, tokenizer, texts, args, device, with_zeroshot=ratio in zeroshot_ratios))
            rows.append(row)
            print(f"{method.label:36s} {ratio:.2f}: wikitext2 {row['perplexity']['wikitext2']['ppl']:10.2f} "
                  f"ptb {row['perplexity']['ptb']['ppl']:10.2f} "
                  f"zero-shot {row.get('zeroshot_average', float('nan')):.3f}", flush=True)
            del model

    rows.extend(run_torch_pruning(args, target_params, layers, len(dense.model.layers), params_dense, tokenizer,
                                  texts, device, dtype, zeroshot_ratios))
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)")
    payload = {
        "command": command, "device": device_name, "dtype": str(dtype).removeprefix("torch."),
        "model": str(args.model), "params_dense": params_dense, "pruned_layers": [layers[0], layers[-1] + 1],
        "structures": list(params.prune.structures), "ratios": args.ratios,
        "ppl_windows": args.ppl_windows, "zeroshot_tasks": args.zeroshot_tasks, "zeroshot_limit": args.zeroshot_limit,
        "zeroshot_ratios": sorted(zeroshot_ratios), "calibration": str(args.calibration),
        "scoring": scoring, "rows": rows, "seconds": time.perf_counter() - started,
    }
    payload["findings"] = findings(rows, args.ratios)
    write_json(args.out.with_suffix(".json"), payload)
    write_text(args.out.with_suffix(".md"), render_markdown(payload))
    plot(payload, args.out.with_suffix(".png"))
    print(render_markdown(payload))
    return 0


def run_torch_pruning(args, target_params, layers, num_layers, params_dense, tokenizer, texts, device, dtype,
                      zeroshot_ratios) -> list[dict[str, Any]]:
    """Every Torch-Pruning setting at every ratio, evaluated like ours; a hang is recorded once per setting."""
    if not args.torch_pruning_settings:
        return []
    sys.path.insert(0, str(HERE))
    from torch_pruning_reference import run_setting  # noqa: PLC0415 - a benchmark-only dependency

    from pruneflow.checkpoint import load_pruned

    rows = []
    for setting in args.torch_pruning_settings:
        stuck = None
        for ratio in args.ratios:
            row: dict[str, Any] = {"method": f"torch-pruning {setting}", "source": "torch-pruning", "ratio": ratio}
            if stuck is not None:
                rows.append({**row, "status": f"not run: {stuck} at an earlier ratio (the graph is the same)"})
                continue
            out_dir = args.work_dir / "torch_pruning" / repr(ratio)  # run_setting adds <setting>/
            result = run_setting(str(args.model), str(args.calibration), target_params[ratio], setting, str(out_dir),
                                 args.torch_pruning_time_limit, layers[0], layers[-1] + 1)
            row["torch_pruning"] = {k: v for k, v in result.items() if k != "layer_shapes"}
            status = result.get("status")
            row["status"] = status if status == "ok" else f"{status}: {result.get('stage', '')} {result.get('error', '')}".strip()
            print(f"torch-pruning {setting} {ratio}: {row['status'][:200]}", flush=True)
            if status == "timeout":
                stuck = f"timeout after {args.torch_pruning_time_limit} s in stage {result.get('stage')!r}"
            gap = abs(result.get("params_after", 0) - target_params[ratio]) / target_params[ratio]
            if status == "ok" and gap > TARGET_TOLERANCE:
                row["status"] = (f"target missed: {result.get('params_after'):,} params for a target of "
                                 f"{target_params[ratio]:,} (MLP channels alone cannot remove this much)")
                status = "target missed"
            if status == "ok":
                model = load_pruned(out_dir / setting / "model", dtype=dtype, device=device)
                row.update(params=result["params_after"], achieved_ratio=1 - result["params_after"] / params_dense)
                row.update(evaluate_model(model, tokenizer, texts, args, device, with_zeroshot=ratio in zeroshot_ratios))
                del model
                shutil.rmtree(out_dir / setting / "model")  # 0.4 GB each; the result.json stays
            rows.append(row)
    return rows


def validate_reference_row(row: dict) -> None:
    """A reference row that missed our parameter count is not comparable: keep it, mark it, drop its
    quality numbers (rows written before this check existed get it here, with --rerender)."""
    result = row.get("torch_pruning") or {}
    target, achieved = result.get("target_params"), result.get("params_after")
    if row.get("status") == "ok" and target and achieved and abs(achieved - target) / target > TARGET_TOLERANCE:
        row["status"] = (f"target missed: {achieved:,} params for a target of {target:,} "
                         "(MLP channels alone cannot remove this much); its quality numbers are dropped")
        for key in ("perplexity", "zeroshot", "zeroshot_average", "params", "achieved_ratio"):
            row.pop(key, None)


def _ppl(row: dict, name: str) -> float | None:
    return row.get("perplexity", {}).get(name, {}).get("ppl")


def findings(rows: list[dict], ratios: list[float]) -> dict[str, Any]:
    """The comparison's targets, computed from the rows (never asserted, only reported)."""
    ok = [r for r in rows if r.get("status", "ok") == "ok" and _ppl(r, "wikitext2") is not None and r["method"] != "dense"]
    out: dict[str, Any] = {"per_ratio": {}}
    for ratio in ratios:
        at = [r for r in ok if r["ratio"] == ratio]
        ours = [r for r in at if r["source"] == "pruneflow"]
        theirs = [r for r in at if r["source"] == "torch-pruning"]
        entry: dict[str, Any] = {}
        if ours:
            best = min(ours, key=lambda r: _ppl(r, "wikitext2"))
            worst = max(ours, key=lambda r: _ppl(r, "wikitext2"))
            entry.update(best_pruneflow=best["method"], best_pruneflow_wikitext2=_ppl(best, "wikitext2"),
                         worst_pruneflow=worst["method"], spread_wikitext2=_ppl(worst, "wikitext2") / _ppl(best, "wikitext2"))
            by = {r["method"]: _ppl(r, "wikitext2") for r in ours}
            if {"taylor_element1", "random", "l2_magnitude"} <= set(by):
                entry["taylor_beats_random_and_l2"] = by["taylor_element1"] < min(by["random"], by["l2_magnitude"])
            with_zs = [r for r in ours if r.get("zeroshot_average") is not None]
            if with_zs:
                best_zs = max(with_zs, key=lambda r: r["zeroshot_average"])
                entry.update(best_pruneflow_zeroshot=best_zs["method"], best_pruneflow_zeroshot_average=best_zs["zeroshot_average"])
        if theirs:
            best_tp = min(theirs, key=lambda r: _ppl(r, "wikitext2"))
            entry.update(best_torch_pruning=best_tp["method"], best_torch_pruning_wikitext2=_ppl(best_tp, "wikitext2"))
            if ours:
                entry["wikitext2_reduction_vs_torch_pruning"] = 1 - entry["best_pruneflow_wikitext2"] / _ppl(best_tp, "wikitext2")
            tp_zs = [r for r in theirs if r.get("zeroshot_average") is not None]
            if tp_zs:
                entry["best_torch_pruning_zeroshot_average"] = max(r["zeroshot_average"] for r in tp_zs)
        elif ours:
            entry["best_torch_pruning"] = "none finished"
        out["per_ratio"][repr(ratio)] = entry
    return out


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def render_markdown(payload: dict) -> str:
    windows = payload["ppl_windows"] or "all"
    lines = [
        "# Criteria side by side: pruneflow vs Torch-Pruning (no recovery)", "",
        f"Command: `{payload['command']}`  ",
        f"Device: {payload['device']}, {payload['dtype']}. Model: `{payload['model']}` "
        f"({payload['params_dense']:,} params). Pruned layers [{payload['pruned_layers'][0]}, "
        f"{payload['pruned_layers'][1]}), structures {payload['structures']}; ratio = fraction of ALL parameters removed.  ",
        f"Perplexity at 128 tokens, first {windows} windows of WikiText-2 raw test and PTB (LLM-Pruner's validation "
        f"split); zero-shot: {', '.join(payload['zeroshot_tasks']) or 'none'} "
        f"(limit {payload['zeroshot_limit'] or 'none'}, headline metric per task: acc_norm for ARC/OBQA/PIQA... "
        f"see pruneflow.zeroshot.HEADLINE_METRIC) at ratios {payload['zeroshot_ratios']}. "
        f"Total wall time {payload['seconds'] / 60:.1f} min.", "",
        "| method | source | ratio | params | WikiText-2 | PTB | zero-shot avg | status |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in sorted(payload["rows"], key=lambda r: (r["ratio"], r["source"] != "-", _ppl(r, "wikitext2") or 1e30)):
        layout = (row.get("surgery") or {}).get("layout")
        method = f"{row['method']} ({layout})" if layout and row.get("attention_unit") == "auto" else row["method"]
        zeroshot = _fmt(None if row.get("zeroshot_average") is None else 100 * row["zeroshot_average"], 1)
        if row.get("zeroshot_average_stderr") is not None:
            zeroshot += f" ± {100 * row['zeroshot_average_stderr']:.1f}"
        lines.append(
            f"| {method} | {row['source']} | {row['ratio']:.2f} | {_fmt(row.get('params'), 0)} | "
            f"{_fmt(_ppl(row, 'wikitext2'))} | {_fmt(_ppl(row, 'ptb'))} | {zeroshot} | "
            f"{row.get('status', 'ok')[:120]} |")
    lines += ["", "## Scoring cost per criterion", "",
              "| criterion | seconds | peak RSS MiB | RSS after model load MiB | peak GPU MiB |", "|---|---:|---:|---:|---:|"]
    for name, result in payload["scoring"].items():
        lines.append(f"| {name} | {_fmt(result.get('seconds'), 1)} | {_fmt(result.get('peak_rss_mib'), 0)} | "
                     f"{_fmt(result.get('rss_after_load_mib'), 0)} | {_fmt(result.get('peak_gpu_mib'), 0)} |"
                     + (f" error: {result['error']}" if "error" in result else ""))
    lines += ["", "## Findings (computed from the rows above)", ""]
    for ratio, entry in payload["findings"]["per_ratio"].items():
        lines.append(f"- ratio {ratio}: " + "; ".join(
            f"{k} = {_fmt(v, 3) if isinstance(v, float) else v}" for k, v in entry.items()))
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pruneflow.pipeline.atomic import atomic_path

    figure, axes = plt.subplots(1, 2, figsize=(13, 5))
    methods = sorted({r["method"] for r in payload["rows"] if r["method"] != "dense"})
    for method in methods:
        points = sorted((r["ratio"], _ppl(r, "wikitext2"), _ppl(r, "ptb")) for r in payload["rows"]
                        if r["method"] == method and _ppl(r, "wikitext2") is not None)
        if not points:
            continue
        style = "--" if method.startswith("torch-pruning") else "-"
        for axis, index in ((axes[0], 1), (axes[1], 2)):
            axis.plot([p[0] for p in points], [p[index] for p in points], style, marker="o", label=method)
    dense = next(r for r in payload["rows"] if r["method"] == "dense")
    for axis, name in ((axes[0], "wikitext2"), (axes[1], "ptb")):
        axis.axhline(_ppl(dense, name), color="black", linewidth=0.8, label="dense")
        axis.set_yscale("log")
        axis.set_xlabel("fraction of all parameters removed")
        axis.set_ylabel(f"{name} perplexity @128 (log)")
    axes[1].legend(fontsize=7, ncol=2)
    figure.suptitle(f"SmolLM2-135M, no recovery — {payload['device']}")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
