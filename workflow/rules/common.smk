# Shared definitions: validated params, output paths, tracked params and source files per stage.
import os
import shutil
import sys
from pathlib import Path

import yaml
from snakemake.utils import min_version, validate

min_version("9.0")

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from pruneflow.config import format_ratio, load_params  # noqa: E402
from pruneflow.errors import PruneflowError  # noqa: E402

PARAMS_FILE = "params.yaml"
CONDA_ENV = "../envs/pruneflow.yaml"

# The typed validation (ranges, names, paths, "did you mean") runs first: a bad value stops here,
# before any job runs, and names the key, the value and what is allowed. The JSON schema (generated
# from the same dataclasses) then checks the structure Snakemake itself reads.
if workflow.config_settings.overwrite_config:
    raise WorkflowError(
        "pruneflow reads every setting from params.yaml, so `--config` overrides would not reach the "
        f"stages: edit {PARAMS_FILE} instead (got --config {dict(workflow.config_settings.overwrite_config)})"
    )
try:
    PARAMS = load_params(PARAMS_FILE)
    source = PARAMS.model.source
    if os.path.isabs(source) or source.startswith((".", "~")) or Path(source).exists():
        from pruneflow.modeling import resolve_source

        resolve_source(source)
except PruneflowError as exc:
    raise WorkflowError(f"pruneflow: {exc}") from None
validate(config, "../schemas/params.schema.yaml")

GRID = PARAMS.grid
RATIOS = [format_ratio(r) for r in GRID.ratios]

MODEL_DIR = "data/models/dense"
CALIBRATION = "data/calibration/calibration.safetensors"
ACTIVATIONS = "data/activations/activations.safetensors"
SCORES = "data/scores/{criterion}.safetensors"
PRUNED_DIR = "data/pruned/{criterion}/{ratio}"
RECOVERED_DIR = "data/recovered/{criterion}/{ratio}"
METRICS = "reports/metrics/{variant}/{criterion}/{ratio}.json"
DENSE_METRICS = "reports/metrics/dense.json"
REPORT_OUTPUTS = ["reports/results.md", "reports/results.csv", "reports/plots"]

# Source files whose edits rerun a stage (dvc.yaml lists the same ones; a test checks).
STAGE_SOURCES = {
    "prepare_model": ["src/pruneflow/stages/prepare_model.py", "src/pruneflow/modeling.py"],
    "calibrate": ["src/pruneflow/stages/calibrate.py", "src/pruneflow/text_data.py", "src/pruneflow/tensor_files.py"],
    "cache_activations": [
        "src/pruneflow/stages/cache_activations.py",
        "src/pruneflow/activations.py",
        "src/pruneflow/tensor_files.py",
    ],
    "score": [
        "src/pruneflow/stages/score.py",
        "src/pruneflow/groups.py",
        "src/pruneflow/tensor_files.py",
        *sorted(str(p) for p in Path(workflow.basedir, "src/pruneflow/importance").glob("*.py")),
    ],
    "prune": [
        "src/pruneflow/stages/prune.py",
        "src/pruneflow/pruning.py",
        "src/pruneflow/checkpoint.py",
        "src/pruneflow/groups.py",
        "src/pruneflow/importance/activation.py",
    ],
    "recover": ["src/pruneflow/stages/recover.py", "src/pruneflow/recovery.py"],
    "evaluate": [
        "src/pruneflow/stages/evaluate.py",
        "src/pruneflow/perplexity.py",
        "src/pruneflow/zeroshot.py",
        "src/pruneflow/efficiency.py",
    ],
    "report": ["src/pruneflow/stages/report.py", "src/pruneflow/reporting.py"],
}
STAGE_SOURCES["score"] = [os.path.relpath(p, workflow.basedir) for p in STAGE_SOURCES["score"]]

# The params.yaml keys each stage reads (dvc.yaml's `params:` lists the same keys; a test checks).
STAGE_PARAMS = {
    "prepare_model": ["model"],
    "calibrate": ["seed", "calibration"],
    "cache_activations": ["seed", "runtime", "activations"],
    "score": ["seed", "runtime", "score"],
    "prune": ["prune"],
    "recover": ["seed", "runtime", "scale", "recover", "laptop.recover"],
    "evaluate": ["seed", "runtime", "scale", "evaluate", "laptop.evaluate"],
    "report": ["grid"],
}


def tracked_params(stage):
    """The values of a stage's params keys: Snakemake reruns the stage when one changes."""
    values = {}
    for key in STAGE_PARAMS[stage]:
        value = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        values[key] = value
    return values


def _declared_gpus():
    resource = workflow.global_resources.get("gpu")
    try:
        return max(1, int(getattr(resource, "value", resource)))
    except (TypeError, ValueError):
        return 1


def _all_cores():
    try:
        return max(1, int(workflow.cores))
    except Exception:
        return 1


# Torch jobs on a CPU-only machine take every core and run one at a time (no oversubscription,
# clean timings); with GPUs, the cores are shared among the GPU jobs that may run at once.
HAS_GPU = shutil.which("nvidia-smi") is not None and os.environ.get("CUDA_VISIBLE_DEVICES", "x") != ""
TORCH_THREADS = max(1, _all_cores() // _declared_gpus()) if HAS_GPU else _all_cores()


wildcard_constraints:
    criterion="[A-Za-z0-9_]+",
    ratio="[0-9]+\\.[0-9]+",
    variant="pruned|recovered",


def stage_command(stage, args):
    return f"python -m pruneflow.stages.{stage} --params {PARAMS_FILE} {args}"


# GPU rules start through the slot allocator: each concurrent GPU job gets its own device
# (CUDA_VISIBLE_DEVICES); it steps aside on CPU-only machines and under SLURM / Kubernetes.
GPU_SLOT_PREFIX = "python -m pruneflow.pipeline.gpu_slots -- "


def gpu_stage_command(stage, args):
    return GPU_SLOT_PREFIX + stage_command(stage, args)


# One MLflow parent run per pipeline invocation: every stage job inherits this id.
from pruneflow.pipeline.tracking import INVOCATION_ENV, finish_invocation, new_invocation_id  # noqa: E402

os.environ.setdefault(INVOCATION_ENV, new_invocation_id())


def record_in_dvc():
    """Commit what this run built (or found up to date) to dvc.lock, so `dvc status` is clean.

    Only in a DVC project, never in a dry run, off with PRUNEFLOW_DVC_COMMIT=0; a failure is
    reported and leaves the pipeline's outputs and result alone.
    """
    import subprocess

    from pruneflow.pipeline.versioning import DISABLE_ENV, is_dvc_project

    if os.environ.get(DISABLE_ENV, "1").lower() in ("0", "off", "false", "no") or not is_dvc_project("."):
        return
    try:
        outputs = sorted({str(path) for job in workflow.dag.jobs for path in job.output})
        done = subprocess.run(
            [sys.executable, "-m", "pruneflow.pipeline.versioning", "commit", "--outputs-file", "-"],
            input="\n".join(outputs) + "\n", text=True, check=False,
        )
        if done.returncode != 0:
            print(f"pruneflow: recording the outputs in dvc.lock failed (exit {done.returncode}); "
                  "the outputs are complete: run `dvc commit` to record them", file=sys.stderr)
    except Exception as exc:
        print(f"pruneflow: recording the outputs in dvc.lock failed: {exc}", file=sys.stderr)


onsuccess:
    finish_invocation(PARAMS.mlflow, "FINISHED")
    record_in_dvc()


onerror:
    finish_invocation(PARAMS.mlflow, "FAILED")
