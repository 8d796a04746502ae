"""The Snakefile, dvc.yaml and params.yaml describe the same pipeline, all taken from one stage table
(pruneflow.pipeline.graph): same stages, commands, upstream outputs, data files, source files, params."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pruneflow.config import load_params
from pruneflow.pipeline.graph import STAGES, evaluation_files, stage_code, stage_data

from .conftest import DVC_YAML_AT_START, PROJECT_ROOT

LOG_REDIRECT = re.compile(r"\s*3>&2\s*>\s*\S+\s+2>&1\s*$")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.fixture(scope="module")
def snakemake_rules():
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import OutputSettings, ResourceSettings

    cwd = os.getcwd()
    os.chdir(PROJECT_ROOT)
    try:
        with SnakemakeApi(OutputSettings(quiet={"all"}, dryrun=True)) as api:
            workflow = api.workflow(resource_settings=ResourceSettings(cores=1), snakefile=Path("workflow/Snakefile"),
                                    workdir=PROJECT_ROOT)
            return {rule.name: rule for rule in workflow._workflow.rules if rule.name != "all"}
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def snakemake_jobs() -> list[dict]:
    """Every job of the default grid as `snakemake --dry-run --forceall` plans it."""
    out = subprocess.run(["snakemake", "--dry-run", "--forceall", "--printshellcmds", "--cores", "1"],
                         cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                         check=True).stdout
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        match = re.match(r"(?:local)?rule (\w+):", block)
        if not match or match.group(1) == "all":
            continue
        fields = dict(re.findall(r"^    (\w+): (.*)$", block, flags=re.M))
        shell = re.search(r"^Shell command: (.*)$", block, flags=re.M)
        jobs.append({
            "rule": match.group(1),
            "input": fields.get("input", "").split(", "),
            "output": [o.removesuffix(" (update)") for o in fields.get("output", "").split(", ")],
            "wildcards": dict(w.split("=", 1) for w in fields["wildcards"].split(", ")) if "wildcards" in fields else {},
            "shell": shell.group(1) if shell else "",
        })
    return jobs


@pytest.fixture(scope="module")
def dvc_stages():
    from dvc.repo import Repo

    stages: dict[str, list] = {}
    for stage in Repo(str(PROJECT_ROOT)).index.stages:
        stages.setdefault(stage.addressing.split("@")[0], []).append(stage)
    return stages


@pytest.fixture(scope="module")
def params():
    return load_params(PROJECT_ROOT / "params.yaml")


def _dvc_params(stage) -> list[str]:
    return [key for dep in stage.deps if type(dep).__name__ == "ParamsDependency" for key in dep.params]


def _dvc_paths(stage) -> list[str]:
    return [dep.def_path for dep in stage.deps if type(dep).__name__ != "ParamsDependency"]


def test_committed_dvc_yaml_is_the_rendering_of_params_and_source(params):
    from pruneflow.pipeline.graph import render_dvc_yaml

    assert render_dvc_yaml(params, PROJECT_ROOT) == DVC_YAML_AT_START, (
        "dvc.yaml is out of date: python -m pruneflow.pipeline.plan --write-dvc-yaml")
    out = subprocess.run([sys.executable, "-m", "pruneflow.pipeline.plan", "--check-dvc-yaml", "--no-devices"],
                         cwd=PROJECT_ROOT, env=_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


def test_same_stages(snakemake_rules, dvc_stages):
    from pruneflow.stages import STAGES as STAGE_MODULES

    assert set(snakemake_rules) == set(dvc_stages) == set(STAGES)
    assert {stage.module for stage in STAGES.values()} == set(STAGE_MODULES)


def test_same_params_keys(dvc_stages):
    for name, stage in STAGES.items():
        for dvc_stage in dvc_stages[name]:
            assert _dvc_params(dvc_stage) == list(stage.params), name


def test_source_dependencies_are_each_stages_import_closure(snakemake_jobs, dvc_stages):
    for job in snakemake_jobs:
        closure = stage_code(PROJECT_ROOT, STAGES[job["rule"]])
        assert [p for p in job["input"] if p.startswith("src/")] == closure, job["rule"]
    for name in STAGES:
        closure = stage_code(PROJECT_ROOT, STAGES[name])
        assert f"src/pruneflow/stages/{STAGES[name].module}.py" in closure
        assert "src/pruneflow/config.py" in closure and "src/pruneflow/pipeline/records.py" in closure
        for stage in dvc_stages[name]:
            assert [p for p in _dvc_paths(stage) if p.startswith("src/")] == closure, name
    # the module that holds the surgery and the layer range is a dependency of prune (it was not, once)
    prune = stage_code(PROJECT_ROOT, STAGES["prune"])
    assert {"src/pruneflow/architectures.py", "src/pruneflow/config.py", "src/pruneflow/pruning.py"} <= set(prune)


def test_same_inputs_outputs_and_data_per_job(snakemake_jobs, dvc_stages, params):
    from pruneflow.pipeline.graph import grid_values, input_paths, outputs_of
    from pruneflow.pipeline.records import stamp_path

    expected = {name: stage_data(params, stage, PROJECT_ROOT) for name, stage in STAGES.items()}
    assert expected["recover"] == sorted(params.recover.data)
    assert expected["calibrate"] == [params.calibration.source]
    assert expected["evaluate_dense"] == evaluation_files(params)
    planned = sorted((job["rule"], tuple(sorted(job["wildcards"].items()))) for job in snakemake_jobs)
    assert planned == sorted((name, tuple(sorted(values.items())))
                             for name, stage in STAGES.items() for values in grid_values(params, stage))
    for job in snakemake_jobs:
        stage, values = STAGES[job["rule"]], job["wildcards"]
        upstream = [path for paths in input_paths(params, stage, values).values() for path in paths]
        stamp = stamp_path(".", stage, values).as_posix()
        assert job["input"] == [*upstream, *expected[stage.name], *stage_code(PROJECT_ROOT, stage), stamp], job
        assert job["output"] == list(outputs_of(stage, values).values())
    for name, stages in dvc_stages.items():
        for stage in stages:
            paths = _dvc_paths(stage)
            assert set(expected[name]) <= set(paths), name
            upstream = {p for p in paths if not p.startswith("src/") and p not in expected[name]}
            assert all(p.startswith(("data/", "reports/")) for p in upstream), (name, upstream)


def test_same_commands_for_the_default_grid(snakemake_jobs, dvc_stages):
    slot = "python -m pruneflow.pipeline.gpu_slots -- "  # Snakemake runs GPU jobs in parallel; DVC runs one at a time
    lines = [job["shell"] for job in snakemake_jobs]
    # the jobs' progress bars go to the console (pruneflow.progress); the stage replaces the job's shell
    progress = "PRUNEFLOW_PROGRESS_FD=3 exec "
    snake_cmds = sorted(LOG_REDIRECT.sub("", line.removeprefix(progress).removeprefix(slot)) for line in lines)
    dvc_cmds = sorted(stage.cmd for stages in dvc_stages.values() for stage in stages)
    assert snake_cmds == dvc_cmds
    gpu_stages = {stage.module for stage in STAGES.values() if stage.gpu}
    assert gpu_stages == {"cache_activations", "score", "prune", "recover", "evaluate"}
    for line in lines:
        stage = re.search(r"pruneflow\.stages\.(\w+)", line).group(1)
        assert line.removeprefix(progress).startswith(slot) == (stage in gpu_stages), line


def test_every_params_section_is_read_by_some_stage():
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    tracked = {key for stage in STAGES.values() for key in stage.params}
    # mlflow only says where runs are logged: changing it must not rerun anything
    assert set(raw) - {"mlflow"} == {key.split(".")[0] for key in tracked}
    assert {f"laptop.{section}" for section in raw["laptop"]} <= tracked


def test_gpu_stages_declare_a_gpu_and_cpu_stages_do_not(snakemake_rules):
    gpu_rules = {name for name, rule in snakemake_rules.items() if rule.resources.get("gpu") == 1}
    assert gpu_rules == {name for name, stage in STAGES.items() if stage.gpu}


def test_every_rule_has_log_benchmark_and_keeps_its_outputs(snakemake_rules):
    from snakemake.io import is_flagged

    for name, rule in snakemake_rules.items():
        assert rule.log, name
        assert rule.benchmark, name
        # `update`: Snakemake must not delete the earlier result before the job or when it fails
        assert all(is_flagged(out, "update") for out in rule.output), name


def test_lint_is_clean():
    result = subprocess.run(["snakemake", "--lint"], cwd=PROJECT_ROOT, capture_output=True, text=True, env=_env())
    assert result.returncode == 0, result.stdout + result.stderr
