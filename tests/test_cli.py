"""The `pruneflow` command and the Python API: options reach Snakemake, `pruneflow prune` and
`pruneflow.prune` give the same checkpoint, the API keeps its invariants, and the core install
(no pipeline, evaluation or GGUF extras) loads and prunes. The DAG-vs-one-shot comparison runs in
the integration test (tests/test_integration.py), on the DAG it builds anyway."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pruneflow.cli import build_parser, main, snakemake_command

from .conftest import PROJECT_ROOT
from .tiny_project import write_tiny_data


def same_tensors(a: Path, b: Path) -> bool:
    left, right = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.fixture(scope="module")
def one_shot_project(tmp_path_factory):
    """A tiny checkpoint, a calibration text and a params file with tiny settings."""
    import yaml

    from pruneflow.tiny_models import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("one_shot")
    write_tiny_data(root / "data/raw")
    write_tiny_checkpoint(root / "tiny")
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["calibration"].update(num_samples=4, seq_len=32)
    params["prune"].update(layer_start=1, layer_end=-1, servable_multiple=16)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


@pytest.mark.parametrize("passed, expected", [
    ([], ["--cores", "all"]),
    (["-n"], ["--cores", "all", "-n"]),
    (["--resources", "gpu=2", "data/pruned/obs/0.2"], ["--cores", "all", "--resources", "gpu=2", "data/pruned/obs/0.2"]),
    (["--cores", "4", "-n"], ["--cores", "4", "-n"]),
    (["-c4"], ["-c4"]),
    (["--cores=2"], ["--cores=2"]),
    (["-j", "3", "--forceall"], ["-j", "3", "--forceall"]),
    (["--profile", "workflow/profiles/slurm"], ["--profile", "workflow/profiles/slurm"]),
])
def test_run_passes_snakemake_options_through(passed, expected):
    assert snakemake_command(passed) == [sys.executable, "-m", "snakemake", *expected]


def test_help_for_every_subcommand(capsys):
    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(commands) == {"run", "repro", "status", "prune", "evaluate", "report", "export-gguf", "ui"}
    for name in commands:
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0
        assert f"pruneflow {name}" in capsys.readouterr().out


def test_run_outside_a_project_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "-n"]) == 2
    assert "no workflow/Snakefile here" in capsys.readouterr().err


def test_options_of_commands_that_pass_nothing_through_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "m", "--ratio", "0.2", "--out", "x", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_run_reaches_snakemake_in_the_project(monkeypatch, capsys):
    """A real `pruneflow run` in the repository: Snakemake lists its rules (no job runs)."""
    monkeypatch.chdir(PROJECT_ROOT)
    out = subprocess.run([sys.executable, "-m", "pruneflow.cli", "run", "--list-rules"], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert {"prune", "score", "evaluate_pruned", "report"} <= set(out.stdout.split())


def test_cli_and_api_give_the_same_checkpoint(one_shot_project, monkeypatch, capsys):
    import pruneflow
    from pruneflow.modeling import load_tokenizer
    from pruneflow.text_data import read_rows

    root = one_shot_project
    monkeypatch.chdir(root)
    assert main(["prune", "tiny", "--criterion", "obs", "--ratio", "0.25", "--out", "cli"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((root / "cli/pruning_summary.json").read_text())
    assert printed["params_after"] == summary["params_after"] < summary["params_before"]
    assert summary["command"].startswith("pruneflow prune tiny")

    model = pruneflow.load_pruned(root / "tiny")
    texts = read_rows(root / "data/raw/wikitext-2/train.txt", "calibration")  # params.yaml's calibration.source
    result = pruneflow.prune(model, load_tokenizer(root / "tiny"), texts, criterion="obs", ratio=0.25,
                             params=root / "params.yaml")
    pruneflow.save_pruned(model, root / "api")
    assert same_tensors(root / "cli", root / "api")
    assert result.params_after == summary["params_after"]
    assert result.summary["layer_shapes_after"] == summary["layer_shapes_after"]
    reloaded = pruneflow.load_pruned(root / "cli")
    ids = torch.arange(20).reshape(2, 10)
    assert torch.equal(reloaded(ids).logits, model(ids).logits)
    provenance = json.loads((root / "cli/provenance.json").read_text())
    assert [step["stage"] for step in provenance][-1] == "prune"
    assert (root / "cli/README.md").is_file()

    # an existing --out is kept unless --force
    assert main(["prune", "tiny", "--ratio", "0.25", "--out", "cli"]) == 2
    assert "--out 'cli' exists" in capsys.readouterr().err


def test_api_invariants(one_shot_project):
    import pruneflow
    from pruneflow.architectures import count_parameters
    from pruneflow.errors import ConfigError, DataError
    from pruneflow.modeling import load_tokenizer
    from pruneflow.text_data import read_rows

    root = one_shot_project
    tokenizer = load_tokenizer(root / "tiny")
    texts = read_rows(root / "data/raw/wikitext-2/train.txt", "calibration")
    overrides = {"calibration": {"num_samples": 4, "seq_len": 32}, "prune": {"layer_start": 1, "layer_end": -1}}
    ids = torch.arange(24).reshape(2, 12)

    model = pruneflow.load_pruned(root / "tiny")
    before = model(ids).logits
    result = pruneflow.prune(model, tokenizer, texts, criterion="l2_magnitude", ratio=0.0, params=overrides)
    assert result.achieved_ratio == 0 and torch.equal(model(ids).logits, before)  # ratio 0: the same model

    model = pruneflow.load_pruned(root / "tiny", dtype=torch.bfloat16)
    dense = count_parameters(model)
    result = pruneflow.prune(model, tokenizer, texts, criterion="wanda_sp", ratio=0.3, params=overrides)
    assert next(model.parameters()).dtype == torch.bfloat16  # ends in the dtype it came in
    assert count_parameters(model) == result.params_after == dense - round(result.achieved_ratio * dense)
    assert abs(result.achieved_ratio - 0.3) < 0.03 and not model.training
    model = pruneflow.load_pruned(root / "tiny")  # float32: the gradient criterion runs on the model itself
    model.train()
    pruneflow.prune(model, tokenizer, texts, criterion="taylor_vector", ratio=0.3, params=overrides)
    assert model.training and all(p.requires_grad for p in model.parameters())  # as it came: ready to fine-tune

    with pytest.raises(DataError, match="calibration_texts is one string"):
        pruneflow.prune(model, tokenizer, "one long text", params=overrides)
    with pytest.raises(ConfigError, match="ratio=1.2 is not allowed"):
        pruneflow.prune(model, tokenizer, texts, ratio=1.2, params=overrides)
    with pytest.raises(ConfigError, match="criterion='taylor' is not allowed"):
        pruneflow.prune(model, tokenizer, texts, criterion="taylor", params=overrides)
    with pytest.raises(ConfigError, match="prune.allocation='best' is not allowed"):
        pruneflow.prune(model, tokenizer, texts, params={"prune": {"allocation": "best"}})
    with pytest.raises(ConfigError, match="params=42 is not allowed"):
        pruneflow.prune(model, tokenizer, texts, params=42)


def test_default_settings_are_the_project_params():
    """`pruneflow.prune(..., params=None)` prunes as the project's params.yaml does."""
    import dataclasses

    from pruneflow.config import load_params, params_from_mapping

    defaults, project = params_from_mapping({}), load_params(PROJECT_ROOT / "params.yaml")
    for section in ("seed", "runtime", "calibration", "activations", "score", "prune"):
        assert getattr(defaults, section) == getattr(project, section), section
    assert dataclasses.replace(project.prune, damping=0.5) != defaults.prune  # the comparison can fail


