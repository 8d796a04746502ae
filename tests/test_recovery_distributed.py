"""The recover stage interrupted and on several processes: a run stopped by SIGTERM (a cluster's notice
before preemption; under torchrun sent to every process, as SLURM does) or killed by SIGKILL resumes
from its state folder to exactly the uninterrupted result, and two processes (torchrun, gloo on the CPU)
train exactly as one without dropout (with it each process draws its own masks).

Stage processes are held at a checkpoint by a `sitecustomize` hook (as in tests/kill_hook.py), so
the signals arrive at a known step; production code has no test switch.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from .kill_hook import PATCH_ON_IMPORT
from .tiny_project import project_env, run_stages_in_process, set_param

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL, TEACHER = "data/pruned/l2_magnitude/0.3", "data/models/dense"
# 12 training blocks, batch 4 (2 micro-batches of 2): 3 steps an epoch, 12 steps over 4 epochs, a
# checkpoint every 2 steps, validation every 4
SETTINGS = {"max_steps": 12, "num_epochs": 4, "max_train_samples": 12, "batch_size": 4, "micro_batch_size": 2,
            "cutoff_len": 32, "val_size": 4, "warmup_steps": 2, "eval_every_steps": 4, "save_every_steps": 2}
PREEMPTED = 143

# Holds the stage when it completes a checkpoint ("after:checkpoint-N") or right before ("before:...",
# Trainer's files written, the run record not yet): writes <state>/paused, waits for <state>/release.
_HOOK = PATCH_ON_IMPORT + '''
import os
import time

_AT = os.environ.get("PRUNEFLOW_TEST_HOLD_AT_CHECKPOINT", "")
_STATE = os.environ.get("PRUNEFLOW_TEST_HOOK_STATE", ".")


def _hold():
    with open(os.path.join(_STATE, "paused.tmp"), "w") as handle:
        handle.write(str(os.getpid()))
    os.replace(os.path.join(_STATE, "paused.tmp"), os.path.join(_STATE, "paused"))
    while not os.path.exists(os.path.join(_STATE, "release")):
        time.sleep(0.02)


def _install(module):
    save = module._RunRecord.save
    when, name = _AT.split(":")

    def holding_save(self, folder, fingerprint):
        if when == "before" and folder.name == name:
            _hold()
        save(self, folder, fingerprint)
        if when == "after" and folder.name == name:
            _hold()

    module._RunRecord.save = holding_save


def _fsdp_on_cpu(module):
    """accelerate turns FSDP on for GPU-like processes only; on CPU processes (gloo) it would train
    data-parallel. torch's FSDP2 itself runs on CPUs, so the test lets accelerate choose it there."""
    from accelerate.utils import DistributedType

    init = module.AcceleratorState.__init__

    def fsdp_init(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin

    module.AcceleratorState.__init__ = fsdp_init


if _AT:
    _patch_on_import("pruneflow.recovery", _install)
if os.environ.get("PRUNEFLOW_TEST_FSDP_ON_CPU"):
    _patch_on_import("accelerate.state", _fsdp_on_cpu)
'''


def _project(staged_project: Path, root: Path, **settings) -> Path:
    shutil.copytree(staged_project, root)
    for key, value in {**SETTINGS, **settings}.items():
        set_param(root, f"laptop.recover.{key}", value)
    return root


def _argv(out: str) -> list[str]:
    return ["--model", MODEL, "--teacher", TEACHER, "--out", out]


def _env(root: Path, hook: Path | None = None, hold_at: str = "") -> dict[str, str]:
    env = {**project_env(root), "OMP_NUM_THREADS": "1", "PRUNEFLOW_PROGRESS": "0"}
    if hook is not None:
        hook.mkdir(parents=True, exist_ok=True)
        (hook / "sitecustomize.py").write_text(_HOOK)
        env.update(PYTHONPATH=os.pathsep.join([str(hook), str(root / "src")]),
                   PRUNEFLOW_TEST_HOLD_AT_CHECKPOINT=hold_at, PRUNEFLOW_TEST_HOOK_STATE=str(hook))
    return env


def _start(root: Path, out: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as handle:
        return subprocess.Popen([sys.executable, "-m", "pruneflow.stages.recover", *_argv(out)], cwd=root, env=env,
                                stdout=handle, stderr=subprocess.STDOUT)


def _wait_until_held(process: subprocess.Popen, hook: Path, log: Path) -> None:
    deadline = time.monotonic() + 240
    while not (hook / "paused").exists():
        assert process.poll() is None, f"the stage ended ({process.returncode}) before the checkpoint:\n" \
                                       f"{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)


def _rerun(root: Path, out: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "pruneflow.stages.recover", *_argv(out)], cwd=root,
                            env=_env(root), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _summary(folder: Path) -> dict:
    return json.loads((folder / "recovery_summary.json").read_text())


def _assert_same_training(folder: Path, reference: Path) -> None:
    """History and merged weights of a resumed run are exactly those of the uninterrupted one."""
    assert _summary(folder)["history"] == _summary(reference)["history"]
    weights, expected = load_file(folder / "model.safetensors"), load_file(reference / "model.safetensors")
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name


@pytest.fixture(scope="module")
def lora_project(staged_project, tmp_path_factory) -> Path:
    """The tiny project's recipe (distillation, LoRA with dropout 0.05: the RNG state must resume too),
    and its uninterrupted result under data/recovered/reference."""
    root = _project(staged_project, tmp_path_factory.mktemp("preempt") / "project", method="lora")
    run_stages_in_process(root, commands=[("recover", _argv("data/recovered/reference"))])
    assert not (root / "data/recovered/.reference.state").exists()  # removed once the output is whole
    return root


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes_exactly(lora_project, tmp_path):
    out = lora_project / "data/recovered/sigterm"
    state = lora_project / "data/recovered/.sigterm.state"
    hook, log = tmp_path / "hook", tmp_path / "stage.log"
    process = _start(lora_project, "data/recovered/sigterm", _env(lora_project, hook, "after:checkpoint-2"), log)
    _wait_until_held(process, hook, log)
    process.send_signal(signal.SIGTERM)
    (hook / "release").touch()
    assert process.wait(timeout=240) == PREEMPTED, log.read_text()[-3000:]
    assert "SIGTERM: training stopped after step 3 of 12" in log.read_text()
    assert not out.exists(), "a preempted run must not write its output"
    assert sorted(p.name for p in state.iterdir()) == ["checkpoint-3", "fingerprint.txt"]
    assert (state / "checkpoint-3/pruneflow_record.json").is_file()

    rerun = _rerun(lora_project, "data/recovered/sigterm")
    assert "resuming from" in rerun.stderr and "checkpoint-3" in rerun.stderr
    assert _summary(out)["resumed_from_step"] == 3
    _assert_same_training(out, lora_project / "data/recovered/reference")
    assert not state.exists()


def test_sigkill_resumes_from_the_last_complete_checkpoint(lora_project, tmp_path):
    out = lora_project / "data/recovered/sigkill"
    state = lora_project / "data/recovered/.sigkill.state"
    hook, log = tmp_path / "hook", tmp_path / "stage.log"
    # killed while checkpoint-6 is half written: Trainer's files are there, the run record is not
    process = _start(lora_project, "data/recovered/sigkill", _env(lora_project, hook, "before:checkpoint-6"), log)
    _wait_until_held(process, hook, log)
    process.kill()
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert not out.exists()
    assert {p.name for p in state.iterdir()} == {"checkpoint-4", "checkpoint-6", "fingerprint.txt"}
    assert not (state / "checkpoint-6/pruneflow_record.json").exists()

    _rerun(lora_project, "data/recovered/sigkill")
    assert _summary(out)["resumed_from_step"] == 4
    _assert_same_training(out, lora_project / "data/recovered/reference")
    assert not state.exists()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _torchrun(root: Path, out: str, env: dict[str, str], log: Path | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "pruneflow.stages.recover", *_argv(out)]
    handle = log.open("w") if log is not None else subprocess.DEVNULL
    return subprocess.Popen(command, cwd=root, env={**env, "PRUNEFLOW_PROGRESS": "0"}, stdout=handle,
                            stderr=subprocess.STDOUT if log is not None else subprocess.PIPE, text=True)


def _kill_tree(process: subprocess.Popen, workers: int | None = 2) -> None:
    """SIGKILL torchrun and every worker (each in a session of its own), as a node failure would; with
    `workers` None, whatever is left of a run that ended (none when it ended cleanly)."""
    tree = psutil.Process(process.pid).children(recursive=True) if process.poll() is None else []
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    for worker in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()
    process.wait(timeout=60)
    _, alive = psutil.wait_procs(tree, timeout=60)
    assert (workers is None or len(tree) == workers) and not alive, (tree, alive)


def _torchrun_to_the_end(root: Path, out: str, env: dict[str, str]) -> None:
    process = _torchrun(root, out, env)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-4000:]


def _assert_trains_as(folder: Path, reference: Path, *, rel: float, atol: float) -> None:
    """The same steps, examples and validations as `reference`; losses and weights within the tolerance."""
    mine_summary, single_summary = _summary(folder), _summary(reference)
    assert [sorted(h) for h in mine_summary["history"]] == [sorted(h) for h in single_summary["history"]]
    for mine, single in zip(mine_summary["history"], single_summary["history"], strict=True):
        assert mine["step"] == single["step"]
        for key in ("loss", "lm_loss", "val_loss", "val_lm_loss", "grad_norm", "learning_rate"):
            if key in single:
                assert mine[key] == pytest.approx(single[key], rel=rel, abs=1e-9), (mine, single)
        assert mine.get("tokens") == single.get("tokens")  # the same examples in every step
    weights, expected = load_file(folder / "model.safetensors"), load_file(reference / "model.safetensors")
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=atol)


def test_two_processes_train_as_one(staged_project, tmp_path):
    """torchrun, 2 processes x micro-batch 2 x accumulation 1 against 1 process x 2 x 2: the same global
    batches, losses normalised by the global token count, data-parallel (DDP) and sharded (FSDP2,
    student and teacher). Measured on the CPU: DDP identical to the bit; FSDP's losses within 1.4e-7
    relative (its gradient norm adds the shards' squares in another order), its merged weights identical.
    The tolerances leave room for another reduction order of gloo."""
    root = _project(staged_project, tmp_path / "project", method="full")
    run_stages_in_process(root, commands=[("recover", _argv("data/recovered/one"))])
    _torchrun_to_the_end(root, "data/recovered/two", _env(root))
    set_param(root, "laptop.recover.sharding", "fsdp")
    _torchrun_to_the_end(root, "data/recovered/fsdp", _fsdp_env(root, tmp_path / "hook"))

    one, two, fsdp = (_summary(root / "data/recovered" / name) for name in ("one", "two", "fsdp"))
    assert (one["processes"], two["processes"], fsdp["processes"]) == (1, 2, 2)
    assert (one["sharding"], two["sharding"], fsdp["sharding"]) == ("none", "none", "fsdp")
    _assert_trains_as(root / "data/recovered/two", root / "data/recovered/one", rel=1e-6, atol=1e-6)
    _assert_trains_as(root / "data/recovered/fsdp", root / "data/recovered/one", rel=1e-5, atol=1e-5)
    # only the main process wrote: one output folder each, no temporaries or state left behind
    assert sorted(p.name for p in (root / "data/recovered").iterdir()) == ["fsdp", "one", "two"]


def _fsdp_env(root: Path, hook: Path, hold_at: str = "") -> dict[str, str]:
    return {**_env(root, hook, hold_at), "PRUNEFLOW_TEST_FSDP_ON_CPU": "1"}


def test_fsdp_on_cpu_processes_is_refused(staged_project, tmp_path):
    """accelerate shards across GPUs only: asked for on CPU processes, FSDP is refused by name, not
    replaced by data-parallel training."""
    root = _project(staged_project, tmp_path / "project", method="full", sharding="fsdp")
    process = _torchrun(root, "data/recovered/refused", _env(root))
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "recover.sharding='fsdp' is not allowed on cpu processes" in stderr
    assert not (root / "data/recovered/refused").exists()


def test_sharded_lora_distillation_resumes_after_sigterm_and_sigkill(lora_project, tmp_path):
    """LoRA distillation sharded over 2 processes (adapters and frozen base in FSDP2 units, the teacher
    sharded too). SIGTERM to torchrun and to both workers, as SLURM's `--signal=TERM@S` signals every
    process of the job step: each worker gets it twice (directly, then from torchrun), finishes the
    step, saves a checkpoint (every process its shard of the weights and optimizer state) and stops.
    The rerun resumes from it; SIGKILLed after a later checkpoint it resumes again, and ends where one
    process ends. Dropout off: two processes draw other dropout masks than one."""
    root = tmp_path / "project"
    shutil.copytree(lora_project, root)
    set_param(root, "laptop.recover.lora_dropout", 0.0)
    run_stages_in_process(root, commands=[("recover", _argv("data/recovered/one"))])
    set_param(root, "laptop.recover.sharding", "fsdp")
    out, state = root / "data/recovered/fsdp", root / "data/recovered/.fsdp.state"

    hook, log = tmp_path / "sigterm", tmp_path / "sigterm.log"
    process = _torchrun(root, "data/recovered/fsdp", _fsdp_env(root, hook, "after:checkpoint-2"), log)
    try:
        _wait_until_held(process, hook, log)
        workers = psutil.Process(process.pid).children(recursive=True)
        assert len(workers) == 2, workers
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        # the held worker handles it at once; torchrun's copy then comes as a second SIGTERM (signals that
        # arrive together count once: the gap makes the repeat certain)
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        time.sleep(1)  # torchrun passes it on; each worker acts on it at the end of its step
        (hook / "release").touch()
        assert process.wait(timeout=240) != 0
    finally:
        _kill_tree(process, workers=None)
    assert log.read_text().count("SIGTERM: training stopped after step 3 of 12") == 2, log.read_text()[-3000:]
    assert not out.exists()
    assert sorted(p.name for p in state.iterdir()) == ["checkpoint-3", "fingerprint.txt"]

    hook, log = tmp_path / "sigkill", tmp_path / "sigkill.log"
    process = _torchrun(root, "data/recovered/fsdp", _fsdp_env(root, hook, "after:checkpoint-6"), log)
    try:
        _wait_until_held(process, hook, log)
    finally:
        _kill_tree(process)  # torchrun and both workers, mid-run
    assert "resuming from data/recovered/.fsdp.state/checkpoint-3 (step 3 of 12)" in log.read_text(), \
        log.read_text()[-3000:]
    assert not out.exists()
    assert (state / "checkpoint-6/pruneflow_record.json").is_file()

    _torchrun_to_the_end(root, "data/recovered/fsdp", _fsdp_env(root, tmp_path / "end"))
    summary = _summary(out)
    assert (summary["processes"], summary["sharding"], summary["resumed_from_step"]) == (2, "fsdp", 6)
    _assert_trains_as(out, root / "data/recovered/one", rel=1e-5, atol=1e-5)
    assert (out / "adapter/adapter_model.safetensors").is_file()
    assert not state.exists()
