"""Stage 1: sample N x L calibration token windows from a training split (never an evaluation split)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from pruneflow.config import load_params, stage_params
from pruneflow.stages.cli import command_line, parser_for, require_file, run_cli

STAGE = "calibrate"


def main(argv: Sequence[str] | None = None) -> None:
    parser = parser_for(STAGE, __doc__)
    parser.add_argument("--model", type=Path, required=True, help="model folder (its tokenizer is used)")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors with input_ids")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    cfg = params.calibration

    from pruneflow.modeling import load_tokenizer, offline_by_default
    from pruneflow.pipeline.preflight import check_calibration_source
    from pruneflow.text_data import read_rows, sample_calibration

    offline_by_default()
    require_file(args.model, "model folder")
    check_calibration_source(params, ".")  # never an evaluation file, by path or content
    rows = read_rows(cfg.source, "calibration.source")
    tokenizer = load_tokenizer(args.model)

    from pruneflow.pipeline.records import RECORD_KEY, recorder
    from pruneflow.pipeline.tracking import stage_run
    from pruneflow.tensor_files import save_tensors

    tracked = stage_params(params, "seed", "calibration")
    with stage_run(STAGE, settings=params.mlflow, params=tracked,
                   inputs={"model": args.model, "text": cfg.source}) as run:
        calibration = sample_calibration(rows, tokenizer, cfg.num_samples, cfg.seq_len, params.seed)
        metadata = {
            "source": cfg.source,
            "seed": str(params.seed),
            "row_indices": json.dumps(calibration.row_indices),
            "offsets": json.dumps(calibration.offsets),
            "command": command_line(),
            RECORD_KEY: json.dumps(recorder(STAGE, inputs={"model": args.model}).record(params), sort_keys=True),
        }
        save_tensors(args.out, {"input_ids": calibration.input_ids.contiguous()}, metadata)
        run.log_metrics({"num_samples": cfg.num_samples, "seq_len": cfg.seq_len,
                         "tokens": calibration.input_ids.numel()})


def load_calibration(path: Path):
    """Read the calibration ids back (shape [num_samples, seq_len])."""
    from safetensors.torch import load_file

    from pruneflow.errors import DataError

    require_file(path, "calibration file")
    try:
        return load_file(str(path))["input_ids"]
    except Exception as exc:
        raise DataError(f"calibration file {str(path)!r} is unreadable: {exc}") from exc


if __name__ == "__main__":
    run_cli(STAGE, main)
