"""Stage 6: perplexity (LLM-Pruner protocol), lm-eval zero-shot accuracy, size and speed of one model."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pruneflow.config import RATIO_PATTERN, load_params, stage_params
from pruneflow.stages.cli import command_line, parser_for, require_file, run_cli

STAGE = "evaluate"
_MODEL_ID = re.compile(rf"^(?P<variant>pruned|recovered|servable)/(?P<criterion>[A-Za-z0-9_]+)/(?P<ratio>{RATIO_PATTERN})$")


def describe_model_id(model_id: str) -> dict[str, Any]:
    """`dense` or `{pruned,recovered,servable}/<criterion>/<ratio>` -> its parts."""
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


def check_seq_lens(model_dir: Path, seq_lens: Sequence[int]) -> None:
    """Every perplexity window must fit the model's context; checked from config.json, before any weights load."""
    import json

    config_file = model_dir / "config.json"
    if not config_file.is_file():
        return  # load_pruned names the missing file
    config = json.loads(config_file.read_text())
    limit = config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")
    if limit is None:
        return
    for index, length in enumerate(seq_lens):
        if length > limit:
            from pruneflow.errors import ConfigError

            raise ConfigError(
                f"evaluate.ppl_seq_lens[{index}]={length} is not allowed for {str(model_dir)!r}; allowed: window "
                f"lengths from 2 to the model's max_position_embeddings={limit}"
            )


