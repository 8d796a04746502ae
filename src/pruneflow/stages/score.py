"""Stage 3: per-group importance of one criterion, computed once and reused for every ratio."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from pruneflow.config import load_params, stage_params
from pruneflow.stages.cli import command_line, parser_for, require_file, run_cli

STAGE = "score"


def main(argv: Sequence[str] | None = None) -> None:
    parser = parser_for(STAGE, __doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--activations", type=Path, required=True)
    parser.add_argument("--criterion", required=True)
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors of group scores")
    args = parser.parse_args(argv)
    params = load_params(args.params)

    from pruneflow.importance import get_criterion
    from pruneflow.runtime import resolve_device, resolve_dtype

    criterion = get_criterion(args.criterion, params.score)  # a bad name fails before any loading
    device = resolve_device(params.runtime.device)
    dtype = resolve_dtype(params.runtime.dtype, device)
    require_file(args.model, "model folder")

    import time

    import torch

    from pruneflow.activations import load_activation_stats
    from pruneflow.criteria import without_gradients
    from pruneflow.importance import score_groups
    from pruneflow.layerwise import (
        FEWER_CALIBRATION_TOKENS,
        dtype_remedy,
        execution_of,
        gradients_of,
        open_model,
    )
    from pruneflow.pipeline.records import RECORD_KEY, recorder
    from pruneflow.pipeline.tracking import stage_run
    from pruneflow.stages.calibrate import load_calibration

    activations = None
    if criterion.needs_activations:
        activations = load_activation_stats(args.activations, f"criterion {criterion.name!r}")
    ids = load_calibration(args.calibration)
    tracked = {**stage_params(params, "seed", "runtime", "score", "activations.batch_size"),
               "criterion": criterion.name}
    with stage_run(STAGE, settings=params.mlflow, params=tracked, tags={"pruneflow.criterion": criterion.name},
                   run_name=f"score {criterion.name}",
                   inputs={"model": args.model, "calibration": args.calibration, "activations": args.activations}) as run:
        # gradient criteria take their gradients one layer at a time when the model (with them) does not fit;
        # weight-based criteria then read the weights in host memory
        remedies = [FEWER_CALIBRATION_TOKENS,
                    *([f"a criterion without gradients ({', '.join(without_gradients())})"]
                      if criterion.needs_gradients else []),
                    *dtype_remedy(dtype)]
        model, layer_weights = open_model(args.model, execution=params.runtime.execution, dtype=dtype, device=device,
                                          resident=not criterion.needs_gradients, tokens=ids.numel(),
                                          gradients=gradients_of(criterion), what=f"score {criterion.name}",
                                          remedies=remedies)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        scores = score_groups(model, criterion.name, ids, activations, params, device, dtype,
                              layer_weights=layer_weights)
        seconds = time.perf_counter() - started
        scores.metadata.update({
            "criterion": criterion.name, "command": command_line(), "device": str(device),
            "execution": execution_of(layer_weights),
            "calibration_samples": str(ids.shape[0]), "calibration_seq_len": str(ids.shape[1]),
            RECORD_KEY: json.dumps(recorder(STAGE, {"criterion": criterion.name}, inputs={
                "model": args.model, "calibration": args.calibration, "activations": args.activations,
            }).record(params), sort_keys=True),
        })
        scores.save(args.out)
        metrics = {"seconds": seconds}
        if device.type == "cuda":
            metrics["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        run.log_metrics(metrics)


if __name__ == "__main__":
    run_cli(STAGE, main)
