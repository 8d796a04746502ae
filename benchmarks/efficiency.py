"""Dense and pruned models side by side on one device: size, MACs, latency, throughput, generation, memory.

Every model is loaded once and measured in interleaved rounds (dense, pruned..., then the reverse
order, and so on), so clock boosts, thermal drift and other jobs on the machine hit every model alike;
each figure is the median over rounds of `pruneflow.efficiency.measure_efficiency`'s medians. To say
*why* a speedup falls short of the parameter ratio, each model's forward pass at the throughput batch
is also split by module (attention, MLP, LM head, the rest) with timing hooks, and the pruned widths
are checked for GPU-friendly multiples. Writes OUT.json and OUT.md.

    python benchmarks/efficiency.py --dense data/models/dense \
        --pruned data/pruned/taylor_element1/0.2 data/pruned/l2_magnitude/0.2
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from pruneflow.architectures import count_parameters, decoder_layers, layer_shapes
from pruneflow.checkpoint import load_pruned
from pruneflow.efficiency import macs_per_token, measure_efficiency, random_token_ids, synchronize
from pruneflow.pipeline.atomic import write_json, write_text
from pruneflow.runtime import resolve_device, resolve_dtype

TARGET_SPEEDUP = 1.15  # the speedup aimed for at 20% removed: batch-16 throughput vs dense (H100)
MEDIAN_KEYS = ("latency_ms_bs1", "throughput_tokens_per_s", "generation_tokens_per_s", "peak_memory_mib")


def module_breakdown(model: torch.nn.Module, *, batch_size: int, seq_len: int, device: torch.device,
                     repeats: int) -> dict[str, float]:
    """Median milliseconds per forward pass spent in attention, MLP, the LM head and everything else."""
    spent: dict[str, float] = defaultdict(float)
    starts: dict[int, float] = {}

    def hooks_for(module: torch.nn.Module, name: str) -> list:
        def pre(mod, *_):
            synchronize(device)
            starts[id(mod)] = time.perf_counter()

        def post(mod, *_):
            synchronize(device)
            spent[name] += time.perf_counter() - starts.pop(id(mod))

        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    handles = []
    for layer in decoder_layers(model):
        handles += hooks_for(layer.self_attn, "attention")
        handles += hooks_for(layer.mlp, "mlp")
    handles += hooks_for(model.get_output_embeddings(), "lm_head")
    ids = random_token_ids(batch_size, seq_len, model.config.vocab_size, device)
    per_run: list[dict[str, float]] = []
    try:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)  # warm-up
            for _ in range(repeats):
                spent.clear()
                synchronize(device)
                start = time.perf_counter()
                model(input_ids=ids, use_cache=False)
                synchronize(device)
                total = time.perf_counter() - start
                run = {k: 1000 * v for k, v in spent.items()}
                run["other"] = 1000 * total - sum(run.values())
                run["total"] = 1000 * total
                per_run.append(run)
    finally:
        for handle in handles:
            handle.remove()
    return {key: statistics.median(run[key] for run in per_run) for key in per_run[0]}


def width_report(model: torch.nn.Module) -> dict[str, Any]:
    """Distinct per-layer widths and whether they are multiples of 64 (what GPU matmul tiles like)."""
    shapes = layer_shapes(model)
    intermediate = sorted({s.intermediate_size for s in shapes})
    heads = sorted({(s.num_attention_heads, s.num_key_value_heads) for s in shapes})
    return {
        "intermediate_sizes": intermediate,
        "attention_heads": [list(h) for h in heads],
        "intermediate_multiple_of_64": all(size % 64 == 0 for size in intermediate),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", type=Path, default=Path("data/models/dense"))
    parser.add_argument("--pruned", type=Path, nargs="+", required=True, help="pruned or recovered model folders")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--generation-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per figure within a round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all models")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/efficiency"))
    args = parser.parse_args(argv)
    for path in [args.dense, *args.pruned]:
        if not (path / "config.json").is_file():
            parser.error(f"--dense/--pruned {str(path)!r} is not a model folder (no config.json); run the pipeline "
                         "first (snakemake) or pass folders it wrote")

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    names = ["dense", *[str(p) for p in args.pruned]]
    models = {name: load_pruned(path, dtype=dtype, device=device)
              for name, path in zip(names, [args.dense, *args.pruned], strict=True)}
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    started = time.perf_counter()
    for index in range(args.rounds):
        order = names if index % 2 == 0 else names[::-1]
        for name in order:
            rounds[name].append(measure_efficiency(
                models[name], device=device, repeats=args.repeats, seq_len=args.seq_len,
                throughput_batch_size=args.batch_size, generation_tokens=args.generation_tokens))
            print(f"round {index + 1}/{args.rounds} {name}: "
                  f"{rounds[name][-1]['throughput_tokens_per_s']:.0f} tok/s", file=sys.stderr)
    rows = []
    for name in names:
        model = models[name]
        first = rounds[name][0]
        row = {"model": name, "params": count_parameters(model), "macs_per_token": macs_per_token(model, args.seq_len),
               "weights_mib": first["weights_mib"], "peak_memory_method": first["peak_memory_method"]}
        for key in MEDIAN_KEYS:
            values = [r[key] for r in rounds[name] if r[key] is not None]
            row[key] = statistics.median(values) if values else None
            row[f"{key}_rounds"] = [r[key] for r in rounds[name]]
        row["breakdown_ms"] = module_breakdown(model, batch_size=args.batch_size, seq_len=args.seq_len,
                                               device=device, repeats=args.repeats)
        row["widths"] = width_report(model)
        rows.append(row)
    dense = rows[0]
    for row in rows:
        row["param_ratio"] = dense["params"] / row["params"]
        row["macs_ratio"] = dense["macs_per_token"] / row["macs_per_token"]
        row["throughput_speedup"] = row["throughput_tokens_per_s"] / dense["throughput_tokens_per_s"]
        row["latency_speedup"] = dense["latency_ms_bs1"] / row["latency_ms_bs1"]
        row["generation_speedup"] = row["generation_tokens_per_s"] / dense["generation_tokens_per_s"]
    payload = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "generation_tokens": args.generation_tokens,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "seconds": time.perf_counter() - started,
        "target_speedup": TARGET_SPEEDUP,
        "rows": rows,
    }
    write_json(args.out.with_suffix(".json"), payload)
    write_text(args.out.with_suffix(".md"), render_markdown(payload))
    print(render_markdown(payload))
    return 0


def _label(path: str) -> str:
    """`.../pruned/flap/0.2` -> `pruned/flap/0.2`: the pipeline's model id when the path has one."""
    parts = Path(path).parts
    for anchor in ("pruned", "recovered", "servable"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor):])
    return path


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render_markdown(payload: dict[str, Any]) -> str:
    rows = payload["rows"]
    lines = [
        "# Efficiency: dense and pruned side by side",
        "",
        f"Command: `{payload['command']}`  ",
        f"Device: {payload['device']}, {payload['dtype']}, torch {payload['torch']}; windows of {payload['seq_len']} "
        f"tokens; throughput at batch {payload['batch_size']}; generation = {payload['generation_tokens']} greedy "
        f"tokens at batch 1 after a {payload['seq_len']}-token prompt (KV cache); medians of {payload['repeats']} "
        f"repeats per round, median over {payload['rounds']} interleaved rounds; {payload['seconds']:.0f} s in all.",
        "",
        "| model | params (M) | MACs/token (M) | latency bs1 (ms) | throughput (tok/s) | speedup | "
        "param ratio | MACs ratio | generation (tok/s) | peak memory (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {_label(row['model'])} | {row['params'] / 1e6:.1f} | {row['macs_per_token'] / 1e6:.1f} | "
            f"{_f(row['latency_ms_bs1'])} | {_f(row['throughput_tokens_per_s'], 0)} | "
            f"{row['throughput_speedup']:.2f}x | {row['param_ratio']:.2f}x | {row['macs_ratio']:.2f}x | "
            f"{_f(row['generation_tokens_per_s'])} | {_f(row['peak_memory_mib'], 0)} |")
    lines += ["", f"Peak memory: {rows[0]['peak_memory_method']}.", "",
              f"Forward pass at batch {payload['batch_size']} split by module (ms, median; hooks add a little "
              "overhead, so the total is slightly above the throughput figure):", "",
              "| model | attention | MLP | LM head | other | total | FFN widths | heads (q, kv) |",
              "|---|---:|---:|---:|---:|---:|---|---|"]
    for row in rows:
        b = row["breakdown_ms"]
        widths = row["widths"]
        lines.append(
            f"| {_label(row['model'])} | {_f(b.get('attention'))} | {_f(b.get('mlp'))} | {_f(b.get('lm_head'))} | "
            f"{_f(b.get('other'))} | {_f(b.get('total'))} | {', '.join(map(str, widths['intermediate_sizes']))} | "
            f"{'; '.join(f'{q},{kv}' for q, kv in widths['attention_heads'])} |")
    lines += ["", "## Reading", ""]
    dense = rows[0]
    for row in rows[1:]:
        b, d = row["breakdown_ms"], dense["breakdown_ms"]
        fixed = d.get("lm_head", 0.0) + d.get("other", 0.0)
        verdict = "at or above" if row["throughput_speedup"] >= payload["target_speedup"] else "below"
        lines.append(
            f"- {_label(row['model'])}: {row['throughput_speedup']:.2f}x batch-{payload['batch_size']} throughput "
            f"on {payload['device']} ({verdict} the {payload['target_speedup']:.2f}x aimed for on an "
            f"H100), against "
            f"{row['param_ratio']:.2f}x fewer parameters and {row['macs_ratio']:.2f}x fewer MACs per token. "
            f"The parts pruning cannot shrink (LM head + embeddings/norms/rest) take {fixed:.1f} of "
            f"{d.get('total', 0.0):.1f} ms in the dense pass ({100 * fixed / max(d.get('total', 1.0), 1e-9):.0f}%); "
            f"attention {d.get('attention', 0):.1f} -> {b.get('attention', 0):.1f} ms, MLP {d.get('mlp', 0):.1f} -> "
            f"{b.get('mlp', 0):.1f} ms"
            + ("" if row["widths"]["intermediate_multiple_of_64"]
               else "; its FFN widths are not all multiples of 64, which GPU matmul kernels handle less efficiently")
            + ".")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
