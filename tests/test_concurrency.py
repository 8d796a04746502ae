"""A second `dvc repro` or `snakemake` in a project where one already runs refuses with a clear message
and leaves the first run and its outputs intact. (Two jobs on the GPUs: test_gpu_slots.py; two
pipelines writing one MLflow store: test_tracking.py.)

No timing windows: the first run is held at a known point (a stage waiting for a `release` file, or
the pause hook right before a job puts its output in place) and the tests wait on that state.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .kill_hook import pause_hook_env, tree_bytes, visible_entries
from .tiny_project import make_tiny_project, project_env, run, set_param

HELD_STAGE = """\
import pathlib, time
pathlib.Path("started").write_text("1")
while not pathlib.Path("release").exists():
    time.sleep(0.05)
pathlib.Path("out.txt").write_text("done")
"""


def _wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 600) -> None:
    """Wait for a state (not a duration); fail at once if the process it depends on has ended."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the first run ended (status {process.returncode}) before {what}:\n"
                                 + (process.stdout.read() if process.stdout else ""))
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _as_in_a_terminal() -> None:
    """SIGINT at its default in the child, as a terminal's foreground job has it: a shell starting a
    background job (`pytest ... &`) sets it to ignored, and children inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(cmd: list[str], root: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=root, env={**project_env(root), **(extra_env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=_as_in_a_terminal)


def test_second_dvc_repro_fails_clearly_while_the_first_holds_the_lock(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    run(["git", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    (root / "held.py").write_text(HELD_STAGE)
    (root / "dvc.yaml").write_text("stages:\n  held:\n    cmd: python held.py\n    outs:\n      - out.txt\n")
    first = _start(["dvc", "repro"], root)
    try:
        _wait_for(lambda: (root / "started").exists(), "its stage started", first)
        second = run(["dvc", "repro"], root, check=False)
        assert second.returncode != 0
        # DVC names the busy output and the process holding it
        assert "is busy, it is being blocked by" in second.stdout, second.stdout
        assert f"(PID {first.pid})" in second.stdout and "dvc repro" in second.stdout
        (root / "release").write_text("go")
        output, _ = first.communicate(timeout=120)  # reads the pipe while waiting: a full pipe cannot block it
        assert first.returncode == 0, output
    finally:
        (root / "release").write_text("go")
        first.kill()
    assert (root / "out.txt").read_text() == "done"
    assert "up to date" in run(["dvc", "status"], root).stdout  # the lock file and dvc.lock are intact


@pytest.mark.integration
def test_second_snakemake_is_refused_with_the_lock_message_while_the_first_runs(tmp_path):
    """The first run is held right before its calibrate job replaces an earlier output (its incomplete
    marker set): a second run gets the lock message, a dry run may look, and Ctrl-C on the first (SIGINT
    to its process group, as a terminal sends it) leaves the earlier output byte-identical."""
    root = make_tiny_project(tmp_path / "project")
    set_param(root, "mlflow.enabled", False)
    target = "data/calibration/calibration.safetensors"
    command = ["snakemake", target, "--cores", "1"]
    run(command, root)
    earlier = tree_bytes(root / target)
    set_param(root, "calibration.num_samples", 3)  # the output is now stale: the next run replaces it
    hook = pause_hook_env(tmp_path / "hook", str(root / target), pythonpath=str(root / "src"))
    first = _start(command, root, hook)
    try:
        _wait_for(lambda: (tmp_path / "hook/paused").exists(), "its calibrate job reached the output", first)
        second = run(command, root, check=False)
        assert second.returncode != 0
        assert "Directory cannot be locked" in second.stdout, second.stdout
        assert f"another `snakemake` runs in this project (PID {first.pid}" in second.stdout
        assert "Incomplete" not in second.stdout and "--rerun-incomplete" not in second.stdout
        dry = run([*command, "--dry-run"], root, check=False)  # looking is fine
        assert dry.returncode == 0 and "Traceback" not in dry.stdout, dry.stdout
        os.killpg(first.pid, signal.SIGINT)
        first.communicate(timeout=300)  # drains its output: a first run blocked on a full pipe never exits
    finally:
        (tmp_path / "hook/release").write_text("go")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode != 0
    assert tree_bytes(root / target) == earlier, "Ctrl-C must not lose or change the earlier output"
    assert visible_entries(root / "data/calibration") == {"calibration.safetensors"}
    # the plain rerun (no lock left behind) rebuilds the stale output, then has nothing to do
    run(command, root)
    from safetensors import safe_open

    with safe_open(str(root / target), framework="pt") as handle:
        assert handle.get_tensor("input_ids").shape[0] == 3
    assert "Nothing to be done" in run(command, root).stdout
