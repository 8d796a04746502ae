"""Plumbing shared by the stage CLIs: argument parsing, clear errors, device and logging setup."""

from __future__ import annotations

import argparse
import logging
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
    logging.basicConfig(level=logging.INFO, format=f"[{stage}] %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    started = time.perf_counter()
    try:
        main(argv)
    except PruneflowError as exc:
        print(f"pruneflow {stage}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.getLogger(__name__).info("done in %.1f s", time.perf_counter() - started)


def require_file(path: Path, what: str) -> Path:
    from pruneflow.errors import DataError

    if not path.exists():
        raise DataError(f"{what} {str(path)!r} does not exist; run the stage that makes it first")
    return path
