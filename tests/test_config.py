"""params.yaml validation: every bad value names the key, the value and what is allowed."""

from __future__ import annotations

import copy

import pytest
import yaml

from pruneflow.config import json_schema, load_params, params_from_mapping
from pruneflow.errors import ConfigError

from .conftest import PROJECT_ROOT


@pytest.fixture()
def raw() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())


def _with(raw: dict, dotted: str, value) -> dict:
    changed = copy.deepcopy(raw)
    node = changed
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return changed


def test_project_params_are_valid():
    params = load_params(PROJECT_ROOT / "params.yaml")
    assert params.scale == "laptop"
    assert params.grid.criteria and params.grid.ratios


def test_laptop_preset_applies_only_at_laptop_scale(raw):
    laptop = params_from_mapping(raw)
    full = params_from_mapping(_with(raw, "scale", "full"))
    assert laptop.evaluate.zeroshot_limit == raw["laptop"]["evaluate"]["zeroshot_limit"]
    assert laptop.recover.max_steps == raw["laptop"]["recover"]["max_steps"]
    assert full.evaluate.zeroshot_limit is None and full.evaluate.ppl_max_windows is None
    assert full.recover.max_steps is None and full.recover.num_epochs == 2
    assert full.recover.batch_size == 64 and full.recover.micro_batch_size == 4 and full.recover.cutoff_len == 256
    assert set(full.evaluate.zeroshot_tasks) == {
        "boolq", "piqa", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "lambada"
    }


