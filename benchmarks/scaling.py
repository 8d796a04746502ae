"""Peak memory and time of cache_activations, score and prune, whole model vs layer by layer, as models grow.

Random Llama models (no weights to download) of one width and growing depth are saved as safetensors
folders; each stage CLI then runs in its own process with `runtime.execution` set to `whole_model`
and to `layer_by_layer`, and the process's peak RSS (getrusage) and wall time are recorded. On a CPU
the host is the device, so peak RSS is what a GPU's memory would hold. Both paths' outputs are
compared (activation statistics, scores, pruned weights: equal or not). A second table applies the
memory arithmetic the automatic choice uses (`pruneflow.layerwise.memory_need`) to published 7B and
70B shapes on one 80 GB GPU. Writes OUT.json and OUT.md.

`--model FOLDER` measures a real checkpoint (a Hugging Face folder, e.g. `data/models/dense` or a
downloaded 1B+ model) instead, calibrated on WikiText-2 train text by the calibrate stage; with
`--device cuda` every stage runs on the GPU (`--dtype`, bf16 by default there) and the peak GPU
memory torch allocated in each stage is recorded beside the host's peak RSS.

    python benchmarks/scaling.py --layers 2 8 31
    python benchmarks/scaling.py --model /models/Llama-3.2-1B --device cuda --samples 128
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

STAGES = ("cache_activations", "score", "prune")
EXECUTIONS = ("whole_model", "layer_by_layer")
# published config.json shapes: TinyLlama-1.1B's width (the random models), Llama-2-7B, Llama-3-70B
TINYLLAMA = {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32, "num_key_value_heads": 4,
             "vocab_size": 32000, "max_position_embeddings": 2048, "tie_word_embeddings": False}
LARGE = {
    "Llama-2-7B": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                   "num_key_value_heads": 32, "num_hidden_layers": 32, "vocab_size": 32000,
                   "tie_word_embeddings": False},
    "Llama-3-70B": {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
                    "num_key_value_heads": 8, "num_hidden_layers": 80, "vocab_size": 128256,
                    "tie_word_embeddings": False},
}
GPU_BYTES = 80 * 10**9  # one 80 GB GPU (A100 / H100 80GB)
REPO = Path(__file__).resolve().parents[1]


def build_model(folder: Path, layers: int, args: argparse.Namespace) -> int:
    """A random Llama of the TinyLlama width with `layers` decoder layers, its tokenizer and random
    calibration ids; returns the parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pruneflow.tensor_files import save_tensors
    from pruneflow.tiny_models import tiny_tokenizer

    config = LlamaConfig(**TINYLLAMA, num_hidden_layers=layers, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # the default init's std 0.02 on every layer: keep activations of a deep stack finite
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, 1.0 / module.in_features**0.5)
    model.save_pretrained(folder / "model")
    tiny_tokenizer().save_pretrained(folder / "model")
    ids = torch.randint(3, TINYLLAMA["vocab_size"], (args.samples, args.seq_len),
                        generator=torch.Generator().manual_seed(1))
    save_tensors(folder / "calibration.safetensors", {"input_ids": ids}, {"source": "random ids"})
    return sum(p.numel() for p in model.parameters())


def calibrate_real_text(folder: Path, model: Path, args: argparse.Namespace) -> None:
    """Calibration ids for a real checkpoint: the calibrate stage on WikiText-2 train text (its tokenizer)."""
    params = write_params(folder, "whole_model", args)
    subprocess.run([sys.executable, "-m", "pruneflow.stages.calibrate", "--params", str(params), "--model", str(model),
                    "--out", str(folder / "calibration.safetensors")], check=True, cwd=REPO, stdin=subprocess.DEVNULL)


def dtype_of(args: argparse.Namespace) -> str:
    return args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")


