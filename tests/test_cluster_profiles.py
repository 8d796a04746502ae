"""The SLURM and Kubernetes profiles plan the whole grid (dry run; no cluster needed), with every job's
resources derived from the model's config.json (pruneflow.pipeline.resources)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from .conftest import PROJECT_ROOT
from .test_resources import LLAMA2_7B, LLAMA3_70B

GPU_RULES = {"cache_activations", "score", "prune", "prune_servable", "recover", "evaluate_dense", "evaluate_pruned",
             "evaluate_recovered", "evaluate_servable"}
SLURM = str(PROJECT_ROOT / "workflow/profiles/slurm")
KUBERNETES = str(PROJECT_ROOT / "workflow/profiles/kubernetes")


def _dry_run(*extra: str, cwd: Path = PROJECT_ROOT, ok: bool = True) -> str:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    out = subprocess.run(["snakemake", "--snakefile", str(PROJECT_ROOT / "workflow/Snakefile"), "--dry-run",
                          "--forceall", *extra], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    assert (out.returncode == 0) == ok, out.stdout[-3000:]
    return out.stdout


def _jobs(text: str) -> dict[str, dict]:
    """rule -> its first job's resources (name -> value) and shell command."""
    found: dict[str, dict] = {}
    for block in re.split(r"\n(?=rule \w+:)", text):
        match = re.match(r"rule (\w+):", block)
        resources = re.search(r"resources: (.*)", block)
        if match and resources and match.group(1) not in found:
            shell = re.search(r"^Shell command: (.*)$", block, flags=re.M)
            values = dict(item.split("=", 1) for item in resources.group(1).split(", "))
            found[match.group(1)] = {**values, "shell": shell.group(1) if shell else ""}
    return found


def test_slurm_profile_plans_every_job_with_gpus_memory_and_time():
    jobs = _jobs(_dry_run("--profile", SLURM))
    assert set(jobs) >= GPU_RULES | {"prepare_model", "calibrate", "prune", "report"}
    for rule, job in jobs.items():
        if rule == "all":
            continue
        assert (job.get("gpu") == "1") == (rule in GPU_RULES), (rule, job)  # the embedded 135M model: one GPU
        assert {"runtime", "mem_mb", "cpus_per_task"} <= set(job), (rule, job)
    assert "python -m pruneflow.stages.recover" in jobs["recover"]["shell"]
    assert jobs["recover"]["slurm_extra"].startswith("--signal=TERM@")


def test_slurm_profile_leaves_a_requeued_job_to_slurm():
    """With the plugin's own requeue setting a job that SLURM requeues after a node failure stays tracked
    as running (snakemake_executor_plugin_slurm: NODE_FAIL with `requeue` set), rather than being
    reported failed and submitted a second time beside the requeued one."""
    from snakemake_executor_plugin_slurm import ExecutorSettings

    profile = yaml.safe_load((Path(SLURM) / "config.yaml").read_text())
    assert profile["slurm-requeue"] is True
    assert "requeue" in {spec.name for spec in dataclasses.fields(ExecutorSettings)}
    sbatch = _sbatch({"runtime": "30", "mem_mb": "8000", "cpus_per_task": "2"})  # a CPU job, no slurm_extra
    assert sbatch.count(" --requeue") == 1, sbatch
    recover = _sbatch({"runtime": "56", "mem_mb": "28000", "cpus_per_task": "8", "gpu": "1",
                       "slurm_extra": "--signal=TERM@300"})
    assert recover.count(" --requeue") == 1 and "--signal=TERM@300" in recover, recover


@pytest.mark.parametrize("rule", ["calibrate", "score", "recover"])
def test_the_stage_replaces_the_shell_of_its_job(tmp_path, rule):
    """SLURM sends SIGTERM to every process of a job: the stage must be the process Snakemake's job
    process started (the shell line execs it, the GPU slot allocator execs it in turn), not the child
    of a shell that dies at once and ends the job before recovery writes its checkpoint. The rendered
    line runs as Snakemake runs it (bash, `set -euo pipefail`), with a stand-in for the stage."""
    from pruneflow.config import load_params
    from pruneflow.pipeline.snakemake_support import SnakemakePipeline

    line = SnakemakePipeline(load_params(PROJECT_ROOT / "params.yaml"), PROJECT_ROOT).shell(rule)
    log = tmp_path / "job.log"
    line = re.sub(r"\{(\w+)(?:\.(\w+))?\}", lambda m: str(log) if m.group(1) == "log" else (
        "python" if m.group(2) == "launcher" else "x"), line)
    bin_dir = tmp_path / "bin"  # `python`: the real one for the slot allocator, else the stage stand-in
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f"#!/bin/sh\nif [ \"$2\" = pruneflow.pipeline.gpu_slots ]; then exec "
                                    f"{sys.executable} \"$@\"; fi\necho \"stage $$\"\necho console >&3\n")
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PRUNEFLOW_GPU_SLOTS": "off"}
    job = subprocess.Popen("set -euo pipefail; " + line, shell=True, executable="/bin/bash", env=env,
                           stderr=subprocess.PIPE, text=True)
    _, console = job.communicate(timeout=60)
    assert job.returncode == 0, console
    assert log.read_text().split() == ["stage", str(job.pid)], line  # no shell between the job and the stage
    assert console.strip().splitlines()[-1] == "console"  # descriptor 3 still reaches the console


