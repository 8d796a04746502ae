"""A second `dvc repro` or `snakemake` in a project where one already runs refuses with a clear message
and leaves the first run and its outputs intact. (Two jobs on the GPUs: test_gpu_slots.py; two
pipelines writing one MLflow store: test_tracking.py.)"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from .tiny_project import make_tiny_project, project_env, run, set_param

SLOW_STAGE = (
    "python -c \"import pathlib, time; pathlib.Path('started').write_text('1'); time.sleep(8); "
    "pathlib.Path('out.txt').write_text('done')\""
)


def _wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _start(cmd: list[str], root: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=root, env=project_env(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_second_dvc_repro_fails_clearly_while_the_first_holds_the_lock(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    run(["git", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    (root / "dvc.yaml").write_text(f"stages:\n  slow:\n    cmd: {SLOW_STAGE}\n    outs:\n      - out.txt\n")
    first = _start(["dvc", "repro"], root)
    try:
        _wait_for(lambda: (root / "started").exists(), "the first repro to start its stage")
        second = run(["dvc", "repro"], root, check=False)
        assert second.returncode != 0
        # DVC names the busy output and the process holding it
        assert "is busy, it is being blocked by" in second.stdout, second.stdout
        assert f"(PID {first.pid})" in second.stdout and "dvc repro" in second.stdout
        assert first.wait(timeout=120) == 0, first.stdout.read()
    finally:
        first.kill()
    assert (root / "out.txt").read_text() == "done"
    assert "up to date" in run(["dvc", "status"], root).stdout  # the lock file and dvc.lock are intact


@pytest.mark.integration
def test_second_snakemake_fails_clearly_while_the_first_runs(tmp_path):
    root = make_tiny_project(tmp_path / "project")
    set_param(root, "mlflow.enabled", False)
    first = _start(["snakemake", "data/calibration/calibration.safetensors", "--cores", "1"], root)
    try:
        _wait_for(lambda: any((root / ".snakemake/locks").glob("*")) if (root / ".snakemake/locks").is_dir()
                  else False, "the first snakemake to lock the project")
        second = run(["snakemake", "data/calibration/calibration.safetensors", "--cores", "1"], root, check=False)
        assert second.returncode != 0
        assert "Directory cannot be locked" in second.stdout
        assert first.wait(timeout=600) == 0, first.stdout.read()
    finally:
        first.kill()
    assert (root / "data/calibration/calibration.safetensors").is_file()
    assert "Nothing to be done" in run(["snakemake", "data/calibration/calibration.safetensors", "--cores", "1",
                                        "--dry-run"], root).stdout
