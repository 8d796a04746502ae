"""LLM-Pruner's Taylor importances from the calibration loss (next-token cross-entropy).

- `taylor_vector`: |sum over a matrix's group slice of dL/dW * W| (the group's weights as one vector);
- `taylor_element1`: sum of |dL/dW_k * W_k| per parameter (Element^1);
- `taylor_element2`: sum of |dL/dW_k * W_k - 1/2 W_k^2 H_kk| (Element^2), H_kk the diagonal of the
  empirical Fisher, mean over calibration samples of (dL_s/dW_k)^2.

Gradients accumulate over micro-batches, so memory does not grow with the number of samples. The
Fisher needs per-sample gradients: they are taken one sample at a time and squared into one running
buffer (memory: weights + gradient + Fisher buffer + one sample's gradient), never stored.

With `ScoringInputs.layer_weights` (a model that does not fit on its device with its gradients)
the same gradients are taken one decoder layer at a time (`layerwise_scores`): a layer-by-layer
forward pass keeps every layer's input hidden states, the head gives dL/d(last hidden states), and
from the top layer down each layer is brought to the device, re-run on its stored inputs and
back-propagated with the gradient arriving from above; its group scores are taken right away and
its gradients freed. Device memory: one layer with its gradient (and Fisher buffer), the modules
outside the layers, one micro-batch's activations; host memory: the weights and every layer's input
hidden states ((layers + 1) x samples x seq_len x hidden values).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from pruneflow.importance.base import GroupScores, ScoringInputs
from pruneflow.importance.elementwise import (
    Aggregated,
    projection_parameters,
    score_elementwise,
    score_layer,
    scores_from_layers,
)
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

    def element_scores(self, fisher: dict[int, torch.Tensor]):
        """`element` of each projection parameter from its `.grad` and its Fisher (keyed by id(param))."""

        def element(_index: int, _name: str, module: nn.Linear, kind: str) -> torch.Tensor:
            param = getattr(module, kind)
            return self.element(param.detach().float(), param.grad.float(), fisher.get(id(param)))

        return element

    def score(self, model: nn.Module, inputs: ScoringInputs) -> GroupScores:
        if inputs.layer_weights is not None:
            return layerwise_scores(model, inputs, self)
        if self.uses_fisher:
            fisher = accumulate_gradients_and_fisher(model, inputs)
        else:
            accumulate_gradients(model, inputs)
            fisher = {}
        try:
            return score_elementwise(model, self.element_scores(fisher), self.aggregation,
                                     absolute_per_matrix=self.absolute_per_matrix)
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


def layerwise_scores(model: nn.Module, inputs: ScoringInputs, criterion: _Taylor) -> GroupScores:
    """`criterion`'s scores with the gradients taken one decoder layer at a time (module docstring)."""
    from pruneflow import layerwise
    from pruneflow.architectures import decoder_layers, head_dim

    ids = inputs.calibration_ids
    _check_ids(ids)
    weights, device = inputs.layer_weights, inputs.device
    total = ids.shape[0]
    chunk = 1 if criterion.uses_fisher else inputs.micro_batch_size
    chunks = list(ids.split(chunk))
    blocks = decoder_layers(model)
    size = head_dim(model)
    _prepare(model)
    with layerwise.outside_on(model, weights, device):
        captured = layerwise.capture_inputs(model, ids, batch_size=chunk, device=device)
        # every layer's input hidden states, kept in host memory
        stored = []
        hidden = captured.hidden
        for index in range(len(blocks)):
            stored.append([h.cpu() for h in hidden])
            hidden = layerwise.run_layers(model, layerwise.LayerInputs(hidden, captured.arguments), weights, device,
                                          layers=[index])
        # dL/d(last layer's output), micro-batch by micro-batch, from the model's own head and loss
        upstream = []
        for ids_chunk, out in zip(chunks, hidden, strict=True):
            out = out.detach().requires_grad_(True)
            with torch.enable_grad():
                loss = layerwise.head_loss(model, ids_chunk.to(device), out)
                scale = 1.0 if criterion.uses_fisher else ids_chunk.shape[0] / total
                (grad,) = torch.autograd.grad(loss.float() * scale, out)
            upstream.append(grad)
        hidden.clear()  # the last layer's outputs (run_layers reuses the list): no longer needed on the device
        rows = {}
        for index in reversed(range(len(blocks))):
            layer = blocks[index]
            weights.load(index, layer, device)
            try:
                upstream, fisher = _layer_backward(layer, stored[index], captured.arguments[index], upstream,
                                                   device, total, criterion.uses_fisher, need_input_grad=index > 0)
                rows[index] = score_layer(layer, index, size, criterion.element_scores(fisher), criterion.aggregation,
                                          criterion.absolute_per_matrix)
            finally:
                for param in layer.parameters():
                    param.grad = None
                    param.requires_grad_(False)
                weights.unload(index, layer)
            stored[index] = []
    return scores_from_layers([rows[i] for i in range(len(blocks))], criterion.aggregation)


def _layer_backward(layer: nn.Module, inputs: list[torch.Tensor], arguments: list[dict],
                    upstream: list[torch.Tensor], device, total: int, per_sample: bool,
                    need_input_grad: bool) -> tuple[list[torch.Tensor], dict[int, torch.Tensor]]:
    """Back-propagate `upstream` (dL/d output per micro-batch) through one layer re-run on its stored
    inputs: fills the projections' `.grad` (and with `per_sample` the Fisher diagonal, as
    `accumulate_gradients_and_fisher` does), returns dL/d input per micro-batch and the Fisher."""
    from pruneflow.architectures import projection
    from pruneflow.families import PROJECTIONS

    trainable = []
    for name in PROJECTIONS:
        module = projection(layer, name)
        trainable += [p for p in (module.weight, module.bias) if p is not None]
    for param in layer.parameters():
        param.requires_grad_(False)
    for param in trainable:
        param.requires_grad_(True)
        param.grad = None
    fisher: dict[int, torch.Tensor] = {}
    gradient: dict[int, torch.Tensor] = {}
    if per_sample:
        fisher = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in trainable}
        gradient = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in trainable}
    downstream = []
    with torch.enable_grad():
        for states, kwargs, grad_out in zip(inputs, arguments, upstream, strict=True):
            x = states.to(device).detach().requires_grad_(need_input_grad)
            out = layer(x, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            targets = ([x] if need_input_grad else []) + trainable
            grads = torch.autograd.grad(out, targets, grad_outputs=grad_out)
            if need_input_grad:
                downstream.append(grads[0])
                grads = grads[1:]
            with torch.no_grad():
                for param, grad in zip(trainable, grads, strict=True):
                    if per_sample:
                        grad = grad.float()
                        gradient[id(param)].add_(grad, alpha=1.0 / total)
                        fisher[id(param)].addcmul_(grad, grad, value=1.0 / total)
                    elif param.grad is None:
                        param.grad = grad
                    else:
                        param.grad += grad
    for param in trainable:
        if per_sample:
            param.grad = gradient.pop(id(param)).to(param.dtype)
    return downstream, fisher
