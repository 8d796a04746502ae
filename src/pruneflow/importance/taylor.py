"""LLM-Pruner's Taylor importances from the calibration loss (next-token cross-entropy).

- `taylor_vector`: |sum over a matrix's group slice of dL/dW * W| (the group's weights as one vector);
- `taylor_element1`: sum of |dL/dW_k * W_k| per parameter (Element^1);
- `taylor_element2`: sum of |dL/dW_k * W_k - 1/2 W_k^2 H_kk| (Element^2), H_kk the diagonal of the
  empirical Fisher, mean over calibration samples of (dL_s/dW_k)^2.

Gradients accumulate over micro-batches, so memory does not grow with the number of samples. The
Fisher needs per-sample gradients: they are taken one sample at a time and squared into one running
buffer (memory: weights + gradient + Fisher buffer + one sample's gradient), never stored.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from pruneflow.importance.base import GroupScores, ScoringInputs
from pruneflow.importance.elementwise import Aggregated, projection_parameters, score_elementwise
from pruneflow.progress import progress


def _check_ids(ids: torch.Tensor) -> None:
    if ids.ndim != 2 or ids.shape[0] == 0:
        raise ValueError(f"calibration ids must be a non-empty [samples, seq_len] tensor, got {tuple(ids.shape)}")


def _prepare(model: nn.Module) -> list[nn.Parameter]:
    trainable = projection_parameters(model)
    trainable_ids = {id(p) for p in trainable}
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable_ids)
        param.grad = None
    model.eval()  # no dropout: the gradient of the deterministic loss
    return trainable


def accumulate_gradients(model: nn.Module, inputs: ScoringInputs) -> None:
    """Fill `.grad` of the projection weights with d(mean calibration loss)/dW."""
    ids = inputs.calibration_ids
    _check_ids(ids)
    _prepare(model)
    total = ids.shape[0]
    with torch.enable_grad():
        for chunk in progress(ids.split(inputs.micro_batch_size), desc="gradients", unit="batch"):
            chunk = chunk.to(inputs.device)
            loss = model(input_ids=chunk, labels=chunk, use_cache=False).loss
            (loss.float() * (chunk.shape[0] / total)).backward()


def accumulate_gradients_and_fisher(model: nn.Module, inputs: ScoringInputs) -> dict[int, torch.Tensor]:
    """`.grad` as above, plus the diagonal empirical Fisher per parameter (keyed by id(param))."""
    ids = inputs.calibration_ids
    _check_ids(ids)
    trainable = _prepare(model)
    total = ids.shape[0]
    fisher = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in trainable}
    gradient = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in trainable}
    with torch.enable_grad():
        for sample in progress(ids.split(1), desc="gradients and Fisher", unit="sample"):
            sample = sample.to(inputs.device)
            loss = model(input_ids=sample, labels=sample, use_cache=False).loss.float()
            grads = torch.autograd.grad(loss, trainable)
            with torch.no_grad():
                for param, grad in zip(trainable, grads, strict=True):
                    grad = grad.float()
                    gradient[id(param)].add_(grad, alpha=1.0 / total)
                    fisher[id(param)].addcmul_(grad, grad, value=1.0 / total)
            del grads
    for param in trainable:
        param.grad = gradient.pop(id(param)).to(param.dtype)
    return fisher


def release_gradients(model: nn.Module) -> None:
    for param in model.parameters():
        param.grad = None
        param.requires_grad_(False)


class _Taylor(Aggregated):
    name: ClassVar[str]
    needs_gradients: ClassVar[bool] = True
    # per-parameter term from (weight, mean gradient, Fisher or None); `absolute` = |sum| per matrix
    absolute_per_matrix: ClassVar[bool] = False
    uses_fisher: ClassVar[bool] = False

    def element(self, weight: torch.Tensor, gradient: torch.Tensor, fisher: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def score(self, model: nn.Module, inputs: ScoringInputs) -> GroupScores:
        if self.uses_fisher:
            fisher = accumulate_gradients_and_fisher(model, inputs)
        else:
            accumulate_gradients(model, inputs)
            fisher = {}

        def element(_index: int, _name: str, module: nn.Linear, kind: str) -> torch.Tensor:
            param = getattr(module, kind)
            return self.element(param.detach().float(), param.grad.float(), fisher.get(id(param)))

        try:
            return score_elementwise(model, element, self.aggregation, absolute_per_matrix=self.absolute_per_matrix)
        finally:
            fisher.clear()
            release_gradients(model)


class TaylorVector(_Taylor):
    """Vector-wise first order: |dL/dW . W| of each matrix's group slice as a whole."""

    name: ClassVar[str] = "taylor_vector"
    absolute_per_matrix: ClassVar[bool] = True

    def element(self, weight, gradient, fisher):
        return weight * gradient


class TaylorElement1(_Taylor):
    """Element-wise first order (LLM-Pruner's Element^1)."""

    name: ClassVar[str] = "taylor_element1"

    def element(self, weight, gradient, fisher):
        return (weight * gradient).abs()


class TaylorElement2(_Taylor):
    """Element-wise second order (LLM-Pruner's Element^2, diagonal Fisher as the Hessian)."""

    name: ClassVar[str] = "taylor_element2"
    uses_fisher: ClassVar[bool] = True

    def element(self, weight, gradient, fisher):
        return (weight * gradient - 0.5 * weight.pow(2) * fisher).abs()
