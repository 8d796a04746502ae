"""MLflow tracking for pipeline stages: one parent run per pipeline invocation, one nested run per stage.

Every stage is its own process (Snakemake / DVC start `python -m pruneflow.stages.<name>`), so the
stages of one invocation find their common parent run through a shared key: the
`PRUNEFLOW_INVOCATION_ID` environment variable (the Snakefile sets it), else the nearest `dvc` /
`snakemake` ancestor process. The parent is found-or-created under a file lock so stages that start
in parallel share one parent.

Tracking is a convenience, never a reason to lose work: any MLflow failure (bad URI, server down,
locked sqlite) is reported once on stderr and the remaining tracking calls of that stage become
no-ops. With `enabled: false` MLflow is never imported; it is imported lazily in any case because
`import mlflow` costs seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import getpass
import hashlib
import math
import numbers
import os
import random
import re
import shlex
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from pruneflow.config import MlflowParams

__all__ = [
    "INVOCATION_ENV",
    "PipelineAncestor",
    "ProcessInfo",
    "StageRun",
    "describe_ui",
    "engine_of",
    "find_pipeline_ancestor",
    "finish_invocation",
    "new_invocation_id",
    "resolve_tracking_uri",
    "stage_run",
]


INVOCATION_ENV = "PRUNEFLOW_INVOCATION_ID"
ENGINES = ("snakemake", "dvc")

# Tags that identify our runs; `pruneflow.kind` separates the parent from its stage runs, which also
# carry the invocation tag so the UI can filter one invocation's stages.
TAG_INVOCATION = "pruneflow.invocation"
TAG_KIND = "pruneflow.kind"
TAG_ENGINE = "pruneflow.engine"
TAG_STAGE = "pruneflow.stage"
TAG_COMMAND = "pruneflow.command"
TAG_GIT_COMMIT = "pruneflow.git_commit"
TAG_GIT_DIRTY = "pruneflow.git_dirty"
TAG_INPUT_PREFIX = "pruneflow.input."  # + role: the path; + role + ".dvc_md5": its DVC hash
PARENT_TAG = "mlflow.parentRunId"

_MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
_MAX_TAG_VALUE = 5000  # below MAX_TAG_VAL_LENGTH (8000), leaves room for multi-byte text
_MAX_KEY = 250
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_LOCK_TIMEOUT_S = 120.0
_LOCKED_RETRIES = 4
# A down server must cost seconds, not MLflow's default 7 retries x 120 s.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}
_TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")

# Stage runs open in this process: finish_invocation must not mark them KILLED as orphans.
_OPEN_RUNS: set[str] = set()

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# Invocation key: environment variable, else the nearest dvc / snakemake ancestor process
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """What ancestor detection needs from a process; tests build chains of these by hand."""

    pid: int
    create_time: float
    cmdline: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class PipelineAncestor:
    """The dvc / snakemake process that (transitively) started this one."""

    engine: str
    pid: int
    create_time: float
    cmdline: tuple[str, ...]

    @property
    def key(self) -> str:
        """Same for every stage the process starts, unique across invocations (pid + start time)."""
        return f"{self.engine}-{self.pid}-{self.create_time:.2f}"


@dataclasses.dataclass(frozen=True)
class Invocation:
    key: str
    engine: str
    command: str | None


def new_invocation_id() -> str:
    """A readable, unique id for the Snakefile to put into `PRUNEFLOW_INVOCATION_ID`."""
    return f"{_dt.datetime.now():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"


def process_chain() -> Iterator[ProcessInfo]:
    """This process, then its parent, grandparent, ... (processes we may not inspect are skipped)."""
    import psutil

    try:
        proc: Any = psutil.Process()
    except (psutil.Error, OSError):
        return
    for _ in range(128):  # guards against pathological parent loops
        info = None
        with contextlib.suppress(psutil.Error, OSError):
            info = ProcessInfo(proc.pid, proc.create_time(), tuple(proc.cmdline()))
        if info is not None:
            yield info
        try:
            proc = proc.parent()
        except (psutil.Error, OSError):
            return
        if proc is None:
            return


def _program_name(path: str) -> str:
    name = re.split(r"[\\/]", path)[-1].lower()
    for suffix in ("-script.py", ".exe", ".py"):
        name = name.removesuffix(suffix)
    return name


def _is_python(program: str) -> bool:
    return re.fullmatch(r"python[\d.]*[a-z]?|pypy[\d.]*", program) is not None


# Interpreter options that consume the next argument (so it is not mistaken for the script).
_PY_OPTS_WITH_ARG = {"-X", "-W", "--check-hash-based-pycs"}


def engine_of(cmdline: Iterable[str]) -> str | None:
    """'snakemake' / 'dvc' if the command line runs one of them, including `python -m snakemake` and
    console scripts (`/venv/bin/python /venv/bin/dvc repro`, how Linux shows an entry-point script)."""
    args = list(cmdline)
    if not args:
        return None
    program = _program_name(args[0])
    if program in ENGINES:
        return program
    if not _is_python(program):
        return None
    i = 1
    while i < len(args):
        arg = args[i]
        if arg == "-m":
            module = args[i + 1] if i + 1 < len(args) else ""
            break
        if arg.startswith("-m") and not arg.startswith("--"):
            module = arg[2:]
            break
        if arg == "-c" or (arg.startswith("-c") and not arg.startswith("--")):
            return None
        if arg in _PY_OPTS_WITH_ARG:
            i += 2
            continue
        if arg.startswith("-"):
            i += 1
            continue
        program = _program_name(arg)
        return program if program in ENGINES else None
    else:
        return None
    root = module.split(".")[0]
    return root if root in ENGINES else None


def _is_snakemake_job_runner(cmdline: tuple[str, ...]) -> bool:
    """Snakemake re-spawns itself per job (`--target-jobs ...`); the invocation is its ancestor."""
    return any(arg == "--target-jobs" or arg.startswith("--target-jobs=") for arg in cmdline)


def find_pipeline_ancestor(chain: Iterable[ProcessInfo] | None = None) -> PipelineAncestor | None:
    """The nearest dvc / snakemake process in `chain` (default: this process and its ancestors).

    Snakemake job-runner subprocesses are skipped in favour of the snakemake that spawned them, so
    jobs of one invocation agree on the key.
    """
    fallback: PipelineAncestor | None = None
    for info in process_chain() if chain is None else chain:
        engine = engine_of(info.cmdline)
        if engine is None:
            continue
        found = PipelineAncestor(engine, info.pid, info.create_time, tuple(info.cmdline))
        if engine == "snakemake" and _is_snakemake_job_runner(found.cmdline):
            fallback = fallback or found
            continue
        return found
    return fallback


def _sanitize_invocation_key(key: str) -> str:
    # Goes into a search filter string: keep it to characters that need no quoting.
    return re.sub(r"[^A-Za-z0-9_.:-]", "_", key.strip())[:_MAX_KEY]


def resolve_invocation(chain: Iterable[ProcessInfo] | None = None) -> Invocation | None:
    """The invocation this process belongs to, or None for a standalone stage run."""
    ancestor = find_pipeline_ancestor(chain)
    command = shlex.join(ancestor.cmdline) if ancestor else None
    env_key = os.environ.get(INVOCATION_ENV, "").strip()
    if env_key:
        engine = ancestor.engine if ancestor else "standalone"
        return Invocation(_sanitize_invocation_key(env_key), engine, command)
    if ancestor is not None:
        return Invocation(_sanitize_invocation_key(ancestor.key), ancestor.engine, command)
    return None


# --------------------------------------------------------------------------------------------------
# URIs, locks, git
# --------------------------------------------------------------------------------------------------


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///path` URI (None for in-memory or non-sqlite URIs)."""
    if not uri.startswith("sqlite:///"):
        return None
    raw = uri[len("sqlite:///") :].split("?", 1)[0]
    if not raw or raw == ":memory:":
        return None
    return Path(raw).expanduser()


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative sqlite / local-path URI absolute against the cwd (the project directory).

    Stage processes and `mlflow ui` must agree on one store whatever directory MLflow resolves from.
    """
    uri = uri.strip() or "sqlite:///mlflow.db"
    path = _sqlite_path(uri)
    if path is not None:
        query = uri.split("?", 1)[1] if "?" in uri else ""
        resolved = path if path.is_absolute() else Path.cwd() / path
        return f"sqlite:///{resolved.as_posix()}" + (f"?{query}" if query else "")
    if "://" not in uri and ":" not in uri[:2]:  # a bare local folder -> file store
        return Path(uri).expanduser().resolve().as_uri()
    return uri


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _configure_http(uri: str) -> None:
    if _is_http(uri):
        for name, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)


def _lock_path(uri: str) -> Path:
    """Next to the sqlite db, else in the temp dir keyed by URI (non-file stores)."""
    db = _sqlite_path(uri)
    if db is not None:
        return db.parent / f".{db.name}.lock"
    digest = hashlib.sha1(uri.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"pruneflow-mlflow-{digest}.lock"


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    from filelock import FileLock

    path = _lock_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path), timeout=_LOCK_TIMEOUT_S):
        yield


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, cwd=os.getcwd(), check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@lru_cache(maxsize=8)
def _git_tags(cwd: str) -> dict[str, str]:
    """Commit and dirty flag of the project checkout; empty outside a git repo (never fails)."""
    del cwd  # cache key only: _git runs in the cwd
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return {}
    tags = {TAG_GIT_COMMIT: commit, "mlflow.source.git.commit": commit}
    status = _git("status", "--porcelain", "--untracked-files=no")
    if status is not None:
        tags[TAG_GIT_DIRTY] = "true" if status else "false"
    return tags


def _user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:
        return None


def _own_command() -> str:
    return shlex.join(getattr(sys, "orig_argv", None) or sys.argv)


def _source_name() -> str:
    argv = list(getattr(sys, "orig_argv", None) or sys.argv)
    if "-m" in argv[:-1]:
        return argv[argv.index("-m") + 1]
    return Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"


# --------------------------------------------------------------------------------------------------
# Value conversion
# --------------------------------------------------------------------------------------------------


def _sanitize_key(key: Any) -> str:
    """MLflow keys allow letters, digits, `_ - . / space`; anything else becomes `_`."""
    text = re.sub(r"[^\w.\- /]", "_", str(key)).strip()
    parts = [part for part in text.split("/") if part not in ("", ".", "..")]
    return ("/".join(parts) or "_")[:_MAX_KEY]


def _param_value(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return str(value)[:_MAX_PARAM_VALUE]


def _tag_value(value: Any) -> str:
    return str(value)[:_MAX_TAG_VALUE]


def _as_number(value: Any) -> float | None:
    """A finite-or-inf float for MLflow, or None for things that are not metrics (bool, NaN, text)."""
    if value is None or isinstance(value, bool | str | bytes):
        return None
    if not isinstance(value, numbers.Real):
        item = getattr(value, "item", None)  # numpy / torch scalars and 1-element tensors
        if item is None:
            return None
        try:
            value = item()
        except Exception:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return None if math.isnan(number) else number


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """{"ppl": {"wikitext2": 12.3}} -> {"ppl.wikitext2": 12.3}; non-numeric / None / NaN dropped."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, name))
            continue
        number = _as_number(value)
        if number is not None:
            flat[_sanitize_key(name)] = number
    return flat


