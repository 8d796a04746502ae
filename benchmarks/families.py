"""Every supported family at its published widths: prune, save, reload, on a CPU.

No real checkpoint of most families is reachable offline, so each model is built from its published
config.json shape (hidden size, heads, KV heads, head_dim, FFN width, norms, rope, soft-capping, tied
embeddings: `PUBLISHED` below) with random weights and fewer decoder layers, and a byte-level BPE
vocabulary trained on WikiText-2 train. Each is pruned in its own process by `pruneflow.prune` (the
function behind `pruneflow prune` and the pipeline's stages) with calibration windows from WikiText-2
train, saved, reloaded, and checked: measured ratio, per-layer widths, the config class written, and
whether the reloaded model gives bit-identical logits. Random weights make perplexity meaningless: this
measures that the code handles the real widths, and what it costs. Writes OUT.json and OUT.md.

    python benchmarks/families.py --layers 2 --samples 16 --criteria flap taylor_element1
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# config.json fields of each published model (num_hidden_layers and vocab_size are replaced)
PUBLISHED: dict[str, tuple[str, dict]] = {
    "Llama-3.2-1B": ("llama", {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32,
                               "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True,
                               "rope_theta": 500000.0, "max_position_embeddings": 131072,
                               "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
    "Qwen3-0.6B": ("qwen3", {"hidden_size": 1024, "intermediate_size": 3072, "num_attention_heads": 16,
                             "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True,
                             "rope_theta": 1000000.0, "max_position_embeddings": 40960}),
    "gemma-2-2b": ("gemma2", {"hidden_size": 2304, "intermediate_size": 9216, "num_attention_heads": 8,
                              "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256,
                              "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                              "sliding_window": 4096, "max_position_embeddings": 8192,
                              "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True}),
    "gemma-3-1b": ("gemma3_text", {"hidden_size": 1152, "intermediate_size": 6912, "num_attention_heads": 4,
                                   "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256,
                                   "sliding_window": 512, "max_position_embeddings": 32768,
                                   "rope_theta": 1000000.0, "tie_word_embeddings": True}),
    "Phi-3-mini-4k": ("phi3", {"hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 32,
                               "num_key_value_heads": 32, "max_position_embeddings": 4096,
                               "tie_word_embeddings": False}),
    "Phi-4-mini": ("phi3", {"hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 24,
                            "num_key_value_heads": 8, "partial_rotary_factor": 0.75, "tie_word_embeddings": True,
                            "max_position_embeddings": 131072, "original_max_position_embeddings": 4096}),
    "OLMo-2-0425-1B": ("olmo2", {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 16,
                                 "num_key_value_heads": 16, "rms_norm_eps": 1e-6, "rope_theta": 500000.0,
                                 "max_position_embeddings": 4096, "tie_word_embeddings": False}),
}


def _texts(path: Path, count: int) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if len(line) > 80][:count]


def run_one(name: str, criterion: str, args: argparse.Namespace) -> dict:
    """Build, prune, save and reload one family in this process; return what was measured."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pruneflow import prune
    from pruneflow.architectures import count_parameters, layer_shapes
    from pruneflow.checkpoint import load_pruned, save_pruned
    from pruneflow.tiny_models import tiny_tokenizer

    torch.set_num_threads(args.threads)
    texts = _texts(args.calibration_source, 4000)
    tokenizer = tiny_tokenizer(vocab_size=args.vocab, texts=texts[:2000])
    model_type, fields = PUBLISHED[name]
    config = AutoConfig.for_model(model_type, **fields, num_hidden_layers=args.layers, vocab_size=len(tokenizer),
                                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    params = {"calibration": {"num_samples": args.samples, "seq_len": args.seq_len},
              "activations": {"max_tokens": 4096, "batch_size": 4},
              "prune": {"layer_start": 0, "layer_end": args.layers, "search_samples": min(8, args.samples)}}
    started = time.perf_counter()
    result = prune(model, tokenizer, texts, criterion=criterion, ratio=args.ratio, params=params, device="cpu")
    seconds = time.perf_counter() - started
    ids = torch.randint(0, len(tokenizer), (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    with tempfile.TemporaryDirectory() as tmp:
        out = save_pruned(model, Path(tmp) / "ckpt", tokenizer=tokenizer)
        written = json.loads((out / "config.json").read_text())
        reloaded = load_pruned(out)
        with torch.no_grad():
            identical = torch.equal(reloaded(input_ids=ids).logits, expected)
    return {
        "model": name, "model_type": model_type, "criterion": criterion, "layers": args.layers,
        "hidden_size": fields["hidden_size"], "heads": fields["num_attention_heads"],
        "kv_heads": fields["num_key_value_heads"], "ffn": fields["intermediate_size"],
        "params_before": result.params_before, "params_after": count_parameters(model),
        "requested_ratio": args.ratio, "achieved_ratio": result.achieved_ratio,
        "layout": result.summary["attention_unit"] or "ffn only",
        "layouts_tried": [t["layout"] for t in result.summary["layout_search"]],
        "layer_shapes_after": [s.to_dict() for s in layer_shapes(model)],
        "checkpoint_model_type": written["model_type"], "reload_identical_logits": identical,
        "prune_seconds": round(seconds, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
    }


def _markdown(rows: list[dict], command: str, device: str, vocab: int) -> str:
    lines = ["# Every family at its published widths (random weights)", "",
             f"Command: `{command}`  ", f"Device: {device}", "",
             f"Each model: the published config.json shape with fewer decoder layers and a {vocab}-token BPE vocabulary, "
             "random weights, pruned by `pruneflow.prune` (all its layers), saved and reloaded.", "",
             "| model | criterion | heads / KV / FFN | widths after (layer 0) | layout | ratio asked / measured | "
             "checkpoint | reload exact | prune s | peak RSS GB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['criterion']} | failed: {r['error']} |||||||| ")
            continue
        after = r["layer_shapes_after"][0]
        lines.append(
            f"| {r['model']} | {r['criterion']} | {r['heads']} / {r['kv_heads']} / {r['ffn']} | "
            f"{after['num_attention_heads']} / {after['num_key_value_heads']} / {after['intermediate_size']} | "
            f"{r['layout']} | {r['requested_ratio']} / {r['achieved_ratio']:.4f} | {r['checkpoint_model_type']} | "
            f"{'yes' if r['reload_identical_logits'] else 'NO'} | {r['prune_seconds']} | {r['peak_rss_gb']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(PUBLISHED), choices=list(PUBLISHED))
    parser.add_argument("--criteria", nargs="+", default=["flap", "taylor_element1"])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibration-source", type=Path, default=Path("data/raw/wikitext-2/train.txt"))
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/families"))
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "CRITERION"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print("RESULT" + json.dumps(run_one(args.one[0], args.one[1], args)))
        return 0
    raw = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python", "benchmarks/families.py", *map(shlex.quote, raw)])
    rows = []
    for name in args.models:
        for criterion in args.criteria:  # one process each: peak memory is that model's
            done = subprocess.run([sys.executable, __file__, *raw, "--one", name, criterion], capture_output=True,
                                  text=True, stdin=subprocess.DEVNULL)
            if done.returncode == 0 and "RESULT" in done.stdout:
                rows.append(json.loads(done.stdout.split("RESULT", 1)[1]))
            else:
                rows.append({"model": name, "criterion": criterion,
                             "error": (done.stderr.strip().splitlines() or ["no output"])[-1][:200]})
            print(json.dumps(rows[-1])[:300], flush=True)
    from pruneflow.pipeline.atomic import write_json, write_text

    device = f"CPU ({platform.processor() or platform.machine()}, {args.threads} threads), torch {torch.__version__}"
    write_json(args.out.with_suffix(".json"), {"command": command, "device": device, "rows": rows})
    write_text(args.out.with_suffix(".md"), _markdown(rows, command, device, args.vocab))
    return 0 if all("error" not in r and r["reload_identical_logits"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
