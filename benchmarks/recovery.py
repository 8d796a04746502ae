"""Recovery recipes side by side: objective x method x data, from one pruned model, on the same windows.

Every setting starts from the same pruned model (the prune stage's output), trains with
`pruneflow.recovery.recover` exactly as the recover stage does (the params file's `recover` section,
laptop caps applied, then the setting's overrides), and is evaluated on the same first N windows of
WikiText-2 raw test and PTB (LLM-Pruner's validation split) at 128 tokens, plus optional zero-shot
tasks. A setting is `LABEL:key=value,key=value` over `recover.*` keys (data paths joined by `+`);
`max_steps=time:REF/RATE` picks the steps that take as long as setting REF's training did, at the
seconds per step setting RATE measured (RATE: the same recipe at another step count), so two recipes
can be compared at equal steps and at equal wall time in one run. Writes OUT.json and OUT.md.

    python benchmarks/recovery.py --pruned data/pruned/obs/0.2 --dense data/models/dense \
        --settings "distill:objective=distill,data=data/raw/wikitext-2/train.txt" \
                   "lora-instructions:objective=lm,max_steps=30"
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import platform
import resource
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pruneflow.pipeline.atomic import write_json, write_text

TUPLE_KEYS = ("data", "target_modules")


def parse_setting(text: str) -> tuple[str, dict[str, str]]:
    label, _, body = text.partition(":")
    if not label or not body:
        raise SystemExit(f"--settings {text!r}: expected LABEL:key=value[,key=value...]")
    overrides = {}
    for item in body.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--settings {text!r}: {item!r} is not key=value")
        overrides[key.strip()] = value.strip()
    return label, overrides


def recover_params(base, overrides: dict[str, str], steps: int | None):
    """The base `recover` params with the setting's overrides, typed like the dataclass fields."""
    import yaml

    fields = {f.name for f in dataclasses.fields(base)}
    values: dict[str, Any] = {}
    for key, raw in overrides.items():
        if key not in fields:
            raise SystemExit(f"unknown recover key {key!r}; allowed: {', '.join(sorted(fields))}")
        if key == "max_steps" and raw.startswith("time:"):
            values[key] = steps
        elif key in TUPLE_KEYS:
            values[key] = tuple(raw.split("+"))
        else:
            value = yaml.safe_load(raw)
            if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
                with contextlib.suppress(ValueError):
                    value = float(value)
            values[key] = value
    params = dataclasses.replace(base, **values)
    params.validate("recover")
    return params


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pruned", type=Path, required=True, help="pruned model folder (prune stage output)")
    parser.add_argument("--dense", type=Path, default=Path("data/models/dense"), help="dense model (teacher)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data-dir", type=Path, default=Path("data/raw"))
    parser.add_argument("--settings", nargs="+", default=[])
    parser.add_argument("--windows", type=int, default=48, help="first N windows of each perplexity text")
    parser.add_argument("--zeroshot-tasks", nargs="*", default=[])
    parser.add_argument("--zeroshot-limit", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/recovery"))
    parser.add_argument("--rerender", action="store_true", help="rebuild OUT.md from OUT.json (no model work)")
    args = parser.parse_args(argv)
    command = " ".join(["python", "benchmarks/recovery.py", *map(shlex.quote, argv or sys.argv[1:])])
    if args.rerender:
        import json

        write_text(args.out.with_suffix(".md"), render_markdown(json.loads(args.out.with_suffix(".json").read_text())))
        return 0
    if not args.settings:
        raise SystemExit("--settings: at least one LABEL:key=value[,...] setting is required")
    settings = [parse_setting(s) for s in args.settings]

    from pruneflow.checkpoint import load_pruned
    from pruneflow.config import load_params
    from pruneflow.modeling import load_tokenizer
    from pruneflow.perplexity import perplexity, tokenize_text
    from pruneflow.recovery import load_training_data, recover
    from pruneflow.runtime import resolve_device, resolve_dtype
    from pruneflow.text_data import evaluation_text
    from pruneflow.zeroshot import evaluate_zeroshot, zeroshot_average

    params = load_params(args.params)
    device = resolve_device(params.runtime.device)
    dtype = resolve_dtype(params.runtime.dtype, device)
    tokenizer = load_tokenizer(args.pruned)
    texts = {name: tokenize_text(evaluation_text(name, args.data_dir), tokenizer) for name in ("wikitext2", "ptb")}
    started = time.perf_counter()

    def evaluate(model) -> dict[str, Any]:
        result: dict[str, Any] = {name: perplexity(model, ids, seq_len=128, batch_size=16, max_windows=args.windows,
                                                   device=device).ppl for name, ids in texts.items()}
        if args.zeroshot_tasks:
            scores = evaluate_zeroshot(model, tokenizer, args.zeroshot_tasks, args.data_dir,
                                       limit=args.zeroshot_limit, batch_size=32, device=device)
            result.update(zeroshot=scores, zeroshot_average=zeroshot_average(scores))
        return result

    rows: list[dict[str, Any]] = []
    for label, path in (("dense", args.dense), ("pruned, no recovery", args.pruned)):
        rows.append({"label": label, **evaluate(load_pruned(path, dtype=dtype, device=device))})
        print(label, rows[-1]["wikitext2"], rows[-1]["ptb"], flush=True)
    by_label: dict[str, dict[str, Any]] = {}
    for label, overrides in settings:
        steps = None
        if overrides.get("max_steps", "").startswith("time:"):
            reference, _, rate = overrides["max_steps"].removeprefix("time:").partition("/")
            ref, per = by_label[reference], by_label[rate or label]
            steps = max(1, round(ref["train_seconds"] / (per["train_seconds"] / per["optimizer_steps"])))
        cfg = recover_params(params.recover, overrides, steps)
        train, val = load_training_data(cfg.data, tokenizer, cutoff_len=cfg.cutoff_len,
                                        train_on_inputs=cfg.train_on_inputs, val_size=cfg.val_size,
                                        seed=params.seed, max_train_samples=cfg.max_train_samples)
        model = load_pruned(args.pruned, dtype=dtype, device=device)
        teacher = load_pruned(args.dense, dtype=dtype, device=device) if cfg.objective == "distill" else None
        result = recover(model, tokenizer, train, val, cfg, seed=params.seed, device=device, dtype=dtype,
                         teacher=teacher, progress=False)
        tokens = sum(entry.get("tokens", 0) for entry in result.history)
        row = {"label": label, "settings": {k: (list(v) if isinstance(v, tuple) else v)
                                            for k, v in dataclasses.asdict(cfg).items()},
               "optimizer_steps": result.optimizer_steps, "train_tokens": tokens,
               "train_seconds": result.seconds, "teacher_seconds": result.teacher_seconds,
               "best_step": result.best_step, "initial_val_loss": result.initial_val_loss,
               "best_val_loss": result.best_val_loss, "peak_rss_mib": _rss_mib(), **evaluate(result.model)}
        rows.append(row)
        by_label[label] = row
        print(label, f"{row['wikitext2']:.2f} {row['ptb']:.2f} {row['train_seconds']:.0f} s "
              f"{row['optimizer_steps']} steps", flush=True)
        del model, teacher, result
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)")
    payload = {"command": command, "device": device_name, "dtype": str(dtype).removeprefix("torch."),
               "pruned": str(args.pruned), "dense": str(args.dense), "windows": args.windows,
               "zeroshot_tasks": args.zeroshot_tasks, "zeroshot_limit": args.zeroshot_limit, "rows": rows,
               "seconds": time.perf_counter() - started}
    write_json(args.out.with_suffix(".json"), payload)
    write_text(args.out.with_suffix(".md"), render_markdown(payload))
    print(render_markdown(payload))
    return 0