def core_site_packages(target: Path) -> set[str]:
    """A folder holding only the core install: pruneflow's declared core dependencies and everything
    they require (markers evaluated), linked from this environment. Returns the distribution names."""
    import importlib.metadata as metadata

    from packaging.requirements import Requirement

    def requirements(dist: str, extras: set[str]) -> list[str]:
        found = []
        for text in metadata.requires(dist) or []:
            requirement = Requirement(text)
            environment = [{"extra": e} for e in extras] or [{"extra": ""}]
            if requirement.marker is None or any(requirement.marker.evaluate(env) for env in environment):
                found.append(requirement.name)
        return found

    wanted, todo = set(), requirements("pruneflow", set())
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in wanted:
            continue
        wanted.add(name)
        todo += requirements(name, set())
    target.mkdir()
    for name in wanted:
        dist = metadata.distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops - {"__pycache__"}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (target / top).exists():
                (target / top).symlink_to(source)
    return wanted


def test_core_install_loads_and_prunes(one_shot_project, tmp_path):
    """In an environment holding only the core dependencies (no Snakemake, DVC, MLflow, lm-eval,
    datasets, pandas, matplotlib, gguf), the API and `pruneflow prune` prune, save and load."""
    site = tmp_path / "core-site"
    installed = core_site_packages(site)
    assert {"torch", "transformers", "safetensors", "peft", "huggingface-hub"} <= installed
    assert not installed & {"snakemake", "dvc", "mlflow", "lm-eval", "datasets", "pandas", "matplotlib", "gguf"}
    script = textwrap.dedent("""
        import sys, pruneflow
        from pruneflow.cli import main
        from pruneflow.modeling import load_tokenizer
        from pruneflow.text_data import read_rows
        root, out = sys.argv[1], sys.argv[2]
        text = root + "/data/raw/wikitext-2/train.txt"
        assert main(["prune", root + "/tiny", "--ratio", "0.2", "--out", out + "/core_cli",
                     "--params", root + "/params.yaml", "--calibration-file", text]) == 0
        model = pruneflow.load_pruned(out + "/core_cli")
        result = pruneflow.prune(model, load_tokenizer(root + "/tiny"), read_rows(text, "calibration"),
                                 criterion="taylor_element1", ratio=0.1, params=root + "/params.yaml")
        pruneflow.save_pruned(model, out + "/core_api")
        pruneflow.load_pruned(out + "/core_api")
        print("PRUNED", result.achieved_ratio)
    """)
    # -S: no site-packages of this environment; only the core folder and the sources are importable
    env = {**os.environ, "PYTHONPATH": f"{PROJECT_ROOT / 'src'}{os.pathsep}{site}", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-S", "-c", script, str(one_shot_project), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "PRUNED 0." in done.stdout
    # the environment is what it claims: a pipeline module needs what the core lacks
    probe = subprocess.run([sys.executable, "-S", "-c", "import pruneflow.reporting"], capture_output=True,
                           text=True, env=env, timeout=120)
    assert probe.returncode != 0 and "No module named 'pandas'" in probe.stderr


def test_read_rows_equals_the_datasets_text_builder(tmp_path):
    """The plain reader gives exactly the rows `datasets`' text builder gives (the perplexity numbers
    depend on it): universal newlines, lines split on \\n only, blank lines and a missing final newline."""
    datasets = pytest.importorskip("datasets")
    from pruneflow.text_data import read_rows

    path = tmp_path / "odd.txt"
    path.write_bytes("first\r\nsecond\rthird\n\n  \nform\x0cfeed\u2028sep\x1cgs\nno end".encode())
    files = [path, PROJECT_ROOT / "data/raw/ptb/ptb.valid.txt"]
    for file in files:
        built = datasets.load_dataset("text", data_files=str(file), split="train", keep_linebreaks=True,
                                      cache_dir=str(tmp_path / "cache"))
        assert read_rows(file, "text") == list(built["text"]), file


def test_progress_bars_reach_the_console_while_the_log_gets_the_rest(tmp_path):
    """As a Snakemake rule runs a stage (`cmd 3>&2 > log 2>&1`, PRUNEFLOW_PROGRESS_FD=3): the bar is drawn
    on the console's stream and the log holds the log lines without it; with no descriptor, stderr."""
    code = ("import logging; from pruneflow.progress import configure_logging, progress; configure_logging('t'); "
            "[x for x in progress(range(3), desc='bar-under-test')]; logging.getLogger('x').info('a log line')")
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src"), "PRUNEFLOW_PROGRESS_FD": "3"}
    command = f"{sys.executable} -c \"{code}\" 3>&2 > {tmp_path / 'job.log'} 2>&1"
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=120)
    log = (tmp_path / "job.log").read_text()
    assert done.returncode == 0 and "bar-under-test" in done.stderr
    assert "[t] a log line" in log and "bar-under-test" not in log
    env.pop("PRUNEFLOW_PROGRESS_FD")
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "bar-under-test" in plain.stderr and "[t] a log line" in plain.stderr


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's example as written (default settings, the project's calibration text), with the
    hub id pointing at a tiny 16-layer checkpoint (no hub here)."""
    import re

    from pruneflow.tiny_models import write_tiny_checkpoint

    readme = (PROJECT_ROOT / "README.md").read_text()
    section = readme.split("## Prune a model in Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    assert "pruneflow.prune(" in code and "HuggingFaceTB/SmolLM2-135M-Instruct" in code
    tiny = write_tiny_checkpoint(tmp_path / "tiny", num_hidden_layers=16)
    code = code.replace("HuggingFaceTB/SmolLM2-135M-Instruct", str(tiny))
    code = code.replace('"data/raw/wikitext-2/train.txt"', repr(str(PROJECT_ROOT / "data/raw/wikitext-2/train.txt")))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 -- the README's own code
    assert abs(scope["result"].achieved_ratio - 0.2) < 0.02
    assert (tmp_path / "smollm2-obs-20/config.json").is_file()
    assert scope["result"].summary["layout_search"]  # the default attention_unit: auto tried the layouts


def test_every_imported_package_is_declared():
    """Each third-party package a module of src/pruneflow imports is a declared dependency (core or an
    extra), found through the installed distributions that provide the import name."""
    import ast
    import importlib.metadata as metadata

    from packaging.requirements import Requirement

    declared = {Requirement(text).name.lower().replace("_", "-") for text in metadata.requires("pruneflow")}
    providers = metadata.packages_distributions()
    stdlib = set(sys.stdlib_module_names)
    imported: dict[str, set[str]] = {}
    for path in (PROJECT_ROOT / "src/pruneflow").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in stdlib and top != "pruneflow":
                    imported.setdefault(top, set()).add(path.name)
    assert {"torch", "transformers", "snakemake", "lm_eval"} <= set(imported)  # the walk finds imports
    undeclared = {top: sorted(files) for top, files in imported.items()
                  if not {d.lower().replace("_", "-") for d in providers.get(top, [top])} & declared}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
