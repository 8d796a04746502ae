"""Activation-aware criteria that read the cached activation statistics (no gradients).

- Wanda-SP (structured Wanda, as the FLAP paper defines it): each weight scores |W_ij| * ||X_j||,
  where ||X_j|| is the L2 norm over calibration tokens of the matrix's j-th input feature; a group
  sums its weights' scores.
- FLAP (An et al., 2024): the fluctuation of an input feature of o_proj / down_proj across tokens,
  weighted by the squared norm of the weight column it feeds: Var(X_j) * ||W_:,j||^2. A channel whose
  input barely fluctuates can be replaced by its mean, which the prune stage folds into the output
  bias (`prune.bias_compensation`; on by default for this criterion).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from pruneflow.architectures import decoder_layers, head_dim, layer_shape, projection
from pruneflow.errors import ConfigError, DataError
from pruneflow.importance.base import GroupScores, ScoringInputs
from pruneflow.importance.elementwise import Aggregated, score_elementwise

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


def _stat(activations: Mapping[str, torch.Tensor], layer_index: int, matrix: str, stat: str) -> torch.Tensor:
    key = f"layers.{layer_index}.{INPUT_OF[matrix]}.{stat}"
    if key not in activations:
        raise DataError(f"activation cache lacks {key!r}; rerun cache_activations for this model")
    return activations[key].double()


def input_norm(activations: Mapping[str, torch.Tensor], layer_index: int, matrix: str) -> torch.Tensor:
    """||X_j|| over every calibration token, per input feature of `matrix`."""
    return _stat(activations, layer_index, matrix, "sq_sum").sqrt()


def input_mean_and_variance(activations: Mapping[str, torch.Tensor], layer_index: int,
                            matrix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and (population) variance over calibration tokens, from the cached sums."""
    if "num_tokens" not in activations:
        raise DataError("activation cache lacks 'num_tokens'; rerun cache_activations for this model")
    tokens = float(activations["num_tokens"].reshape(-1)[0])
    mean = _stat(activations, layer_index, matrix, "sum") / tokens
    variance = (_stat(activations, layer_index, matrix, "sq_sum") / tokens - mean.pow(2)).clamp_min(0.0)
    return mean, variance


def _require(inputs: ScoringInputs, name: str) -> Mapping[str, torch.Tensor]:
    if inputs.activations is None:
        raise ConfigError(f"criterion {name!r} needs cached activations; pass --activations")
    return inputs.activations


def _check_width(stat: torch.Tensor, module: nn.Linear, key: str) -> None:
    if stat.numel() != module.in_features:
        raise DataError(
            f"cached activations {key!r} have {stat.numel()} features but the layer's matrix has "
            f"{module.in_features} inputs; the cache belongs to another model: rerun cache_activations"
        )


class WandaSP(Aggregated):
    name: ClassVar[str] = "wanda_sp"
    needs_gradients: ClassVar[bool] = False
    needs_activations: ClassVar[bool] = True

    def score(self, model: nn.Module, inputs: ScoringInputs) -> GroupScores:
        activations = _require(inputs, self.name)

        def element(index: int, name: str, module: nn.Linear, kind: str) -> torch.Tensor | None:
            if kind == "bias":
                return None
            norm = input_norm(activations, index, name)
            _check_width(norm, module, f"layers.{index}.{INPUT_OF[name]}")
            return module.weight.detach().double().abs() * norm.to(module.weight.device).unsqueeze(0)

        return score_elementwise(model, element, self.aggregation)


class Flap:
    """Fluctuation-based importance of FFN channels and attention heads (FLAP's WIFV metric)."""

    name: ClassVar[str] = "flap"
    needs_gradients: ClassVar[bool] = False
    needs_activations: ClassVar[bool] = True

    def score(self, model: nn.Module, inputs: ScoringInputs) -> GroupScores:
        activations = _require(inputs, self.name)
        size = head_dim(model)
        attention, heads, ffn = [], [], []
        for index, layer in enumerate(decoder_layers(model)):
            shape = layer_shape(layer, size)
            o_proj, down_proj = projection(layer, 'o_proj'), projection(layer, 'down_proj')
            _, o_variance = input_mean_and_variance(activations, index, "o_proj")
            _check_width(o_variance, o_proj, f"layers.{index}.o_proj_in")
            _, down_variance = input_mean_and_variance(activations, index, "down_proj")
            _check_width(down_variance, down_proj, f"layers.{index}.down_proj_in")
            with torch.no_grad():
                o_columns = o_proj.weight.detach().double().pow(2).sum(dim=0).cpu()
                down_columns = down_proj.weight.detach().double().pow(2).sum(dim=0).cpu()
            per_feature = o_variance * o_columns
            head_scores = per_feature.reshape(shape.num_attention_heads, size).sum(dim=1)
            heads.append(head_scores)
            attention.append(head_scores.reshape(shape.num_key_value_heads, -1).sum(dim=1))
            ffn.append(down_variance * down_columns)
        return GroupScores(attention=attention, ffn=ffn, attention_heads=heads)
