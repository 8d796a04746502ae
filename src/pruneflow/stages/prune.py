"""Stage 4: remove the lowest-scored groups so that `ratio` of all parameters goes, re-fit what stays
(`prune.reconstruction`); save a loadable checkpoint and a summary whose parameter counts are
measured, not requested."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from pruneflow.config import BIAS_RECONSTRUCTIONS, format_ratio, load_params, parse_ratio, stage_params
from pruneflow.stages.cli import command_line, parser_for, require_file, run_cli

STAGE = "prune"
STAGE_SERVABLE = "prune_servable"  # the same module, every layer alike (`--servable`)
SUMMARY_FILE = "pruning_summary.json"


def main(argv: Sequence[str] | None = None) -> None:
    parser = parser_for(STAGE, __doc__)
    parser.add_argument("--model", type=Path, required=True, help="dense model folder")
    parser.add_argument("--scores", type=Path, required=True)
    parser.add_argument("--activations", type=Path, required=True,
                        help="activation cache (its Gram matrices and means feed the reconstruction)")
    parser.add_argument("--calibration", type=Path, default=None,
                        help="calibration ids: needed by the sequential reconstruction, and by the parallel one "
                             "when the activation cache holds no Gram matrices (the pipeline always passes it)")
    parser.add_argument("--criterion", required=True)
    parser.add_argument("--ratio", required=True, help="fraction of all parameters to remove, [0, 1)")
    parser.add_argument("--out", type=Path, required=True, help="output checkpoint folder")
    parser.add_argument("--servable", action="store_true",
                        help="every layer pruned to the same widths, FFN a multiple of prune.servable_multiple: a "
                             "vanilla config that vLLM, llama.cpp and every Hugging Face tool load")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    parsed = parse_ratio(args.ratio)  # a number in [0, 1), or a one-line error naming --ratio
    ratio, ratio_name = float(parsed), format_ratio(parsed)  # ratio_name: the grid's folder name (DVC's spelling)

    from pruneflow.errors import DataError
    from pruneflow.importance import GroupScores, get_criterion

    get_criterion(args.criterion)
    from pruneflow.pruning import check_bias_compensation

    settings = params.prune
    adds_bias = settings.reconstruction in BIAS_RECONSTRUCTIONS
    require_file(args.model, "model folder")
    from pruneflow.checkpoint import checkpoint_dtype, read_config_dict, save_pruned
    from pruneflow.surgery import layers_to_prune, prune_scored

    model_config = read_config_dict(args.model)
    num_layers = int(model_config["num_hidden_layers"])
    # before anything is loaded; servable: every layer alike (a dense first or last layer would differ)
    layers_to_prune(num_layers, params, args.servable)
    scores = GroupScores.load(args.scores)
    if scores.metadata.get("criterion") != args.criterion:
        raise DataError(
            f"scores file {str(args.scores)!r} holds criterion {scores.metadata.get('criterion')!r}, "
            f"not --criterion={args.criterion!r}"
        )

    from pruneflow.layout_search import layouts_to_try
    from pruneflow.model_card import write_model_card
    from pruneflow.modeling import load_tokenizer
    from pruneflow.pipeline.atomic import atomic_dir
    from pruneflow.pipeline.records import recorder, write_record_file
    from pruneflow.pipeline.tracking import stage_run
    from pruneflow.provenance import read_chain, step, write_chain

    activations = calibration_ids = None
    if adds_bias:
        check_bias_compensation(model_config.get("model_type"), f"prune.reconstruction={settings.reconstruction!r}")
    candidates = layouts_to_try(settings.structures, settings.attention_unit)
    if settings.reconstruction != "none":
        from pruneflow.activations import load_activation_stats

        activations = load_activation_stats(args.activations, f"prune.reconstruction={settings.reconstruction!r}")
    why = None
    if len(candidates) > 1:
        why = "prune.attention_unit='auto' (it ranks layouts by the loss on calibration samples)"
    elif settings.reconstruction != "none" and settings.reconstruction_mode == "sequential":
        why = "prune.reconstruction_mode='sequential'"
    elif activations is not None and not any(k.endswith(".gram") for k in activations):
        why = "an activation cache without Gram matrices (activations.gram_matrices: false)"
    if args.calibration is not None:
        from pruneflow.stages.calibrate import load_calibration

        calibration_ids = load_calibration(args.calibration)
    elif why is not None:
        from pruneflow.errors import ConfigError

        raise ConfigError(f"--calibration is required by {why}; pass the calibration ids file")
    import torch

    from pruneflow.layerwise import FEWER_CALIBRATION_TOKENS, open_model, refit_grams
    from pruneflow.runtime import resolve_device

    # fp32 for exact surgery and solves; forward passes (sequential mode, Gram matrices not cached) on the
    # device, one layer at a time when the model does not fit there (the model then stays in host memory)
    device = resolve_device(params.runtime.device)
    cfg = params.prune
    # the Gram sums the re-fit gathers itself; the layout search prunes a copy of the model per layout it tries
    grams = refit_grams(cfg, cached=params.activations.gram_matrices)
    search = cfg.attention_unit == "auto"
    remedies = [FEWER_CALIBRATION_TOKENS,
                *(["a fixed prune.attention_unit (no copy of the model per layout tried)"] if search else [])]
    model, layer_weights = open_model(args.model, execution=params.runtime.execution, dtype=torch.float32,
                                      device=device, resident=True,
                                      tokens=0 if calibration_ids is None else calibration_ids.numel(),
                                      grams=grams, copies=2 if search else 1, what="prune", remedies=remedies)
    tokenizer = load_tokenizer(args.model)
    tracked = {**stage_params(params, "prune"), "criterion": args.criterion, "ratio": ratio,
               **({"servable": True} if args.servable else {})}
    with stage_run(STAGE, settings=params.mlflow, params=tracked,
                   tags={"pruneflow.criterion": args.criterion, "pruneflow.ratio": str(ratio)},
                   run_name=f"prune {args.criterion} {ratio}",
                   inputs={"model": args.model, "scores": args.scores}) as run:
        summary = prune_scored(model, scores, ratio, params, calibration_ids=calibration_ids,
                               activations=activations, servable=args.servable, device=device,
                               layer_weights=layer_weights)
        seconds = summary.pop("surgery_seconds")  # wall time goes to MLflow only (see below)
        summary["command"] = command_line()
        with atomic_dir(args.out) as tmp:
            save_pruned(model, tmp, tokenizer=tokenizer, dtype=checkpoint_dtype(args.model))  # the source's dtype
            (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
            chain = read_chain(args.model)
            chain.append(step("score", scores.metadata.get("command", ""), {"criterion": args.criterion},
                              device=scores.metadata.get("device")))
            chain.append(step(STAGE, command_line(), tracked, params_before=summary["params_before"],
                              params_after=summary["params_after"], achieved_ratio=summary["achieved_ratio"]))
            write_chain(tmp, chain)
            write_model_card(tmp, parent=args.model,
                             title=f"{'servable' if args.servable else 'pruned'} {args.criterion} {ratio_name}")
            inputs = {"model": args.model, "scores": args.scores, "activations": args.activations}
            if args.calibration is not None:
                inputs["calibration"] = args.calibration
            write_record_file(tmp, recorder(STAGE_SERVABLE if args.servable else STAGE,
                                            {"criterion": args.criterion, "ratio": ratio_name},
                                            inputs=inputs).record(params))
        # wall time goes to MLflow only: the checkpoint folder stays byte-identical across reruns
        run.log_metrics({**{k: summary[k] for k in ("achieved_ratio", "params_before", "params_after")},
                         "surgery_seconds": seconds, **summary["reconstruction_errors"]})
        run.log_artifact(args.out / SUMMARY_FILE)


if __name__ == "__main__":
    run_cli(STAGE, main)
