"""The importance protocol: a criterion turns a model (+ calibration data) into group scores.

Criteria are interchangeable objects (Torch-Pruning's *importance* role): the pruner only sees
`GroupScores`, one vector per layer and structure, higher = more important.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from safetensors.torch import load_file

from pruneflow.errors import DataError
from pruneflow.tensor_files import read_metadata, save_tensors

# GroupScores metadata: "true" when attention and FFN scores are on one scale, so a global ranking
# compares them directly instead of standardising each structure
COMMON_SCALE_KEY = "common_scale"


@dataclass
class ScoringInputs:
    """What a criterion may use: calibration token ids [n, seq_len] and cached activation stats."""

    calibration_ids: torch.Tensor
    activations: Mapping[str, torch.Tensor] | None = None
    micro_batch_size: int = 2
    seed: int = 0
    forward_batch_size: int = 8  # calibration samples per forward-only pass (criteria without gradients)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    # a `pruneflow.layerwise.LayerWeights`: passes over the model bring one decoder layer at a time to
    # `device` (the model in host memory); None: the model is on `device` whole
    layer_weights: Any = None


@dataclass
class GroupScores:
    """Per-layer scores: attention[i] has one entry per KV group, ffn[i] one per FFN channel.

    `attention_heads[i]` (optional) has one entry per query head: what pruning query heads inside
    their KV groups (`prune.attention_unit: query_head`) ranks. Criteria that cannot score single
    heads leave it None and that mode then fails naming the criterion.
    """

    attention: list[torch.Tensor]
    ffn: list[torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    attention_heads: list[torch.Tensor] | None = None

    def save(self, path: str | Path) -> None:
        tensors = {}
        for i, (att, ffn) in enumerate(zip(self.attention, self.ffn, strict=True)):
            tensors[f"layers.{i}.attention"] = att.detach().double().cpu().contiguous()
            tensors[f"layers.{i}.ffn"] = ffn.detach().double().cpu().contiguous()
        for i, heads in enumerate(self.attention_heads or []):
            tensors[f"layers.{i}.attention_heads"] = heads.detach().double().cpu().contiguous()
        meta = {k: str(v) for k, v in self.metadata.items()}
        meta["num_layers"] = str(len(self.attention))
        save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> GroupScores:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"scores file {str(path)!r} does not exist; run the score stage first")
        try:
            metadata = read_metadata(path)
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise DataError(f"scores file {str(path)!r} is not a readable safetensors file: {exc}") from exc
        num_layers = int(metadata.get("num_layers", "0"))
        try:
            attention = [tensors[f"layers.{i}.attention"] for i in range(num_layers)]
            ffn = [tensors[f"layers.{i}.ffn"] for i in range(num_layers)]
        except KeyError as exc:
            raise DataError(f"scores file {str(path)!r} lacks tensor {exc}; it was not written by pruneflow") from None
        heads = None
        if num_layers and "layers.0.attention_heads" in tensors:
            heads = [tensors[f"layers.{i}.attention_heads"] for i in range(num_layers)]
        return cls(attention=attention, ffn=ffn, metadata=metadata, attention_heads=heads)


class Importance(Protocol):
    """A pruning criterion."""

    name: ClassVar[str]
    needs_gradients: ClassVar[bool]
    needs_activations: ClassVar[bool]

    def score(self, model: torch.nn.Module, inputs: ScoringInputs) -> GroupScores: ...


def describe(criterion: Any) -> dict[str, str]:
    return {
        "criterion": criterion.name,
        "needs_gradients": str(criterion.needs_gradients),
        "needs_activations": str(criterion.needs_activations),
    }