@pytest.fixture()
def storage(tmp_path):
    """What every pod would mount: the sources and the raw data under the storage prefix."""
    (tmp_path / "data").mkdir()
    (tmp_path / "src").symlink_to(PROJECT_ROOT / "src")
    (tmp_path / "data/raw").symlink_to(PROJECT_ROOT / "data/raw")
    return tmp_path


def test_kubernetes_profile_plans_every_job_through_storage(storage):
    text = _dry_run("--profile", KUBERNETES, "--default-storage-prefix", str(storage))
    jobs = _jobs(text)
    assert set(jobs) >= GPU_RULES | {"prepare_model", "report"}
    for rule, job in jobs.items():
        assert (job.get("gpu") == "1") == (rule in GPU_RULES), (rule, job)
        assert (job.get("gpu_manufacturer") == "nvidia") == (rule in GPU_RULES), (rule, job)  # the plugin needs it
    assert f"{storage}/data/models/dense" in text  # outputs live under the storage prefix


def _project(root: Path, config: dict, **sections) -> Path:
    """A project whose model folder holds only the config.json of a published model (the dry run reads
    no weights), with the repository's sources and data, at full scale."""
    (root / "models/model").mkdir(parents=True)
    (root / "models/model/config.json").write_text(json.dumps(config))
    (root / "data").mkdir()
    (root / "src").symlink_to(PROJECT_ROOT / "src")
    (root / "data/raw").symlink_to(PROJECT_ROOT / "data/raw")
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params.update(scale="full", model={"source": "models/model", "revision": None})
    params["mlflow"]["enabled"] = False
    for section, changes in sections.items():
        params[section].update(changes)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def _sbatch(job: dict) -> str:
    """The sbatch line snakemake-executor-plugin-slurm builds for a job with these resources, under the
    SLURM profile's executor settings."""
    from snakemake_executor_plugin_slurm import ExecutorSettings
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string
    from snakemake_executor_plugin_slurm.validation import validate_slurm_extra

    class Resources(dict):
        __getattr__ = dict.get

    resources = Resources({key: int(value) if value.isdigit() else value for key, value in job.items()
                           if key != "shell"})
    fake = SimpleNamespace(resources=resources, threads=1, name="recover", is_group=lambda: False)
    validate_slurm_extra(fake)
    params = {"run_uuid": "u", "slurm_logfile": "log", "comment_str": "c", "account": "", "partition": "",
              "workdir": ""}
    profile = yaml.safe_load((Path(SLURM) / "config.yaml").read_text())
    settings = ExecutorSettings(requeue=profile["slurm-requeue"])
    return get_submit_command(fake, params, settings=settings) + set_gres_string(fake)


def test_slurm_plans_a_7b_grid_from_its_config(tmp_path):
    """Llama-2-7B (6.74B): LoRA distillation fits one 80 GB GPU (tests/test_resources.py has the
    arithmetic); the forward stages fit one GPU whole."""
    jobs = _jobs(_dry_run("--profile", SLURM, cwd=_project(tmp_path, LLAMA2_7B, recover={"method": "lora"})))
    recover = jobs["recover"]
    assert (recover["gpu"], recover["gpu_mem_mb"], recover["mem_mb"], recover["cpus_per_task"]) == (
        "1", "30000", "28000", "8")
    assert "python -m pruneflow.stages.recover" in recover["shell"] and "torchrun" not in recover["shell"]
    sbatch = _sbatch(recover)
    for flag in ("--gpus=1", "--mem 28000", f"-t {recover['runtime']}", "--cpus-per-task=8",
                 "--signal=TERM@300", " --requeue"):
        assert flag in sbatch, (flag, sbatch)
    assert int(recover["runtime"]) > 15  # 2 epochs of the WikiText-2 training text at 120 TFLOP/s
    assert (jobs["evaluate_dense"]["gpu"], jobs["evaluate_dense"]["gpu_mem_mb"]) == ("1", "32000")
    assert jobs["cache_activations"]["gpu_mem_mb"] == "50000"  # bf16 weights x 1.25 + float64 Gram sums
    # fp32 surgery: forward passes on one GPU (whole: 1.25 x 27 GB of fp32 weights), the model in host memory
    assert (jobs["prune"]["mem_mb"], jobs["prune"]["gpu"], jobs["prune"]["gpu_mem_mb"]) == ("57000", "1", "34000")


