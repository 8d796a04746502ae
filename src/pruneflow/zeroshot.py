"""Zero-shot accuracy of an in-memory causal LM on the LLM-Pruner commonsense suite, through lm-eval.

The scoring is lm-eval's own (`HFLM` log-likelihoods, its `multiple_choice` / `loglikelihood` task
logic and metrics), so numbers are comparable with papers that used the harness; only the data of
the built-in tasks comes from local MosaicML llm-foundry ICL files (`<data_dir>/zeroshot/*.jsonl`),
so that they never touch the Hub. Their task configs are generated per call into a temporary
directory (absolute data paths, names prefixed `pruneflow_` so they never shadow lm-eval's registry)
and the temporary directory is removed afterwards. The model is passed in memory (pruned models may
have per-layer widths that no `from_pretrained` can rebuild), 0-shot, fixed seeds, no result cache.
lm-eval's own progress bars (documents per task, then requests) go to pruneflow's progress stream.

Prompts (context | scored continuations), matching lm-eval's standard task YAMLs exactly where the
llm-foundry data allows; the target delimiter is always " ":

- arc_easy, arc_challenge (lm-eval `arc_*`): `"{query}\\nAnswer:"` | `" {choice}"`; the foundry
  query already reads `"Question: {question}"`, so the context is lm-eval's
  `"Question: {question}\\nAnswer:"` verbatim.
- piqa (lm-eval `piqa`): `"{query}Answer:"` | `" {choice}"`; the foundry query is
  `"Question: {goal}\\n"`, giving lm-eval's `"Question: {goal}\\nAnswer:"`.
- boolq (lm-eval `boolq`): the query minus its leading `"Passage: "` plus `"\\nAnswer:"` | `" no"`,
  `" yes"`; the foundry query is `"Passage: {passage}\\nQuestion: {question}?"`, giving lm-eval's
  `"{passage}\\nQuestion: {question}?\\nAnswer:"`.
- openbookqa (lm-eval `openbookqa`): `"{query}"` (the question stem) | `" {choice}"`.
- winogrande (lm-eval `winogrande`, partial scoring): each of `context_options` (the sentence up to
  the blank with the option filled in) is a context; the one continuation `" {continuation}"` (the
  rest of the sentence) is scored under each; the prediction is the context that makes it likeliest.
- lambada (lm-eval `lambada_openai`): `"{context}"` | `" {continuation}"` (the last word);
  acc = the continuation is the greedy decode, perplexity = exp(-mean log-likelihood).
- hellaswag (lm-eval `hellaswag`): lm-eval's own task config, loaded from its installed YAML with its
  `process_docs` / `preprocess`, over Rowan/hellaswag records in `<data_dir>/zeroshot/hellaswag.jsonl`
  (not shipped: HellaSwag's data is not available offline, so the default suite uses lambada instead).

Any other task name is run as lm-eval defines it: a task of the user's own YAMLs under
`include_path` (`evaluate.zeroshot_include_path`) or of lm-eval's registry, whose data lm-eval loads
from the Hub or the local Hugging Face datasets cache (then the caller's Hub settings apply, not
forced offline). Such runs are still 0-shot whatever the task's YAML says.

Metrics: acc is argmax of the summed log-likelihood; acc_norm divides by the choice's character
length (lm-eval's definition). Both are recorded wherever lm-eval's task defines both (ARC, PIQA,
OpenBookQA, HellaSwag); BoolQ and WinoGrande define acc only (acc_norm would be meaningless for WinoGrande,
whose "choices" are contexts), lambada acc and perplexity. Tasks without acc_norm report None.

Headline metric (`HEADLINE_METRIC`, used by `zeroshot_average`): the LLM-Pruner table convention,
acc for BoolQ, PIQA, WinoGrande and lambada, acc_norm for HellaSwag, ARC-e, ARC-c and OBQA (other
tasks: the first metric lm-eval marks higher-is-better). (Reproductions in
LLM-Pruner issue #25 suggest its ARC-e column may actually be acc; both are recorded, and
`zeroshot_average(metric_by_task=...)` recomputes the mean under any other convention.)

Cost: lm-eval runs context + choice as one sequence per choice, so it is compute-bound on the
shared contexts; SmolLM2-135M on 2 CPU cores takes about a minute for arc_easy + piqa at limit=100
(batch size 32; 8 and 64 were slower).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import logging
import math
import os
import random
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from pruneflow.errors import ConfigError, DataError
from pruneflow.zeroshot_tasks import (  # noqa: F401  (task_file, check_task_files: part of this API)
    _SCHEMAS,
    _SPECS,
    BUILTIN,
    HEADLINE_METRIC,
    _check_tasks,
    _read_records,
    check_task_files,
    include_folders,
    task_file,
    task_sources,
)

TASK_PREFIX = "pruneflow_"
# lm-eval's simple_evaluate defaults, so runs are comparable with harness CLI runs.
_RANDOM_SEED, _NUMPY_SEED, _TORCH_SEED, _FEWSHOT_SEED = 0, 1234, 1234, 1234
# Only lambada's perplexity is bootstrapped (mean metrics have closed-form stderrs); 1000 draws
# (one deterministic chunk, no process pool) keep it to about a second.
_BOOTSTRAP_ITERS = 1000
# HFLM warns twice on every in-memory model, which is exactly how this module is meant to use it.
_HFLM_IN_MEMORY_WARNINGS = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
)

_METRIC_CONFIG = {
    "acc": {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
    "acc_norm": {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
    "perplexity": {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
}


def evaluate_zeroshot(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    data_dir: str | Path,
    limit: int | None,
    batch_size: int,
    device: torch.device,
    include_path: str | Path | Sequence[str | Path] | None = None,
) -> dict[str, dict[str, float | int | str | None]]:
    """Score `model` 0-shot on `tasks` with lm-eval; one flat metrics dict per task, in `tasks` order.

    Built-in tasks' keys: acc, acc_stderr, acc_norm, acc_norm_stderr (None where the task has no
    acc_norm, or a stderr is undefined because n == 1), n (documents scored), headline_metric; lambada
    adds perplexity and perplexity_stderr. Tasks of lm-eval's registry or of `include_path` (folders of
    lm-eval task YAMLs) record every metric lm-eval reports (`<metric>` for its "none" filter, else
    `<metric>,<filter>`, each with `<key>_stderr`), n, and as headline_metric the first metric lm-eval
    marks higher-is-better. `limit` = N scores the first N documents of each task (None: all of them).
    Inputs and every built-in data file are validated before any model work. The model is moved to
    `device` for the call; its device, its modules' train/eval modes, the tokenizer, the process
    environment and the global RNG states are as before when this returns.
    """
    raw = _run(model, tokenizer, tasks, data_dir, limit, batch_size, device, log_samples=False,
               include_path=include_path)
    sources = raw["pruneflow_sources"]
    return {name: _summarize(name, raw) if source == BUILTIN else _summarize_external(name, raw)
            for name, source in sources.items()}


def zeroshot_average(
    results: Mapping[str, Mapping[str, Any]], metric_by_task: Mapping[str, str] | None = None
) -> float:
    """Mean over tasks of each task's headline metric (or `metric_by_task[task]` where given)."""
    if not results:
        raise ConfigError("zeroshot_average: results are empty; allowed: at least one task's metrics")
    values = []
    for task, metrics in results.items():
        metric = (
            (metric_by_task or {}).get(task) or metrics.get("headline_metric") or HEADLINE_METRIC.get(task)
        )
        value = metrics.get(metric) if metric else None
        if value is None:
            available = sorted(k for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k)
            raise ConfigError(
                f"zeroshot_average: task {task!r} has no value for metric={metric!r}; "
                f"allowed: {', '.join(available) or 'none'}"
            )
        values.append(float(value))
    return float(sum(values) / len(values))


