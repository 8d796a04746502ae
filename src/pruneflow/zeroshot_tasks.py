"""The zero-shot tasks pruneflow scores and the files they read: names, record layouts, validation.

Kept apart from the lm-eval run (`pruneflow.zeroshot`) and free of torch, so the plan checks every
configured task before any job starts. A task name is, in this order:

- built-in (`_SPECS`): one local jsonl under `<data_dir>/zeroshot/`, a MosaicML llm-foundry ICL file
  (or, for hellaswag, records in the Rowan/hellaswag layout), mapped onto an lm-eval task config;
- a task of the user's own lm-eval YAML configs under `evaluate.zeroshot_include_path`;
- a task or group of lm-eval's registry (`TaskManager().all_tasks`), whose data lm-eval fetches from
  the Hub or the local Hugging Face datasets cache at run time.

Built-in names win over the other two. Reading lm-eval's registry takes seconds, so it happens only
when a configured name is not built-in.
"""

from __future__ import annotations

import difflib
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pruneflow.config import BUILTIN_ZEROSHOT_TASKS, ZEROSHOT_TASKS_ALLOWED
from pruneflow.errors import ConfigError, DataError

# where a configured task comes from (`task_sources`)
BUILTIN, INCLUDE_PATH, REGISTRY = "builtin", "include_path", "lm_eval"
INCLUDE_PATH_ALLOWED = "null or a list of existing folders of lm-eval task YAML files"

HEADLINE_METRIC: dict[str, str] = {
    "boolq": "acc",
    "piqa": "acc",
    "winogrande": "acc",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
    "lambada": "acc",
    "hellaswag": "acc_norm",
}

# Required keys of each record layout (checked line by line before any model work).
_SCHEMAS: dict[str, tuple[str, ...]] = {
    "multiple_choice": ("query", "choices", "gold"),
    "partial": ("context_options", "continuation", "gold"),
    "loglikelihood": ("context", "continuation"),
    "hellaswag": ("activity_label", "ctx_a", "ctx_b", "endings", "label"),  # Rowan/hellaswag's fields
}
# what a file of each layout is, for the message about a missing one
_LAYOUTS = {"hellaswag": "HellaSwag jsonl (Rowan/hellaswag records, e.g. its validation split)"}


@dataclass(frozen=True)
class _TaskSpec:
    """How one pruneflow task maps onto an llm-foundry file and an lm-eval task config."""

    file: str
    schema: str
    config: Mapping[str, Any]
    metrics: tuple[str, ...]
    # an lm-eval task YAML (relative to lm_eval/tasks) whose config, preprocessing and metrics are used
    # as they are; only the data source and splits are replaced (then `config` is empty)
    lm_eval_yaml: str | None = None


_MC_METRICS = ("acc", "acc_norm")
_SPECS: dict[str, _TaskSpec] = {
    "arc_easy": _TaskSpec(
        "arc_easy.jsonl",
        "multiple_choice",
        {"doc_to_text": "{{query}}\nAnswer:", "doc_to_choice": "choices", "doc_to_target": "gold"},
        _MC_METRICS,
    ),
    "arc_challenge": _TaskSpec(
        "arc_challenge.jsonl",
        "multiple_choice",
        {"doc_to_text": "{{query}}\nAnswer:", "doc_to_choice": "choices", "doc_to_target": "gold"},
        _MC_METRICS,
    ),
    "piqa": _TaskSpec(
        "piqa.jsonl",
        "multiple_choice",
        {"doc_to_text": "{{query}}Answer:", "doc_to_choice": "choices", "doc_to_target": "gold"},
        _MC_METRICS,
    ),
    "boolq": _TaskSpec(
        "boolq.jsonl",
        "multiple_choice",
        {
            "doc_to_text": "{{ query[9:] if query.startswith('Passage: ') else query }}\nAnswer:",
            "doc_to_choice": "choices",
            "doc_to_target": "gold",
        },
        ("acc",),
    ),
    "openbookqa": _TaskSpec(
        "openbook_qa.jsonl",
        "multiple_choice",
        {"doc_to_text": "query", "doc_to_choice": "choices", "doc_to_target": "gold"},
        _MC_METRICS,
    ),
    # doc_to_text returning the gold index (an int column) is lm-eval's "multiple inputs" mode:
    # choices become contexts and doc_to_target is the shared continuation.
    "winogrande": _TaskSpec(
        "winogrande.jsonl",
        "partial",
        {"doc_to_text": "gold", "doc_to_choice": "context_options", "doc_to_target": "continuation"},
        ("acc",),
    ),
    "lambada": _TaskSpec(
        "lambada_openai.jsonl",
        "loglikelihood",
        {"doc_to_text": "context", "doc_to_target": "{{' ' + continuation}}"},
        ("perplexity", "acc"),
    ),
    # lm-eval's own hellaswag task (its process_docs / preprocess) over a local file
    "hellaswag": _TaskSpec("hellaswag.jsonl", "hellaswag", {}, _MC_METRICS, lm_eval_yaml="hellaswag/hellaswag.yaml"),
}
assert set(_SPECS) == set(BUILTIN_ZEROSHOT_TASKS) == set(HEADLINE_METRIC)


