"""Stage: one checkpoint as a GGUF file for llama.cpp (`pruneflow.gguf_export`), in `export.gguf_type`.

The pipeline exports the servable checkpoints (one width in every layer: llama.cpp's `llama` / `qwen2`
graphs, which transformers' GGUF loader reads too); run it by hand on any other folder, per-layer
checkpoints included (llama.cpp's `deci` graph): `python -m pruneflow.stages.export_gguf --model
data/recovered/obs/0.2 --out obs-0.2.gguf`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pruneflow.config import load_params, stage_params
from pruneflow.stages.cli import parser_for, require_file, run_cli

STAGE = "export_gguf"


def tokenizer_pre(configured: str | None, model_source: str) -> str:
    """llama.cpp's pre-tokenizer name: the configured one, else the source GGUF's, else "default"."""
    if configured:
        return configured
    from pruneflow.config import EMBEDDED_SMOLLM2
    from pruneflow.sources import resolve_source

    if model_source != EMBEDDED_SMOLLM2:  # a folder or hub id holds no GGUF header to read (nor is it an input)
        return "default"

    source = resolve_source(model_source)
    if source.kind == "embedded":
        from gguf import GGUFReader

        field = GGUFReader(str(Path(source.location) / source.gguf_file)).fields.get("tokenizer.ggml.pre")
        if field is not None and field.data:
            return bytes(field.parts[field.data[0]]).decode("utf-8")
    return "default"


def main(argv: Sequence[str] | None = None) -> None:
    parser = parser_for(STAGE, __doc__)
    parser.add_argument("--model", type=Path, required=True, help="checkpoint folder")
    parser.add_argument("--out", type=Path, required=True, help="the .gguf file to write")
    parser.add_argument("--name", default=None, help="general.name in the file (default: the folder's path)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    require_file(args.model, "model folder")

    import json

    from pruneflow.gguf_export import export_gguf
    from pruneflow.pipeline.records import RECORD_KEY, read_record, recorder
    from pruneflow.pipeline.tracking import stage_run

    settings = params.export
    pre = tokenizer_pre(settings.gguf_tokenizer_pre, params.model.source)
    # a servable grid instance is recorded as its export_gguf instance; any other folder under its own name
    upstream = str((read_record(args.model) or {}).get("instance", "")).split("/")
    values = dict(zip(("criterion", "ratio"), upstream[1:], strict=True)) \
        if len(upstream) == 3 and upstream[0] == "prune_servable" else None
    record = recorder(STAGE, values, inputs={"model": args.model},
                      instance=None if values else f"{STAGE}/{args.model}").record(params)
    with stage_run(STAGE, settings=params.mlflow, params=stage_params(params, "export"),
                   run_name=f"export_gguf {args.model}", inputs={"model": args.model}) as run:
        out = export_gguf(args.model, args.out, settings.gguf_type, name=args.name or str(args.model),
                          tokenizer_pre=pre, metadata={RECORD_KEY: json.dumps(record, sort_keys=True)})
        run.log_metrics({"gguf_bytes": out.stat().st_size})


if __name__ == "__main__":
    run_cli(STAGE, main)
