"""Give each GPU job its own device: a lock-file slot allocator for `--resources gpu=N`.

Snakemake's `gpu` resource only caps how many GPU jobs run at once; it does not say which device a
job gets, so two jobs would both land on cuda:0. A job started through `run_in_slot` takes an
exclusive `flock` on one `<lock_dir>/gpu-<device>.lock`, sets CUDA_VISIBLE_DEVICES to that device
and then *execs* the command, so the command itself holds the lock: the kernel drops it when the
process ends for any reason (success, failure, SIGKILL, a lost node), and no stale lock survives.

Devices come from PRUNEFLOW_GPUS (comma list; any names, which is how tests use fake devices), else
from CUDA_VISIBLE_DEVICES as the user set it, else from `torch.cuda.device_count()`. With no device
the command runs unchanged (CPU). Under a cluster scheduler (SLURM, Kubernetes, or
PRUNEFLOW_GPU_SLOTS=off) the allocator steps aside: the scheduler already assigned the job's GPUs.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)
DEFAULT_LOCK_DIR = ".snakemake/gpu-slots"
SCHEDULER_VARIABLES = ("SLURM_JOB_ID", "KUBERNETES_SERVICE_HOST")
POLL_SECONDS = 0.2


def scheduler_assigns_devices(env: Mapping[str, str]) -> bool:
    """True when a cluster scheduler (or the user) owns device assignment."""
    if env.get("PRUNEFLOW_GPU_SLOTS", "").lower() in ("off", "0", "false", "no"):
        return True
    return any(env.get(name) for name in SCHEDULER_VARIABLES)


def available_devices(env: Mapping[str, str]) -> list[str]:
    """The device names this machine offers to GPU jobs, in order."""
    for name in ("PRUNEFLOW_GPUS", "CUDA_VISIBLE_DEVICES"):
        value = env.get(name)
        if value is not None:
            return [d.strip() for d in value.split(",") if d.strip()]
    if not Path("/proc/driver/nvidia").exists() and sys.platform == "linux":
        return []  # no NVIDIA driver: skip importing torch (seconds per job)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return []
    return [str(i) for i in range(torch.cuda.device_count())]


def _lock_name(device: str) -> str:
    return "gpu-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in device) + ".lock"


def acquire_slot(devices: Sequence[str], lock_dir: str | os.PathLike[str], *, timeout: float | None = None
                 ) -> tuple[str, int]:
    """Block until one device's lock is free; returns (device, fd of the held lock).

    The fd is inheritable so that an exec'd command keeps holding the lock.
    """
    if not devices:
        raise ValueError("no GPU devices to allocate")
    directory = Path(lock_dir)
    directory.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    start = os.getpid() % len(devices)  # spread first tries so jobs do not all poll device 0 first
    while True:
        for offset in range(len(devices)):
            device = devices[(start + offset) % len(devices)]
            fd = os.open(directory / _lock_name(device), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.set_inheritable(fd, True)
            return device, fd
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"no free GPU slot among {list(devices)} after {timeout} s (locks in {directory})")
        time.sleep(POLL_SECONDS)


def run_in_slot(command: Sequence[str], *, lock_dir: str | os.PathLike[str] = DEFAULT_LOCK_DIR,
                env: Mapping[str, str] | None = None) -> None:
    """Replace this process with `command`, on its own GPU when there is one to allocate. Never returns."""
    if not command:
        raise ValueError("no command given to run in a GPU slot")
    environment = dict(os.environ if env is None else env)
    if not scheduler_assigns_devices(environment):
        devices = available_devices(environment)
        if devices:
            device, _fd = acquire_slot(devices, lock_dir)
            environment["CUDA_VISIBLE_DEVICES"] = device
            environment["PRUNEFLOW_GPU_SLOT"] = device
            log.warning("[gpu-slot] %s ... on device %s", command[0], device)
    os.execvpe(command[0], list(command), environment)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pruneflow.pipeline.gpu_slots",
        description="Run COMMAND on a GPU no other pruneflow job holds (CUDA_VISIBLE_DEVICES), or as is.",
    )
    parser.add_argument("--lock-dir", default=DEFAULT_LOCK_DIR)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("COMMAND is missing; usage: python -m pruneflow.pipeline.gpu_slots [--lock-dir DIR] -- COMMAND ...")
    run_in_slot(command, lock_dir=args.lock_dir)


if __name__ == "__main__":
    main()
