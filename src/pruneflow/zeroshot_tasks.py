"""The zero-shot tasks pruneflow scores and the files they read: names, record layouts, validation.

Kept apart from the lm-eval run (`pruneflow.zeroshot`) and free of torch, so the plan checks every
configured task file before any job starts. Each task reads one MosaicML llm-foundry ICL jsonl file
under `<data_dir>/zeroshot/`; `_SPECS` maps it onto lm-eval's task config.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pruneflow.config import ZEROSHOT_TASKS
from pruneflow.errors import ConfigError, DataError

HEADLINE_METRIC: dict[str, str] = {
    "boolq": "acc",
    "piqa": "acc",
    "winogrande": "acc",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
    "lambada": "acc",
}

# Required keys of each llm-foundry record layout (checked line by line before any model work).
_SCHEMAS: dict[str, tuple[str, ...]] = {
    "multiple_choice": ("query", "choices", "gold"),
    "partial": ("context_options", "continuation", "gold"),
    "loglikelihood": ("context", "continuation"),
}


@dataclass(frozen=True)
class _TaskSpec:
    """How one pruneflow task maps onto an llm-foundry file and an lm-eval task config."""

    file: str
    schema: str
    config: Mapping[str, Any]
    metrics: tuple[str, ...]


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
}
assert set(_SPECS) == set(ZEROSHOT_TASKS) == set(HEADLINE_METRIC)



def task_file(task: str, data_dir: str | Path) -> Path:
    """Where a task's llm-foundry jsonl lives under `data_dir`."""
    return Path(data_dir) / "zeroshot" / _SPECS[task].file


def check_task_files(tasks: Sequence[str], data_dir: str | Path) -> None:
    """Validate task names and every record of their data files (cheap; no model needed)."""
    for name in _check_tasks(tasks, allow_empty=True):
        _read_records(task_file(name, data_dir), _SPECS[name].schema)



def _check_tasks(tasks: Sequence[str], allow_empty: bool = False) -> list[str]:
    """Deduplicated task list in the given order; unknown names are a ConfigError."""
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names and not allow_empty:
        raise ConfigError(
            f"zeroshot tasks=[] is not allowed; allowed: one or more of {', '.join(ZEROSHOT_TASKS)}"
        )
    for name in names:
        if name not in _SPECS:
            raise ConfigError(f"zeroshot task={name!r} is not allowed; allowed: {', '.join(ZEROSHOT_TASKS)}")
    return list(dict.fromkeys(names))


def _record_problem(record: Any, schema: str) -> str | None:
    """Why `record` does not fit `schema`, or None if it does."""
    if not isinstance(record, dict):
        return f"a JSON object is required, got {type(record).__name__}"
    missing = [k for k in _SCHEMAS[schema] if k not in record]
    if missing:
        return f"missing key(s) {', '.join(missing)}"
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


def _read_records(path: Path, schema: str) -> list[dict[str, Any]]:
    """All records of one jsonl file, reduced to the schema's keys; bad files are a DataError."""
    if not path.is_file():
        raise DataError(f"zero-shot data file {path} is missing; expected llm-foundry jsonl there")
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
                records.append({k: record[k] for k in _SCHEMAS[schema]})
    except UnicodeDecodeError as exc:
        raise DataError(f"zero-shot data file {path} is not UTF-8 text ({exc}); expected UTF-8 jsonl") from None
    if not records:
        raise DataError(
            f"zero-shot data file {path} is empty; expected one JSON record per line ({expected})"
        )
    return records
