"""Do pruneflow's GGUF files run in llama.cpp itself, and to what accuracy?

Needs llama.cpp's Python binding (`pip install llama-cpp-python`, which compiles llama.cpp; not part of
the pinned stack). Two parts, one run:
1. tiny random models of every family, one width everywhere and per layer (llama.cpp's `llama`,
   `qwen2` and `deci` graphs), with and without biases: the relative error of llama.cpp's logits against
   transformers' (max |difference| / max |logit|) for every GGUF tensor type;
2. real checkpoints given with --model: perplexity at 128 tokens on the first --windows windows of
   WikiText-2 raw test, in pruneflow (transformers, fp32) and in llama.cpp for each type, with file sizes.
Writes reports/benchmarks/gguf_llama_cpp.{json,md}.

    python benchmarks/gguf_llama_cpp.py --model data/servable/obs/0.2 --model data/pruned/obs/0.2 --windows 48
"""

from __future__ import annotations

import argparse
import math
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pruneflow.checkpoint import load_pruned, save_pruned
from pruneflow.config import GGUF_TYPES
from pruneflow.gguf_export import export_gguf
from pruneflow.importance import ScoringInputs, get_criterion
from pruneflow.modeling import load_tokenizer
from pruneflow.perplexity import perplexity, tokenize_text
from pruneflow.pipeline.atomic import write_json, write_text
from pruneflow.pruning import add_compensation_biases, apply_pruning, plan_pruning
from pruneflow.text_data import evaluation_text
from pruneflow.tiny_models import tiny_model, tiny_tokenizer

TINY_CASES = (  # family, layers pruned, structures, width multiple, o_proj / down_proj biases
    ("llama", range(4), ("attention", "ffn"), 16, False),
    ("llama", range(1, 3), ("attention", "ffn"), None, False),
    ("llama", range(1, 3), ("attention", "ffn"), None, True),
    ("mistral", range(1, 3), ("attention", "ffn"), None, False),
    ("qwen2", range(4), ("ffn",), 16, False),
    ("qwen2", range(4), ("attention", "ffn"), 16, False),
    ("qwen2", range(1, 3), ("attention", "ffn"), None, False),
)


def llama_cpp_logits(path: Path, ids: list[int], n_ctx: int) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, verbose=False, n_threads=2,
                          n_batch=n_ctx)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()


def arch_of(path: Path) -> str:
    from pruneflow.gguf_export import read_first_string

    return read_first_string(path, "general.architecture") or "?"


def tiny_rows(work: Path) -> list[dict]:
    tokenizer = tiny_tokenizer()
    ids = torch.randint(3, len(tokenizer), (1, 24), generator=torch.Generator().manual_seed(0))
    rows = []
    for family, layers, structures, multiple, biases in TINY_CASES:
        model = tiny_model(family, vocab_size=len(tokenizer))
        scores = get_criterion("l2_magnitude").score(model, ScoringInputs(calibration_ids=ids))
        apply_pruning(model, plan_pruning(model, scores, 0.25, list(layers), structures, width_multiple=multiple))
        if biases:  # what bias compensation adds: o_proj / down_proj biases (the others zero)
            generator = torch.Generator().manual_seed(1)
            hidden = model.config.hidden_size
            add_compensation_biases(model, {i: (torch.randn(hidden, generator=generator) * 0.1,
                                                torch.randn(hidden, generator=generator) * 0.1) for i in layers})
        folder = work / f"tiny-{len(rows)}"
        save_pruned(model, folder, tokenizer=tokenizer)
        with torch.no_grad():
            expected = model(input_ids=ids).logits[0].double().numpy()
        for gguf_type in GGUF_TYPES:
            out = export_gguf(folder, work / f"tiny-{len(rows)}-{gguf_type}.gguf", gguf_type, name="tiny")
            got = llama_cpp_logits(out, ids[0].tolist(), 64)
            rows.append({"family": family, "widths": "per layer" if multiple is None else f"one, x{multiple}",
                         "structures": "+".join(structures), "biases": biases, "type": gguf_type,
                         "architecture": arch_of(out),
                         "relative_error": float(np.abs(got - expected).max() / np.abs(expected).max())})
    return rows


def llama_cpp_perplexity(path: Path, windows: torch.Tensor) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=windows.shape[1], verbose=False,
                          n_threads=2, n_batch=windows.shape[1])
    nll, count = 0.0, 0
    try:
        for window in windows.tolist():
            llm.reset()
            llm.eval(window)
            logits = torch.tensor(np.array(llm.scores[: len(window)]), dtype=torch.float64)[:-1]
            nll += torch.nn.functional.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum").item()
            count += len(window) - 1
    finally:
        llm.close()
    return math.exp(nll / count)


def model_rows(models: list[Path], work: Path, window_count: int, seq_len: int = 128) -> list[dict]:
    rows = []
    for folder in models:
        tokenizer = load_tokenizer(folder)
        tokens = tokenize_text(evaluation_text("wikitext2", "data/raw"), tokenizer)
        windows = tokens[: window_count * seq_len].view(window_count, seq_len)
        reference = perplexity(load_pruned(folder), tokens, seq_len=seq_len, max_windows=window_count).ppl
        for gguf_type in GGUF_TYPES:
            out = export_gguf(folder, work / f"{folder.name}-{gguf_type}.gguf", gguf_type, name=str(folder),
                              tokenizer_pre="smollm" if "smollm" in str(folder).lower() else "default")
            started = time.perf_counter()
            ppl = llama_cpp_perplexity(out, windows)
            rows.append({"model": str(folder), "type": gguf_type, "architecture": arch_of(out),
                         "gguf_mib": out.stat().st_size / 2**20, "ppl_pruneflow": reference, "ppl_llama_cpp": ppl,
                         "ratio": ppl / reference, "llama_cpp_seconds": time.perf_counter() - started})
            out.unlink()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, action="append", default=[], help="a checkpoint folder (repeatable)")
    parser.add_argument("--windows", type=int, default=48)
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/gguf_llama_cpp"))
    args = parser.parse_args(argv)
    import llama_cpp

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="pruneflow-gguf-") as tmp:
        tiny = tiny_rows(Path(tmp))
        real = model_rows(args.model, Path(tmp), args.windows)
    result = {"command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
              "device": f"CPU ({platform.processor() or platform.machine()}), llama.cpp via llama-cpp-python "
                        f"{llama_cpp.__version__}", "tiny": tiny, "models": real}
    write_json(args.out.with_suffix(".json"), result)
    lines = ["# GGUF files in llama.cpp", "", f"`{result['command']}` on {result['device']}.", "",
             "Tiny random models (relative logit error of llama.cpp against transformers):", "",
             "| family | widths | structures | biases | llama.cpp graph | type | relative error |",
             "|---|---|---|---|---|---|---:|"]
    lines += [f"| {r['family']} | {r['widths']} | {r['structures']} | {'yes' if r['biases'] else 'no'} | "
              f"{r['architecture']} | {r['type']} | {r['relative_error']:.1e} |" for r in tiny]
    if real:
        lines += ["", f"Checkpoints: WikiText-2 perplexity at 128 tokens, first {args.windows} windows:", "",
                  "| model | type | llama.cpp graph | GGUF MiB | pruneflow | llama.cpp | ratio |",
                  "|---|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['type']} | {r['architecture']} | {r['gguf_mib']:.1f} | "
                  f"{r['ppl_pruneflow']:.2f} | {r['ppl_llama_cpp']:.2f} | {r['ratio']:.4f} |" for r in real]
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