def main(argv: Sequence[str] | None = None) -> None:
    parser = parser_for(STAGE, __doc__)
    parser.add_argument("--model", type=Path, required=True, help="model folder to evaluate")
    parser.add_argument("--model-id", required=True, help="dense | pruned/<criterion>/<ratio> | recovered/... | servable/...")
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

    check_task_files(cfg.zeroshot_tasks, args.data_dir, include_path=cfg.zeroshot_include_path)
    check_seq_lens(args.model, cfg.ppl_seq_lens)
    offline_by_default()

    from pruneflow.architectures import count_parameters
    from pruneflow.checkpoint import load_pruned
    from pruneflow.efficiency import measure_efficiency
    from pruneflow.layerwise import dtype_remedy, execution_of, open_model
    from pruneflow.perplexity import perplexity, tokenize_text
    from pruneflow.pipeline.atomic import write_json
    from pruneflow.pipeline.graph import evaluation_files, project_path, stage_for_model_id
    from pruneflow.pipeline.records import RECORD_KEY, recorder
    from pruneflow.pipeline.tracking import stage_run
    from pruneflow.provenance import read_chain, step
    from pruneflow.text_data import evaluation_text
    from pruneflow.zeroshot import evaluate_zeroshot, zeroshot_average

    seed_everything(params.seed)
    identity = describe_model_id(args.model_id)
    tracked = {**stage_params(params, "scale", "runtime", "evaluate"), "model_id": args.model_id}
    data_files = evaluation_files(params, project_path(args.data_dir, Path.cwd()))  # exactly what is read
    tags = {"pruneflow.model_id": args.model_id, "pruneflow.variant": identity["variant"]}
    with stage_run(STAGE, settings=params.mlflow, params=tracked, tags=tags,
                   run_name=f"evaluate {args.model_id}",
                   inputs={"model": args.model, **{f"data{i}": path for i, path in enumerate(data_files)}}) as run:
        started = time.perf_counter()
        tokenizer = load_tokenizer(args.model)
        texts = {name: tokenize_text(evaluation_text(name, args.data_dir), tokenizer) for name in cfg.ppl_datasets}
        # layer by layer, every window of a perplexity pass is on the device between layers
        pass_tokens = max((ids.numel() if cfg.ppl_max_windows is None
                           else min(ids.numel(), cfg.ppl_max_windows * cfg.ppl_seq_lens[0]) for ids in texts.values()),
                          default=0)
        model, layer_weights = open_model(args.model, execution=params.runtime.execution, dtype=dtype, device=device,
                                          tokens=pass_tokens, what=STAGE,
                                          remedies=["fewer tokens per pass (evaluate.ppl_max_windows)",
                                                    *dtype_remedy(dtype)])
        execution = execution_of(layer_weights)
        timing = {"load_s": time.perf_counter() - started}
        mark = time.perf_counter()
        ppl_by_seq_len: dict[str, dict[str, Any]] = {}
        for name, ids in texts.items():
            for seq_len in cfg.ppl_seq_lens:
                # the same token budget at every length: max_windows counts windows of the headline length
                windows = (None if cfg.ppl_max_windows is None
                           else max(1, cfg.ppl_max_windows * cfg.ppl_seq_lens[0] // seq_len))
                batch = max(1, cfg.ppl_batch_size * cfg.ppl_seq_lens[0] // seq_len)
                result = perplexity(model, ids, seq_len=seq_len, batch_size=batch, max_windows=windows, device=device,
                                    layer_weights=layer_weights)
                ppl_by_seq_len.setdefault(str(seq_len), {})[name] = {**result.to_dict(),
                                                                     "split": PPL_SOURCES[name][1]}
        ppl = ppl_by_seq_len.get(str(cfg.ppl_seq_lens[0]), {})  # {} in a zero-shot-only run
        timing["perplexity_s"], mark = time.perf_counter() - mark, time.perf_counter()
        if layer_weights is not None:
            # lm-eval and the timing loops call the model as a whole: accelerate spreads it over the visible
            # devices and host memory (big-model inference), so these run, slower than on one device
            params_count = count_parameters(model)
            del model, layer_weights
            model = load_pruned(args.model, dtype=dtype, device_map="auto")
        zeroshot = {}
        if cfg.zeroshot_tasks:
            zeroshot = evaluate_zeroshot(model, tokenizer, cfg.zeroshot_tasks, args.data_dir,
                                         limit=cfg.zeroshot_limit, batch_size=cfg.zeroshot_batch_size, device=device,
                                         include_path=cfg.zeroshot_include_path)
        timing["zeroshot_s"], mark = time.perf_counter() - mark, time.perf_counter()
        efficiency = measure_efficiency(model, device=device, repeats=cfg.latency_repeats,
                                        seq_len=cfg.ppl_seq_lens[0], throughput_batch_size=cfg.throughput_batch_size,
                                        generation_tokens=cfg.generation_tokens)
        timing["efficiency_s"] = time.perf_counter() - mark
        metrics = {
            "model_id": args.model_id,
            **identity,
            "params": count_parameters(model) if execution == "whole_model" else params_count,
            "perplexity": ppl,
            "perplexity_by_seq_len": ppl_by_seq_len,
            "zeroshot": zeroshot,
            "zeroshot_average": zeroshot_average(zeroshot) if zeroshot else None,
            "zeroshot_tasks": list(zeroshot),  # the tasks behind zeroshot_average (the report names them)
            "zeroshot_headline_metric": {task: scores["headline_metric"] for task, scores in zeroshot.items()},
            "efficiency": efficiency,
            "summaries": _model_summaries(args.model),
            "setting": {"scale": params.scale, "evaluate": stage_params(params, "evaluate"),
                        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "execution": execution},
            "seconds": time.perf_counter() - started,
            "timing": timing,
            "command": command_line(),
            "provenance": [*read_chain(args.model), step(STAGE, command_line(), tracked)],
        }
        stage, values = stage_for_model_id(args.model_id) or (None, {})
        # a model outside the grid is recorded under its own id (an evaluate stage all the same)
        metrics[RECORD_KEY] = recorder(stage.name if stage else "evaluate_dense", values, inputs={"model": args.model},
                                       instance=None if stage else f"evaluate/{args.model_id}").record(
            params, data=data_files)
        write_json(args.out, metrics)
        run.log_metrics({"params": metrics["params"], "perplexity": {k: v["ppl"] for k, v in ppl.items()},
                         "perplexity_at": {length: {k: v["ppl"] for k, v in by_name.items()}
                                           for length, by_name in ppl_by_seq_len.items()},
                         "zeroshot": zeroshot, "zeroshot_average": metrics["zeroshot_average"],
                         "efficiency": efficiency, "seconds": metrics["seconds"]})
        run.log_artifact(args.out)


if __name__ == "__main__":
    run_cli(STAGE, main)
