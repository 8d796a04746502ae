"""A copy of the project with a tiny random model and slices of the real data, in a temp dir.

The pipeline files (workflow/ with the Snakefile, dvc.yaml, src/) are copied unchanged; only params.yaml is
shrunk, so the integration tests exercise exactly what users run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from .conftest import PROJECT_ROOT

TINY_OVERRIDES = {
    "model": {"source": "models/tiny-llama"},
    "calibration": {"num_samples": 4, "seq_len": 32},
    "activations": {"max_tokens": 64},
    "grid": {"criteria": ["taylor_element1", "l2_magnitude"], "ratios": [0.3], "recovered_criteria": ["taylor_element1"],
             "servable_criteria": ["l2_magnitude"]},
    "prune": {"layer_start": 1, "layer_end": -1, "structures": ["attention", "ffn"], "servable_multiple": 16},
    "recover": {"method": "lora"},  # distillation with LoRA: the integration tests change and refuse LoRA settings
    "laptop": {
        "recover": {"batch_size": 4, "micro_batch_size": 2, "max_steps": 2, "cutoff_len": 64, "val_size": 4,
                    "warmup_steps": 1, "eval_every_steps": 1},
        "evaluate": {"ppl_max_windows": 4, "ppl_seq_lens": [32, 64], "ppl_batch_size": 4, "zeroshot_tasks": ["arc_easy", "piqa"],
                     "zeroshot_limit": 6, "zeroshot_batch_size": 8, "latency_repeats": 1,
                     "throughput_batch_size": 2, "generation_tokens": 4},
    },
}


def _merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def _head_lines(src: Path, dst: Path, lines: int) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with src.open() as handle:
        dst.write_text("".join(line for _, line in zip(range(lines), handle, strict=False)))


def _head_json_list(src: Path, dst: Path, records: int) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(json.loads(src.read_text())[:records], indent=1))


def write_tiny_data(data_dir: Path) -> None:
    raw = PROJECT_ROOT / "data/raw"
    _head_lines(raw / "wikitext-2-raw/test.txt", data_dir / "wikitext-2-raw/test.txt", 120)
    _head_lines(raw / "wikitext-2/train.txt", data_dir / "wikitext-2/train.txt", 300)
    _head_lines(raw / "ptb/ptb.valid.txt", data_dir / "ptb/ptb.valid.txt", 120)
    for task in sorted((raw / "zeroshot").glob("*.jsonl")):
        _head_lines(task, data_dir / "zeroshot" / task.name, 12)
    for instruct in sorted((raw / "instruct").glob("*.json")):
        _head_json_list(instruct, data_dir / "instruct" / instruct.name, 20)


def make_tiny_project(root: Path, overrides: dict | None = None, family: str = "llama") -> Path:
    """Copy the pipeline into `root`, add tiny data and a tiny model of `family` (a name of
    `pruneflow.tiny_models.TINY_CONFIGS`, written to models/tiny-<family>, the model.source), shrink params.yaml."""
    from pruneflow.tiny_models import write_tiny_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy2(PROJECT_ROOT / name, root / name)
    shutil.copytree(PROJECT_ROOT / "workflow", root / "workflow")
    shutil.copytree(PROJECT_ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (root / ".gitignore").write_text((PROJECT_ROOT / ".gitignore").read_text())
    write_tiny_data(root / "data/raw")
    write_tiny_checkpoint(root / f"models/tiny-{family}", family=family)
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params = _merge(params, TINY_OVERRIDES)
    if family != "llama":
        params = _merge(params, {"model": {"source": f"models/tiny-{family}"}})
    if overrides:
        params = _merge(params, overrides)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    render_dvc_yaml(root)
    return root


def render_dvc_yaml(root: Path) -> None:
    """dvc.yaml for the project's params.yaml, as `python -m pruneflow.pipeline.plan --write-dvc-yaml` writes it
    (the tiny model is a local folder: a data file of prepare_model the repository's dvc.yaml lacks)."""
    from pruneflow.config import load_params
    from pruneflow.pipeline.graph import render_dvc_yaml as render

    (root / "dvc.yaml").write_text(render(load_params(root / "params.yaml"), root))


def stage_chain(criteria: list[str], ratio: float) -> list[tuple[str, list[str]]]:
    """The DAG's commands up to the pruned models, as (stage, argv) pairs with the Snakefile's paths."""
    cal, act, dense = "data/calibration/calibration.safetensors", "data/activations/activations.safetensors", \
        "data/models/dense"
    chain = [("prepare_model", ["--out", dense]), ("calibrate", ["--model", dense, "--out", cal]),
             ("cache_activations", ["--model", dense, "--calibration", cal, "--out", act])]
    for name in criteria:
        scores = f"data/scores/{name}.safetensors"
        chain.append(("score", ["--model", dense, "--calibration", cal, "--activations", act, "--criterion", name,
                                "--out", scores]))
        chain.append(("prune", ["--model", dense, "--scores", scores, "--activations", act, "--calibration", cal,
                                "--criterion", name, "--ratio", str(ratio), "--out", f"data/pruned/{name}/{ratio}"]))
    return chain


def run_stages_in_process(root: Path, criteria: list[str] | None = None, ratio: float = 0.3,
                          commands: list[tuple[str, list[str]]] | None = None) -> None:
    """Run stage CLIs' mains in this process with `root` as cwd: the chain up to pruning, or `commands`."""
    import importlib

    previous = Path.cwd()
    os.chdir(root)
    try:
        for stage, argv in commands if commands is not None else stage_chain(criteria or [], ratio):
            importlib.import_module(f"pruneflow.stages.{stage}").main(argv)
    finally:
        os.chdir(previous)


def set_param(root: Path, dotted: str, value) -> None:
    """Set one params.yaml key (dotted path) of a project, as a user editing the file would."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    node = params
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def project_env(root: Path) -> dict[str, str]:
    """The environment stage processes get: the copied sources first on the path, no network."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(root / "src")
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DVC_NO_ANALYTICS="1", TOKENIZERS_PARALLELISM="false",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    env.pop("PRUNEFLOW_INVOCATION_ID", None)
    return env


def run(cmd: list[str], root: Path, check: bool = True, timeout: int = 1500,
        extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=root, env={**project_env(root), **(extra_env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if check and result.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted((root / "logs").rglob("*.log"))
                         ) if (root / "logs").exists() else ""
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-6000:]}\n{logs}")
    return result


def snakemake_planned_jobs(root: Path) -> dict[str, int]:
    """Jobs a dry run would execute, by rule (empty when nothing is to be done)."""
    out = run(["snakemake", "--dry-run", "--cores", "1"], root).stdout
    if "Nothing to be done" in out:
        return {}
    jobs: dict[str, int] = {}
    in_table = False
    for line in out.splitlines():
        if line.startswith("job ") and "count" in line:
            in_table = True
            continue
        if in_table:
            parts = line.split()
            if not parts or line.startswith("-"):
                continue
            if parts[0] == "total":
                break
            jobs[parts[0]] = int(parts[1])
    jobs.pop("all", None)
    return jobs


def dvc_planned_stages(root: Path) -> list[str]:
    out = run(["dvc", "repro", "--dry"], root).stdout
    return sorted(line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '"))


def dvc_ran_stages(root: Path) -> list[str]:
    """Run `dvc repro` and return the stages that actually executed."""
    out = run(["dvc", "repro"], root).stdout
    return sorted(line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '"))


def init_git_and_dvc(root: Path) -> None:
    run(["git", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    shutil.copy2(PROJECT_ROOT / ".dvc/config", root / ".dvc/config")  # the project's settings and default remote
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "tiny project"], root)
