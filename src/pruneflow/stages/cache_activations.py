"""Stage 2: per-layer activation statistics and token samples at o_proj / down_proj (and q/gate) inputs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from pruneflow.config import load_params, stage_params
from pruneflow.stages.cli import command_line, parser_for, require_file, run_cli

STAGE = "cache_activations"


def main(argv: Sequence[str] | None = None) -> None:
    parser = parser_for(STAGE, __doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors of statistics")
    args = parser.parse_args(argv)
    params = load_params(args.params)

    from pruneflow.runtime import resolve_device, resolve_dtype

    device = resolve_device(params.runtime.device)
    dtype = resolve_dtype(params.runtime.dtype, device)
    require_file(args.model, "model folder")

    from pruneflow.activations import activation_statistics
    from pruneflow.layerwise import FEWER_CALIBRATION_TOKENS, dtype_remedy, execution_of, open_model
    from pruneflow.pipeline.records import RECORD_KEY, recorder
    from pruneflow.pipeline.tracking import stage_run
    from pruneflow.stages.calibrate import load_calibration
    from pruneflow.tensor_files import save_tensors

    ids = load_calibration(args.calibration)
    tracked = stage_params(params, "seed", "runtime", "activations")
    with stage_run(STAGE, settings=params.mlflow, params=tracked,
                   inputs={"model": args.model, "calibration": args.calibration}) as run:
        grams = "saved" if params.activations.gram_matrices else "none"
        remedies = [FEWER_CALIBRATION_TOKENS,
                    *(["activations.gram_matrices=false (the prune stage then gathers them layer by layer)"]
                      if grams == "saved" else []), *dtype_remedy(dtype)]
        model, layer_weights = open_model(args.model, execution=params.runtime.execution, dtype=dtype, device=device,
                                          tokens=ids.numel(), grams=grams, what=STAGE, remedies=remedies)
        stats = activation_statistics(model, ids, params, device, layer_weights=layer_weights)
        record = recorder(STAGE, inputs={"model": args.model, "calibration": args.calibration}).record(params)
        save_tensors(args.out, stats, {"command": command_line(), "device": str(device),
                                       "execution": execution_of(layer_weights),
                                       RECORD_KEY: json.dumps(record, sort_keys=True)})
        run.log_metrics({"tokens": int(stats["num_tokens"].item()), "tensors": len(stats)})


if __name__ == "__main__":
    run_cli(STAGE, main)