def render_markdown(payload: dict) -> str:
    from pruneflow.zeroshot import zeroshot_average_stderr

    dense = payload["rows"][0]
    zeroshot = bool(payload["zeroshot_tasks"])
    lines = [
        "# Recovery recipes side by side (one pruned model, the same windows)", "",
        f"Command: `{payload['command']}`  ",
        f"Device: {payload['device']}, {payload['dtype']}. Pruned model `{payload['pruned']}`, teacher "
        f"`{payload['dense']}`. Perplexity at 128 tokens on the first {payload['windows']} windows of WikiText-2 raw "
        "test and of PTB (validation split)"
        + (f"; zero-shot {', '.join(payload['zeroshot_tasks'])} (limit {payload['zeroshot_limit']})" if zeroshot
           else "")
        + f". Total {payload['seconds'] / 60:.1f} min. WikiText-2 is in-domain for recipes trained on "
        "WikiText-2 train; PTB is not.", "",
        "| recipe | objective | method | data | lr | steps | tokens | train s | teacher s | WikiText-2 | x dense | PTB | x dense |"
        + (" zero-shot |" if zeroshot else ""),
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if zeroshot else ""),
    ]
    for row in payload["rows"]:
        s = row.get("settings")
        cells = ([s["objective"], s["method"], "+".join(Path(d).name for d in s["data"]), f"{s['learning_rate']:g}",
                  str(row["optimizer_steps"]), f"{row['train_tokens']:,}", f"{row['train_seconds']:.0f}",
                  f"{row['teacher_seconds']:.0f}"] if s else [""] * 8)
        line = (f"| {row['label']} | " + " | ".join(cells)
                + f" | {row['wikitext2']:.2f} | {row['wikitext2'] / dense['wikitext2']:.3f} | {row['ptb']:.2f} | "
                f"{row['ptb'] / dense['ptb']:.3f} |")
        if zeroshot:
            error = zeroshot_average_stderr(row["zeroshot"])
            line += f" {100 * row['zeroshot_average']:.1f}" + (f" ± {100 * error:.1f}" if error is not None else "") + " |"
        lines.append(line)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
