"""Which commands and settings produced an artifact: a chain carried from stage to stage.

Every model folder holds `provenance.json`, the list of steps that made it (prepare_model, score,
prune, recover), each with its command, the params it read and when it ran. Metrics embed the chain,
so the report can name the exact commands behind every number.

Steps hold nothing that changes between identical reruns (no timestamps, no commit id: MLflow
records those), so a rerun with the same inputs writes the same bytes and DVC skips what follows.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from pruneflow import __version__

PROVENANCE_FILE = "provenance.json"


def step(stage: str, command: str, params: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "stage": stage,
        "command": command,
        "params": _jsonable(params),
        "pruneflow_version": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        **_jsonable(extra),
    }


def read_chain(model_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(model_dir) / PROVENANCE_FILE
    if not path.is_file():
        return []
    return json.loads(path.read_text())


def write_chain(model_dir: str | Path, chain: list[dict[str, Any]]) -> None:
    (Path(model_dir) / PROVENANCE_FILE).write_text(json.dumps(chain, indent=2) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
