"""Everything about a run that can be checked before any job starts, checked in one place.

`check_plan` is what `snakemake` runs while it reads the Snakefile (before it plans or removes
anything), what every stage runs first under `dvc repro` (so the first job DVC starts refuses a
bad plan before any work), and what `python -m pruneflow.pipeline.plan` runs. The stage CLIs call
the parts that concern them when run alone. Each check reads only config files, headers and data
files, never model weights, and imports no torch (the device check excepted).

Checked: the model source (a local folder with a supported config.json, the embedded GGUF, or a hub
id that is cached or reachable), the layer range and every length against the model's context, the
calibration text (and that it is none of the evaluation files, by resolved path and by content),
the perplexity texts and zero-shot files the evaluation reads, the instruction data recovery reads,
and the device.
"""

from __future__ import annotations

from pathlib import Path

from pruneflow.config import BIAS_RECONSTRUCTIONS, BUILTIN_ZEROSHOT_TASKS, Params
from pruneflow.errors import ConfigError
from pruneflow.pipeline.graph import DATA_DIR, STATE_DIR, project_path
from pruneflow.pipeline.hashing import HashCache


def check_model(params: Params, root: str | Path) -> dict:
    """The source exists and is supported; the layer range and lengths fit it. Returns its config facts."""
    from pruneflow.families import supported_names
    from pruneflow.sources import (
        BIAS_MODEL_TYPES,
        resolve_source,
        source_config,
        unsupported_architecture,
    )

    root = Path(root)
    source = resolve_source(params.model.source, base_dir=root)
    config = source_config(source, params.model.revision, cache_dir=root / STATE_DIR)
    unsupported = unsupported_architecture(config)
    if unsupported:
        raise ConfigError(f"model.source={params.model.source!r} is a {unsupported!r} model, which is not "
                          f"supported; supported: {supported_names()}")
    layers = config.get("num_hidden_layers")
    if isinstance(layers, int):
        params.prune.layer_range(layers)
    if params.prune.reconstruction in BIAS_RECONSTRUCTIONS and config.get("model_type") not in BIAS_MODEL_TYPES:
        raise ConfigError(
            f"prune.reconstruction={params.prune.reconstruction!r} needs output biases on o_proj/down_proj, which "
            f"model_type={config.get('model_type')!r} cannot express in its config; allowed for: "
            f"{', '.join(BIAS_MODEL_TYPES)} (set prune.reconstruction to 'least_squares' or 'none')")
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv_heads, int):
        from types import SimpleNamespace

        from pruneflow.families import check_attention_unit

        shape = SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads)
        check_attention_unit({f"model.source={params.model.source!r}": shape}, params.prune.structures,
                             params.prune.attention_unit)
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int):
        check_lengths(params, positions, f"model.source={params.model.source!r}")
    return config


def check_lengths(params: Params, positions: int, where: str) -> None:
    """Every token length the pipeline uses fits the model's context (max_position_embeddings)."""
    lengths = [("calibration.seq_len", params.calibration.seq_len)]
    lengths += [(f"evaluate.ppl_seq_lens[{i}]", n) for i, n in enumerate(params.evaluate.ppl_seq_lens)]
    if params.grid.recovered_criteria:
        lengths.append(("recover.cutoff_len", params.recover.cutoff_len))
    for key, length in lengths:
        if length > positions:
            raise ConfigError(f"{key}={length} is not allowed for {where}; allowed: an integer <= its "
                              f"max_position_embeddings={positions}")


def evaluation_file_paths(root: str | Path) -> list[Path]:
    """Every file the pipeline can evaluate on (all perplexity texts and zero-shot tasks)."""
    from pruneflow.text_data import PPL_SOURCES
    from pruneflow.zeroshot_tasks import task_file

    data = Path(root) / DATA_DIR
    return [data / relative for relative, _ in PPL_SOURCES.values()] + [task_file(t, data)
                                                                        for t in BUILTIN_ZEROSHOT_TASKS]


def check_calibration_source(params: Params, root: str | Path, cache: HashCache | None = None) -> None:
    """The calibration text is readable and is none of the evaluation files: not the same file (symlinks and
    `..` resolved) and not a copy of one (same size and md5). Names like `latest_test_notes.txt` are fine."""
    from pruneflow.text_data import check_text_file

    root = Path(root)
    source = root / Path(params.calibration.source).expanduser()
    check_text_file(source, "calibration.source")
    resolved = source.resolve()
    cache = cache or HashCache(root / STATE_DIR)
    for evaluation in evaluation_file_paths(root):
        if not evaluation.is_file():
            continue
        same_file = resolved == evaluation.resolve()
        same_content = (not same_file and resolved.stat().st_size == evaluation.stat().st_size
                        and cache.dvc_hash(resolved) == cache.dvc_hash(evaluation))
        if same_file or same_content:
            how = "is" if same_file else "has the same content as"
            raise ConfigError(
                f"calibration.source={params.calibration.source!r} is not allowed: it {how} the evaluation file "
                f"{project_path(evaluation, root)!r}; allowed: a training text (evaluation data must never "
                "calibrate)")


def check_evaluation_data(params: Params, root: str | Path) -> None:
    """The configured perplexity texts and zero-shot files exist and parse; every zero-shot task name is
    built-in, under `evaluate.zeroshot_include_path` (an existing folder) or in lm-eval's registry."""
    from pruneflow.text_data import PPL_SOURCES, check_text_file
    from pruneflow.zeroshot_tasks import check_task_files

    data = Path(root) / DATA_DIR
    for name in params.evaluate.ppl_datasets:
        check_text_file(data / PPL_SOURCES[name][0], f"perplexity dataset {name!r} (evaluate.ppl_datasets)")
    check_task_files(params.evaluate.zeroshot_tasks, data, include_path=params.evaluate.zeroshot_include_path,
                     root=root)


def check_recovery_data(params: Params, root: str | Path) -> None:
    """Every `recover.data` file parses (Alpaca records or UTF-8 text; only when the grid recovers anything)."""
    from pruneflow.text_data import check_recovery_files

    if params.grid.recovered_criteria:
        check_recovery_files(params.recover.data, root)


def check_device(device: str) -> None:
    """`runtime.device` names a device this machine has (checked where the jobs run)."""
    if device in ("auto", "cpu"):
        return
    import torch

    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.split(":")[1]) if ":" in device else 0
        if count == 0:
            raise ConfigError(f"runtime.device={device!r} is not allowed on this machine: it has no CUDA device "
                              "(torch.cuda.is_available() is False); allowed: 'auto' or 'cpu'")
        if index >= count:
            raise ConfigError(f"runtime.device={device!r} is not allowed on this machine; allowed: 'auto', 'cpu', "
                              + ", ".join(repr(f"cuda:{i}") for i in range(count)))
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"runtime.device={device!r} is not allowed on this machine: MPS is not available; "
                          "allowed: 'auto' or 'cpu'")


def check_plan(params: Params, root: str | Path, *, devices: bool = True) -> None:
    """Every check above; the first problem raises a PruneflowError naming the key, value and what is allowed."""
    cache = HashCache(Path(root) / STATE_DIR)
    check_model(params, root)
    check_calibration_source(params, root, cache)
    check_evaluation_data(params, root)
    check_recovery_data(params, root)
    if devices:
        check_device(params.runtime.device)
    cache.save()
