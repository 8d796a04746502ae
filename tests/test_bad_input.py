"""Bad input stops before heavy work, names the key, the value and what is allowed, and leaves
existing outputs untouched."""

from __future__ import annotations

import importlib
import json
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
    set_param(workdir, "recover.data", ["data/raw/instruct/gsm_8k_train.json"])
    (workdir / "data/raw/instruct/gsm_8k_train.json").write_text("[]")
    out = _sentinel(workdir / "data/recovered/taylor_element1/0.3")
    err = _run_stage("recover", ["--model", "models/tiny-llama", "--teacher", "models/tiny-llama", "--out",
                                 str(out)], capsys)
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


# ------------------------------------------------------------------- settings that do not fit the model


def test_activation_criterion_without_a_cache(workdir, capsys):
    out = _sentinel(workdir / "data/scores/flap.safetensors")
    err = _run_stage("score", ["--model", "models/tiny-llama", "--calibration", "c",
                               "--activations", "data/activations/none.safetensors", "--criterion", "flap",
                               "--out", str(out)], capsys)
    assert "criterion 'flap' needs the activation cache, but 'data/activations/none.safetensors' does not exist" in err
    assert "cache_activations" in err
    assert _untouched(out)


def test_lora_rank_wider_than_the_model(workdir, capsys):
    set_param(workdir, "recover.lora_r", 64)  # the tiny model's k_proj/v_proj are 64 -> 32
    out = _sentinel(workdir / "data/recovered/taylor_element1/0.3")
    err = _run_stage("recover", ["--model", "models/tiny-llama", "--out", str(out)], capsys)
    assert "recover.lora_r=64 is not allowed for this model; allowed: 1 <= lora_r <= 32" in err
    assert _untouched(out)


def test_lora_cutoff_longer_than_the_model_context(workdir, capsys):
    set_param(workdir, "laptop.recover.cutoff_len", 4096)  # the tiny model has 512 positions
    out = _sentinel(workdir / "data/recovered/taylor_element1/0.3")
    err = _run_stage("recover", ["--model", "models/tiny-llama", "--out", str(out)], capsys)
    assert "recover.cutoff_len=4096 is not allowed for this model" in err and "max_position_embeddings=512" in err
    assert _untouched(out)


def test_distillation_without_a_teacher(workdir, capsys):
    set_param(workdir, "recover.objective", "distill")
    out = _sentinel(workdir / "data/recovered/taylor_element1/0.3")
    err = _run_stage("recover", ["--model", "models/tiny-llama", "--out", str(out)], capsys)
    assert "recover.objective='distill' needs the dense teacher: pass --teacher MODEL_DIR" in err
    assert _untouched(out)


def test_distillation_teacher_with_another_vocabulary(workdir, capsys):
    set_param(workdir, "recover.objective", "distill")
    _model_copy(workdir, "models/other-vocab", vocab_size=999)
    out = _sentinel(workdir / "data/recovered/taylor_element1/0.3")
    err = _run_stage("recover", ["--model", "models/tiny-llama", "--teacher", "models/other-vocab", "--out", str(out)],
                     capsys)
    assert "--teacher models/other-vocab has a vocabulary of 999 tokens" in err and "the dense model it was pruned" in err
    assert _untouched(out)


def test_recovery_text_shorter_than_one_block(workdir, capsys):
    (workdir / "data/raw/short.txt").write_text("a few words\n")
    set_param(workdir, "recover.data", ["data/raw/short.txt"])
    out = _sentinel(workdir / "data/recovered/taylor_element1/0.3")
    err = _run_stage("recover", ["--model", "models/tiny-llama", "--teacher", "models/tiny-llama", "--out",
                                 str(out)], capsys)
    assert "recovery text file 'data/raw/short.txt' has" in err and "fewer than one block of recover.cutoff_len=64" in err
    assert _untouched(out)


def test_layer_range_outside_the_model_at_the_prune_stage(workdir, capsys):
    set_param(workdir, "prune.layer_start", 10)  # the tiny model has 4 layers
    out = _sentinel(workdir / "data/pruned/taylor_element1/0.3")
    err = _run_stage("prune", ["--model", "models/tiny-llama", "--scores", "s", "--activations", "a",
                               "--criterion", "taylor_element1", "--ratio", "0.3", "--out", str(out)], capsys)
    assert "prune.layer_start=10, prune.layer_end=-1 select no layers of a model with 4" in err
    assert _untouched(out)


