"""Does our perplexity protocol reproduce the reference numbers of the dense model?

Evaluates the full WikiText-2 raw test set, PTB validation (LLM-Pruner's "PTB") and PTB test at 128
tokens with `pruneflow.perplexity` and compares against the independently measured references in
independently measured reference values (SmolLM2-135M-Instruct, fp32). Writes reports/benchmarks/ppl_reproduction.{json,md}.

    python benchmarks/ppl_reproduction.py [--model data/models/dense] [--device auto]
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from pruneflow.checkpoint import load_pruned
from pruneflow.config import EMBEDDED_SMOLLM2
from pruneflow.modeling import load_source, load_tokenizer, resolve_source
from pruneflow.perplexity import perplexity, tokenize_text
from pruneflow.pipeline.atomic import write_json, write_text
from pruneflow.runtime import resolve_device
from pruneflow.text_data import PPL_SOURCES, evaluation_text

REFERENCE = {  # independently measured: windows of 128 tokens, no BOS, fp32
    "wikitext2": {"ppl": 56.09, "windows": 2382},
    "ptb": {"ppl": 99.01, "windows": 730},
    "ptb_test": {"ppl": 87.09, "windows": 826},
}
TOLERANCE = 0.01


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_SMOLLM2,
                        help="model folder, or the embedded model (default)")
    parser.add_argument("--data-dir", type=Path, default=Path("data/raw"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/ppl_reproduction"))
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    if args.model == EMBEDDED_SMOLLM2:
        model, tokenizer = load_source(resolve_source(args.model))
        model = model.float().to(device).eval()
    else:
        model, tokenizer = load_pruned(args.model, dtype=torch.float32, device=device), load_tokenizer(args.model)
    rows = []
    for name, reference in REFERENCE.items():
        ids = tokenize_text(evaluation_text(name, args.data_dir), tokenizer)
        started = time.perf_counter()
        result = perplexity(model, ids, seq_len=128, batch_size=args.batch_size, device=device)
        seconds = time.perf_counter() - started
        relative = result.ppl / reference["ppl"] - 1
        rows.append({
            "dataset": name, "split": PPL_SOURCES[name][1], "ppl": result.ppl, "reference_ppl": reference["ppl"],
            "relative_difference": relative, "windows": result.windows, "reference_windows": reference["windows"],
            "within_tolerance": abs(relative) <= TOLERANCE and result.windows == reference["windows"],
            "seconds": seconds,
        })
        print(f"{name:10s} ppl {result.ppl:8.3f}  reference {reference['ppl']:7.2f}  "
              f"diff {100 * relative:+.2f}%  windows {result.windows}  {seconds:.0f} s", flush=True)
    command = " ".join(["python", "benchmarks/ppl_reproduction.py", *map(shlex.quote, argv or sys.argv[1:])])
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    payload = {"command": command, "model": args.model, "device": device_name, "dtype": "float32",
               "tolerance": TOLERANCE, "results": rows}
    write_json(args.out.with_suffix(".json"), payload)
    lines = [
        "# Perplexity protocol reproduction (dense model, 128-token windows)", "",
        f"Command: `{command}`; device: {device_name}; fp32. References: independently measured values (the REFERENCE table in benchmarks/ppl_reproduction.py).", "",
        "| text | ppl | reference | difference | windows | within 1% |", "|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(f"| {row['split']} | {row['ppl']:.2f} | {row['reference_ppl']:.2f} | "
                     f"{100 * row['relative_difference']:+.2f}% | {row['windows']} | "
                     f"{'yes' if row['within_tolerance'] else 'NO'} |")
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    return 0 if all(row["within_tolerance"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
