"""LLM-Pruner's first-order Taylor importance: |dL/dW * W| per parameter, summed over the group.

The loss is next-token cross-entropy over the calibration samples. Micro-batches accumulate into
the parameters' `.grad`, so memory does not grow with the number of samples and no per-sample
gradient is kept.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from pruneflow.importance.base import GroupScores, ScoringInputs
from pruneflow.importance.elementwise import projection_parameters, score_elementwise


def accumulate_gradients(model: nn.Module, inputs: ScoringInputs) -> None:
    """Fill `.grad` of the projection weights with d(mean calibration loss)/dW."""
    ids = inputs.calibration_ids
    if ids.ndim != 2 or ids.shape[0] == 0:
        raise ValueError(f"calibration ids must be a non-empty [samples, seq_len] tensor, got {tuple(ids.shape)}")
    trainable = projection_parameters(model)
    trainable_ids = {id(p) for p in trainable}
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable_ids)
        param.grad = None
    total = ids.shape[0]
    model.eval()  # no dropout: the gradient of the deterministic loss
    with torch.enable_grad():
        for chunk in ids.split(inputs.micro_batch_size):
            chunk = chunk.to(inputs.device)
            loss = model(input_ids=chunk, labels=chunk, use_cache=False).loss
            (loss.float() * (chunk.shape[0] / total)).backward()


def release_gradients(model: nn.Module) -> None:
    for param in model.parameters():
        param.grad = None
        param.requires_grad_(False)


class TaylorElement1:
    """Element-wise first order (LLM-Pruner's Element^1)."""

    name: ClassVar[str] = "taylor_element1"
    needs_gradients: ClassVar[bool] = True
    needs_activations: ClassVar[bool] = False

    def score(self, model: nn.Module, inputs: ScoringInputs) -> GroupScores:
        accumulate_gradients(model, inputs)

        def element(_index: int, _name: str, module: nn.Linear, kind: str) -> torch.Tensor:
            param = getattr(module, kind)
            return (param.detach().float() * param.grad.float()).abs()

        try:
            return score_elementwise(model, element)
        finally:
            release_gradients(model)