def write_params(folder: Path, execution: str, args: argparse.Namespace, layers: int | None = None) -> Path:
    """params.yaml for one path; `layers` None: prune params.yaml's layer range of the model."""
    prune = {"attention_unit": "kv_group", "reconstruction": "none"}
    if getattr(args, "refit", False):  # the parallel re-fit gathers every pruned layer's Gram sums by forward passes
        prune.update(reconstruction="least_squares", reconstruction_mode="parallel")
    if layers is not None:
        prune.update(layer_start=0, layer_end=layers)
    overrides = {
        "scale": "full",
        "runtime": {"device": args.device, "dtype": dtype_of(args), "execution": execution},
        "calibration": {"num_samples": args.samples, "seq_len": args.seq_len},
        # no cached Gram matrices (4 (h^2 + f^2) bytes per layer): with --refit prune gathers its own
        "activations": {"batch_size": 4, "max_tokens": 128, "gram_matrices": False},
        "score": {"micro_batch_size": 2},
        # one attention unit and, without --refit, no re-fit: prune then runs no forward pass, so its rows
        # measure the surgery on a model held in host memory, the same code in both paths
        "prune": prune,
        "mlflow": {"enabled": False},
    }
    params = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), overrides)
    path = folder / f"params-{execution}.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _prune_layers(config: dict) -> str:
    """The layers params.yaml's prune range covers in this model ("4..27": both ends pruned)."""
    from pruneflow.config import load_params

    layers = load_params(REPO / "params.yaml").prune.layer_range(config["num_hidden_layers"])
    return f"{layers.start}..{layers.stop - 1}"


