"""pruneflow.pipeline.versioning: DVC-compatible hashes, recording Snakemake-built outputs, ordered checkout.

A toy DVC project (two stages made of shell commands, no model) keeps these tests to seconds; the
integration test runs the same commands on the real pipeline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pruneflow.pipeline.versioning import checkout, commit_built_stages, dvc_hash, order_output_times

pytestmark = pytest.mark.skipif(shutil.which("dvc") is None, reason="dvc is not installed")

TOY_DVC_YAML = {
    "stages": {
        "make_folder": {
            "cmd": "mkdir -p out/folder && cp input.txt out/folder/a.txt && echo b > out/folder/b.txt",
            "deps": ["input.txt"],
            "outs": ["out/folder"],
        },
        "summarise": {
            "cmd": "cat out/folder/a.txt out/folder/b.txt > out/summary.txt",
            "deps": ["out/folder"],
            "outs": ["out/summary.txt"],
        },
    }
}


def _run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    done = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout}"
    return done.stdout


@pytest.fixture
def toy_project(tmp_path: Path) -> Path:
    root = tmp_path / "toy"
    root.mkdir()
    (root / "input.txt").write_text("a\n")
    (root / "dvc.yaml").write_text(yaml.safe_dump(TOY_DVC_YAML, sort_keys=False))
    _run(["git", "init", "-q"], root)
    _run(["dvc", "init", "-q"], root)
    _run(["dvc", "config", "cache.type", "copy"], root)  # copies get fresh file times on checkout
    return root


def _build_like_snakemake(root: Path) -> None:
    """What a Snakemake run leaves: the outputs, made by the same commands, and no dvc.lock."""
    for stage in TOY_DVC_YAML["stages"].values():
        subprocess.run(stage["cmd"], shell=True, cwd=root, check=True)


def test_dvc_hash_matches_what_dvc_records(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (root / "folder/nested").mkdir(parents=True)
    (root / "folder/x.bin").write_bytes(bytes(range(256)) * 10)
    (root / "folder/nested/y.txt").write_text("ünïcode\n")
    (root / "single.txt").write_text("one file\n")
    _run(["dvc", "init", "-q", "--no-scm"], root)
    _run(["dvc", "add", "-q", "folder", "single.txt"], root)
    for name in ("folder", "single.txt"):
        recorded = yaml.safe_load((root / f"{name}.dvc").read_text())["outs"][0]["md5"]
        assert dvc_hash(root / name) == recorded, name
    assert dvc_hash(root / "folder").endswith(".dir")
    with pytest.raises(FileNotFoundError, match="missing"):
        dvc_hash(root / "missing")


def test_commit_records_only_built_stages_and_status_is_clean(toy_project: Path) -> None:
    _build_like_snakemake(toy_project)
    assert "up to date" not in _run(["dvc", "status"], toy_project)  # nothing recorded yet

    # a run that built only the folder records only its stage
    assert commit_built_stages(toy_project, ["out/folder"]) == ["make_folder"]
    status = _run(["dvc", "status"], toy_project)
    assert "make_folder" not in status and "summarise" in status

    assert commit_built_stages(toy_project, ["out/folder", str(toy_project / "out/summary.txt")]) == [
        "make_folder", "summarise"]
    assert "up to date" in _run(["dvc", "status"], toy_project)
    lock = yaml.safe_load((toy_project / "dvc.lock").read_text())
    assert lock["stages"]["summarise"]["outs"][0]["md5"] == dvc_hash(toy_project / "out/summary.txt")


def test_checkout_dates_outputs_upstream_first(toy_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _build_like_snakemake(toy_project)
    commit_built_stages(toy_project, ["out/folder", "out/summary.txt"])
    shutil.rmtree(toy_project / "out")
    benchmark = toy_project / "logs/benchmarks/summarise.tsv"  # Snakemake counts it as an output
    benchmark.parent.mkdir(parents=True)
    benchmark.write_text("s\n1.0\n")
    monkeypatch.chdir(toy_project.parent)
    touched = checkout(toy_project.name)  # a root relative to the caller's cwd
    assert (toy_project / "out/summary.txt").read_text() == "a\nb\n"
    assert touched == ["out/folder", "out/summary.txt"]
    folder_files = [p.stat().st_mtime_ns for p in (toy_project / "out/folder").rglob("*")]
    summary = (toy_project / "out/summary.txt").stat().st_mtime_ns
    assert max(folder_files) < summary < benchmark.stat().st_mtime_ns
    assert (toy_project / "input.txt").stat().st_mtime_ns < min(folder_files)
    assert "up to date" in _run(["dvc", "status"], toy_project)


def test_order_output_times_skips_missing_outputs(toy_project: Path) -> None:
    (toy_project / "out").mkdir()
    (toy_project / "out/summary.txt").write_text("x")
    assert order_output_times(toy_project, now_ns=10**18) == ["out/summary.txt"]
    assert (toy_project / "out/summary.txt").stat().st_mtime_ns == 10**18 + 10_000_000


def test_cli_commit_reads_built_outputs_from_stdin(toy_project: Path) -> None:
    _build_like_snakemake(toy_project)
    done = subprocess.run([sys.executable, "-m", "pruneflow.pipeline.versioning", "commit", "--outputs-file", "-"],
                          cwd=toy_project, input="out/folder\nout/summary.txt\n", text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert done.returncode == 0, done.stdout
    assert "recorded 2 DVC stage(s) in dvc.lock: make_folder, summarise" in done.stdout
    assert "up to date" in _run(["dvc", "status"], toy_project)


def test_cli_outside_a_dvc_project_says_so(tmp_path: Path) -> None:
    listing = tmp_path / "built.txt"
    listing.write_text("out\n")
    done = subprocess.run([sys.executable, "-m", "pruneflow.pipeline.versioning", "commit", "--outputs-file", str(listing)],
                          cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert done.returncode == 2 and "is not a DVC project" in done.stdout
