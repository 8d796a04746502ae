"""Selection x structure x allocation x reconstruction, on one model, one calibration set, one set of windows.

Every setting is pruned from the same dense model with the same calibration ids (sampled once, as the
calibrate stage samples them) and the same cached statistics, re-fitted as the prune stage re-fits
(`pruneflow.reconstruction.prune_and_reconstruct`), and evaluated on the same first N windows of
WikiText-2 raw test at 128 tokens (LLM-Pruner's protocol). A setting is written
STRUCTURES|ALLOCATION|ATTENTION_UNIT|RECONSTRUCTION|MODE[|DAMPING[|FIRST-END]], e.g.
`ffn|uniform|kv_group|least_squares|parallel` or `attention,ffn|uniform|query_head|least_squares|sequential|0.01|2-29`.
Writes OUT.json and OUT.md.

    python benchmarks/reconstruction.py --samples 128 --criteria obs flap \
        --settings "ffn|uniform|kv_group|none|parallel" "ffn|uniform|kv_group|least_squares|parallel"
"""

from __future__ import annotations

import argparse
import copy
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pruneflow.pipeline.atomic import write_json, write_text


def parse_setting(text: str, default_damping: float, default_layers: tuple[int, int]) -> dict[str, Any]:
    fields = text.split("|")
    if len(fields) < 5:
        raise SystemExit(f"--settings {text!r}: expected STRUCTURES|ALLOCATION|UNIT|RECONSTRUCTION|MODE[|DAMPING[|A-B]]")
    first, end = map(int, fields[6].split("-")) if len(fields) > 6 else default_layers
    return {"structures": fields[0].split(","), "allocation": fields[1], "attention_unit": fields[2],
            "reconstruction": fields[3], "mode": fields[4],
            "damping": float(fields[5]) if len(fields) > 5 else default_damping, "layers": [first, end]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("data/models/dense"))
    parser.add_argument("--data-dir", type=Path, default=Path("data/raw"))
    parser.add_argument("--calibration-source", type=Path, default=Path("data/raw/wikitext-2/train.txt"))
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--criteria", nargs="+", default=["obs", "flap"])
    parser.add_argument("--settings", nargs="+", default=["ffn|uniform|kv_group|least_squares|parallel"])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--layers", default="4-28", help="pruned layers FIRST-END (end exclusive)")
    parser.add_argument("--windows", type=int, default=48, help="first N windows of WikiText-2 test")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/reconstruction"))
    args = parser.parse_args(argv)
    command = " ".join(["python", "benchmarks/reconstruction.py", *map(shlex.quote, argv or sys.argv[1:])])
    default_layers = tuple(map(int, args.layers.split("-")))
    settings = [parse_setting(s, args.damping, default_layers) for s in args.settings]

    from pruneflow.activations import collect_activation_stats
    from pruneflow.architectures import count_parameters
    from pruneflow.checkpoint import load_pruned
    from pruneflow.importance import ScoringInputs, get_criterion
    from pruneflow.modeling import load_tokenizer
    from pruneflow.perplexity import perplexity, tokenize_text
    from pruneflow.pruning import plan_pruning
    from pruneflow.reconstruction import prune_and_reconstruct
    from pruneflow.text_data import evaluation_text, read_rows, sample_calibration

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    dense = load_pruned(args.model)
    tokenizer = load_tokenizer(args.model)
    calibration = sample_calibration(read_rows(args.calibration_source, "calibration"), tokenizer, args.samples,
                                     args.seq_len, args.seed).input_ids
    text = tokenize_text(evaluation_text("wikitext2", args.data_dir), tokenizer)

    def wikitext2(model) -> float:
        return perplexity(model, text, seq_len=128, batch_size=16, max_windows=args.windows).ppl

    timings: dict[str, float] = {}
    clock = time.perf_counter()
    stats = collect_activation_stats(dense, calibration, batch_size=args.batch_size, max_tokens=512, seed=args.seed,
                                     gram_matrices=True)
    timings["activation_cache"] = time.perf_counter() - clock
    scores = {}
    for name in args.criteria:
        clock = time.perf_counter()
        scores[name] = get_criterion(name).score(dense, ScoringInputs(
            calibration_ids=calibration, activations=stats, forward_batch_size=args.batch_size, seed=args.seed))
        timings[f"score_{name}"] = time.perf_counter() - clock
    rows: list[dict[str, Any]] = [{"method": "dense", "params": count_parameters(dense), "wikitext2": wikitext2(dense)}]
    print(f"dense {rows[0]['wikitext2']:.2f}", flush=True)
    for name in args.criteria:
        for setting in settings:
            row: dict[str, Any] = {"criterion": name, **setting}
            model = copy.deepcopy(dense)
            try:
                plan = plan_pruning(model, scores[name], args.ratio, range(*setting["layers"]), setting["structures"],
                                    allocation=setting["allocation"], attention_unit=setting["attention_unit"])
                clock = time.perf_counter()
                result = prune_and_reconstruct(model, plan, method=setting["reconstruction"], mode=setting["mode"],
                                               damping=setting["damping"], calibration_ids=calibration,
                                               batch_size=args.batch_size, activations=stats)
                row.update(seconds=time.perf_counter() - clock, errors=result.mean_errors(),
                           params=count_parameters(model), wikitext2=wikitext2(model))
            except Exception as exc:  # a setting that cannot be planned is a result, not a crash
                row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
            print(row.get("wikitext2", row.get("error")), name, "|".join(map(str, setting.values())), flush=True)
            del model
    device = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    payload = {"command": command, "device": device, "model": str(args.model), "ratio": args.ratio,
               "calibration": {"source": str(args.calibration_source), "samples": args.samples,
                               "seq_len": args.seq_len, "seed": args.seed},
               "windows": args.windows, "timings_seconds": timings, "rows": rows,
               "seconds": time.perf_counter() - started}
    write_json(args.out.with_suffix(".json"), payload)
    write_text(args.out.with_suffix(".md"), render_markdown(payload))
    print(render_markdown(payload))
    return 0