def zeroshot_average_stderr(results: Mapping[str, Mapping[str, Any]]) -> float | None:
    """Standard error of `zeroshot_average`: sqrt(sum of the tasks' squared stderrs) / tasks (tasks are
    independent samples); None when a task has no stderr for its headline metric."""
    errors = []
    for task, metrics in results.items():
        metric = metrics.get("headline_metric") or HEADLINE_METRIC.get(task)
        error = metrics.get(f"{metric}_stderr")
        if error is None:
            return None
        errors.append(float(error) ** 2)
    return math.sqrt(sum(errors)) / len(errors) if errors else None


# ----------------------------------------------------------------------------- validation


def _check_positive(key: str, value: Any, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "None or an integer >= 1" if allow_none else "an integer >= 1"
        raise ConfigError(f"zeroshot {key}={value!r} is not allowed; allowed: {allowed}")


# ----------------------------------------------------------------------------- lm-eval run


def _task_config(name: str, data_file: Path, cache_dir: Path) -> dict[str, Any]:
    """The lm-eval YAML config of one task, reading `data_file` (absolute) with no shared cache."""
    spec = _SPECS[name]
    if spec.lm_eval_yaml is not None:
        return _lm_eval_task_config(name, data_file, cache_dir)
    return {
        "task": TASK_PREFIX + name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(cache_dir)},
        "test_split": "test",
        "output_type": "loglikelihood" if spec.schema == "loglikelihood" else "multiple_choice",
        **spec.config,
        "target_delimiter": " ",
        "num_fewshot": 0,
        "metric_list": [_METRIC_CONFIG[m] for m in spec.metrics],
        "metadata": {"version": 1.0},
    }


