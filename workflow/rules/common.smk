# Loads and checks params.yaml, holds the run lock, finds stale outputs, and gives every rule its
# inputs, outputs and command from one table (src/pruneflow/pipeline/graph.py; dvc.yaml is rendered
# from the same table). See pruneflow.pipeline.snakemake_support for what happens here and why.
import os
import shutil
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")

sys.path.insert(0, str(Path(workflow.basedir).parent / "src"))  # workflow/ -> the project

from pruneflow.config import RATIO_PATTERN  # noqa: E402
from pruneflow.pipeline import snakemake_support  # noqa: E402
from pruneflow.pipeline.resources import CLUSTER_KEYS  # noqa: E402

PARAMS_FILE = "params.yaml"
CONDA_ENV = "../envs/pruneflow.yaml"

# Refuses a second run, a bad params.yaml or input, before Snakemake plans or removes anything. Under a
# cluster executor it also plans every job's resources from the model (pruneflow.pipeline.resources);
# `--config gpu_memory_gb=141` etc. say what the cluster offers and are the only `--config` keys allowed.
PIPELINE = snakemake_support.start(workflow, PARAMS_FILE)
for key in CLUSTER_KEYS:
    config.pop(key, None)
config.update(PIPELINE.params.raw)  # params.yaml as DVC reads it (YAML 1.2), not Snakemake's own reader
validate(config, "../schemas/params.schema.yaml")


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
    ratio=RATIO_PATTERN,


# One MLflow parent run per pipeline invocation: every stage job inherits this id.
from pruneflow.pipeline.tracking import INVOCATION_ENV, finish_invocation, new_invocation_id  # noqa: E402

os.environ.setdefault(INVOCATION_ENV, new_invocation_id())


def check_devices():
    """`runtime.device` must exist where the jobs run: here, unless a cluster executor runs them."""
    from pruneflow.errors import PruneflowError
    from pruneflow.pipeline.preflight import check_device

    if workflow.local_exec:
        try:
            check_device(PIPELINE.params.runtime.device)
        except PruneflowError as exc:
            raise WorkflowError(f"pruneflow plan: error: {exc}") from None


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
            input="\n".join(outputs) + "\n",
            text=True,
            check=False,
        )
        if done.returncode != 0:
            print(
                f"pruneflow: recording the outputs in dvc.lock failed (exit {done.returncode}); "
                "the outputs are complete: run `dvc commit` to record them",
                file=sys.stderr,
            )
    except Exception as exc:
        print(f"pruneflow: recording the outputs in dvc.lock failed: {exc}", file=sys.stderr)