def test_7b_full_distillation_is_refused_on_80gb_and_data_parallel_on_141gb(tmp_path):
    """Every GPU holds the teacher and the whole training state (about 117 GB): more 80 GB GPUs do not
    help; on 141 GB GPUs the job is longer than an hour on one, so it takes two (64 = 4 x 2 x 8)."""
    root = _project(tmp_path, LLAMA2_7B)
    text = _dry_run("--profile", SLURM, cwd=root, ok=False)
    assert "recover.method='full' is not allowed for model.source='models/model' (5.4B parameters) after pruning, " \
           "6.7B as the teacher: recovery is data-parallel (each GPU holds the whole teacher and training state), " \
           "so every GPU needs 108.7 GiB" in text
    assert "rule recover" not in text
    recover = _jobs(_dry_run("--profile", SLURM, "--config", "gpu_memory_gb=141", cwd=root))["recover"]
    assert (recover["gpu"], recover["gpu_mem_mb"], recover["mem_mb"], recover["cpus_per_task"]) == (
        "2", "112000", "76000", "16")
    assert "env TORCH_ELASTIC_SHUTDOWN_TIMEOUT=300 torchrun --standalone --nproc_per_node 2 " \
           "-m pruneflow.stages.recover" in recover["shell"]
    assert "--gpus=2" in _sbatch(recover) and "--signal=TERM@300" in _sbatch(recover)


def test_slurm_plans_a_70b_grid_from_its_config(tmp_path):
    """Llama-3-70B (70.6B) without recovery on 80 GB GPUs: forward stages layer by layer on one GPU with
    the weights in host memory. LoRA next-token recovery with gradient checkpointing fits 141 GB GPUs
    data-parallel; LoRA distillation with gradient checkpointing fits eight 80 GB GPUs sharded."""
    root = _project(tmp_path, LLAMA3_70B, grid={"recovered_criteria": []}, activations={"gram_matrices": False})
    jobs = _jobs(_dry_run("--profile", SLURM, cwd=root))
    assert "recover" not in jobs and "evaluate_recovered" not in jobs
    for rule in ("cache_activations", "score", "evaluate_dense"):
        assert jobs[rule]["gpu"] == "1" and int(jobs[rule]["gpu_mem_mb"]) < 80 * 1024, rule
        assert int(jobs[rule]["mem_mb"]) > 131_000, rule  # 141 GB of bf16 weights in host memory
    root = _project(tmp_path / "lora", LLAMA3_70B, activations={"gram_matrices": False},
                    recover={"method": "lora", "objective": "lm", "gradient_checkpointing": True})
    h200 = _jobs(_dry_run("--profile", SLURM, "--config", "gpu_memory_gb=141", cwd=root))["recover"]
    assert (h200["gpu"], h200["gpu_mem_mb"], h200["mem_mb"]) == ("4", "114000", "448000")
    assert "--nproc_per_node 4" in h200["shell"] and "--gpus=4" in _sbatch(h200)
    # sharded (FSDP), LoRA distillation with gradient checkpointing fits the 8 80 GB GPUs of one node; only the
    # main process loads the models
    root = _project(tmp_path / "fsdp", LLAMA3_70B, activations={"gram_matrices": False},
                    recover={"method": "lora", "sharding": "fsdp", "gradient_checkpointing": True})
    sharded = _jobs(_dry_run("--profile", SLURM, cwd=root))["recover"]
    assert (sharded["gpu"], sharded["gpu_mem_mb"], sharded["mem_mb"]) == ("8", "48000", "276000")
    assert "--nproc_per_node 8" in sharded["shell"] and "--gpus=8" in _sbatch(sharded)


def test_a_70b_grid_that_cannot_fit_is_refused_before_planning(tmp_path):
    root = _project(tmp_path, LLAMA3_70B, recover={"method": "lora"})  # LoRA distillation, Gram sums on the GPU
    text = _dry_run("--profile", SLURM, cwd=root, ok=False)
    assert "pruneflow plan: error: activations.gram_matrices=True is not allowed for model.source='models/model' " \
           "(70.6B parameters)" in text
    assert "recover.method='lora' is not allowed for model.source='models/model' (56.4B parameters) after pruning, " \
           "70.6B as the teacher: recovery is data-parallel" in text
    assert "more than 80 GB per GPU (--config gpu_memory_gb) allows (72.0 GiB usable); allowed: " \
           "recover.sharding: fsdp with recover.gradient_checkpointing: true (on 8 GPUs), recover.objective: lm (no " \
           "teacher)" in text
    assert "rule recover" not in text


def test_kubernetes_asks_for_the_70b_gpus(tmp_path):
    root = _project(tmp_path, LLAMA3_70B, activations={"gram_matrices": False},
                    recover={"method": "lora", "objective": "lm", "gradient_checkpointing": True})
    jobs = _jobs(_dry_run("--profile", KUBERNETES, "--default-storage-prefix", str(root), "--config",
                          "gpu_memory_gb=141", cwd=root))
    assert (jobs["recover"]["gpu"], jobs["recover"]["mem_mb"], jobs["recover"]["gpu_manufacturer"]) == (
        "4", "448000", "nvidia")
    assert "--nproc_per_node 4" in jobs["recover"]["shell"]


def test_only_cluster_settings_may_come_from_the_command_line(tmp_path):
    root = _project(tmp_path, LLAMA2_7B)
    text = _dry_run("--profile", SLURM, "--config", "gpu_memory_gb=0", cwd=root, ok=False)
    assert "pruneflow plan: error: --config gpu_memory_gb=0 is not allowed; allowed: a number > 0" in text
