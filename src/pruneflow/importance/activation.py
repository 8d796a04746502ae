"""Activation-aware criteria that read the cached activation statistics.

Wanda-SP (structured Wanda, as the FLAP paper defines it): each weight scores |W_ij| * ||X_j||,
where ||X_j|| is the L2 norm over calibration tokens of the matrix's j-th input feature; a group
sums its weights' scores.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from pruneflow.errors import ConfigError
from pruneflow.importance.base import GroupScores, ScoringInputs
from pruneflow.importance.elementwise import score_elementwise

# which cached input feeds which projection
INPUT_OF = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "o_proj": "o_proj_in",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "down_proj": "down_proj_in",
}


def input_norm(activations, layer_index: int, matrix: str) -> torch.Tensor:
    key = f"layers.{layer_index}.{INPUT_OF[matrix]}.sq_sum"
    if key not in activations:
        raise ConfigError(f"activation cache lacks {key!r}; rerun cache_activations for this model")
    return activations[key].double().sqrt()


class WandaSP:
    name: ClassVar[str] = "wanda_sp"
    needs_gradients: ClassVar[bool] = False
    needs_activations: ClassVar[bool] = True

    def score(self, model: nn.Module, inputs: ScoringInputs) -> GroupScores:
        if inputs.activations is None:
            raise ConfigError("criterion 'wanda_sp' needs cached activations; pass --activations")
        activations = inputs.activations

        def element(index: int, name: str, module: nn.Linear, kind: str) -> torch.Tensor | None:
            if kind == "bias":
                return None
            norm = input_norm(activations, index, name).to(module.weight.device)
            return module.weight.detach().double().abs() * norm.unsqueeze(0)

        return score_elementwise(model, element)
