"""Stage 0: materialise the dense model as a local safetensors folder (from GGUF, a folder or the hub)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pruneflow.config import load_params, stage_params
from pruneflow.pipeline.atomic import atomic_dir
from pruneflow.stages.cli import command_line, parser_for, run_cli

STAGE = "prepare_model"


def main(argv: Sequence[str] | None = None) -> None:
    parser = parser_for(STAGE, __doc__)
    parser.add_argument("--out", type=Path, required=True, help="output model folder")
    args = parser.parse_args(argv)
    params = load_params(args.params)

    from pruneflow.modeling import load_source, offline_by_default
    from pruneflow.pipeline.preflight import check_model
    from pruneflow.sources import portable_location, resolve_source

    source = resolve_source(params.model.source)  # a missing path fails here, before loading anything
    check_model(params, ".")  # supported family, layer range and lengths fit: from config.json alone
    offline_by_default()

    from pruneflow.architectures import count_parameters, layer_shapes
    from pruneflow.checkpoint import save_pruned
    from pruneflow.model_card import source_card_facts, write_model_card
    from pruneflow.pipeline.records import recorder, write_record_file
    from pruneflow.pipeline.tracking import stage_run
    from pruneflow.provenance import step, write_chain

    tracked = stage_params(params, "model")
    with stage_run(STAGE, settings=params.mlflow, params=tracked) as run:
        model, tokenizer = load_source(source, revision=params.model.revision, dtype="auto")
        parameters = count_parameters(model)
        with atomic_dir(args.out) as tmp:
            save_pruned(model, tmp, tokenizer=tokenizer)
            write_record_file(tmp, recorder(STAGE).record(params))
            write_chain(tmp, [step(STAGE, command_line(), tracked, source_kind=source.kind,
                                   source_location=portable_location(source), params_count=parameters,
                                   layer_shapes=[s.to_dict() for s in layer_shapes(model)])])
            write_model_card(tmp, title=f"{portable_location(source)} (dense)", **source_card_facts(source))
        run.log_metrics({"params": parameters, "layers": len(layer_shapes(model))})


if __name__ == "__main__":
    run_cli(STAGE, main)