def _merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merge(base.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def stage_argv(stage: str, folder: Path, execution: str, criterion: str, model: Path | None = None) -> list[str]:
    model, cal, out = model or folder / "model", folder / "calibration.safetensors", folder / execution
    common = ["--params", str(folder / f"params-{execution}.yaml")]
    if stage == "cache_activations":
        return [*common, "--model", str(model), "--calibration", str(cal), "--out", str(out / "act.safetensors")]
    if stage == "score":
        return [*common, "--model", str(model), "--calibration", str(cal), "--activations",
                str(out / "act.safetensors"), "--criterion", criterion, "--out", str(out / "scores.safetensors")]
    return [*common, "--model", str(model), "--scores", str(out / "scores.safetensors"), "--activations",
            str(out / "act.safetensors"), "--calibration", str(cal), "--criterion", criterion, "--ratio", "0.2",
            "--out", str(out / "pruned")]


def run_stage(stage: str, argv: list[str], threads: int) -> dict:
    """In this (child) process: one stage CLI; its wall time, this process's peak RSS and, where CUDA is
    available, the peak GPU memory torch allocated (and reserved) during the stage."""
    import importlib

    torch.set_num_threads(threads)
    module = importlib.import_module(f"pruneflow.stages.{stage}")
    baseline = peak_rss_gb()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    module.main(argv)
    result = {"seconds": round(time.perf_counter() - started, 1), "peak_rss_gb": peak_rss_gb(),
              "rss_after_imports_gb": baseline}
    if cuda:
        result["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        result["peak_gpu_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 2)
    return result


def peak_rss_gb() -> float:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss, which keeps the high-water
    mark of the parent's memory image across fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024**2, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)


def checkpoint_parameters(folder: Path) -> int:
    """The checkpoint's parameters (a tied head once), from its module tree on the meta device: no weights read."""
    from pruneflow.architectures import count_parameters
    from pruneflow.checkpoint import model_skeleton

    return count_parameters(model_skeleton(folder))


def _same_tensors(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def compare_outputs(folder: Path) -> dict[str, bool]:
    whole, streamed = folder / "whole_model", folder / "layer_by_layer"
    return {"activations": _same_tensors(whole / "act.safetensors", streamed / "act.safetensors"),
            "scores": _same_tensors(whole / "scores.safetensors", streamed / "scores.safetensors"),
            "pruned_weights": _same_tensors(whole / "pruned" / "model.safetensors",
                                            streamed / "pruned" / "model.safetensors")}


def large_model_arithmetic(calibration_tokens: int, ppl_tokens: int) -> list[dict]:
    """What `memory_need` (the automatic choice's arithmetic) gives for 7B and 70B in bf16."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    from pruneflow.layerwise import memory_need

    rows = []
    for name, fields in LARGE.items():
        with init_empty_weights():
            model = LlamaForCausalLM(LlamaConfig(**fields))
        params = sum(p.numel() for p in model.parameters())
        for what, tokens, gradients, grams in (
                ("cache_activations", calibration_tokens, "none", "none"),
                ("cache_activations with Gram matrices", calibration_tokens, "none", "saved"),
                ("score taylor (mean gradient)", calibration_tokens, "mean", "none"),
                ("score taylor_element2 (Fisher)", calibration_tokens, "fisher", "none"),
                ("evaluate perplexity", ppl_tokens, "none", "none")):
            need = memory_need(model, torch.bfloat16, tokens=tokens, gradients=gradients, grams=grams)
            rows.append({"model": name, "params": params, "pass": what, "tokens": tokens,
                         **{k: round(v / 1e9, 2) for k, v in need.to_dict().items()},
                         "whole_model_fits_80gb": need.whole_model <= GPU_BYTES,
                         "layer_by_layer_fits_80gb": need.layer_by_layer <= GPU_BYTES})
    return rows


def _what_was_measured(report: dict) -> str:
    dtype = report.get("dtype", "float32")
    refit = ("with the parallel least-squares re-fit, its Gram sums gathered by the prune stage's own forward "
             "passes (whole model: every pruned layer's at once; layer by layer: one layer's, re-fitted as soon as "
             "it has run)" if report.get("refit") else
             "without re-fit (the structure search and surgery: no forward pass, the same code in both paths; "
             "re-fitting is measured with --refit and in reconstruction.md)")
    common = (f"{dtype}, {report['samples']} calibration sequences x {report['seq_len']} tokens, criterion "
              f"{report['criterion']}, prune ratio 0.2 {refit}. Each stage in its own process")
    memory = ("; peak RSS of that process (on a CPU the host is the device)" if not report.get("gpu") else
              "; peak GPU memory torch allocated during the stage, and the process's peak host RSS")
    if report.get("model"):
        what = (f"The checkpoint `{report['model']}` ({report['model_type']}, layers {report['prune_layers']} pruned, "
                "params.yaml's range), calibrated "
                f"on WikiText-2 train text, {common}")
    else:
        what = ("Random Llama models of TinyLlama-1.1B's width (hidden 2048, FFN 5632, 32 heads / 4 KV heads, "
                f"32000-token vocabulary), layers 0..L-1 pruned, {common}")
    return what + memory + ". 'same output' compares the two paths' files tensor by tensor."


def _cell(r: dict, gpu: bool) -> str:
    if "peak_rss_gb" not in r:
        return f"failed: {r.get('error', 'not run')}"
    return (f"{r.get('peak_gpu_gb', '-')} / {r['peak_rss_gb']} / {r['seconds']}" if gpu else
            f"{r['peak_rss_gb']} / {r['seconds']}")


def _markdown(report: dict) -> str:
    gpu = bool(report.get("gpu"))
    unit = "peak GPU GB / peak RSS GB / s" if gpu else "peak RSS GB / s"
    lines = ["# Whole model vs layer by layer as the model grows", "",
             f"Command: `{report['command']}`  ", f"Device: {report['device']}", "", _what_was_measured(report), "",
             f"| layers | params (B) | stage | whole model: {unit} | layer by layer: {unit} |",
             "|---|---|---|---|---|"]
    for row in report["rows"]:
        for stage in STAGES:
            cells = [_cell(row["stages"].get(execution, {}).get(stage, {}), gpu) for execution in EXECUTIONS]
            lines.append(f"| {row['layers']} | {row['params'] / 1e9:.2f} | {stage} | {cells[0]} | {cells[1]} |")
    lines += ["", "Same output (whole model vs layer by layer): " + "; ".join(
        f"{row['layers']} layers: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in row["same_output"].items())
        for row in report["rows"] if "same_output" in row), ""]
    lines += ["## 7B and 70B on one 80 GB GPU (bf16, the automatic choice's arithmetic)", "",
              *([f"Recomputed with `{report['arithmetic_command']}` (arithmetic only; the rows above are as "
                 "measured).", ""] if report.get("arithmetic_command") else []),
              "`pruneflow.layerwise.memory_need`: weights (+ for Taylor one gradient per projection weight and "
              "the float64 element scores of the layer being scored; + fp32 gradient and Fisher buffers for "
              "Element^2; + float64 Gram sums of the o_proj / down_proj inputs, 8 x (h^2 + f^2) bytes per layer, "
              "where the pass gathers them), + hidden states entering and leaving a layer (tokens x hidden x "
              "2 bytes x 2), x 1.25 headroom. Layer by layer: the largest layer (with its gradient and Gram sums) "
              "+ embeddings and head + hidden states on the GPU; in host memory the layer being read, every "
              "layer's input hidden states for Taylor, every layer's Gram sums and their float32 copies.", "",
              "| model | pass | tokens | whole model GB | layer by layer GB | largest layer GB | embeddings + head GB | "
              "host, layer by layer GB | fits 80 GB whole / layer by layer |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["large_models"]:
        lines.append(f"| {r['model']} ({r['params'] / 1e9:.1f}B) | {r['pass']} | {r['tokens']} | {r['whole_model']} | "
                     f"{r['layer_by_layer']} | {r['largest_layer']} | {r['outside_layers']} | "
                     f"{r.get('host_layer_by_layer', '-')} | "
                     f"{'yes' if r['whole_model_fits_80gb'] else 'no'} / "
                     f"{'yes' if r['layer_by_layer_fits_80gb'] else 'no'} |")
    return "\n".join(lines) + "\n"


def rerender(args: argparse.Namespace) -> int:
    """OUT.md again from OUT.json, with the large-model arithmetic recomputed (it depends on the code
    only, not on the machine); the measured rows and their command stay as they were measured."""
    from pruneflow.pipeline.atomic import write_json, write_text

    report = json.loads(args.out.with_suffix(".json").read_text())
    report["large_models"] = large_model_arithmetic(args.large_calibration_tokens, args.ppl_tokens)
    report["arithmetic_command"] = " ".join(["python", "benchmarks/scaling.py", "--rerender", "--out",
                                             shlex.quote(str(args.out))])
    write_json(args.out.with_suffix(".json"), report)
    write_text(args.out.with_suffix(".md"), _markdown(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 31])
    parser.add_argument("--model", type=Path, default=None,
                        help="a real checkpoint folder to measure instead of the random models")
    parser.add_argument("--device", default="cpu", help="runtime.device of every stage: cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="runtime.dtype (default: float32 on the CPU, bfloat16 on a GPU)")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--criterion", default="taylor_element1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ppl-tokens", type=int, default=340_000,
                        help="tokens of one perplexity pass (7B/70B table; WikiText-2 test is about 340k Llama tokens)")
    parser.add_argument("--large-calibration-tokens", type=int, default=512 * 128,
                        help="calibration tokens of one pass (7B/70B table; the default params: 512 x 128)")
    parser.add_argument("--workdir", type=Path, default=None, help="where models are built (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/scaling"))
    parser.add_argument("--refit", action="store_true",
                        help="prune with the parallel least-squares re-fit, gathering its Gram sums by forward passes")
    parser.add_argument("--rerender", action="store_true",
                        help="rewrite OUT.json's 7B/70B arithmetic with the current memory_need and OUT.md from it; "
                             "the measured rows are kept as they are (no stage runs)")
    raw = argv if argv is not None else sys.argv[1:]
    if raw[:1] == ["--build"]:  # the model in its own process, so this one stays small
        folder, layers, samples, seq_len = raw[1:5]
        built = build_model(Path(folder), int(layers), argparse.Namespace(samples=int(samples), seq_len=int(seq_len)))
        print(f"PARAMS{built}")
        return 0
    if raw[:1] == ["--child"]:  # one stage in this process: --child STAGE THREADS STAGE-ARGS...
        print("RESULT" + json.dumps(run_stage(raw[1], raw[3:], int(raw[2]))))
        return 0
    args = parser.parse_args(raw)
    if args.rerender:
        return rerender(args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here")
    if args.model is not None and not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there (a Hugging Face checkpoint folder is needed)")
    command = " ".join(["python", "benchmarks/scaling.py", *map(shlex.quote, raw)])
    named_model = str(args.model) if args.model is not None else None  # as given, for the report
    if args.model is not None:
        args.model = args.model.resolve()  # the calibrate stage runs in the repository root
    rows = []
    workdir = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        for layers in [None] if args.model is not None else args.layers:
            folder = workdir / f"layers{layers or 'model'}"
            folder.mkdir()
            if args.model is not None:
                config = json.loads((args.model / "config.json").read_text())
                calibrate_real_text(folder, args.model, args)
                row = {"layers": config["num_hidden_layers"], "params": checkpoint_parameters(args.model),
                       "model_type": config.get("model_type"), "prune_layers": _prune_layers(config), "stages": {}}
            else:
                built = subprocess.run([sys.executable, __file__, "--build", str(folder), str(layers),
                                        str(args.samples), str(args.seq_len)], capture_output=True, text=True, check=True)
                row = {"layers": layers, "params": int(built.stdout.split("PARAMS", 1)[1]), "stages": {}}
            for execution in EXECUTIONS:
                write_params(folder, execution, args, layers)
                results = row["stages"][execution] = {}
                for stage in STAGES:
                    done = subprocess.run(
                        [sys.executable, __file__, "--child", stage, str(args.threads),
                         *stage_argv(stage, folder, execution, args.criterion, args.model)],
                        capture_output=True, text=True, stdin=subprocess.DEVNULL)
                    if done.returncode == 0 and "RESULT" in done.stdout:
                        results[stage] = json.loads(done.stdout.split("RESULT", 1)[1])
                    else:
                        results[stage] = {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
                    print(layers, execution, stage, json.dumps(results[stage]), flush=True)
            if all("error" not in r for e in row["stages"].values() for r in e.values()):
                row["same_output"] = compare_outputs(folder)
            rows.append(row)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    from pruneflow.pipeline.atomic import write_json, write_text

    gpu = args.device.startswith("cuda")
    device = (f"{torch.cuda.get_device_name(torch.device(args.device))} (CUDA {torch.version.cuda}), host CPU "
              f"{args.threads} threads" if gpu else
              f"CPU ({platform.processor() or platform.machine()}, {args.threads} threads)") + f", torch {torch.__version__}"
    report = {"command": command, "device": device, "gpu": gpu, "dtype": dtype_of(args), "samples": args.samples,
              "seq_len": args.seq_len, "criterion": args.criterion, "refit": args.refit, "rows": rows,
              "model": named_model,
              "model_type": rows[0].get("model_type") if rows else None,
              "prune_layers": rows[0].get("prune_layers") if rows else None,
              "large_models": large_model_arithmetic(args.large_calibration_tokens, args.ppl_tokens)}
    write_json(args.out.with_suffix(".json"), report)
    write_text(args.out.with_suffix(".md"), _markdown(report))
    return 0 if all(all(r.get("same_output", {"run": False}).values()) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
