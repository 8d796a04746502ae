"""One ratio folder name for Snakemake, DVC and the stage CLIs, however params.yaml spells the ratio.

DVC names a grid instance by the YAML scalar as written; pruneflow's `format_ratio` must give the same
string, Snakemake's ratio wildcard must match it (and read it back unchanged), and `--ratio` must
parse it to the same number. Checked for many ratios (0, tiny, many digits) and YAML spellings.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pruneflow.config import RATIO_PATTERN, format_ratio, load_params, parse_ratio
from pruneflow.pipeline.graph import STAGES, all_outputs, render_dvc_yaml

from .conftest import PROJECT_ROOT
from .tiny_project import init_git_and_dvc, make_tiny_project, run, set_param

SPELLINGS = ["0", "0.0", "0.", ".5", "5e-1", "5E-1", "1e-5", "1.0e-10", "0.30000000000000004", "0.1234567890123",
             "9.999999999999999e-05", "0.0001", "+0.25", "2.5e-1", "0.99999999999999989", "5e-324"]


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory):
    """A DVC project with the pipeline's sources and data; dvc.yaml and params.yaml per example."""
    root = tmp_path_factory.mktemp("ratios") / "p"
    root.mkdir()
    shutil.copytree(PROJECT_ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (root / "data").mkdir()
    (root / "data/raw").symlink_to(PROJECT_ROOT / "data/raw")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=root, check=True)
    return root


def _snakemake_ratio(path: str, template: str) -> str | None:
    """The ratio wildcard Snakemake reads from `path` with the rule's pattern and the workflow's constraint."""
    from snakemake.io import regex_from_filepattern, update_wildcard_constraints

    pattern = update_wildcard_constraints(template, {}, {"criterion": "[A-Za-z0-9_]+", "ratio": RATIO_PATTERN})
    match = re.match(regex_from_filepattern(pattern), path)
    return match.group("ratio") if match else None


def _check_spelling(root: Path, spelled: str) -> None:
    text = (PROJECT_ROOT / "params.yaml").read_text().replace("ratios: [0.2]", f"ratios: [{spelled}]")
    (root / "params.yaml").write_text(text)
    params = load_params(root / "params.yaml")
    (ratio,) = params.grid.ratios
    name = format_ratio(ratio)
    # the stage CLI reads the name back to the same number, and its own spelling is the name again
    assert parse_ratio(name) == ratio and format_ratio(parse_ratio(name)) == name
    # Snakemake's wildcard matches every path that uses it, and reads the same name back
    for stage in STAGES.values():
        if stage.ratios:
            for out in stage.outputs.values():
                path = out.path.replace("{criterion}", "flap").replace("{ratio}", name)
                assert _snakemake_ratio(path, out.path) == name, (spelled, path)
    # DVC names the instances with the same string
    (root / "dvc.yaml").write_text(render_dvc_yaml(params, root))
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        dvc_outs = sorted(out.def_path for stage in repo.index.stages for out in stage.outs)
        dvc_names = sorted(stage.addressing.split(":")[-1] for stage in repo.index.stages)
    assert dvc_outs == sorted(all_outputs(params)), spelled
    assert f"prune@{params.grid.criteria[0]}-{name}" in dvc_names


@pytest.mark.parametrize("spelled", SPELLINGS)
def test_every_engine_names_a_spelled_ratio_alike(dvc_project, spelled):
    _check_spelling(dvc_project, spelled)


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.one_of(st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
                 st.floats(min_value=5e-324, max_value=1e-3), st.just(0)))
def test_every_engine_names_any_ratio_alike(dvc_project, value):
    _check_spelling(dvc_project, yaml.safe_dump(value).splitlines()[0] if not isinstance(value, int) else "0")


def test_pattern_accepts_every_float_repr_in_the_unit_interval():
    for value in [0.0, 5e-324, 1e-5, 1e-4, 0.1 + 0.2, 0.5, 1 - 2**-53, 2.5e-300]:
        assert re.fullmatch(RATIO_PATTERN, format_ratio(value)), value
    for bad in ["1.0", "0.2.1", "-0.1", "1e5", "abc", ""]:
        assert not re.fullmatch(RATIO_PATTERN, bad), bad


@pytest.mark.integration
def test_snakemake_and_dvc_plan_the_same_paths_for_awkward_ratios(tmp_path):
    """The engines themselves (not only their rules): `snakemake -n` and DVC's stage list, one project."""
    root = make_tiny_project(tmp_path / "project")
    init_git_and_dvc(root)
    set_param(root, "grid.ratios", [0, 1e-05, 0.30000000000000004])
    run(["python", "-m", "pruneflow.pipeline.plan", "--write-dvc-yaml", "--no-devices"], root)
    out = run(["snakemake", "--dry-run", "--forceall", "--cores", "1"], root).stdout
    planned = set(re.findall(r"^    output: (.*)$", out, flags=re.M))
    snake_outputs = {path.removesuffix(" (update)") for line in planned for path in line.split(", ")}
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        dvc_outputs = {out.def_path for stage in repo.index.stages for out in stage.outs}
    assert snake_outputs == dvc_outputs
    assert {"data/pruned/taylor_element1/0", "data/pruned/taylor_element1/1e-05",
            "data/pruned/taylor_element1/0.30000000000000004"} <= snake_outputs
    # a target outside the grid (another criterion and ratio) is planned too, its stamp made on demand
    outside = run(["snakemake", "--dry-run", "data/pruned/flap/0.5", "--cores", "1"], root).stdout
    assert "data/pruned/flap/0.5" in outside and "rule score:" in outside