def _lm_eval_task_config(name: str, data_file: Path, cache_dir: Path) -> dict[str, Any]:
    """lm-eval's own task config (its process_docs, templates and metrics, functions resolved) over
    `data_file`: the config is a dict with callables, so it is handed to lm-eval as is, not as YAML."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    spec = _SPECS[name]
    config = load_yaml(Path(lm_eval.tasks.__file__).parent / str(spec.lm_eval_yaml), resolve_func=True)
    for key in ("tag", "group", "training_split", "validation_split", "fewshot_split", "dataset_name"):
        config.pop(key, None)
    return {
        **config,
        "task": TASK_PREFIX + name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(cache_dir)},
        "test_split": "test",
        "target_delimiter": " ",
        "num_fewshot": 0,
    }


@contextlib.contextmanager
def _progress_to_console() -> Iterator[None]:
    """lm-eval's tqdm bars (documents per task, then requests) on pruneflow's progress stream: stderr,
    or the console under Snakemake; none with PRUNEFLOW_PROGRESS=0. tqdm picks sys.stderr when a bar
    starts, so only the bars move: loggers keep their own streams."""
    from pruneflow.progress import PROGRESS_ENV, progress_stream

    if os.environ.get(PROGRESS_ENV) == "0":
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            yield
    else:
        with contextlib.redirect_stderr(progress_stream()):
            yield


@contextlib.contextmanager
def _isolated_call(model: torch.nn.Module, device: torch.device, offline: bool = True) -> Iterator[None]:
    """Offline (unless `offline` is False: the caller's Hub settings apply), quiet, seeded and on
    `device` inside; env, loggers, RNGs and model state restored after.

    stdout is sent to stderr inside, so lm-eval's bare prints cannot mix into a caller's output.
    """
    import datasets.config
    import huggingface_hub.constants

    # the module, not the `tqdm` class that `datasets.utils` re-exports under the same name
    datasets_tqdm = importlib.import_module("datasets.utils.tqdm")

    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"} if offline else {}
    env["DISABLE_MULTIPROC"] = "1"
    saved_env = {k: os.environ.get(k) for k in env}
    offline_flags = [
        *[(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
          (huggingface_hub.constants, "HF_HUB_OFFLINE")][: 3 if offline else 0],
        (datasets_tqdm, "_hf_datasets_progress_bars_disabled"),  # "Generating test split" bars
    ]
    saved_flags = [getattr(mod, attr) for mod, attr in offline_flags]
    lm_eval_logger = logging.getLogger("lm_eval")
    saved_level = lm_eval_logger.level
    hflm_logger = logging.getLogger("lm_eval.models.huggingface")
    drop_hflm_warning = _MessageFilter(_HFLM_IN_MEMORY_WARNINGS)
    rng_states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    modes = {module: module.training for module in model.modules()}
    first_param = next(model.parameters(), None)
    original_device = first_param.device if first_param is not None else None
    try:
        os.environ.update(env)
        for mod, attr in offline_flags:
            setattr(mod, attr, True)
        lm_eval_logger.setLevel(logging.WARNING)
        hflm_logger.addFilter(drop_hflm_warning)
        random.seed(_RANDOM_SEED)
        np.random.seed(_NUMPY_SEED)
        torch.manual_seed(_TORCH_SEED)
        if original_device is not None and original_device != device:
            model.to(device)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if original_device is not None and original_device != device:
            model.to(original_device)
        for module, training in modes.items():
            module.training = training
        random.setstate(rng_states[0])
        np.random.set_state(rng_states[1])
        torch.set_rng_state(rng_states[2])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        hflm_logger.removeFilter(drop_hflm_warning)
        lm_eval_logger.setLevel(saved_level)
        for (mod, attr), value in zip(offline_flags, saved_flags, strict=True):
            setattr(mod, attr, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _MessageFilter(logging.Filter):
    """Drops log records whose message contains any of some fixed substrings."""

    def __init__(self, substrings: Sequence[str]) -> None:
        super().__init__()
        self.substrings = tuple(substrings)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(s in message for s in self.substrings)


def _run(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    data_dir: str | Path,
    limit: int | None,
    batch_size: int,
    device: torch.device,
    log_samples: bool = False,
    include_path: str | Path | Sequence[str | Path] | None = None,
) -> dict[str, Any]:
    """Validate everything, then run lm-eval; returns its raw result dict (with samples if asked)
    plus `pruneflow_sources`, each task's `task_sources` entry."""
    sources = task_sources(tasks, include_path)
    folders = include_folders(include_path)
    _check_positive("limit", limit, allow_none=True)
    _check_positive("batch_size", batch_size)
    device = torch.device(device)
    data_root = Path(data_dir).expanduser().resolve() / "zeroshot"
    names = [name for name, source in sources.items() if source == BUILTIN]
    external = [name for name, source in sources.items() if source != BUILTIN]
    records = {name: _read_records(data_root / _SPECS[name].file, _SPECS[name].schema) for name in names}

    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="pruneflow-zeroshot-") as tmp:
        tmp_dir = Path(tmp)
        for sub in ("tasks", "data", "cache"):
            (tmp_dir / sub).mkdir()
        specs: list[str | dict[str, Any]] = []
        for name in names:
            # a normalised copy: only the schema's keys (uniform Arrow types), only the docs scored
            data_file = tmp_dir / "data" / f"{name}.jsonl"
            docs = records[name] if limit is None else records[name][:limit]
            data_file.write_text(
                "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8"
            )
            config = _task_config(name, data_file, tmp_dir / "cache")
            if _SPECS[name].lm_eval_yaml is not None:  # holds lm-eval's functions: passed as a dict
                specs.append(config)
                continue
            (tmp_dir / "tasks" / f"{name}.yaml").write_text(
                yaml.safe_dump(config, sort_keys=False), encoding="utf-8"
            )
            specs.append(TASK_PREFIX + name)

        # other tasks need lm-eval's registry (and the user's folders, which override it); the
        # generated configs go last so that nothing overrides them
        include = [*(str(f) for f in folders), str(tmp_dir / "tasks")] if external else str(tmp_dir / "tasks")
        with _isolated_call(model, device, offline=not external):
            task_manager = TaskManager(include_path=include, include_defaults=bool(external))
            loaded = task_manager.load([*specs, *external])
            for task in loaded["tasks"].values():
                if task.get_config("num_fewshot") != 0:  # zero-shot, whatever a task's YAML says
                    task.set_config(key="num_fewshot", value=0)
                task.set_fewshot_seed(seed=_FEWSHOT_SEED)
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
            with _progress_to_console():
                results = evaluate(
                    lm=lm,
                    task_dict=loaded,
                    limit=limit,
                    bootstrap_iters=_BOOTSTRAP_ITERS,
                    log_samples=log_samples,
                )
            del lm, loaded, task_manager  # drop the memory-mapped datasets before their files go
    if results is None:  # only non-zero ranks of a distributed run get None
        raise RuntimeError("lm-eval returned no results (not rank 0?)")
    results["pruneflow_sources"] = sources
    return results


