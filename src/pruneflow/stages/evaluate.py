"""Stage 6: perplexity (LLM-Pruner protocol), lm-eval zero-shot accuracy, size and speed of one model."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pruneflow.config import load_params, stage_params
from pruneflow.stages.cli import command_line, parser_for, require_file, run_cli

STAGE = "evaluate"
_MODEL_ID = re.compile(r"^(?P<variant>pruned|recovered)/(?P<criterion>[A-Za-z0-9_]+)/(?P<ratio>[0-9.]+)$")


def describe_model_id(model_id: str) -> dict[str, Any]:
    """`dense`, `pruned/<criterion>/<ratio>` or `recovered/<criterion>/<ratio>` -> its parts."""
    if model_id == "dense":
        return {"variant": "dense", "criterion": None, "ratio": 0.0}
    match = _MODEL_ID.match(model_id)
    if match:
        return {"variant": match["variant"], "criterion": match["criterion"], "ratio": float(match["ratio"])}
    return {"variant": "custom", "criterion": None, "ratio": None}


def _model_summaries(model_dir: Path) -> dict[str, Any]:
    import json

    found = {}
    for name in ("pruning_summary.json", "recovery_summary.json"):
        path = model_dir / name
        if path.is_file():
            summary = json.loads(path.read_text())
            summary.pop("removed_attention_groups", None)
            summary.pop("removed_ffn_channels", None)
            summary.pop("history", None)
            found[name.removesuffix("_summary.json")] = summary
    return found


def main(argv: Sequence[str] | None = None) -> None:
    parser = parser_for(STAGE, __doc__)
    parser.add_argument("--model", type=Path, required=True, help="model folder to evaluate")
    parser.add_argument("--model-id", required=True, help="dense | pruned/<criterion>/<ratio> | recovered/...")
    parser.add_argument("--data-dir", type=Path, default=Path("data/raw"))
    parser.add_argument("--out", type=Path, required=True, help="output metrics.json")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    cfg = params.evaluate

    from pruneflow.modeling import load_tokenizer, offline_by_default
    from pruneflow.runtime import resolve_device, resolve_dtype, seed_everything
    from pruneflow.text_data import PPL_SOURCES, check_text_file

    device = resolve_device(params.runtime.device)
    dtype = resolve_dtype(params.runtime.dtype, device)
    require_file(args.model, "model folder")
    for name in cfg.ppl_datasets:  # every input checked before the model is loaded
        check_text_file(args.data_dir / PPL_SOURCES[name][0], f"perplexity dataset {name!r}")
    from pruneflow.zeroshot import check_task_files

    check_task_files(cfg.zeroshot_tasks, args.data_dir)
    offline_by_default()

    from pruneflow.architectures import count_parameters
    from pruneflow.atomic import write_json
    from pruneflow.checkpoint import load_pruned
    from pruneflow.efficiency import measure_efficiency
    from pruneflow.perplexity import perplexity, tokenize_text
    from pruneflow.provenance import read_chain, step
    from pruneflow.text_data import evaluation_text
    from pruneflow.tracking import stage_run
    from pruneflow.zeroshot import HEADLINE_METRIC, evaluate_zeroshot, zeroshot_average

    seed_everything(params.seed)
    identity = describe_model_id(args.model_id)
    tracked = {**stage_params(params, "scale", "runtime", "evaluate"), "model_id": args.model_id}
    tags = {"pruneflow.model_id": args.model_id, "pruneflow.variant": identity["variant"]}
    with stage_run(STAGE, settings=params.mlflow, params=tracked, tags=tags,
                   run_name=f"evaluate {args.model_id}") as run:
        started = time.perf_counter()
        tokenizer = load_tokenizer(args.model)
        model = load_pruned(args.model, dtype=dtype, device=device)
        ppl = {}
        for name in cfg.ppl_datasets:
            ids = tokenize_text(evaluation_text(name, args.data_dir), tokenizer)
            result = perplexity(model, ids, seq_len=cfg.ppl_seq_len, batch_size=cfg.ppl_batch_size,
                                max_windows=cfg.ppl_max_windows, device=device)
            ppl[name] = {**result.to_dict(), "split": PPL_SOURCES[name][1]}
        zeroshot = {}
        if cfg.zeroshot_tasks:
            zeroshot = evaluate_zeroshot(model, tokenizer, cfg.zeroshot_tasks, args.data_dir,
                                         limit=cfg.zeroshot_limit, batch_size=cfg.zeroshot_batch_size, device=device)
        efficiency = measure_efficiency(model, device=device, repeats=cfg.latency_repeats, seq_len=cfg.ppl_seq_len)
        metrics = {
            "model_id": args.model_id,
            **identity,
            "params": count_parameters(model),
            "perplexity": ppl,
            "zeroshot": zeroshot,
            "zeroshot_average": zeroshot_average(zeroshot) if zeroshot else None,
            "zeroshot_headline_metric": {task: HEADLINE_METRIC[task] for task in zeroshot},
            "efficiency": efficiency,
            "summaries": _model_summaries(args.model),
            "setting": {"scale": params.scale, "evaluate": stage_params(params, "evaluate"),
                        "device": str(device), "dtype": str(dtype).removeprefix("torch.")},
            "seconds": time.perf_counter() - started,
            "command": command_line(),
            "provenance": [*read_chain(args.model), step(STAGE, command_line(), tracked)],
        }
        write_json(args.out, metrics)
        run.log_metrics({"params": metrics["params"], "perplexity": {k: v["ppl"] for k, v in ppl.items()},
                         "zeroshot": zeroshot, "zeroshot_average": metrics["zeroshot_average"],
                         "efficiency": efficiency, "seconds": metrics["seconds"]})
        run.log_artifact(args.out)


if __name__ == "__main__":
    run_cli(STAGE, main)
