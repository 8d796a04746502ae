"""The `pruneflow` command: the pipeline (`run`, `repro`, `status`), one model without the DAG
(`prune`, `evaluate`, `export-gguf`), the results (`report`, `ui`).

Written with argparse: each subcommand either hands its arguments to the tool that does the work
(Snakemake, DVC, the MLflow UI) or calls the same stage module or core function the DAG runs, so
there is one implementation of every step. Imports stay inside the subcommands: `pruneflow --help`
and `pruneflow prune` need neither Snakemake, DVC nor MLflow installed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from pruneflow import __version__
from pruneflow.errors import ConfigError, PruneflowError

log = logging.getLogger("pruneflow")

SNAKEFILE = Path("workflow/Snakefile")
PARAMS_FILE = Path("params.yaml")
# Snakemake options that already say how many cores / jobs to use: then no `--cores all` is added
_CORE_OPTIONS = ("--cores", "-c", "--jobs", "-j", "--profile", "--workflow-profile")


def snakemake_command(passed: Sequence[str]) -> list[str]:
    """The Snakemake command `pruneflow run` starts: every option passed through, `--cores all` unless
    the caller chose the cores, jobs or a profile (`--cores=4`, `-c4` and `-j 2` count)."""
    chooses_cores = any(arg == option or arg.startswith(option + "=") or
                        (len(option) == 2 and arg.startswith(option) and arg[2:].isdigit())
                        for arg in passed for option in _CORE_OPTIONS)
    return [sys.executable, "-m", "snakemake", *([] if chooses_cores else ["--cores", "all"]), *passed]


def _project_root() -> Path:
    """The pipeline runs from the project root (where workflow/Snakefile and params.yaml live)."""
    root = Path.cwd()
    if not (root / SNAKEFILE).is_file():
        raise ConfigError(f"{str(root)!r} is not a pruneflow project: no {SNAKEFILE} here; allowed: run "
                          "`pruneflow run` from the project root (the folder with params.yaml and workflow/)")
    return root


def _exec(command: list[str]) -> int:
    """Run a tool with this interpreter (`python -m ...`; `_module_available` checked it is installed)."""
    log.debug("running %s", shlex.join(command))
    return subprocess.call(command)


def _module_available(module: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"the {module!r} package is not installed; install it with pip install 'pruneflow[{extra}]'")


# --------------------------------------------------------------------------------------- subcommands

def cmd_run(args: argparse.Namespace, passed: list[str]) -> int:
    _project_root()
    _module_available("snakemake", "pipeline")
    return _exec(snakemake_command(passed))


def cmd_repro(args: argparse.Namespace, passed: list[str]) -> int:
    _project_root()
    _module_available("dvc", "pipeline")
    return _exec([sys.executable, "-m", "dvc", "repro", *passed])


def cmd_status(args: argparse.Namespace, passed: list[str]) -> int:
    from pruneflow.pipeline.plan import main as plan_main

    plan_main(["--params", str(args.params), *(["--json"] if args.json else []), "--no-devices"])
    return 0


def _read_model(spec: str, revision: str | None):
    """A model folder (dense or pruned, any dtype), or a source as `model.source` takes it (a hub id,
    the embedded GGUF): (model, tokenizer, folder or None, source or None)."""
    from pruneflow.checkpoint import checkpoint_dtype, load_pruned
    from pruneflow.modeling import load_source, load_tokenizer, offline_by_default
    from pruneflow.sources import resolve_source

    folder = Path(spec).expanduser()
    if (folder / "config.json").is_file():
        return load_pruned(folder, dtype=checkpoint_dtype(folder)), load_tokenizer(folder), folder, None
    source = resolve_source(spec)  # a missing path or unknown spelling fails here, naming it
    offline_by_default()
    model, tokenizer = load_source(source, revision=revision, dtype="auto")
    return model, tokenizer, None, source


def _one_shot_params(args: argparse.Namespace):
    from pruneflow.config import load_params, params_from_mapping

    if args.params is not None:
        return load_params(args.params)
    return load_params(PARAMS_FILE) if PARAMS_FILE.is_file() else params_from_mapping({})


def cmd_prune(args: argparse.Namespace, passed: list[str]) -> int:
    import dataclasses

    from pruneflow.config import format_ratio, parse_ratio
    from pruneflow.importance import get_criterion

    params = _one_shot_params(args)
    ratio = parse_ratio(args.ratio)
    get_criterion(args.criterion, params.score)  # a bad name fails before any loading
    if args.device is not None:
        params = dataclasses.replace(params, runtime=dataclasses.replace(params.runtime, device=args.device))
        params.runtime.validate("--device")
    calibration_file = args.calibration_file or Path(params.calibration.source)
    params = dataclasses.replace(params, calibration=dataclasses.replace(params.calibration,
                                                                         source=str(calibration_file)))
    from pruneflow.pipeline.preflight import check_calibration_source
    from pruneflow.text_data import read_rows

    check_calibration_source(params, ".")  # readable, and never one of the evaluation files
    rows = read_rows(calibration_file, "--calibration-file")
    if args.out.exists() and not args.force:
        raise ConfigError(f"--out {str(args.out)!r} exists; allowed: a new folder, or pass --force to replace it")

    from pruneflow.checkpoint import save_pruned
    from pruneflow.model_card import source_card_facts, write_model_card
    from pruneflow.oneshot import prune
    from pruneflow.pipeline.atomic import atomic_dir
    from pruneflow.provenance import read_chain, step, write_chain
    from pruneflow.sources import portable_location
    from pruneflow.stages.prune import SUMMARY_FILE

    model, tokenizer, folder, source = _read_model(args.model, params.model.revision)
    dtype = next(model.parameters()).dtype
    result = prune(model, tokenizer, rows, criterion=args.criterion, ratio=float(ratio), params=params,
                   servable=args.servable)
    summary = {**result.summary, "command": _command_line(args)}
    summary.pop("surgery_seconds")  # the folder stays byte-identical across reruns
    kind = "servable" if args.servable else "pruned"
    with atomic_dir(args.out) as tmp:
        save_pruned(model, tmp, tokenizer=tokenizer, dtype=dtype)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        chain = read_chain(folder) if folder is not None else []
        chain.append(step("prune", _command_line(args), {"criterion": args.criterion, "ratio": float(ratio),
                                                     "servable": args.servable, "params": str(args.params or "")},
                          params_before=result.params_before, params_after=result.params_after,
                          achieved_ratio=result.achieved_ratio,
                          source=str(folder) if folder is not None else portable_location(source)))
        write_chain(tmp, chain)
        facts = source_card_facts(source) if source is not None else {}
        write_model_card(tmp, parent=folder, title=f"{kind} {args.criterion} {format_ratio(ratio)}", **facts)
    print(json.dumps({"out": str(args.out), "criterion": args.criterion, "requested_ratio": float(ratio),
                      "achieved_ratio": round(result.achieved_ratio, 6), "params_before": result.params_before,
                      "params_after": result.params_after}))
    return 0


def cmd_evaluate(args: argparse.Namespace, passed: list[str]) -> int:
    _module_available("lm_eval", "eval")
    from pruneflow.stages import evaluate

    out = args.out or Path(f"{Path(args.model).name}.metrics.json")
    evaluate.main(["--params", str(args.params), "--model", str(args.model),
                   "--model-id", args.model_id or Path(args.model).name, "--data-dir", str(args.data_dir),
                   "--out", str(out)])
    metrics = json.loads(out.read_text())
    print(json.dumps({"out": str(out), "perplexity": {k: v.get("ppl") for k, v in metrics.get("perplexity", {}).items()},
                      "zeroshot_average": metrics.get("zeroshot_average")}))
    return 0


def cmd_report(args: argparse.Namespace, passed: list[str]) -> int:
    _module_available("matplotlib", "pipeline")
    from pruneflow.pipeline.graph import STAGES, outputs_of
    from pruneflow.stages import report

    outputs = outputs_of(STAGES["report"], {})
    report.main(["--params", str(args.params), "--metrics-dir", str(args.metrics_dir),
                 "--out", outputs["markdown"], "--csv", outputs["csv"], "--plots-dir", outputs["plots"]])
    print(outputs["markdown"])
    return 0


def cmd_export_gguf(args: argparse.Namespace, passed: list[str]) -> int:
    _module_available("gguf", "gguf")
    from pruneflow.gguf_export import export_gguf

    out = export_gguf(args.model, args.out, args.type, name=args.name or Path(args.model).name,
                      tokenizer_pre=args.tokenizer_pre)
    print(out)
    return 0


def cmd_ui(args: argparse.Namespace, passed: list[str]) -> int:
    _module_available("mlflow", "pipeline")
    from pruneflow.config import load_params

    uri = args.tracking_uri or load_params(args.params).mlflow.tracking_uri
    return _exec([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
                  "--port", str(args.port), *passed])


# ------------------------------------------------------------------------------------------- parsing

def _command_line(args: argparse.Namespace) -> str:
    """The command as a user would retype it (for the summary and the provenance)."""
    return shlex.join(["pruneflow", *args.argv])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pruneflow", description="Structural pruning, recovery and evaluation of LLMs as a reproducible "
        "pipeline (Snakemake + DVC + MLflow), or one model at a time.")
    parser.add_argument("--version", action="version", version=f"pruneflow {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, handler, help: str, passthrough: str | None = None) -> argparse.ArgumentParser:
        description = help + (f"\n\nEvery other option is passed to {passthrough}." if passthrough else "")
        p = sub.add_parser(name, help=help, description=description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(handler=handler, passthrough=passthrough is not None)
        return p

    add("run", cmd_run, "run the whole DAG with Snakemake from the project root (default --cores all), e.g. "
        "`pruneflow run --resources gpu=2`, `pruneflow run -n`", passthrough="snakemake")
    add("repro", cmd_repro, "run the same stages with DVC (`dvc repro`)", passthrough="dvc repro")
    p = add("status", cmd_status, "which pipeline outputs are fresh, stale or missing, and why")
    p.add_argument("--params", type=Path, default=PARAMS_FILE)
    p.add_argument("--json", action="store_true", help="print the verdicts as JSON")

    p = add("prune", cmd_prune, "prune one model without the DAG: calibration, activation statistics, scoring, "
            "removal and re-fit in one process (the same functions and settings as the pipeline)")
    p.add_argument("model", help="a model folder, a hub id, or embedded:smollm2-135m-instruct")
    p.add_argument("--criterion", default="obs", help="importance criterion (default obs)")
    p.add_argument("--ratio", required=True, help="fraction of all parameters to remove, in [0, 1)")
    p.add_argument("--out", type=Path, required=True, help="the checkpoint folder to write")
    p.add_argument("--params", type=Path, default=None,
                   help="params file (default: ./params.yaml when present, else the built-in defaults)")
    p.add_argument("--calibration-file", type=Path, default=None,
                   help="text file with one document per line (default: calibration.source)")
    p.add_argument("--servable", action="store_true", help="every layer pruned to one width: a vanilla config")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: runtime.device)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")

    p = add("evaluate", cmd_evaluate, "perplexity, zero-shot accuracy, size and speed of one model folder")
    p.add_argument("model", type=Path, help="a model folder")
    p.add_argument("--params", type=Path, default=PARAMS_FILE)
    p.add_argument("--out", type=Path, default=None, help="metrics JSON (default: <folder name>.metrics.json)")
    p.add_argument("--model-id", default=None, help="the name in the metrics (default: the folder name)")
    p.add_argument("--data-dir", type=Path, default=Path("data/raw"))

    p = add("report", cmd_report, "results table (markdown + csv) and plots from reports/metrics")
    p.add_argument("--params", type=Path, default=PARAMS_FILE)
    p.add_argument("--metrics-dir", type=Path, default=Path("reports/metrics"))

    p = add("export-gguf", cmd_export_gguf, "write a checkpoint folder as one GGUF file for llama.cpp")
    p.add_argument("model", type=Path, help="a model folder")
    p.add_argument("--out", type=Path, required=True, help="the .gguf file to write")
    p.add_argument("--type", default="q8_0", help="f32 | bf16 | f16 | q8_0 (default q8_0)")
    p.add_argument("--name", default=None, help="general.name (default: the folder name)")
    p.add_argument("--tokenizer-pre", default="default", help="llama.cpp's pre-tokenizer name (default: default)")

    p = add("ui", cmd_ui, "the MLflow UI on the configured tracking store (mlflow.tracking_uri)",
            passthrough="mlflow ui")
    p.add_argument("--params", type=Path, default=PARAMS_FILE)
    p.add_argument("--tracking-uri", default=None, help="another store than mlflow.tracking_uri")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    args.argv = argv
    if rest and not args.passthrough:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from pruneflow.progress import configure_logging

    configure_logging(args.command, debug=args.verbose)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.handler(args, rest)
    except PruneflowError as exc:
        print(f"pruneflow {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
