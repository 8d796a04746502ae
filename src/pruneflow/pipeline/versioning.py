"""Keep DVC's record and Snakemake's view of the same files in step.

Snakemake decides what to rerun from file times and its own metadata; DVC from content hashes in
dvc.lock. Two commands bridge them:

- `commit`: after a Snakemake run, record in dvc.lock (and the DVC cache) every DVC stage whose
  outputs Snakemake just built or found up to date, so `dvc status` is clean and `dvc push` works.
  The Snakefile's `onsuccess` hook calls it when the project is a DVC repository.
- `checkout`: `dvc checkout`, then give the outputs file times in pipeline order (upstream older),
  because a checkout writes files in any order and Snakemake would rerun what looks out of date.

`dvc_hash` (from `pruneflow.pipeline.hashing`) computes DVC's own content hash, so MLflow runs and
stage records can name the exact inputs they read.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from pruneflow.pipeline.hashing import dvc_hash  # noqa: F401  (re-exported: `versioning.dvc_hash`)
from pruneflow.progress import configure_logging

log = logging.getLogger(__name__)

DISABLE_ENV = "PRUNEFLOW_DVC_COMMIT"
# pipeline order becomes file-time order in steps of this many nanoseconds
_MTIME_STEP_NS = 10_000_000
# where the Snakefile's `benchmark:` files live (Snakemake counts them among a job's outputs)
SNAKEMAKE_BENCHMARKS = "logs/benchmarks"


def is_dvc_project(root: str | Path = ".") -> bool:
    return (Path(root) / ".dvc").is_dir() and (Path(root) / "dvc.yaml").is_file()


def _relative(path: str | Path, root: Path) -> str:
    absolute = Path(path) if Path(path).is_absolute() else root / path
    return os.path.relpath(os.path.normpath(absolute), root)


def _stages_upstream_first(repo) -> list:
    """DVC stages in pipeline order (a stage after every stage it depends on)."""
    import networkx as nx

    graph = repo.index.graph  # edges point from a stage to the stages it depends on
    return list(reversed(list(nx.topological_sort(graph))))


def _stage_outs(stage, root: Path) -> list[str]:
    return [_relative(out.fs_path, root) for out in stage.outs]


def commit_built_stages(root: str | Path, built_outputs: Iterable[str]) -> list[str]:
    """Record in dvc.lock each DVC stage whose every output is among `built_outputs` and exists.

    Only outputs of the Snakemake run's DAG count as built: an output left from an older config
    is never recorded as if the current params made it. Returns the committed stage names.

    This is `dvc commit --force` for many stages in one pass: under one repository lock each stage's
    hashes are saved and its outputs linked to the cache, then dvc.lock is written once. `Repo.commit`
    takes one target and re-reads and rewrites dvc.lock (and dvc.yaml) per call: 38 s instead of 5 s
    on a 16-stage DAG, nearly all of it YAML parsing, growing with the square of the stage count.
    """
    from dvc.repo import Repo, lock_repo

    root = Path(root).resolve()
    built = {_relative(path, root) for path in built_outputs}
    committed = []
    with contextlib.chdir(root), Repo(str(root)) as repo, lock_repo(repo):  # DVC names stages from the cwd
        for stage in _stages_upstream_first(repo):
            outs = _stage_outs(stage, root)
            if not outs or not all(out in built and (root / out).exists() for out in outs):
                continue
            times = _file_times(root / out for out in outs)
            stage.save()  # what `dvc commit --force` does per stage (dvc/repo/commit.py)
            stage.commit(relink=True)
            _restore_file_times(times)
            committed.append(stage)
        by_file: dict[str, list] = {}
        for stage in committed:
            by_file.setdefault(stage.dvcfile.relpath, []).append(stage)
        for stages in by_file.values():
            stages[0].dvcfile.dump_stages(stages, update_pipeline=False)
        return [stage.addressing for stage in committed]  # names relative to the root


def _file_times(outputs: Iterable[Path]) -> dict[Path, tuple[int, int]]:
    """(atime, mtime) of each output and everything inside an output folder."""
    times = {}
    for out in outputs:
        for item in [*(out.rglob("*") if out.is_dir() else ()), out]:
            info = item.lstat()
            times[item] = (info.st_atime_ns, info.st_mtime_ns)
    return times


def _restore_file_times(times: dict[Path, tuple[int, int]]) -> None:
    """Give outputs their times back after `dvc commit`: linking a file to the cache replaces it with the
    cache's copy, dated now, which Snakemake would take for an input newer than the jobs that read it
    (its checksum fallback covers only files up to 1 MB)."""
    for item, (atime, mtime) in times.items():
        with contextlib.suppress(OSError):
            if item.lstat().st_mtime_ns != mtime:
                os.utime(item, ns=(atime, mtime), follow_symlinks=False)


def order_output_times(root: str | Path, now_ns: int | None = None,
                       snakemake_benchmarks: str = SNAKEMAKE_BENCHMARKS) -> list[str]:
    """Give existing DVC outputs file times in pipeline order (each stage newer than its inputs).

    Every file inside an output folder gets its stage's time as well (Snakemake reads a folder's
    time from its files). Snakemake also counts a job's benchmark file as an output, so the files
    under `snakemake_benchmarks` are dated after every output. Returns the outputs touched.
    """
    from dvc.repo import Repo

    root = Path(root).resolve()
    stamp = now_ns if now_ns is not None else time.time_ns()
    touched = []
    with contextlib.chdir(root), Repo(str(root)) as repo:
        stages = _stages_upstream_first(repo)
    for index, stage in enumerate(stages):
        when = stamp + index * _MTIME_STEP_NS
        for out in _stage_outs(stage, root):
            path = root / out
            if not path.exists():
                continue
            inner = sorted(path.rglob("*"), reverse=True) if path.is_dir() else []
            for item in [*inner, path]:  # children first, the folder itself last
                os.utime(item, ns=(when, when), follow_symlinks=False)
            touched.append(out)
    benchmarks = root / snakemake_benchmarks
    if benchmarks.is_dir():
        when = stamp + len(stages) * _MTIME_STEP_NS
        for item in benchmarks.rglob("*"):
            os.utime(item, ns=(when, when), follow_symlinks=False)
    return touched


def checkout(root: str | Path, targets: Sequence[str] = ()) -> list[str]:
    """`dvc checkout` (optionally of some targets), then pipeline-ordered output times."""
    from dvc.repo import Repo

    root = Path(root).resolve()  # before the chdir: a relative root names a folder below the caller's cwd
    with contextlib.chdir(root), Repo(str(root)) as repo:
        if targets:
            for target in targets:
                repo.checkout(target, force=True)
        else:
            repo.checkout(force=True)
    return order_output_times(root)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pruneflow.pipeline.versioning", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commit = commands.add_parser("commit", help="record Snakemake-built outputs in dvc.lock")
    commit.add_argument("--outputs-file", required=True,
                        help="text file with one built output path per line (- for standard input)")
    restore = commands.add_parser("checkout", help="dvc checkout, then file times in pipeline order")
    restore.add_argument("targets", nargs="*", help="DVC stages or outputs (default: all)")
    args = parser.parse_args(argv)
    configure_logging("pruneflow")
    root = Path.cwd()
    if not is_dvc_project(root):
        log.error("%s is not a DVC project (no .dvc/ or dvc.yaml); nothing to do", root)
        return 2
    if args.command == "commit":
        text = sys.stdin.read() if args.outputs_file == "-" else Path(args.outputs_file).read_text()
        outputs = [line.strip() for line in text.splitlines() if line.strip()]
        committed = commit_built_stages(root, outputs)
        log.info("recorded %d DVC stage(s) in dvc.lock: %s", len(committed), ", ".join(committed) or "none")
    else:
        touched = checkout(root, args.targets)
        log.info("checked out; %d output(s) dated in pipeline order", len(touched))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