def task_file(task: str, data_dir: str | Path) -> Path:
    """Where a task's llm-foundry jsonl lives under `data_dir`."""
    return Path(data_dir) / "zeroshot" / _SPECS[task].file


def check_task_files(
    tasks: Sequence[str],
    data_dir: str | Path,
    include_path: str | Path | Sequence[str | Path] | None = None,
    root: str | Path = ".",
) -> dict[str, str]:
    """Validate task names, the include path and every record of the built-in tasks' files (no model
    needed; seconds only when a name must be looked up in lm-eval's registry). Returns `task_sources`."""
    sources = task_sources(tasks, include_path, root, allow_empty=True)
    for name, source in sources.items():
        if source == BUILTIN:
            _read_records(task_file(name, data_dir), _SPECS[name].schema)
    return sources


def include_folders(
    include_path: str | Path | Sequence[str | Path] | None, root: str | Path = "."
) -> tuple[Path, ...]:
    """The include-path folders as absolute paths (relative ones against `root`); a missing one is a ConfigError."""
    if include_path is None:
        return ()
    items = [include_path] if isinstance(include_path, str | Path) else list(include_path)
    folders = []
    for item in items:
        folder = (Path(root) / Path(item).expanduser()).resolve()
        if not folder.is_dir():
            problem = "is a file, not a folder" if folder.exists() else "does not exist"
            raise ConfigError(
                f"evaluate.zeroshot_include_path={str(item)!r} is not allowed: {folder} {problem}; "
                f"allowed: {INCLUDE_PATH_ALLOWED}"
            )
        folders.append(folder)
    return tuple(dict.fromkeys(folders))


def task_sources(
    tasks: Sequence[str],
    include_path: str | Path | Sequence[str | Path] | None = None,
    root: str | Path = ".",
    allow_empty: bool = False,
) -> dict[str, str]:
    """Where each task comes from (BUILTIN, INCLUDE_PATH or REGISTRY), in the given order, deduplicated.

    A name that is none of them is a ConfigError with a did-you-mean; so is an lm-eval tag (a set of
    tasks with no one score) or a group without an aggregate metric: their tasks must be listed instead.
    """
    names = _check_tasks(tasks, allow_empty)
    folders = include_folders(include_path, root)
    external = [name for name in names if name not in _SPECS]
    sources = dict.fromkeys(names, BUILTIN)
    if not external:
        return sources
    own = _task_index(folders) if folders else {}
    for name in external:
        if name in own:
            sources[name], index = INCLUDE_PATH, own
        elif name in _registry_index():
            sources[name], index = REGISTRY, _registry_index()
        else:
            known = [*_SPECS, *own, *_registry_index()]
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            where = f" ({', '.join(str(f) for f in folders)})" if folders else " (not set)"
            raise ConfigError(
                f"evaluate.zeroshot_tasks={name!r} is not allowed: no built-in task, no task under "
                f"evaluate.zeroshot_include_path{where} and no task of lm-eval's registry has that name; "
                f"allowed: {ZEROSHOT_TASKS_ALLOWED}" + (f" (did you mean {close[0]!r}?)" if close else "")
            )
        _check_scorable(name, index)
    return sources


def _check_scorable(name: str, index: Mapping[str, Any]) -> None:
    """A tag, or a group without an aggregate metric, has no one score to record: refused, naming its tasks."""
    entry = index[name]
    kind = entry.kind.name
    if kind == "TAG":
        members = sorted(other for other, e in index.items() if name in (e.tags or ()))
        problem, listed = "an lm-eval tag (a set of tasks with no one score)", members
    elif kind == "GROUP" and not (entry.cfg or {}).get("aggregate_metric_list"):
        children = (entry.cfg or {}).get("task") or []
        listed = [c if isinstance(c, str) else str(c.get("task", c)) for c in children]
        problem = "an lm-eval group without an aggregate metric"
    else:
        return
    shown = ", ".join(listed[:10]) + (", ..." if len(listed) > 10 else "")
    raise ConfigError(
        f"evaluate.zeroshot_tasks={name!r} is not allowed: it is {problem}; allowed: its tasks listed one by "
        f"one ({shown or 'none'})"
    )


