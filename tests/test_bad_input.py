"""Bad input stops before heavy work, names the key, the value and what is allowed, and leaves
existing outputs untouched."""

from __future__ import annotations

import importlib
import shutil

import pytest

from pruneflow.stages.cli import run_cli

from .tiny_project import make_tiny_project, run, set_param


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_tiny_project(tmp_path_factory.mktemp("bad") / "project")


@pytest.fixture()
def workdir(project, tmp_path, monkeypatch):
    """A fresh copy of the tiny project as cwd, with model loading booby-trapped."""
    root = tmp_path / "p"
    shutil.copytree(project, root, ignore=shutil.ignore_patterns("src"))
    monkeypatch.chdir(root)
    monkeypatch.setenv("PRUNEFLOW_INVOCATION_ID", "bad-input-test")

    def heavy(*_args, **_kwargs):
        raise AssertionError("heavy work started before the bad input was reported")

    import pruneflow.checkpoint
    import pruneflow.modeling

    monkeypatch.setattr(pruneflow.checkpoint, "load_pruned", heavy)
    monkeypatch.setattr(pruneflow.modeling, "load_source", heavy)
    set_param(root, "mlflow.enabled", False)
    return root


def _run_stage(stage: str, argv: list[str], capsys) -> str:
    module = importlib.import_module(f"pruneflow.stages.{stage}")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(stage, module.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"pruneflow {stage}: error:" in err
    assert "Traceback" not in err
    return err


def _sentinel(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix:
        path.write_text("earlier result")
    else:
        path.mkdir(exist_ok=True)
        (path / "config.json").write_text("earlier result")
    return path


def _untouched(path) -> bool:
    target = path if path.suffix else path / "config.json"
    return target.read_text() == "earlier result"


def test_unknown_criterion(workdir, capsys):
    out = _sentinel(workdir / "data/scores/bogus.safetensors")
    err = _run_stage("score", ["--model", "models/tiny-llama", "--calibration", "c", "--activations", "a",
                               "--criterion", "bogus", "--out", str(out)], capsys)
    assert "criterion='bogus' is not allowed; allowed: random, l1_magnitude, l2_magnitude, taylor_vector" in err
    assert _untouched(out)


@pytest.mark.parametrize("ratio", ["1.0", "-0.1", "1.5"])
def test_ratio_outside_unit_interval(workdir, capsys, ratio):
    out = _sentinel(workdir / "data/pruned/taylor_element1" / ratio)
    err = _run_stage("prune", ["--model", "models/tiny-llama", "--scores", "s", "--activations", "a",
                               "--criterion", "taylor_element1",
                               "--ratio", ratio, "--out", str(out)], capsys)
    assert f"--ratio={float(ratio)} is not allowed; allowed: a number in [0, 1)" in err
    assert _untouched(out)


def test_missing_model_path(workdir, capsys):
    set_param(workdir, "model.source", "./models/does-not-exist")
    out = _sentinel(workdir / "data/models/dense")
    err = _run_stage("prepare_model", ["--out", str(out)], capsys)
    assert "model.source='./models/does-not-exist' does not exist as a local folder; allowed:" in err
    assert "embedded:smollm2-135m-instruct" in err
    assert _untouched(out)


def test_missing_model_folder_for_a_later_stage(workdir, capsys):
    out = _sentinel(workdir / "data/calibration/calibration.safetensors")
    err = _run_stage("calibrate", ["--model", "data/models/nowhere", "--out", str(out)], capsys)
    assert "model folder 'data/models/nowhere' does not exist" in err
    assert _untouched(out)


@pytest.mark.parametrize("content", ["", " \n\n"])
def test_empty_calibration_file(workdir, capsys, content):
    (workdir / "data/raw/wikitext-2/train.txt").write_text(content)
    out = _sentinel(workdir / "data/calibration/calibration.safetensors")
    err = _run_stage("calibrate", ["--model", "models/tiny-llama", "--out", str(out)], capsys)
    assert "calibration.source file 'data/raw/wikitext-2/train.txt'" in err
    assert "empty" in err or "only blank lines" in err
    assert _untouched(out)


def test_missing_calibration_file(workdir, capsys):
    set_param(workdir, "calibration.source", "data/raw/wikitext-2/missing-train.txt")
    out = _sentinel(workdir / "data/calibration/calibration.safetensors")
    err = _run_stage("calibrate", ["--model", "models/tiny-llama", "--out", str(out)], capsys)
    assert "calibration.source file 'data/raw/wikitext-2/missing-train.txt' does not exist" in err
    assert _untouched(out)


def test_missing_evaluation_file(workdir, capsys):
    (workdir / "data/raw/ptb/ptb.valid.txt").unlink()
    out = _sentinel(workdir / "reports/metrics/dense.json")
    err = _run_stage("evaluate", ["--model", "models/tiny-llama", "--model-id", "dense", "--out", str(out)], capsys)
    assert "data/raw/ptb/ptb.valid.txt" in err and "does not exist" in err
    assert _untouched(out)


def test_perplexity_window_longer_than_the_model_context(workdir, capsys):
    set_param(workdir, "laptop.evaluate.ppl_seq_lens", [32, 4096])  # the tiny model has 512 positions
    out = _sentinel(workdir / "reports/metrics/dense.json")
    err = _run_stage("evaluate", ["--model", "models/tiny-llama", "--model-id", "dense", "--out", str(out)], capsys)
    assert "evaluate.ppl_seq_lens[1]=4096" in err and "max_position_embeddings=512" in err
    assert _untouched(out)


def test_empty_zeroshot_file(workdir, capsys):
    (workdir / "data/raw/zeroshot/piqa.jsonl").write_text("")
    out = _sentinel(workdir / "reports/metrics/dense.json")
    err = _run_stage("evaluate", ["--model", "models/tiny-llama", "--model-id", "dense", "--out", str(out)], capsys)
    assert "piqa.jsonl" in err and "empty" in err
    assert _untouched(out)


def test_empty_instruction_file(workdir, capsys):
    (workdir / "data/raw/instruct/gsm_8k_train.json").write_text("[]")
    out = _sentinel(workdir / "data/recovered/taylor_element1/0.3")
    err = _run_stage("recover", ["--model", "models/tiny-llama", "--out", str(out)], capsys)
    assert "gsm_8k_train.json" in err
    assert _untouched(out)


def test_unknown_params_key(workdir, capsys):
    set_param(workdir, "prune.ratio", 0.2)
    out = _sentinel(workdir / "data/models/dense")
    err = _run_stage("prepare_model", ["--out", str(out)], capsys)
    assert "unknown key 'prune.ratio'; allowed keys in prune: layer_start, layer_end, structures" in err
    assert _untouched(out)


@pytest.mark.parametrize(
    ("dotted", "value", "expected"),
    [
        ("grid.criteria", ["taylor", "l2_magnitude"], "grid.criteria='taylor' is not allowed; allowed: 'random'"),
        ("grid.ratios", [1.2], "grid.ratios=1.2 is not allowed; allowed: a number in [0, 1)"),
        ("grid.ratio", [0.2], "unknown key 'grid.ratio'"),
        ("model.source", "./missing-model", "model.source='./missing-model' does not exist as a local folder"),
    ],
)
def test_snakemake_refuses_bad_params_before_any_job(project, tmp_path, dotted, value, expected):
    root = tmp_path / "p"
    shutil.copytree(project, root)
    sentinel = _sentinel(root / "data/models/dense")
    set_param(root, dotted, value)
    result = run(["snakemake", "--cores", "1", "--resources", "gpu=1"], root, check=False)
    assert result.returncode != 0
    assert expected in result.stdout
    assert _untouched(sentinel)
    assert not (root / "logs").exists()
