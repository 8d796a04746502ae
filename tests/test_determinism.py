"""Same params and seeds, two fresh processes in two copies of a project: byte-identical outputs on the CPU.

Every stage output down to the recovered model is compared byte for byte, except the fields that
measure time (recovery_summary.json `seconds`, `teacher_seconds`), which are compared after removing them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from .kill_hook import tree_bytes
from .tiny_project import make_tiny_project, project_env, set_param, stage_chain

# every kind of randomness: gradients, seeded token/pair sampling, bias compensation, random scores
CRITERIA = ["taylor_element1", "mutual_information", "flap", "random"]
RECOVERED = "taylor_element1"
DRIVER = """
import importlib, json, sys
for stage, argv in json.loads(sys.argv[1]):
    importlib.import_module(f"pruneflow.stages.{stage}").main(argv)
"""


def _commands() -> list[tuple[str, list[str]]]:
    chain = stage_chain(CRITERIA, 0.3)
    pruned = f"data/pruned/{RECOVERED}/0.3"
    return [*chain, ("recover", ["--model", pruned, "--teacher", "data/models/dense", "--out",
                                 f"data/recovered/{RECOVERED}/0.3"])]


def _run_pipeline(root) -> dict[str, bytes]:
    result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(_commands())], cwd=root,
                            env=project_env(root), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    outputs = tree_bytes(root / "data")
    summary_key = f"recovered/{RECOVERED}/0.3/recovery_summary.json"
    summary = json.loads(outputs[summary_key])
    assert summary["seconds"] > 0 and summary["teacher_seconds"] > 0  # distillation: the default objective
    for key in ("seconds", "teacher_seconds"):  # wall-clock time, the one thing a rerun may not repeat
        summary.pop(key)
    outputs[summary_key] = json.dumps(summary, sort_keys=True).encode()
    return {name: data for name, data in outputs.items() if not name.startswith("raw/")}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    first = make_tiny_project(tmp_path_factory.mktemp("determinism") / "project")
    set_param(first, "mlflow.enabled", False)
    set_param(first, "score.mi_tokens", 32)
    second = first.parent.parent / "second"
    shutil.copytree(first, second)
    return _run_pipeline(first), _run_pipeline(second)


def test_scores_are_byte_identical(two_runs):
    first, second = two_runs
    for name in CRITERIA:
        key = f"scores/{name}.safetensors"
        assert first[key] == second[key], key


def test_pruned_and_recovered_checkpoints_are_byte_identical(two_runs):
    first, second = two_runs
    checkpoints = [k for k in first if k.startswith(("pruned/", "recovered/", "models/"))]
    assert {k.split("/")[-1] for k in checkpoints} >= {"model.safetensors", "config.json", "provenance.json",
                                                      "pruning_summary.json", "tokenizer.json"}
    assert len([k for k in checkpoints if k.endswith("/model.safetensors")]) == 1 + len(CRITERIA) + 1
    assert first.keys() == second.keys()
    differing = [k for k in first if first[k] != second[k]]
    assert differing == [], f"not byte-identical across two runs: {differing}"
