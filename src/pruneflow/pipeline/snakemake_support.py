"""What the Snakefile takes from pruneflow: the checked plan, each rule's inputs, outputs and command,
one run at a time, and earlier results that survive a failed or killed job.

`start(workflow)` runs while Snakemake reads the Snakefile, before it plans or touches anything:

1. **One run at a time.** A second `snakemake` in the project is refused at once with the lock
   message, before Snakemake looks at incomplete files (whose advice, `--rerun-incomplete`, would
   clobber the running job's output). The lock is an flock on `.pruneflow/snakemake.lock` held by the
   running `snakemake` process, so the kernel frees it however that process ends. Dry runs and the
   per-job processes of cluster executors do not take it.
2. **The plan is checked** (`pipeline.preflight.check_plan`): a bad params.yaml or input ends the
   run here with the same one-line message the stage CLIs give; nothing is planned or removed.
3. **Stale outputs are found from their records** (`pipeline.records`) and their rules' stamps
   dated so that Snakemake reruns them, whatever its own metadata says; the reasons are printed.
4. **dvc.yaml is refreshed** from the same table when params.yaml names other data files.
5. **Earlier results stay in place** until the new ones are whole (`keep_outputs_in_place`).
6. **Cluster resources are planned** (`pipeline.resources`) when `--config` names what the cluster
   offers (`gpu_memory_gb=80` ..., as the SLURM and Kubernetes profiles do): every job's memory, GPUs,
   time and CPUs from the model's config.json, a setting that cannot fit refused here. Without them
   (local runs) a GPU job asks for `gpu=1`, the slot allocator's unit, as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pruneflow.config import Params, load_params
from pruneflow.pipeline.graph import (
    GPU_SLOT_PREFIX,
    LEAF_STAGES,
    PARAMS_FILE,
    STAGES,
    STATE_DIR,
    all_outputs,
    command,
    input_paths,
    instances,
    outputs_of,
    stage_code,
    stage_data,
)
from pruneflow.pipeline.resources import (
    CLUSTER_KEYS,
    SHARDED_STAGES,
    ClusterPlan,
    ClusterSettings,
    slurm_extra,
)
from pruneflow.progress import PROGRESS_FD_ENV

log = logging.getLogger(__name__)

LOCK_FILE = "snakemake.lock"
CONSOLE_FD = 3  # a job's descriptor for the console while its stdout and stderr go to its log
RESUMABLE_RETRIES = 3  # resubmissions of a cluster's recovery job (each resumes from its checkpoint)
_held_locks: list[int] = []  # file descriptors kept open for the life of the process


class RunLockedError(Exception):
    pass


def acquire_run_lock(root: str | Path) -> None:
    """Hold `.pruneflow/snakemake.lock` for the rest of this process, or raise naming the holder."""
    import fcntl

    path = Path(root) / STATE_DIR / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
        os.close(fd)
        raise RunLockedError(
            "Directory cannot be locked. Please make sure that no other Snakemake process is trying to create "
            f"the same files in the following directory:\n{Path(root).resolve()}\n"
            f"pruneflow: another `snakemake` runs in this project ({holder}); wait for it to finish. Its "
            "outputs are untouched. (A dry run, `snakemake -n`, may run meanwhile.)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"PID {os.getpid()}: {' '.join(sys.argv)}".encode(), 0)
    _held_locks.append(fd)


# ----------------------------------------------------------------------- outputs survive failed jobs

_kept_outputs: set[str] = set()


def keep_outputs_in_place(paths: Iterable[str]) -> None:
    """Make Snakemake leave these outputs alone before a job and after it fails.

    Snakemake deletes a job's outputs before starting it and again if it fails, so a failed or killed
    rerun would lose the earlier result. Its one switch against that is the `update()` flag (not
    deleted before the job, restored if it fails), which the rules set; the restore comes from a
    full copy made before every job (`FileBackupMixin.backup_output`). pruneflow's stages write to a
    temporary sibling and swap it in only when complete (`pipeline.atomic`), so the output on disk
    already *is* the earlier result until the new one is whole: for these paths the copy is skipped,
    and "restoring" after a failure means keeping what is there. Other outputs keep Snakemake's
    behaviour. Written against Snakemake 9's persistence API; without it the run stops here rather
    than delete outputs.
    """
    try:
        from snakemake.persistence import FileBackupMixin
    except ImportError as exc:  # pragma: no cover - depends on the installed Snakemake
        raise RuntimeError(f"pruneflow needs Snakemake 9's FileBackupMixin to keep earlier outputs: {exc}") from exc
    for name in ("backup_output", "restore_output", "cleanup_backup"):
        if not hasattr(FileBackupMixin, name):  # pragma: no cover
            raise RuntimeError(f"this Snakemake lacks FileBackupMixin.{name}; pruneflow is tested with Snakemake 9")
    _kept_outputs.update(os.path.abspath(path) for path in paths)
    if getattr(FileBackupMixin, "_pruneflow_patched", False):
        return
    original = {name: getattr(FileBackupMixin, name) for name in ("backup_output", "restore_output", "cleanup_backup")}

    def backup_output(self, path: Path) -> None:
        if os.path.abspath(path) not in _kept_outputs:
            original["backup_output"](self, path)

    def restore_output(self, path: Path) -> bool:
        if os.path.abspath(path) not in _kept_outputs:
            return original["restore_output"](self, path)
        return Path(path).exists()  # the earlier result, untouched: nothing to restore, nothing to delete

    def cleanup_backup(self, path: Path) -> None:
        if os.path.abspath(path) not in _kept_outputs:
            original["cleanup_backup"](self, path)

    FileBackupMixin.backup_output = backup_output
    FileBackupMixin.restore_output = restore_output
    FileBackupMixin.cleanup_backup = cleanup_backup
    FileBackupMixin._pruneflow_patched = True


# ------------------------------------------------------------------------------------------ the rules


class SnakemakePipeline:
    """The checked plan and each rule's parts, for the rules in workflow/rules/*.smk.

    `cluster` is None for local runs; under a cluster executor it holds the planned resources of
    every job (`pipeline.resources`), or None values where config.json could not be read (fixed ones).
    """

    def __init__(self, params: Params, root: Path, params_file: str = PARAMS_FILE,
                 cluster: ClusterPlan | None = None) -> None:
        self.params = params
        self.root = root
        self.params_file = params_file
        self.cluster = cluster
        self._code = {name: stage_code(root, stage) for name, stage in STAGES.items()}
        self._data = {name: stage_data(params, stage, root) for name, stage in STAGES.items()}

    def inputs(self, name: str) -> Callable[[Any], dict[str, Any]]:
        """An input function: upstream outputs by role, data files, source files and the rule's stamp."""
        from snakemake.io import local

        from pruneflow.pipeline.records import stamp_path

        stage = STAGES[name]

        def rule_inputs(wildcards: Any) -> dict[str, Any]:
            values = {key: wildcards[key] for key in stage.placeholders}
            stamp = stamp_path(self.root, stage, values)
            if not stamp.exists():  # a target outside the grid (`snakemake data/pruned/flap/0.5`): judged now
                from pruneflow.pipeline.records import ChainBuilder, update_stamps, verdict

                update_stamps(self.root, [verdict(ChainBuilder(self.params, self.root), stage, values)])
            found: dict[str, Any] = {}
            for role, paths in input_paths(self.params, stage, values).items():
                found[role] = paths if len(paths) != 1 or role in stage.dvc_inputs else paths[0]
            found["data"] = self._data[name]
            found["code"] = self._code[name]
            found["stamp"] = local(os.path.relpath(stamp, self.root))
            return found

        return rule_inputs

    def outputs(self, name: str) -> dict[str, Any]:
        from snakemake.io import directory
        from snakemake.ioflags import update

        return {role: update(directory(out.path) if out.kind == "dir" else out.path)
                for role, out in STAGES[name].outputs.items()}

    def shell(self, name: str) -> str:
        """The rule's shell line. Its one command is `exec`ed, redirections included (no pipe, no tee),
        so the stage process replaces the shell Snakemake starts (the GPU slot allocator execs it in
        turn): a SIGTERM to every process of a job (SLURM's time limit or preemption) then reaches a
        stage whose parent is Snakemake's job process, which waits for it to write its checkpoint
        rather than seeing an interposed shell die at once and ending the job under it."""
        stage = STAGES[name]
        inputs = {role: "{input." + role + "}" for role in stage.inputs}
        outputs = {role: "{output." + role + "}" for role in stage.outputs}
        values = {key: "{wildcards." + key + "}" for key in stage.placeholders}
        # the log gets stdout and stderr; descriptor 3 keeps the console for the progress bars
        line = command(stage, inputs, outputs, values, self.params_file) + f" {CONSOLE_FD}>&2 > {{log}} 2>&1"
        if name in SHARDED_STAGES:  # `python`, or torchrun with one process per GPU (resources.launcher)
            line = "{resources.launcher}" + line.removeprefix("python")
        return f"{PROGRESS_FD_ENV}={CONSOLE_FD} exec " + ((GPU_SLOT_PREFIX + line) if stage.gpu else line)

    def resources(self, name: str) -> dict[str, Any]:
        """The rule's Snakemake resources: locally `gpu=1` for a GPU stage (what `--resources gpu=N` and
        the slot allocator count); with the cluster settings each job's planned memory, time, CPUs and
        GPUs, and for recovery its launcher and sbatch signal flags."""
        stage = STAGES[name]
        found: dict[str, Any] = {"launcher": "python"} if name in SHARDED_STAGES else {}
        if self.cluster is None:
            return {**({"gpu": 1} if stage.gpu else {}), **found}

        def planned(key: str) -> Callable[[Any], Any]:
            return lambda wildcards: getattr(self.cluster.job(name, dict(wildcards.items())), key)

        keys = ["mem_mb", "runtime", "cpus_per_task", *(("gpu", "gpu_mem_mb") if stage.gpu else ())]
        found.update({key: planned(key) for key in keys})
        if stage.gpu:  # the Kubernetes plugin refuses a GPU request without it (SLURM ignores it)
            found["gpu_manufacturer"] = "nvidia"
        if name in SHARDED_STAGES:
            found["launcher"] = lambda wildcards: self.cluster.launcher(name, dict(wildcards.items()))
            found["slurm_extra"] = lambda wildcards: slurm_extra(self.cluster.job(name, dict(wildcards.items())))
        return found

    def retries(self, name: str) -> int:
        """Resubmissions of a failed job: a cluster's recovery job that stopped on SIGTERM (time limit,
        preemption) resumes from its checkpoint; local runs do not retry."""
        return RESUMABLE_RETRIES if self.cluster is not None and name in SHARDED_STAGES else 0

    def log(self, name: str, suffix: str = ".log", folder: str = "logs") -> str:
        stage = STAGES[name]
        return "/".join([folder, stage.name, *("{" + key + "}" for key in stage.placeholders)]) + suffix

    def benchmark(self, name: str) -> str:
        return self.log(name, ".tsv", "logs/benchmarks")

    @property
    def targets(self) -> list[str]:
        """What `rule all` asks for: the outputs no other stage reads (the report, which needs every
        evaluated model, and the GGUF files), so every stage instance of the grid is built."""
        return [path for stage, values in instances(self.params) if stage.name in LEAF_STAGES
                for path in outputs_of(stage, values).values()]


