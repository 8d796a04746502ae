"""The Snakefile, dvc.yaml and params.yaml describe the same pipeline."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import PROJECT_ROOT

LOG_REDIRECT = re.compile(r"\s*>\s*\S+\s+2>&1\s*$")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def snakemake_rules():
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import OutputSettings, ResourceSettings

    cwd = os.getcwd()
    os.chdir(PROJECT_ROOT)
    try:
        with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
            workflow = api.workflow(resource_settings=ResourceSettings(cores=1), snakefile=Path("Snakefile"),
                                    workdir=PROJECT_ROOT)
            return {rule.name: rule for rule in workflow._workflow.rules if rule.name != "all"}
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def dvc_stages():
    from dvc.repo import Repo

    stages: dict[str, list] = {}
    for stage in Repo(str(PROJECT_ROOT)).index.stages:
        stages.setdefault(stage.addressing.split("@")[0], []).append(stage)
    return stages


def _dvc_params(stage) -> list[str]:
    return [key for dep in stage.deps if type(dep).__name__ == "ParamsDependency" for key in dep.params]


def _dvc_paths(stage) -> list[str]:
    return [dep.def_path for dep in stage.deps if type(dep).__name__ != "ParamsDependency"]


def test_same_stages(snakemake_rules, dvc_stages):
    from pruneflow.stages import STAGES

    assert set(snakemake_rules) == set(dvc_stages)
    used_modules = {re.search(r"pruneflow\.stages\.(\w+)", r.shellcmd).group(1) for r in snakemake_rules.values()}
    assert used_modules == set(STAGES)


def test_same_tracked_params(snakemake_rules, dvc_stages):
    for name, rule in snakemake_rules.items():
        snakemake_keys = list(rule.params["tracked"].keys())
        for stage in dvc_stages[name]:
            assert _dvc_params(stage) == snakemake_keys, name


def test_same_source_dependencies(snakemake_rules, dvc_stages):
    for name, rule in snakemake_rules.items():
        snakemake_code = [str(p) for p in rule.input if str(p).startswith("src/")]
        assert snakemake_code, f"rule {name} lists no source file"
        assert any(f"stages/{name.split('_')[0]}" in p or "stages/" in p for p in snakemake_code)
        for stage in dvc_stages[name]:
            assert [p for p in _dvc_paths(stage) if p.startswith("src/")] == snakemake_code, name
    importance = sorted(str(p.relative_to(PROJECT_ROOT)) for p in (PROJECT_ROOT / "src/pruneflow/importance").glob("*.py"))
    assert set(importance) <= set(_dvc_paths(dvc_stages["score"][0])), "a new criterion module is missing in dvc.yaml"


def test_data_dependencies_cover_each_other(snakemake_rules, dvc_stages):
    def covered(path: str, by: list[str]) -> bool:
        return any(path == other or path.startswith(other.rstrip("/") + "/") for other in by)

    for name, rule in snakemake_rules.items():
        snake = [str(p) for p in rule.input if not str(p).startswith("src/")]
        for stage in dvc_stages[name]:
            dvc = [p for p in _dvc_paths(stage) if not p.startswith("src/")]
            concrete = [p for p in snake if "{" not in p]
            assert all(covered(p, dvc) for p in concrete), (name, concrete, dvc)
            assert all(any(covered(s, [p]) or covered(p, [s]) or "{" in s for s in snake) for p in dvc), (name, dvc)


def test_same_commands_for_the_default_grid(dvc_stages):
    out = subprocess.run(
        ["snakemake", "--dry-run", "--printshellcmds", "--forceall", "--cores", "1"],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), check=True,
    ).stdout
    prefix = "Shell command: "
    slot = "python -m pruneflow.pipeline.gpu_slots -- "  # Snakemake runs GPU jobs in parallel; DVC runs one at a time
    lines = [line.strip().removeprefix(prefix) for line in out.splitlines()]
    lines = [line for line in lines if line.startswith(("python -m pruneflow.stages.", slot))]
    snake_cmds = sorted(LOG_REDIRECT.sub("", line.removeprefix(slot)) for line in lines)
    dvc_cmds = sorted(stage.cmd for stages in dvc_stages.values() for stage in stages)
    assert snake_cmds == dvc_cmds
    gpu_stages = {"cache_activations", "score", "recover", "evaluate"}
    for line in lines:
        stage = re.search(r"pruneflow\.stages\.(\w+)", line).group(1)
        assert line.startswith(slot) == (stage in gpu_stages), line


def test_every_params_section_is_tracked_by_some_stage(snakemake_rules):
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    tracked = {key for rule in snakemake_rules.values() for key in rule.params["tracked"]}
    top = {key.split(".")[0] for key in tracked}
    # mlflow only says where runs are logged: changing it must not rerun anything
    assert set(raw) - {"mlflow"} == top
    assert {f"laptop.{section}" for section in raw["laptop"]} <= tracked


def test_gpu_stages_declare_a_gpu_and_cpu_stages_do_not(snakemake_rules):
    gpu_rules = {name for name, rule in snakemake_rules.items() if rule.resources.get("gpu") == 1}
    assert gpu_rules == {"cache_activations", "score", "recover", "evaluate_dense", "evaluate_pruned",
                         "evaluate_recovered"}


def test_every_rule_has_log_and_benchmark(snakemake_rules):
    for name, rule in snakemake_rules.items():
        assert rule.log, name
        assert rule.benchmark, name


def test_lint_is_clean():
    result = subprocess.run(["snakemake", "--lint"], cwd=PROJECT_ROOT, capture_output=True, text=True, env=_env())
    assert result.returncode == 0, result.stdout + result.stderr
