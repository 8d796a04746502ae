"""Fuzzing params.yaml: whatever a user writes, the plan is either valid or one line naming the key.

Hypothesis mutates the tiny project's params.yaml (types, ranges, names, structure, YAML spellings,
repeated keys, broken syntax) and runs the plan command in this process, as `snakemake` and every
stage do first. Every outcome must be a valid plan, or exit status 2 with exactly one line
`pruneflow plan: error: ...` that names a params key (or the YAML line), no traceback, and no file
of the project touched.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .tiny_project import make_tiny_project

SECTION_KEYS: set[str] = set()


def _paths(node, prefix=""):
    """Every dotted path of a nested mapping (mappings and leaves)."""
    if isinstance(node, dict):
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            yield dotted
            yield from _paths(value, dotted)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = make_tiny_project(tmp_path_factory.mktemp("fuzz") / "project")
    (root / "data/models").mkdir(parents=True, exist_ok=True)  # an "output" that must never be touched
    (root / "data/models/sentinel.txt").write_text("earlier result")
    return root


def _snapshot(root: Path, skip_state: bool) -> dict[str, tuple[int, int]]:
    found = {}
    for path in root.rglob("*"):
        relative = path.relative_to(root).as_posix()
        if relative == "params.yaml" or (skip_state and relative.startswith(".pruneflow")):
            continue
        stat = path.lstat()
        found[relative] = (stat.st_size, stat.st_mtime_ns)
    return found


VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-10**9, 10**9),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["auto", "cpu", "cuda:7", "full", "laptop", "flap", "0.2", "2e-4", "off", "yes", "", " "]),
    st.lists(st.one_of(st.integers(-3, 3), st.floats(-1, 2), st.text(max_size=6)), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
YAML_NUMBERS = ["2e-4", "1e-5", ".5", "0x10", "0o7", "1_000", "+1", "-0", "1.", ".inf", "-.inf", ".nan", "017", "1e3"]


@st.composite
def mutated_params(draw, base: dict) -> tuple[str, str]:
    """(params.yaml text, the dotted key the mutation touched)."""
    params = copy.deepcopy(base)
    paths = sorted(_paths(params))
    target = draw(st.sampled_from(paths))
    *parents, last = target.split(".")
    node = params
    for part in parents:
        node = node[part]
    kind = draw(st.sampled_from(["value", "value", "delete", "rename", "spelling", "duplicate", "syntax",
                                 "list", "structure"]))
    if kind == "value":
        node[last] = draw(VALUES)
    elif kind == "delete":
        del node[last]
    elif kind == "rename":
        new = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=12))
        node[new] = node.pop(last)
        target = ".".join([*parents, new])
    elif kind == "list":
        current = node[last]
        node[last] = draw(st.sampled_from([[], [current, current], [current, None], [[current]]]))
    elif kind == "structure":
        node[last] = draw(st.sampled_from([[node[last]], {"x": node[last]}, "section", 7]))
    text = yaml.safe_dump(params, sort_keys=False)
    if kind == "spelling":  # a number written in another YAML spelling, as a user would type it
        spelled = draw(st.sampled_from(YAML_NUMBERS))
        text = yaml.safe_dump({**params}, sort_keys=False)
        pattern = re.compile(rf"^(\s*{re.escape(last)}:) .*$", flags=re.M)
        text = pattern.sub(lambda m: f"{m.group(1)} {spelled}", text, count=1)
    elif kind == "duplicate":
        lines = text.splitlines()
        index = draw(st.integers(0, len(lines) - 1))
        lines.insert(index, lines[index])
        text = "\n".join(lines) + "\n"
    elif kind == "syntax":
        lines = text.splitlines()
        index = draw(st.integers(0, len(lines) - 1))
        lines[index] = lines[index] + draw(st.sampled_from([" [", ": :", " {", "\t", " '", " ]"]))
        text = "\n".join(lines) + "\n"
    return text, target


def _run_plan(root: Path) -> tuple[int, str]:
    from pruneflow.pipeline import plan
    from pruneflow.stages.cli import run_cli

    stdout, stderr = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    os.chdir(root)
    code = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                run_cli("plan", plan.main, ["--no-devices"])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(previous)
    return code, stderr.getvalue()


def test_fuzzed_params_give_a_plan_or_one_line_naming_the_key(project):
    base = yaml.safe_load((project / "params.yaml").read_text())
    original = (project / "params.yaml").read_text()
    keys = set(_paths(base)) | {p.split(".")[-1] for p in _paths(base)}
    seen = {"valid": 0, "error": 0}

    @settings(max_examples=int(os.environ.get("PRUNEFLOW_FUZZ_EXAMPLES", "250")), deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck), database=None)
    @given(mutated_params(base))
    def check(example):
        text, target = example
        (project / "params.yaml").write_text(text)
        before = _snapshot(project, skip_state=False)
        code, err = _run_plan(project)
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[plan]")]
        if code == 0:
            seen["valid"] += 1
            assert _snapshot(project, skip_state=True) == {k: v for k, v in before.items()
                                                           if not k.startswith(".pruneflow")}
            return
        seen["error"] += 1
        assert code == 2, (text, err)
        assert "Traceback" not in err, err
        assert len(lines) == 1 and lines[0].startswith("pruneflow plan: error: "), err
        message = lines[0]
        named = re.findall(r"[A-Za-z_][\w.\[\]]*", message)
        leaf = target.split(".")[-1]
        assert (leaf in message or any(word.split("[")[0] in keys for word in named)
                or "not valid YAML" in message or "written twice" in message), (target, message)
        assert _snapshot(project, skip_state=False) == before, "an invalid plan touched a file"

    try:
        check()
    finally:
        (project / "params.yaml").write_text(original)
    assert seen["valid"] > 10 and seen["error"] > 50, seen  # the mutations reach both outcomes


def test_yaml_number_spellings_read_alike_by_us_and_dvc():
    """The strategy's raw material parses as DVC would: the YAML spellings are numbers to both readers."""
    from dvc.utils.serialize import parse_yaml

    from pruneflow.config import parse_params_text

    for spelled in YAML_NUMBERS:
        ours = parse_params_text(f"x: {spelled}\n")["x"]
        theirs = parse_yaml(f"x: {spelled}\n", "params.yaml")["x"]
        assert type(ours) is type(theirs) and (ours == theirs or (math.isnan(ours) and math.isnan(theirs))), spelled
