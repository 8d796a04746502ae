"""The plan is checked before any job: every problem is one line naming the key, the value and what
is allowed, from `python -m pruneflow.pipeline.plan`, `snakemake` and the stage CLIs alike."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from pruneflow.config import load_params
from pruneflow.errors import PruneflowError
from pruneflow.pipeline.preflight import check_calibration_source, check_device, check_plan

from .tiny_project import make_tiny_project, project_env, set_param


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return make_tiny_project(tmp_path_factory.mktemp("preflight") / "project")


@pytest.fixture()
def root(template, tmp_path):
    copy = tmp_path / "p"
    shutil.copytree(template, copy)
    return copy


def _plan_error(root) -> str:
    with pytest.raises(PruneflowError) as caught:
        check_plan(load_params(root / "params.yaml"), root, devices=False)
    return str(caught.value)


def test_the_tiny_project_plans(root):
    check_plan(load_params(root / "params.yaml"), root, devices=False)


# ------------------------------------------------------------------------------ the calibration guard


@pytest.mark.parametrize("how", ["symlink", "dotdot", "copy", "absolute"])
def test_calibrating_on_an_evaluation_file_is_refused_however_it_is_named(root, tmp_path, how):
    test_file = root / "data/raw/wikitext-2-raw/test.txt"
    if how == "symlink":
        link = root / "data/raw/wikitext-2/train_v2.txt"
        link.symlink_to(test_file)
        source = "data/raw/wikitext-2/train_v2.txt"
    elif how == "dotdot":
        source = "data/raw/wikitext-2/../wikitext-2-raw/test.txt"
    elif how == "copy":
        (root / "data/raw/wikitext-2/fresh_corpus.txt").write_bytes(test_file.read_bytes())
        source = "data/raw/wikitext-2/fresh_corpus.txt"
    else:
        source = str(test_file)
    set_param(root, "calibration.source", source)
    message = _plan_error(root)
    assert f"calibration.source={source!r} is not allowed" in message
    assert "'data/raw/wikitext-2-raw/test.txt'" in message
    assert ("same content" in message) == (how == "copy")


@pytest.mark.parametrize("name", ["latest_test_notes.txt", "validation_free/train.txt"])
def test_training_text_whose_name_mentions_test_or_valid_is_allowed(root, tmp_path, name):
    outside = tmp_path / "home/testuser" / name  # the old substring guard refused all of these
    outside.parent.mkdir(parents=True)
    outside.write_bytes((root / "data/raw/wikitext-2/train.txt").read_bytes())
    set_param(root, "calibration.source", str(outside))
    params = load_params(root / "params.yaml")
    check_calibration_source(params, root)
    check_plan(params, root, devices=False)


# ------------------------------------------------------------------------------------ model and lengths


def test_a_hub_id_without_network_or_cache_is_refused_before_any_job(root, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    set_param(root, "model.source", "Qwen/Qwen2.5-0.5B")
    message = _plan_error(root)
    assert "model.source='Qwen/Qwen2.5-0.5B' is not in the local Hugging Face cache" in message
    assert "HF_HUB_OFFLINE" in message


def test_a_hub_id_is_refused_fast_when_the_hub_does_not_resolve(root, tmp_path, monkeypatch):
    import pruneflow.sources

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(pruneflow.sources, "_resolves", lambda host, timeout=3.0: False)
    set_param(root, "model.source", "Qwen/Qwen2.5-0.5B")
    message = _plan_error(root)
    assert "model.source='Qwen/Qwen2.5-0.5B' is not in the local Hugging Face cache and the hub cannot be reached" \
        in message and "does not resolve" in message


@pytest.mark.parametrize(
    ("dotted", "value", "expected"),
    [
        ("calibration.seq_len", 1024, "calibration.seq_len=1024 is not allowed"),
        ("laptop.evaluate.ppl_seq_lens", [32, 4096], "evaluate.ppl_seq_lens[1]=4096 is not allowed"),
        ("laptop.recover.cutoff_len", 600, "recover.cutoff_len=600 is not allowed"),
    ],
)
def test_lengths_beyond_the_model_context_are_refused_at_plan_time(root, dotted, value, expected):
    set_param(root, dotted, value)
    message = _plan_error(root)
    assert expected in message and "max_position_embeddings=512" in message


def test_cutoff_is_not_checked_when_nothing_is_recovered(root):
    set_param(root, "laptop.recover.cutoff_len", 600)
    set_param(root, "grid.recovered_criteria", [])
    check_plan(load_params(root / "params.yaml"), root, devices=False)


def test_layer_range_outside_the_model_is_refused_at_plan_time(root):
    set_param(root, "prune.layer_start", 10)
    assert "prune.layer_start=10, prune.layer_end=-1 select no layers of a model with 4" in _plan_error(root)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_a_bias_reconstruction_on_a_family_without_output_biases_is_refused_at_plan_time(root, family):
    from pruneflow.tiny_models import write_tiny_checkpoint

    write_tiny_checkpoint(root / "models" / f"tiny-{family}", family=family)
    set_param(root, "model.source", f"models/tiny-{family}")
    set_param(root, "prune.reconstruction", "least_squares_bias")
    assert (f"prune.reconstruction='least_squares_bias' needs output biases on o_proj/down_proj, which "
            f"model_type='{family}' cannot express") in _plan_error(root)
    set_param(root, "prune.reconstruction", "least_squares")  # no bias: any family
    check_plan(load_params(root / "params.yaml"), root, devices=False)


@pytest.mark.skipif(os.environ.get("CUDA_VISIBLE_DEVICES") is None and shutil.which("nvidia-smi") is not None,
                    reason="a CUDA machine has devices")
def test_a_device_this_machine_lacks_is_refused():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(PruneflowError, match=r"runtime.device='cuda' is not allowed on this machine: it has no CUDA"):
        check_device("cuda")
    with pytest.raises(PruneflowError, match=r"runtime.device='cuda:3' is not allowed on this machine"):
        check_device("cuda:3")
    check_device("cpu")
    check_device("auto")


# ------------------------------------------------------------------------------------------ data files


def test_missing_instruction_file_is_refused_only_when_something_is_recovered(root):
    set_param(root, "recover.data", ["data/raw/instruct/gsm_8k_train.json", "/nowhere/alpaca.json"])
    assert "instruction data file '/nowhere/alpaca.json' does not exist" in _plan_error(root)
    set_param(root, "grid.recovered_criteria", [])
    check_plan(load_params(root / "params.yaml"), root, devices=False)


def test_a_missing_or_empty_recovery_text_file_is_refused_at_plan_time(root):
    set_param(root, "recover.data", ["/nowhere/train.txt"])
    assert "recovery text file '/nowhere/train.txt' does not exist" in _plan_error(root)
    (root / "data/raw/empty.txt").write_text("")
    set_param(root, "recover.data", ["data/raw/empty.txt"])
    assert "recovery text file" in _plan_error(root) and "empty.txt' is empty" in _plan_error(root)


def test_a_zero_shot_task_file_is_checked_when_configured(root):
    (root / "data/raw/zeroshot/boolq.jsonl").unlink()
    check_plan(load_params(root / "params.yaml"), root, devices=False)  # boolq is not configured
    set_param(root, "laptop.evaluate.zeroshot_tasks", ["arc_easy", "boolq"])
    assert "zero-shot data file" in _plan_error(root) and "boolq.jsonl is missing" in _plan_error(root)


# ------------------------------------------------------------------------------------- the plan command


def test_plan_command_prints_one_line_and_writes_nothing(root):
    set_param(root, "recover.lora_r", 0)
    before = sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*"))
    out = subprocess.run([sys.executable, "-m", "pruneflow.pipeline.plan"], cwd=root, env=project_env(root),
                         capture_output=True, text=True)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines == ["pruneflow plan: error: params.yaml: recover.lora_r=0 is not allowed; allowed: an integer > 0"]
    assert sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*")) == before


def test_plan_command_lists_what_would_run(root):
    out = subprocess.run([sys.executable, "-m", "pruneflow.pipeline.plan", "--json"], cwd=root,
                         env=project_env(root), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    import json

    plan = json.loads(out.stdout)
    assert {entry["status"] for entry in plan} == {"missing"}
    assert [entry["instance"] for entry in plan][:3] == ["prepare_model", "calibrate", "cache_activations"]
