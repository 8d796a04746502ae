"""The GPU slot allocator: one job per device, slots freed on success, failure and SIGKILL (fake devices)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pruneflow.pipeline.gpu_slots import acquire_slot, available_devices, scheduler_assigns_devices

RECORDER = textwrap.dedent("""
    import json, os, sys, time
    start = time.time()
    time.sleep(float(sys.argv[2]))
    with open(sys.argv[1], "w") as handle:
        json.dump({"device": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": start, "end": time.time()}, handle)
""")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "KUBERNETES_SERVICE_HOST",
                                                               "CUDA_VISIBLE_DEVICES", "PRUNEFLOW_GPU_SLOTS")}
    return {**env, **extra}


def _slot_command(lock_dir: Path, *command: str) -> list[str]:
    return [sys.executable, "-m", "pruneflow.pipeline.gpu_slots", "--lock-dir", str(lock_dir), "--", *command]


def _no_overlap_per_device(records: list[dict]) -> None:
    for a in records:
        for b in records:
            if a is not b and a["device"] == b["device"]:
                assert a["end"] <= b["start"] or b["end"] <= a["start"], (a, b)


def test_four_jobs_on_two_fake_gpus_never_share_a_device(tmp_path):
    recorder = tmp_path / "record.py"
    recorder.write_text(RECORDER)
    env = _env(PRUNEFLOW_GPUS="fake0,fake1")
    procs = [subprocess.Popen(_slot_command(tmp_path / "locks", sys.executable, str(recorder),
                                            str(tmp_path / f"job{i}.json"), "1.0"), env=env) for i in range(4)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]
    records = [json.loads((tmp_path / f"job{i}.json").read_text()) for i in range(4)]
    assert {r["device"] for r in records} == {"fake0", "fake1"}
    _no_overlap_per_device(records)


def test_a_killed_job_frees_its_slot(tmp_path):
    env = _env(PRUNEFLOW_GPUS="only")
    holder = subprocess.Popen(_slot_command(tmp_path / "locks", sys.executable, "-c", "import time; time.sleep(60)"),
                              env=env)
    deadline = time.monotonic() + 20
    while not (tmp_path / "locks/gpu-only.lock").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the wrapper has exec'd into the sleeper, which now holds the lock
    with pytest.raises(TimeoutError, match="no free GPU slot among \\['only'\\]"):
        acquire_slot(["only"], tmp_path / "locks", timeout=0.5)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    device, fd = acquire_slot(["only"], tmp_path / "locks", timeout=5)
    assert device == "only"
    os.close(fd)


def test_a_failing_job_keeps_its_exit_code_and_frees_its_slot(tmp_path):
    env = _env(PRUNEFLOW_GPUS="only")
    failed = subprocess.run(_slot_command(tmp_path / "locks", sys.executable, "-c", "raise SystemExit(3)"), env=env)
    assert failed.returncode == 3
    device, fd = acquire_slot(["only"], tmp_path / "locks", timeout=1)
    os.close(fd)


def test_steps_aside_under_a_cluster_scheduler(tmp_path):
    env = _env(PRUNEFLOW_GPUS="fake0", SLURM_JOB_ID="42", CUDA_VISIBLE_DEVICES="3")
    out = subprocess.run(_slot_command(tmp_path / "locks", sys.executable, "-c",
                                       "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"),
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3"  # what the scheduler assigned
    assert not (tmp_path / "locks").exists()
    assert scheduler_assigns_devices({"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    assert scheduler_assigns_devices({"PRUNEFLOW_GPU_SLOTS": "off"})
    assert not scheduler_assigns_devices({})


def test_device_list_sources():
    assert available_devices({"PRUNEFLOW_GPUS": "a, b"}) == ["a", "b"]
    assert available_devices({"CUDA_VISIBLE_DEVICES": "2,5"}) == ["2", "5"]
    assert available_devices({"CUDA_VISIBLE_DEVICES": ""}) == []  # the user hid every GPU: CPU


def test_missing_command_is_a_clear_error():
    out = subprocess.run([sys.executable, "-m", "pruneflow.pipeline.gpu_slots", "--"], capture_output=True, text=True)
    assert out.returncode == 2 and "COMMAND is missing" in out.stderr


SNAKEFILE = """
rule all:
    input: expand("out/job{i}.json", i=range(4))

rule gpu_job:
    output: "out/job{i}.json"
    resources: gpu=1
    shell: "python -m pruneflow.pipeline.gpu_slots --lock-dir locks -- python {RECORDER} {output} 1.0"
"""


def test_snakemake_gpu_resource_with_two_fake_gpus(tmp_path):
    (tmp_path / "record.py").write_text(RECORDER)
    (tmp_path / "Snakefile").write_text(SNAKEFILE.replace("{RECORDER}", str(tmp_path / "record.py")))
    env = _env(PRUNEFLOW_GPUS="fake0,fake1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    subprocess.run(["snakemake", "--cores", "4", "--resources", "gpu=2", "--quiet"], cwd=tmp_path, env=env,
                   check=True, capture_output=True)
    records = [json.loads((tmp_path / f"out/job{i}.json").read_text()) for i in range(4)]
    assert {r["device"] for r in records} == {"fake0", "fake1"}
    _no_overlap_per_device(records)