def test_unsupported_architecture_as_model_source(workdir, capsys):
    _model_copy(workdir, "models/gpt2", architectures=["GPT2LMHeadModel"])
    set_param(workdir, "model.source", "./models/gpt2")
    out = _sentinel(workdir / "data/models/dense")
    err = _run_stage("prepare_model", ["--out", str(out)], capsys)
    assert "model.source='./models/gpt2' is a 'GPT2LMHeadModel' model, which is not supported; supported:" in err
    assert "LlamaForCausalLM" in err and "Qwen2ForCausalLM" in err
    assert _untouched(out)


# --------------------------------------------------------------------------------- unreadable data


def test_non_utf8_calibration_text(workdir, capsys):
    (workdir / "data/raw/wikitext-2/train.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 50)
    out = _sentinel(workdir / "data/calibration/calibration.safetensors")
    err = _run_stage("calibrate", ["--model", "models/tiny-llama", "--out", str(out)], capsys)
    assert "calibration.source file 'data/raw/wikitext-2/train.txt' is not UTF-8 text: byte 3" in err
    assert _untouched(out)


def test_non_utf8_zeroshot_file(workdir, capsys):
    path = workdir / "data/raw/zeroshot/piqa.jsonl"
    path.write_bytes(path.read_bytes() + '{"goal": "caf\u00e9"}\n'.encode("latin-1"))
    out = _sentinel(workdir / "reports/metrics/dense.json")
    err = _run_stage("evaluate", ["--model", "models/tiny-llama", "--model-id", "dense", "--out", str(out)], capsys)
    assert "piqa.jsonl is not UTF-8 text" in err
    assert _untouched(out)


def test_non_utf8_instruction_file(workdir, capsys):
    set_param(workdir, "recover.data", ["data/raw/instruct/gsm_8k_train.json"])
    (workdir / "data/raw/instruct/gsm_8k_train.json").write_bytes('[{"instruction": "caf\u00e9"}]'.encode("latin-1"))
    out = _sentinel(workdir / "data/recovered/taylor_element1/0.3")
    err = _run_stage("recover", ["--model", "models/tiny-llama", "--teacher", "models/tiny-llama", "--out",
                                 str(out)], capsys)
    assert "gsm_8k_train.json" in err and "UTF-8" in err
    assert _untouched(out)


def test_zeroshot_file_with_a_wrong_schema(workdir, capsys):
    path = workdir / "data/raw/zeroshot/arc_easy.jsonl"
    path.write_text(path.read_text() + '{"question": "Q?", "answer": "A"}\n')
    out = _sentinel(workdir / "reports/metrics/dense.json")
    err = _run_stage("evaluate", ["--model", "models/tiny-llama", "--model-id", "dense", "--out", str(out)], capsys)
    assert "arc_easy.jsonl:13" in err and "expected keys:" in err
    assert _untouched(out)


# ---------------------------------------------------------------------- broken artifacts (real loads)


def _edit_config(folder, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _model_copy(root, relative: str, **config_changes):
    folder = root / relative
    shutil.copytree(root / "models/tiny-llama", folder)
    _edit_config(folder, **config_changes)
    return folder


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def built(staged_project):
    """The tiny project with real outputs up to l2_magnitude scores (stages run in this process)."""
    return staged_project


@pytest.fixture()
def artifacts(built, tmp_path, monkeypatch):
    root = tmp_path / "p"
    shutil.copytree(built, root)
    monkeypatch.chdir(root)
    return root


SCORE_ARGS = ["--calibration", "data/calibration/calibration.safetensors",
              "--activations", "data/activations/activations.safetensors"]


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_broken_model_weights(artifacts, capsys, damage):
    weights = artifacts / "data/models/dense/model.safetensors"
    _truncate(weights) if damage == "truncated" else weights.unlink()
    out = _sentinel(artifacts / "data/scores/taylor_element1.safetensors")
    err = _run_stage("score", ["--model", "data/models/dense", *SCORE_ARGS, "--criterion", "taylor_element1",
                               "--out", str(out)], capsys)
    assert "could not load the model in 'data/models/dense' (missing, truncated or corrupt weights?)" in err
    assert _untouched(out)


PRUNE_L2 = ["prune", "--model", "data/models/dense", "--scores", "data/scores/l2_magnitude.safetensors",
            "--activations", "a", "--ratio", "0.2"]


@pytest.mark.parametrize(
    ("damaged", "command", "output", "expected"),
    [
        ("data/scores/l2_magnitude.safetensors", [*PRUNE_L2, "--criterion", "l2_magnitude"],
         "data/pruned/l2_magnitude/0.2",
         "scores file 'data/scores/l2_magnitude.safetensors' is not a readable safetensors file"),
        ("data/activations/activations.safetensors", ["score", "--model", "data/models/dense", *SCORE_ARGS,
                                                      "--criterion", "wanda_sp"], "data/scores/wanda_sp.safetensors",
         "activation cache 'data/activations/activations.safetensors' is not a readable safetensors file"),
        ("data/calibration/calibration.safetensors", ["score", "--model", "data/models/dense", *SCORE_ARGS,
                                                      "--criterion", "taylor_element1"],
         "data/scores/taylor_element1.safetensors",
         "calibration file 'data/calibration/calibration.safetensors' is unreadable"),
    ],
    ids=["scores", "activations", "calibration"],
)
def test_truncated_intermediate_file(artifacts, capsys, damaged, command, output, expected):
    _truncate(artifacts / damaged)
    out = _sentinel(artifacts / output)
    err = _run_stage(command[0], [*command[1:], "--out", str(out)], capsys)
    assert expected in err
    assert _untouched(out)


def test_scores_of_another_criterion(artifacts, capsys):
    out = _sentinel(artifacts / "data/pruned/taylor_element1/0.2")
    err = _run_stage("prune", [*PRUNE_L2[1:], "--criterion", "taylor_element1", "--out", str(out)], capsys)
    assert "holds criterion 'l2_magnitude', not --criterion='taylor_element1'" in err
    assert _untouched(out)


def test_tokenizer_of_another_model_as_source(artifacts, capsys):
    _model_copy(artifacts, "models/small-vocab", vocab_size=64)  # its tokenizer has more tokens
    set_param(artifacts, "model.source", "./models/small-vocab")
    out = _sentinel(artifacts / "data/models/other")
    err = _run_stage("prepare_model", ["--out", str(out)], capsys)
    assert "has 64" in err and "they do not belong together" in err
    assert _untouched(out)


def test_tokenizer_swapped_in_a_model_folder(artifacts, capsys):
    _edit_config(artifacts / "data/models/dense", vocab_size=64)
    out = _sentinel(artifacts / "data/calibration/calibration.safetensors")
    err = _run_stage("calibrate", ["--model", "data/models/dense", "--out", str(out)], capsys)
    assert "the tokenizer of model folder 'data/models/dense' has" in err and "do not belong together" in err
    assert _untouched(out)


def test_unsupported_architecture_in_a_model_folder(artifacts, capsys):
    _edit_config(artifacts / "data/models/dense", architectures=["GPT2LMHeadModel"])
    out = _sentinel(artifacts / "data/scores/taylor_element1.safetensors")
    err = _run_stage("score", ["--model", "data/models/dense", *SCORE_ARGS, "--criterion", "taylor_element1",
                               "--out", str(out)], capsys)
    assert "architecture 'GPT2LMHeadModel' in data/models/dense/config.json is not supported" in err
    assert _untouched(out)


@pytest.mark.parametrize("override", [["--config", "seed=3"], ["--configfile", "other.yaml"]])
def test_snakemake_refuses_config_overrides(project, tmp_path, override):
    """Every stage and `dvc repro` read params.yaml: an override only Snakemake would see is refused."""
    root = tmp_path / "p"
    shutil.copytree(project, root)
    (root / "other.yaml").write_text("seed: 3\n")
    sentinel = _sentinel(root / "data/models/dense")
    result = run(["snakemake", "--cores", "1", *override], root, check=False)
    assert result.returncode != 0
    assert f"pruneflow plan: error: {override[0]} " in result.stdout
    assert "is not allowed; allowed: settings in params.yaml" in result.stdout
    assert _untouched(sentinel) and not (root / "logs").exists()