def _chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --------------------------------------------------------------------------------------------------
# Error handling
# --------------------------------------------------------------------------------------------------


def _is_locked_error(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current).lower()
        if "database is locked" in text or "database table is locked" in text:
            return True
        current = current.__cause__ or current.__context__
    return False


def _with_retries(fn: Callable[[], T]) -> T:
    """Retry sqlite "database is locked" a few times (MLflow already waits 20 s per attempt)."""
    for attempt in range(_LOCKED_RETRIES):
        try:
            return fn()
        except Exception as exc:
            if attempt == _LOCKED_RETRIES - 1 or not _is_locked_error(exc):
                raise
        time.sleep(0.2 * 2**attempt + random.uniform(0, 0.2))
    raise AssertionError("unreachable")


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "no details"
    if len(text) > 400:
        text = text[:400] + " ..."
    return f"{type(exc).__name__}: {text}"


def _warn(message: str) -> None:
    """Tracking problems never stop a stage: one line on stderr."""
    with contextlib.suppress(Exception):
        print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# MLflow plumbing (all imports of mlflow live below this line, inside functions)
# --------------------------------------------------------------------------------------------------


def _preimport(uri: str) -> None:
    """Import MLflow's store code (~2 s) before taking the store lock, which only guards the db."""
    import importlib

    importlib.import_module("mlflow.tracking")
    if uri.startswith(("sqlite:", "postgresql", "mysql", "mssql")):
        with contextlib.suppress(Exception):
            importlib.import_module("mlflow.store.tracking.sqlalchemy_store")


