"""A stage killed with SIGKILL while writing leaves no output that looks complete, keeps the earlier
result, and a rerun finishes the work. (Through Snakemake and DVC: tests/test_integration.py.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pruneflow.pipeline import atomic
from pruneflow.pipeline.atomic import atomic_dir, atomic_path, stale_temporaries

from .kill_hook import kill_hook_env, tree_bytes, visible_entries
from .tiny_project import project_env, run_stages_in_process

KILLED = -signal.SIGKILL


def _child(code: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------------ atomic writes


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_sigkill_while_writing_keeps_the_earlier_result_and_the_next_write_cleans_up(tmp_path, kind):
    target = tmp_path / ("result.json" if kind == "file" else "model")
    if kind == "file":
        target.write_text("earlier result")
    else:
        target.mkdir()
        (target / "weights.bin").write_text("earlier weights")
    before = tree_bytes(target)
    writer = ("with atomic_path(target) as tmp:\n    tmp.write_bytes(b'new' * 10000)" if kind == "file" else
              "with atomic_dir(target) as tmp:\n    (tmp / 'weights.bin').write_bytes(b'new' * 10000)")
    env = kill_hook_env(tmp_path / "hook", str(target), pythonpath=str(Path(atomic.__file__).parents[1]))
    child = _child(f"from pathlib import Path\nfrom pruneflow.pipeline.atomic import atomic_dir, atomic_path\n"
                   f"target = Path({str(target)!r})\n{writer}\n", env, tmp_path)
    assert child.returncode == KILLED, child.stderr
    assert tree_bytes(target) == before, "the earlier result must survive the kill untouched"
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(f".{target.name}.")]
    assert len(leftovers) == 1 and leftovers[0].name.endswith(".tmp")  # hidden, and named as temporary
    assert leftovers[0].name.startswith(f".{target.name}.{atomic._host()}.")
    assert visible_entries(tmp_path) == {target.name, "hook"}
    assert stale_temporaries(target) == leftovers  # its writer is dead

    with (atomic_path if kind == "file" else atomic_dir)(target) as tmp:
        (tmp if kind == "file" else tmp / "weights.bin").write_text("rerun result")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{target.name}.")], "leftover not swept"
    assert (target if kind == "file" else target / "weights.bin").read_text() == "rerun result"


def test_a_live_writers_temporary_is_never_swept(tmp_path):
    target = tmp_path / "scores.safetensors"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = atomic._host()
        live = tmp_path / f".{target.name}.{host}.{sleeper.pid}.abcd.tmp"
        live.write_text("being written")
        other_host = tmp_path / f".{target.name}.elsewhere.1.abcd.tmp"  # another node of a shared disk
        other_host.write_text("being written elsewhere")
        assert stale_temporaries(target) == []
        with atomic_path(target) as tmp:
            tmp.write_text("mine")
        assert live.exists() and other_host.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert stale_temporaries(target) == [live]


def test_an_earlier_result_moved_aside_by_a_killed_writer_comes_back(tmp_path):
    """Without an atomic exchange the old folder is moved aside first; a kill right then must not lose it."""
    target = tmp_path / "model"
    dead_pid = _dead_pid()
    moved_aside = tmp_path / f".model.{atomic._host()}.{dead_pid}.x1y2.old"
    moved_aside.mkdir()
    (moved_aside / "weights.bin").write_text("earlier weights")
    with pytest.raises(RuntimeError), atomic_dir(target):
        raise RuntimeError("this write fails too")
    assert (target / "weights.bin").read_text() == "earlier weights"
    assert not moved_aside.exists()


def test_folder_swap_without_atomic_exchange(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # e.g. a filesystem without RENAME_EXCHANGE
    target = tmp_path / "model"
    for text in ("first", "second"):
        with atomic_dir(target) as tmp:
            (tmp / "weights.bin").write_text(text)
    assert (target / "weights.bin").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_failing_write_leaves_neither_output_nor_temporaries(tmp_path):
    target = tmp_path / "metrics.json"
    with pytest.raises(ValueError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise ValueError("stage failed")
    assert list(tmp_path.iterdir()) == []


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ------------------------------------------------------------------------------------ stage processes


@pytest.fixture(scope="module")
def project(staged_project, tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt") / "project"
    shutil.copytree(staged_project, root)
    return root


@pytest.mark.parametrize(
    ("stage", "argv", "output"),
    [
        ("score", ["--model", "data/models/dense", "--calibration", "data/calibration/calibration.safetensors",
                   "--activations", "data/activations/activations.safetensors", "--criterion", "l2_magnitude",
                   "--out", "data/scores/l2_magnitude.safetensors"], "data/scores/l2_magnitude.safetensors"),
        ("prune", ["--model", "data/models/dense", "--scores", "data/scores/l2_magnitude.safetensors",
                   "--activations", "data/activations/activations.safetensors", "--calibration",
                   "data/calibration/calibration.safetensors", "--criterion", "l2_magnitude",
                   "--ratio", "0.2", "--out", "data/pruned/l2_magnitude/0.3"], "data/pruned/l2_magnitude/0.3"),
    ],
)
def test_stage_killed_while_writing_keeps_every_finished_output(project, tmp_path, stage, argv, output):
    finished = {p: tree_bytes(project / p) for p in ("data/models/dense", "data/calibration", "data/activations",
                                                     "data/scores", "data/pruned")}
    env = {**project_env(project), **kill_hook_env(tmp_path / "hook", str(project / output),
                                                   pythonpath=str(project / "src"))}
    child = subprocess.run([sys.executable, "-m", f"pruneflow.stages.{stage}", *argv], cwd=project, env=env,
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == KILLED, child.stderr[-3000:]
    assert "kill_hook: SIGKILL while writing" in child.stderr
    after = {p: tree_bytes(project / p) for p in finished}
    assert after == finished, "a killed stage must not change any finished output, its own earlier one included"
    parent = (project / output).parent
    assert any(p.name.startswith(".") and p.name.endswith(".tmp") for p in parent.iterdir())

    # the rerun (what Snakemake or DVC would start) finishes the work and sweeps the dead temporary
    run_stages_in_process(project, commands=[(stage, argv)])
    assert not [p for p in parent.iterdir() if p.name.startswith(".")]
    if stage == "prune":
        summary = json.loads((project / output / "pruning_summary.json").read_text())
        assert summary["requested_ratio"] == 0.2