def _report_stale(found) -> None:
    stale = [v for v in found if v.status == "stale"]
    if not stale:
        return
    lines = [f"  {verdict.output}: {'; '.join(verdict.reasons)}" for verdict in stale]
    log.warning("\n".join([f"pruneflow: {len(stale)} existing output(s) are out of date and will be rebuilt:", *lines]))


def _ensure_stamps(params: Params, root: Path) -> None:
    """Per-job processes of cluster executors only need the stamps to exist (the plan was made already)."""
    from pruneflow.pipeline.graph import instances
    from pruneflow.pipeline.records import stamp_path

    for stage, values in instances(params):
        path = stamp_path(root, stage, values)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                path.touch(exist_ok=False)
                os.utime(path, ns=(0, 0))


def start(workflow: Any, params_file: str = PARAMS_FILE) -> SnakemakePipeline:
    """Everything the Snakefile does before Snakemake plans: lock, check, find stale outputs, keep outputs."""
    from snakemake.exceptions import WorkflowError
    from snakemake_interface_executor_plugins.settings import ExecMode

    from pruneflow.errors import PruneflowError
    from pruneflow.pipeline.plan import refresh_dvc_yaml
    from pruneflow.pipeline.preflight import check_plan
    from pruneflow.pipeline.records import update_stamps, verdicts

    root = Path.cwd()
    overrides = dict(workflow.config_settings.overwrite_config or {})
    configfiles = [str(f) for f in (workflow.config_settings.configfiles or [])]
    # `--config` may set what the cluster offers (pipeline.resources); pipeline settings live in params.yaml
    settings = {key: overrides.pop(key) for key in CLUSTER_KEYS if key in overrides}
    if overrides or configfiles:
        given = f"--configfile {' '.join(configfiles)}" if configfiles else f"--config {overrides}"
        raise WorkflowError(f"pruneflow plan: error: {given} is not allowed; allowed: settings in {params_file}, "
                            "which every stage and `dvc repro` read (edit it instead), and the cluster settings "
                            f"{', '.join(CLUSTER_KEYS)}")
    main_process = workflow.exec_mode == ExecMode.DEFAULT
    # the cluster profiles give these keys (Snakemake passes them on to every job's process); a
    # Snakefile cannot tell the executor while it is read, so they are what switches the derivation on
    on_cluster = bool(settings)
    dry_run = bool(getattr(workflow.output_settings, "dryrun", False))
    if main_process and not dry_run:
        try:
            acquire_run_lock(root)
        except RunLockedError as exc:
            raise WorkflowError(str(exc)) from None
    try:
        params = load_params(root / params_file)
        if main_process:
            check_plan(params, root, devices=False)  # devices are checked where the jobs run (onstart, stages)
        cluster = ClusterPlan.build(params, root, ClusterSettings.from_config(settings)) if on_cluster else None
    except PruneflowError as exc:
        raise WorkflowError(f"pruneflow plan: error: {exc}") from None
    if cluster is not None and cluster.derivation is None and main_process:
        log.warning(f"pruneflow: the model's config.json cannot be read while planning ({cluster.reason}); every "
                    "job gets the fixed resources of pruneflow.pipeline.resources.FALLBACK and one GPU")
    pipeline = SnakemakePipeline(params, root, params_file, cluster)
    if main_process:
        if refresh_dvc_yaml(params, root):
            log.warning("pruneflow: dvc.yaml regenerated from params.yaml and the source")
        found = verdicts(params, root)
        update_stamps(root, found)
        _report_stale(found)
    else:
        _ensure_stamps(params, root)
    keep_outputs_in_place(root / path for path in all_outputs(params))
    return pipeline
