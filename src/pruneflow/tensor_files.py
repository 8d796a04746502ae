"""Safetensors files whose bytes depend only on their content, written atomically.

safetensors stores the `__metadata__` map in hash order, which changes from process to process: the
same scores written by two runs differed in bytes, so DVC saw a change where there was none. Here the
metadata travels as one entry holding sorted JSON, and reading accepts plain safetensors files too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from pruneflow.pipeline.atomic import atomic_path

if TYPE_CHECKING:
    import torch

METADATA_KEY = "pruneflow"


def save_tensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(dict(tensors), str(tmp), metadata={METADATA_KEY: json.dumps(dict(metadata), sort_keys=True)})


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata map (the header only: no tensor is read, and torch is not needed)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        raw = dict(handle.metadata() or {})
    if set(raw) == {METADATA_KEY}:
        return json.loads(raw[METADATA_KEY])
    return raw
