"""Progress bars and log setup shared by every entry point.

Under Snakemake a stage's stdout and stderr go to its log file; the rule also hands the console to
the stage as file descriptor `PRUNEFLOW_PROGRESS_FD` (see `pipeline.snakemake_support`), and the bars
are drawn there, so a long job shows its progress while its log stays a clean record. Elsewhere
(`dvc repro`, a stage run by hand, `pruneflow prune`) they go to stderr. `PRUNEFLOW_PROGRESS=0`
turns them off. tqdm draws them; this module only picks the stream.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import IO, Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")
PROGRESS_FD_ENV = "PRUNEFLOW_PROGRESS_FD"
PROGRESS_ENV = "PRUNEFLOW_PROGRESS"
_NOISY_LOGGERS = ("httpx", "urllib3", "datasets", "filelock", "alembic", "mlflow", "git")
_streams: dict[int, IO[str]] = {}


def progress_stream() -> IO[str]:
    """The console: the descriptor the Snakemake rule passes, else stderr (also when it is not open)."""
    fd = os.environ.get(PROGRESS_FD_ENV, "")
    if fd.isdigit():
        number = int(fd)
        if number not in _streams:
            try:
                os.fstat(number)  # open in this process (the rule opens it; elsewhere fall back)
                _streams[number] = os.fdopen(number, "w", buffering=1, closefd=False)
            except OSError:
                return sys.stderr
        return _streams[number]
    return sys.stderr


def progress(iterable: Iterable[T] | None = None, *, desc: str, total: int | None = None, unit: str = "it",
             **kwargs: Any) -> tqdm:
    """A tqdm bar on the console stream, cleared when it completes (the log lines carry the milestones)."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=progress_stream(), dynamic_ncols=True,
                mininterval=1.0, leave=False, disable=os.environ.get(PROGRESS_ENV) == "0", **kwargs)


def configure_logging(name: str, debug: bool = False) -> None:
    """`[name] message` lines on stderr at INFO (DEBUG with `debug`); chatty libraries at WARNING."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format=f"[{name}] %(message)s",
                        stream=sys.stderr, force=True)
    for noisy in _NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