def _task_index(folders: Sequence[Path]) -> Mapping[str, Any]:
    """lm-eval's index (name -> entry) of the task YAMLs under `folders` (TaskManager's own scan)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(f) for f in folders], include_defaults=False).task_index


@functools.cache
def _registry_index() -> Mapping[str, Any]:
    """lm-eval's registry (name -> entry), read once per process (it takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager().task_index


def _check_tasks(tasks: Sequence[str], allow_empty: bool = False) -> list[str]:
    """Deduplicated task list in the given order; empty or non-string names are a ConfigError."""
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names and not allow_empty:
        raise ConfigError(f"evaluate.zeroshot_tasks=[] is not allowed; allowed: one or more of: {ZEROSHOT_TASKS_ALLOWED}")
    for name in names:
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise ConfigError(f"evaluate.zeroshot_tasks={name!r} is not allowed; allowed: {ZEROSHOT_TASKS_ALLOWED}")
    return list(dict.fromkeys(names))


def _record_problem(record: Any, schema: str) -> str | None:
    """Why `record` does not fit `schema`, or None if it does."""
    if not isinstance(record, dict):
        return f"a JSON object is required, got {type(record).__name__}"
    missing = [k for k in _SCHEMAS[schema] if k not in record]
    if missing:
        return f"missing key(s) {', '.join(missing)}"
    if schema == "hellaswag":
        return _hellaswag_problem(record)
    options_key = {"multiple_choice": "choices", "partial": "context_options"}.get(schema)
    for key in ("query", "context", "continuation"):
        if key in _SCHEMAS[schema] and not isinstance(record[key], str):
            return f"{key!r} must be a string"
    for key in ("query", "context", "continuation"):
        if key in _SCHEMAS[schema] and not record[key]:
            return f"{key!r} must not be empty"
    if options_key is not None:
        options = record[options_key]
        if not isinstance(options, list) or len(options) < 2:
            return f"{options_key!r} must be a list of at least 2 strings"
        if not all(isinstance(o, str) and o for o in options):
            return f"{options_key!r} must hold non-empty strings"
        gold = record["gold"]
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(options):
            return f"'gold' must be an integer index into {options_key!r}, got {gold!r}"
    return None


def _hellaswag_problem(record: dict[str, Any]) -> str | None:
    """Why a Rowan/hellaswag record cannot go through lm-eval's hellaswag preprocessing, or None."""
    for key in ("activity_label", "ctx_a", "ctx_b"):
        if not isinstance(record[key], str):
            return f"{key!r} must be a string"
    if not record["ctx_a"].strip():
        return "'ctx_a' must not be empty"
    endings = record["endings"]
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) and e for e in endings):
        return "'endings' must be a list of at least 2 non-empty strings"
    label = record["label"]
    index = label if isinstance(label, int) and not isinstance(label, bool) else None
    if isinstance(label, str) and label.isdecimal():
        index = int(label)
    if index is None or not 0 <= index < len(endings):
        return f"'label' must be an index into 'endings' (an integer or a string of digits), got {label!r}"
    return None


def _read_records(path: Path, schema: str) -> list[dict[str, Any]]:
    """All records of one jsonl file, reduced to the schema's keys; bad files are a DataError."""
    layout = _LAYOUTS.get(schema, "llm-foundry jsonl")
    if not path.is_file():
        raise DataError(f"zero-shot data file {path} is missing; expected {layout} there")
    expected = ", ".join(_SCHEMAS[schema])
    records: list[dict[str, Any]] = []
    try:
        with path.open(encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{path}:{line_no}: not valid JSON ({exc.msg}); expected keys: {expected}"
                    ) from exc
                problem = _record_problem(record, schema)
                if problem:
                    raise DataError(f"{path}:{line_no}: {problem}; expected keys: {expected}")
                kept = {k: record[k] for k in _SCHEMAS[schema]}
                if schema == "hellaswag":  # one Arrow type for the column, as in Rowan/hellaswag
                    kept["label"] = str(int(kept["label"]))
                records.append(kept)
    except UnicodeDecodeError as exc:
        raise DataError(f"zero-shot data file {path} is not UTF-8 text ({exc}); expected UTF-8 jsonl") from None
    if not records:
        raise DataError(
            f"zero-shot data file {path} is empty; expected one JSON record per line ({expected})"
        )
    return records