def _client(uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _ensure_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """Find or create the experiment; a sqlite store keeps artifacts in `mlartifacts/` beside the db."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        db = _sqlite_path(uri)
        location = (db.parent / "mlartifacts").resolve().as_uri() if db is not None else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except Exception:
            experiment = client.get_experiment_by_name(name)  # created meanwhile by another machine
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def _find_parents(client: MlflowClient, experiment_id: str, key: str) -> list[Any]:
    query = f"tags.`{TAG_INVOCATION}` = '{key}' and tags.`{TAG_KIND}` = 'pipeline'"
    return list(
        client.search_runs([experiment_id], filter_string=query, max_results=10, order_by=["start_time ASC"])
    )


def _ensure_parent(client: MlflowClient, experiment_id: str, invocation: Invocation) -> str:
    """Find-or-create the invocation's parent run (caller holds the store lock)."""
    existing = _find_parents(client, experiment_id, invocation.key)
    if existing:
        return existing[0].info.run_id
    tags = {
        TAG_INVOCATION: invocation.key,
        TAG_KIND: "pipeline",
        TAG_ENGINE: invocation.engine,
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": invocation.engine,
        **_git_tags(os.getcwd()),
    }
    if invocation.command:
        tags[TAG_COMMAND] = _tag_value(invocation.command)
    if user := _user():
        tags["mlflow.user"] = user
    run = client.create_run(
        experiment_id, run_name=f"pipeline {_dt.datetime.now():%Y-%m-%d %H:%M:%S}", tags=tags
    )
    return run.info.run_id


def input_tags(inputs: Mapping[str, str | Path]) -> dict[str, str]:
    """Tags naming each input and its DVC hash, so a run says exactly which data it read.

    An input that cannot be hashed (missing, unreadable) is tagged with the reason instead.
    """
    from pruneflow.pipeline.hashing import dvc_hash

    tags: dict[str, str] = {}
    for role, path in inputs.items():
        key = f"{TAG_INPUT_PREFIX}{_sanitize_key(role)}"
        tags[key] = _tag_value(str(path))
        try:
            tags[f"{key}.dvc_md5"] = dvc_hash(path)
        except OSError as exc:
            tags[f"{key}.dvc_md5"] = f"unavailable ({_reason(exc)})"
    return tags


def _status_for(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "KILLED"
    if isinstance(exc, SystemExit) and exc.code in (0, None):
        return "FINISHED"
    return "FAILED"


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


class StageRun:
    """Handle to one stage's MLflow run. Every method is a no-op once tracking is off or has failed."""

    def __init__(self, stage: str, run_name: str | None = None) -> None:
        self.stage = stage
        self.run_name = run_name or stage
        self.run_id: str | None = None
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self._client: MlflowClient | None = None
        self._params: dict[str, str] = {}

    @property
    def active(self) -> bool:
        return self.run_id is not None and self._client is not None

    # -- internal ----------------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        """Report once, then switch every later call off: tracking never stops a stage."""
        _warn(
            f"pruneflow: MLflow tracking failed for stage {self.stage}: {_reason(exc)}; "
            "the stage's outputs are unaffected"
        )
        self._client = None
        if self.run_id is not None:
            _OPEN_RUNS.discard(self.run_id)
        self.run_id = None

    def _call(self, fn: Callable[[MlflowClient, str], Any]) -> None:
        client, run_id = self._client, self.run_id
        if client is None or run_id is None:
            return
        try:
            _with_retries(lambda: fn(client, run_id))
        except Exception as exc:
            self._fail(exc)

    def _start(
        self,
        settings: MlflowParams,
        params: Mapping[str, Any] | None,
        tags: Mapping[str, str] | None,
        inputs: Mapping[str, str | Path] | None = None,
    ) -> None:
        try:
            uri = resolve_tracking_uri(settings.tracking_uri)
            _configure_http(uri)
            invocation = resolve_invocation()
            _preimport(uri)
            with _store_lock(uri):
                # Creating the first client of a new sqlite db runs the schema migrations: only
                # one process may do that at a time, hence inside the lock.
                client = _with_retries(lambda: _client(uri))
                experiment_id = _with_retries(lambda: _ensure_experiment(client, settings.experiment, uri))
                parent_id = (
                    _with_retries(lambda: _ensure_parent(client, experiment_id, invocation))
                    if invocation is not None
                    else None
                )
            run_tags = {
                TAG_STAGE: self.stage,
                TAG_KIND: "stage",
                TAG_ENGINE: invocation.engine if invocation else "standalone",
                TAG_COMMAND: _tag_value(_own_command()),
                "mlflow.source.type": "LOCAL",
                "mlflow.source.name": _source_name(),
                **_git_tags(os.getcwd()),
            }
            if invocation is not None:
                run_tags[TAG_INVOCATION] = invocation.key
            if parent_id is not None:
                run_tags[PARENT_TAG] = parent_id
            if user := _user():
                run_tags["mlflow.user"] = user
            for key, value in (tags or {}).items():
                run_tags[str(key)] = _tag_value(value)
            run_tags.update(input_tags(inputs or {}))
            run = _with_retries(lambda: client.create_run(experiment_id, run_name=self.run_name, tags=run_tags))
        except Exception as exc:
            self._fail(exc)
            return
        self._client = client
        self.run_id = run.info.run_id
        self.parent_run_id = parent_id
        self.experiment_id = experiment_id
        _OPEN_RUNS.add(self.run_id)
        if params:
            self.log_params(params)

    def _end(self, status: str) -> None:
        run_id = self.run_id
        self._call(lambda client, rid: client.set_terminated(rid, status))
        if run_id is not None:
            _OPEN_RUNS.discard(run_id)
        self._client = None  # later calls are no-ops; run_id stays readable for the caller

    # -- logging -----------------------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params as strings (MLflow params are immutable: a key keeps its first value)."""
        if not self.active:
            return
        from mlflow.entities import Param

        fresh: dict[str, str] = {}
        for key, value in params.items():
            name, text = _sanitize_key(key), _param_value(value)
            previous = self._params.get(name, fresh.get(name))
            if previous is None:
                fresh[name] = text
            elif previous != text:
                _warn(
                    f"pruneflow: MLflow param {name!r} of stage {self.stage} was already logged as "
                    f"{previous!r}; not logging {text!r} (MLflow params cannot change)"
                )
        batch = [Param(key, value) for key, value in fresh.items()]
        for chunk in _chunks(batch, _PARAMS_PER_BATCH):
            self._call(lambda client, rid, chunk=chunk: client.log_batch(rid, params=chunk))
        if self.active:
            self._params.update(fresh)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric values; nested dicts become dotted keys, None / NaN / text are skipped."""
        if not self.active:
            return
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        batch = [
            Metric(key, value, timestamp, int(step or 0)) for key, value in flatten_metrics(metrics).items()
        ]
        for chunk in _chunks(batch, _METRICS_PER_BATCH):
            self._call(lambda client, rid, chunk=chunk: client.log_batch(rid, metrics=chunk))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file or folder into the run's artifacts (a missing path is a warning, not a failure)."""
        if not self.active:
            return
        local = Path(path)
        if not local.exists():
            _warn(f"pruneflow: MLflow artifact {str(local)!r} of stage {self.stage} does not exist; skipped")
            return
        if local.is_dir():
            self._call(lambda client, rid: client.log_artifacts(rid, str(local), artifact_path))
        else:
            self._call(lambda client, rid: client.log_artifact(rid, str(local), artifact_path))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if not self.active:
            return
        from mlflow.entities import RunTag

        batch = [RunTag(str(key), _tag_value(value)) for key, value in tags.items()]
        for chunk in _chunks(batch, _PARAMS_PER_BATCH):
            self._call(lambda client, rid, chunk=chunk: client.log_batch(rid, tags=chunk))


@contextlib.contextmanager
def stage_run(
    stage: str,
    *,
    settings: MlflowParams,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    run_name: str | None = None,
    inputs: Mapping[str, str | Path] | None = None,
) -> Iterator[StageRun]:
    """Track one stage as a run nested under its invocation's parent run (named `run_name`, e.g.
    "prune taylor_element1 0.2", default the stage name; the `pruneflow.stage` tag is the stage).
    `inputs` (role -> path) become tags `pruneflow.input.<role>` (the path) and
    `pruneflow.input.<role>.dvc_md5` (DVC's content hash, as in dvc.lock).

    The run ends FINISHED, or FAILED (KILLED on Ctrl-C) when the body raises; the body's exception
    propagates unchanged. Only MlflowClient is used, so MLflow's process-global active-run / URI
    state is never touched.
    """
    run = StageRun(stage, run_name)
    if settings.enabled:
        run._start(settings, params, tags, inputs)
    try:
        yield run
    except BaseException as exc:
        run._end(_status_for(exc))
        raise
    run._end("FINISHED")


def finish_invocation(settings: MlflowParams, status: str = "FINISHED") -> None:
    """End the current invocation's parent run (Snakemake `onsuccess` / `onerror` call this).

    Stage runs of the invocation still RUNNING (their process was killed) are marked KILLED.
    Never raises for tracking problems; an invalid `status` is a programming error (ValueError).
    """
    status = status.upper()
    if status not in _TERMINAL_STATUSES:
        raise ValueError(f"status={status!r} is not allowed; allowed: {', '.join(_TERMINAL_STATUSES)}")
    if not settings.enabled:
        return
    invocation = resolve_invocation()
    if invocation is None:
        return
    try:
        uri = resolve_tracking_uri(settings.tracking_uri)
        db = _sqlite_path(uri)
        if db is not None and not db.exists():
            return  # no stage was tracked; do not create an empty store
        _configure_http(uri)
        _preimport(uri)
        with _store_lock(uri):
            client = _with_retries(lambda: _client(uri))
            experiment = _with_retries(lambda: client.get_experiment_by_name(settings.experiment))
            if experiment is None:
                return
            parents = _with_retries(lambda: _find_parents(client, experiment.experiment_id, invocation.key))
            for parent in parents:
                parent_id = parent.info.run_id
                orphans = _with_retries(
                    lambda parent_id=parent_id: client.search_runs(
                        [experiment.experiment_id],
                        filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and attributes.status = 'RUNNING'",
                        max_results=1000,
                    )
                )
                for orphan in orphans:
                    if orphan.info.run_id not in _OPEN_RUNS:
                        _with_retries(lambda rid=orphan.info.run_id: client.set_terminated(rid, "KILLED"))
                _with_retries(lambda parent_id=parent_id: client.set_terminated(parent_id, status))
    except Exception as exc:
        _warn(
            f"pruneflow: MLflow tracking failed while finishing pipeline invocation {invocation.key}: "
            f"{_reason(exc)}; the pipeline's outputs are unaffected"
        )


def describe_ui(settings: MlflowParams) -> str:
    """The command that opens the results in a browser (run it in the project directory)."""
    uri = settings.tracking_uri.strip() or "sqlite:///mlflow.db"
    if _is_http(uri):
        return f"python -m webbrowser {shlex.quote(uri)}"
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)}"