@pytest.mark.parametrize(
    ("dotted", "value", "pattern"),
    [
        ("grid.criteria", ["taylor_elemnt1"], r"grid.criteria='taylor_elemnt1' .*did you mean 'taylor_element1'"),
        ("grid.ratios", [1.0], r"grid.ratios=1.0 is not allowed; allowed: a number in \[0, 1\)"),
        ("grid.ratios", [-0.2], r"grid.ratios=-0.2 is not allowed"),
        ("grid.ratios", ["0.2"], r"grid.ratios\[0\]='0.2' is not allowed; allowed: a number"),
        ("grid.recovered_criteria", ["random"], r"grid.recovered_criteria='random' .*criteria listed in grid.criteria"),
        ("calibration.num_samples", 0, r"calibration.num_samples=0 is not allowed; allowed: an integer > 0"),
        ("runtime.device", "gpu", r"runtime.device='gpu' is not allowed; allowed: 'auto', 'cpu'"),
        ("runtime.dtype", "fp8", r"runtime.dtype='fp8' is not allowed"),
        ("scale", "huge", r"scale='huge' is not allowed; allowed: 'laptop', 'full'"),
        ("recover.batch_size", 10, r"recover.batch_size=10 .*multiple of recover.micro_batch_size=4"),
        ("recover.target_modules", ["qkv"], r"recover.target_modules='qkv' is not allowed"),
        ("recover.lora_dropout", 1.5, r"recover.lora_dropout=1.5"),
        ("recover.objective", "kd", r"recover.objective='kd' is not allowed; allowed: 'lm', 'distill'"),
        ("recover.method", "qlora", r"recover.method='qlora' is not allowed; allowed: 'lora', 'full'"),
        ("recover.sharding", "zero3", r"recover.sharding='zero3' is not allowed; allowed: 'none', 'fsdp'"),
        ("recover.distill_temperature", 0, r"recover.distill_temperature=0(\.0)? is not allowed; allowed: a number in \(0"),
        ("recover.distill_weight", 1.5, r"recover.distill_weight=1.5 is not allowed; allowed: a number in \[0, 1\]"),
        ("recover.data", ["notes.md"], r"recover.data='notes.md' is not allowed; allowed: .*\(\.json\).*\(\.txt\)"),
        ("evaluate.zeroshot_tasks", ["arc easy"], r"evaluate.zeroshot_tasks='arc easy' .*allowed: a built-in task \('boolq'"),
        ("evaluate.zeroshot_tasks", [""], r"evaluate.zeroshot_tasks='' is not allowed; allowed: .*lm-eval's registry"),
        ("evaluate.zeroshot_include_path", "tasks", r"evaluate.zeroshot_include_path='tasks' .*allowed: a list of strings"),
        ("evaluate.zeroshot_include_path", [" "], r"evaluate.zeroshot_include_path=' ' .*allowed: null or a list of folders"),
        ("evaluate.zeroshot_include_path", ["a", "a"], r"evaluate.zeroshot_include_path=\['a', 'a'\] .*without duplicates"),
        ("evaluate.ppl_datasets", ["wikitext"], r"did you mean 'wikitext2'"),
        ("prune.structures", ["heads"], r"prune.structures='heads' is not allowed; allowed: 'attention', 'ffn'"),
        ("model.source", "embedded:llama", r"model.source='embedded:llama' is not allowed"),
        ("seed", "zero", r"seed='zero' is not allowed; allowed: an integer"),
        ("mlflow.enabled", "yes", r"mlflow.enabled='yes' is not allowed; allowed: true or false"),
        ("laptop.evaluate.zeroshot_limit", -3, r"laptop.evaluate.zeroshot_limit=-3"),
        ("evaluate.ppl_seq_lens", [], r"evaluate.ppl_seq_lens=\[\] is not allowed; allowed: a non-empty list"),
        ("evaluate.ppl_seq_lens", [128, 1], r"evaluate.ppl_seq_lens\[1\]=1 is not allowed; allowed: an integer >= 2"),
        ("evaluate.ppl_seq_lens", [128, 128], r"evaluate.ppl_seq_lens=\[128, 128\] .*distinct"),
        ("evaluate.ppl_seq_len", 128, r"unknown key 'evaluate.ppl_seq_len'.*did you mean 'ppl_seq_lens'"),
        ("evaluate.generation_tokens", 0, r"evaluate.generation_tokens=0 is not allowed; allowed: an integer > 0"),
    ],
)
def test_bad_values_name_key_value_and_allowed(raw, dotted, value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        params_from_mapping(_with(raw, dotted, value))


@pytest.mark.parametrize(
    ("dotted", "pattern"),
    [
        ("grid.ratio", r"unknown key 'grid.ratio'.*did you mean 'ratios'"),
        ("sead", r"unknown key 'sead'.*did you mean 'seed'"),
        ("recover.lora_rank", r"unknown key 'recover.lora_rank'.*did you mean 'lora_r'"),
        ("laptop.prune", r"unknown key 'laptop.prune'; allowed keys in laptop: recover, evaluate"),
        ("laptop.evaluate.windows", r"unknown key 'laptop.evaluate.windows'"),
    ],
)
def test_unknown_keys_suggest_the_nearest(raw, dotted, pattern):
    changed = _with(raw, dotted, {} if dotted == "laptop.prune" else 1)
    with pytest.raises(ConfigError, match=pattern):
        params_from_mapping(changed)


def test_any_task_name_and_include_folders_pass_the_fast_check(raw):
    """Names beyond the built-in ones are looked up at plan time (lm-eval's registry is slow to read)."""
    changed = _with(_with(raw, "evaluate.zeroshot_tasks", ["hellaswag", "mmlu", "my_task"]),
                    "evaluate.zeroshot_include_path", ["tasks/mine", "/abs/tasks"])
    params = params_from_mapping(_with(changed, "scale", "full"))
    assert params.evaluate.zeroshot_tasks == ("hellaswag", "mmlu", "my_task")
    assert params.evaluate.zeroshot_include_path == ("tasks/mine", "/abs/tasks")
    assert params_from_mapping(raw).evaluate.zeroshot_include_path is None


def test_layer_range_outside_the_model_is_explained(raw):
    params = params_from_mapping(_with(raw, "prune.layer_start", 40))
    with pytest.raises(ConfigError, match=r"prune.layer_start=40, prune.layer_end=-2 select no layers of a model with 30"):
        params.prune.layer_range(30)
    assert list(params_from_mapping(raw).prune.layer_range(30)) == list(range(4, 28))


def test_missing_and_malformed_params_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_schema_file_is_generated_from_the_dataclasses():
    committed = yaml.safe_load((PROJECT_ROOT / "workflow/schemas/params.schema.yaml").read_text())
    assert committed == json_schema(), "regenerate: python -m pruneflow.config --schema > workflow/schemas/params.schema.yaml"


def test_every_params_key_is_read_by_the_typed_config(raw):
    """Binds params.yaml to the code: every key maps to a dataclass field (and the file is complete)."""
    import dataclasses

    from pruneflow.config import Params

    params = params_from_mapping(raw)
    for section, value in raw.items():
        if section == "laptop":
            continue
        field_value = getattr(params, section)
        if dataclasses.is_dataclass(field_value):
            declared = {f.name for f in dataclasses.fields(field_value)}
            assert set(value) == declared, f"params.yaml section {section} should list every key explicitly"
    top = {f.name for f in dataclasses.fields(Params)} - {"raw"}
    assert set(raw) - {"laptop"} == top


# ------------------------------------------------------------------ the file itself, as DVC reads it


def _write(tmp_path, text: str):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def _project_text() -> str:
    return (PROJECT_ROOT / "params.yaml").read_text()


def test_numbers_and_words_are_read_as_dvc_reads_them(tmp_path):
    """YAML 1.2 (DVC's reader): `2e-4` is a number, `off` a word; PyYAML's 1.1 reads a string and a boolean."""
    from dvc.utils.serialize import parse_yaml

    text = _project_text().replace("learning_rate: 1.0e-4", "learning_rate: 2e-4").replace(
        "experiment: pruneflow", "experiment: off")
    assert "learning_rate: 2e-4" in text and "experiment: off" in text
    params = load_params(_write(tmp_path, text))
    assert params.recover.learning_rate == 2e-4
    assert params.mlflow.experiment == "off"
    dvc_view = parse_yaml(text, "params.yaml")
    assert dvc_view["recover"]["learning_rate"] == params.recover.learning_rate
    assert dvc_view["mlflow"]["experiment"] == params.mlflow.experiment


def test_a_replaced_key_names_its_replacement(tmp_path):
    text = _project_text().replace("  allocation: uniform", "  bias_compensation: on\n  allocation: uniform")
    with pytest.raises(ConfigError, match=r"'prune.bias_compensation' was replaced by prune.reconstruction"):
        load_params(_write(tmp_path, text))


def test_a_key_written_twice_is_refused(tmp_path):
    text = _project_text().replace("  lora_r: 8\n", "  lora_r: 8\n  lora_r: 16\n")
    with pytest.raises(ConfigError, match=r"key 'recover.lora_r' is written twice \(lines \d+ and \d+\)"):
        load_params(_write(tmp_path, text))


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n"])
def test_an_empty_params_file_is_refused(tmp_path, text):
    with pytest.raises(ConfigError, match=r"params file .* is empty; allowed: a YAML mapping with the sections scale"):
        load_params(_write(tmp_path, text))


@pytest.mark.parametrize(
    ("remove", "pattern"),
    [("grid", r"missing 'grid'"), ("laptop", r"missing 'laptop'"), ("seed", r"missing 'seed'"),
     ("laptop.evaluate", r"missing 'laptop.evaluate'"), ("grid.ratios", r"missing 'grid.ratios'")],
)
def test_a_missing_section_is_refused_everywhere(tmp_path, raw, remove, pattern):
    changed = copy.deepcopy(raw)
    node = changed
    *parents, last = remove.split(".")
    for part in parents:
        node = node[part]
    del node[last]
    with pytest.raises(ConfigError, match=pattern + r".*mlflow may be left out"):
        load_params(_write(tmp_path, yaml.safe_dump(changed)))


def test_an_empty_section_is_refused_and_a_missing_key_takes_its_default(tmp_path, raw):
    with pytest.raises(ConfigError, match=r"runtime=None is not allowed; allowed: a mapping"):
        load_params(_write(tmp_path, yaml.safe_dump({**raw, "runtime": None})))
    without = copy.deepcopy(raw)
    del without["recover"]["lora_r"]
    del without["mlflow"]
    params = load_params(_write(tmp_path, yaml.safe_dump(without)))
    assert params.recover.lora_r == 8 and params.mlflow.enabled


def test_ratio_folder_names_follow_the_yaml_spelling(tmp_path, raw):
    from pruneflow.config import Ratio, format_ratio, parse_ratio

    text = _project_text().replace("ratios: [0.2]", "ratios: [0, 1e-5, 0.30000000000000004, .5]")
    params = load_params(_write(tmp_path, text))
    assert [format_ratio(r) for r in params.grid.ratios] == ["0", "1e-05", "0.30000000000000004", "0.5"]
    assert params.grid.ratios == (0.0, 1e-5, 0.30000000000000004, 0.5)
    assert format_ratio(0.0) == "0.0" and Ratio(Ratio(0)).name == "0"
    assert parse_ratio("0").name == "0" and parse_ratio("1e-05") == 1e-5
    with pytest.raises(ConfigError, match=r"--ratio='abc' is not allowed; allowed: a number in \[0, 1\)"):
        parse_ratio("abc")
    with pytest.raises(ConfigError, match=r"grid.ratios=\[0, 0.0\] is not allowed; allowed: a list without duplicates"):
        load_params(_write(tmp_path, text.replace("ratios: [0, 1e-5, 0.30000000000000004, .5]", "ratios: [0, 0.0]")))


@pytest.mark.parametrize(
    ("ppl", "tasks", "ok"),
    [([], ["arc_easy"], True), (["wikitext2"], [], True), ([], [], False)],
)
def test_perplexity_only_and_zero_shot_only_runs(raw, ppl, tasks, ok):
    for section in ("evaluate", "laptop.evaluate"):
        changed = _with(_with(raw, f"{section}.ppl_datasets", ppl), f"{section}.zeroshot_tasks", tasks)
        if ok:
            params = params_from_mapping(_with(changed, "scale", "full" if section == "evaluate" else "laptop"))
            assert list(params.evaluate.ppl_datasets) == ppl and list(params.evaluate.zeroshot_tasks) == tasks
        else:
            with pytest.raises(ConfigError, match=rf"{section}.ppl_datasets=\[\] is not allowed; allowed: a non-empty "
                                                  rf"list when {section}.zeroshot_tasks is empty too"):
                params_from_mapping(changed)


@pytest.mark.parametrize(("key", "value"), [("prune.damping", 0), ("prune.damping", 1.5), ("score.obs_damping", -1e-3),
                                            ("prune.damping", "1e-3x")])
def test_a_damping_outside_its_range_is_refused(tmp_path, key, value):
    section, name = key.split(".")
    text = _project_text()
    old = next(line for line in text.splitlines() if line.startswith(f"  {name}:"))
    text = text.replace(old, f"  {name}: {value}", 1)
    with pytest.raises(ConfigError, match=rf"{key}=.* is not allowed; allowed: a number"):
        load_params(_write(tmp_path, text))
