"""Plumbing shared by the stage CLIs: argument parsing, clear errors, device and logging setup."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pruneflow.errors import PruneflowError


def parser_for(stage: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m pruneflow.stages.{stage}", description=description)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default params.yaml)")
    return parser


def command_line() -> str:
    """The command that produced an output, as a user would retype it."""
    module = sys.modules["__main__"].__spec__
    name = module.name if module is not None else sys.argv[0]
    return " ".join(["python", "-m", name, *map(shlex.quote, sys.argv[1:])])


def run_cli(stage: str, main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> None:
    """Run a stage; a PruneflowError is printed as one clear line and exits with status 2."""
    from pruneflow.progress import configure_logging

    configure_logging(stage)
    started = time.perf_counter()
    try:
        if os.environ.get("DVC_STAGE"):
            check_before_dvc_runs(argv)
        main(argv)
    except PruneflowError as exc:
        print(f"pruneflow {stage}: error: {exc}", file=sys.stderr)  # the one line a failed job's log ends with
        raise SystemExit(2) from None
    logging.getLogger(__name__).info("done in %.1f s", time.perf_counter() - started)


def check_before_dvc_runs(argv: Sequence[str] | None) -> None:
    """Under `dvc repro` (DVC_STAGE is set), the first stage DVC starts checks the whole plan, as `snakemake`
    does before any job: a bad params.yaml or input stops it before any work. A dvc.yaml that no longer
    matches params.yaml and the source (other data files, new imports) is regenerated and the run stopped,
    since DVC planned it without those dependencies."""
    from pruneflow.config import load_params
    from pruneflow.errors import ConfigError
    from pruneflow.pipeline.plan import refresh_dvc_yaml
    from pruneflow.pipeline.preflight import check_plan

    only_params = argparse.ArgumentParser(add_help=False)
    only_params.add_argument("--params", type=Path, default=Path("params.yaml"))
    known, _ = only_params.parse_known_args(argv)
    params = load_params(known.params)
    root = Path.cwd()
    check_plan(params, root)
    changed = refresh_dvc_yaml(params, root)
    if changed:
        raise ConfigError(f"dvc.yaml did not match params.yaml and the source ({changed}); it has been regenerated: "
                          "run `dvc repro` again")


def require_file(path: Path, what: str) -> Path:
    from pruneflow.errors import DataError

    if not path.exists():
        raise DataError(f"{what} {str(path)!r} does not exist; run the stage that makes it first")
    return path