def _summarize(name: str, raw: Mapping[str, Any]) -> dict[str, float | int | str | None]:
    """pruneflow's flat per-task record from lm-eval's `results` / `n-samples` entries."""
    key = TASK_PREFIX + name
    metrics = raw["results"][key]

    def value(metric: str) -> float | None:
        found = metrics.get(f"{metric},none")
        if found is None or isinstance(found, str):  # lm-eval writes "N/A" for undefined stderrs
            return None
        return float(found)

    out: dict[str, float | int | str | None] = {
        "acc": value("acc"),
        "acc_stderr": value("acc_stderr"),
        "acc_norm": value("acc_norm"),
        "acc_norm_stderr": value("acc_norm_stderr"),
    }
    if "perplexity" in _SPECS[name].metrics:
        out["perplexity"] = value("perplexity")
        out["perplexity_stderr"] = value("perplexity_stderr")
    out["n"] = int(raw["n-samples"][key]["effective"])
    out["headline_metric"] = HEADLINE_METRIC[name]
    return out


def _summarize_external(name: str, raw: Mapping[str, Any]) -> dict[str, float | int | str | None]:
    """The flat record of a registry or include-path task (or group): every metric lm-eval reports."""
    metrics = raw["results"][name]
    out: dict[str, float | int | str | None] = {}
    for key, found in metrics.items():
        metric, _, filter_name = key.partition(",")
        if not filter_name or metric.endswith("_stderr"):
            continue
        flat = metric if filter_name == "none" else key
        out[flat] = None if found is None or isinstance(found, str) else float(found)
        error = metrics.get(f"{metric}_stderr,{filter_name}")
        out[f"{flat}_stderr"] = None if error is None or isinstance(error, str) else float(error)
    out["n"] = _documents(name, raw)
    better = raw.get("higher_is_better", {}).get(name, {})
    ranked = [m for m, up in better.items() if up] + [m for m, up in better.items() if not up]
    candidates = [k for k in out if k != "n" and not k.endswith("_stderr") and out[k] is not None]
    headline = next((k for m in ranked for k in candidates if k.partition(",")[0] == m), None)
    if headline is None and candidates:
        headline = candidates[0]
    if headline is None:
        raise DataError(f"zero-shot task {name!r}: lm-eval reported no metric for it; allowed: a task "
                        "or group whose lm-eval config lists metrics (metric_list / aggregate_metric_list)")
    out["headline_metric"] = headline
    return out


def _documents(name: str, raw: Mapping[str, Any]) -> int:
    """Documents scored by a task, or by all the tasks under a group."""
    if name in raw.get("n-samples", {}):
        return int(raw["n-samples"][name]["effective"])
    return sum(_documents(child, raw) for child in raw.get("group_subtasks", {}).get(name, []))

