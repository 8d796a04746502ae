"""The SLURM and Kubernetes profiles plan the whole grid (dry run; no cluster needed)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import PROJECT_ROOT

GPU_RULES = {"cache_activations", "score", "recover", "evaluate_dense", "evaluate_pruned", "evaluate_recovered",
             "evaluate_servable"}


def _dry_run(*extra: str) -> str:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    out = subprocess.run(["snakemake", "--dry-run", "--forceall", *extra], cwd=PROJECT_ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert out.returncode == 0, out.stdout[-3000:]
    return out.stdout


def _resources_by_rule(text: str) -> dict[str, str]:
    found = {}
    for block in re.split(r"\n(?=rule \w+:)", text):
        match = re.match(r"rule (\w+):", block)
        resources = re.search(r"resources: (.*)", block)
        if match and resources:
            found.setdefault(match.group(1), resources.group(1))
    return found


def test_slurm_profile_plans_every_job_with_gpus_memory_and_time():
    text = _dry_run("--profile", "workflow/profiles/slurm")
    resources = _resources_by_rule(text)
    assert set(resources) >= GPU_RULES | {"prepare_model", "calibrate", "prune", "report"}
    for rule, line in resources.items():
        assert ("gpu=1" in line) == (rule in GPU_RULES), (rule, line)
        assert "runtime=" in line and "mem_mb=" in line, (rule, line)
    assert "runtime=720" in resources["recover"] and "mem_mb=64000" in resources["recover"]


@pytest.fixture()
def storage(tmp_path):
    """What every pod would mount: the sources and the raw data under the storage prefix."""
    (tmp_path / "data").mkdir()
    (tmp_path / "src").symlink_to(PROJECT_ROOT / "src")
    (tmp_path / "data/raw").symlink_to(PROJECT_ROOT / "data/raw")
    return tmp_path


def test_kubernetes_profile_plans_every_job_through_storage(storage):
    text = _dry_run("--profile", "workflow/profiles/kubernetes", "--default-storage-prefix", str(storage))
    resources = _resources_by_rule(text)
    assert set(resources) >= GPU_RULES | {"prepare_model", "report"}
    assert all(("gpu=1" in line) == (rule in GPU_RULES) for rule, line in resources.items())
    assert f"{storage}/data/models/dense" in text  # outputs live under the storage prefix