def render_markdown(payload: dict) -> str:
    dense = payload["rows"][0]["wikitext2"]
    cal = payload["calibration"]
    lines = [
        "# Selection, structure, allocation and reconstruction side by side (no recovery)", "",
        f"Command: `{payload['command']}`  ",
        f"Device: {payload['device']}, float32. Model: `{payload['model']}`; {payload['ratio']:.0%} of all "
        f"parameters removed. Calibration: {cal['samples']} x {cal['seq_len']} tokens of `{cal['source']}` "
        f"(seed {cal['seed']}), the same ids for every row. WikiText-2 raw test, first {payload['windows']} "
        f"windows of 128 tokens. Total {payload['seconds'] / 60:.1f} min; activation cache "
        f"{payload['timings_seconds']['activation_cache']:.0f} s; scoring "
        + ", ".join(f"{k.removeprefix('score_')} {v:.0f} s" for k, v in payload["timings_seconds"].items()
                    if k.startswith("score_")) + ".", "",
        "| criterion | structures | allocation | attention unit | reconstruction | mode | damping | layers | params | WikiText-2 | x dense | refit s | down_proj error (removed -> refit) |",
        "|---|---|---|---|---|---|---:|---|---:|---:|---:|---:|---|",
        f"| dense | | | | | | | | {payload['rows'][0]['params']:,} | {dense:.2f} | 1.00 | | |",
    ]
    for row in payload["rows"][1:]:
        if "error" in row:
            lines.append(f"| {row['criterion']} | {','.join(row['structures'])} | {row['allocation']} | "
                         f"{row['attention_unit']} | {row['reconstruction']} | {row['mode']} | {row['damping']:g} | "
                         f"{row['layers'][0]}-{row['layers'][1]} | | {row['error'][:80]} | | | |")
            continue
        errors = row["errors"]
        lines.append(
            f"| {row['criterion']} | {','.join(row['structures'])} | {row['allocation']} | {row['attention_unit']} | "
            f"{row['reconstruction']} | {row['mode']} | {row['damping']:g} | {row['layers'][0]}-{row['layers'][1]} | "
            f"{row['params']:,} | {row['wikitext2']:.2f} | {row['wikitext2'] / dense:.3f} | {row['seconds']:.1f} | "
            f"{errors['down_proj_error_pruned']:.3f} -> {errors['down_proj_error_refit']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
