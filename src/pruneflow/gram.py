"""Gram matrices X X^T of the o_proj / down_proj inputs over calibration tokens.

What weight reconstruction and the structured-OBS criterion solve with; collected by the
activation-cache stage (stored) or by forward passes over the calibration ids. Kept apart from the
solvers so the activation cache depends on nothing but this and the model code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from pruneflow.architectures import decoder_layers, projection

PROJECTIONS = ("o_proj", "down_proj")


class GramAccumulator:
    """Sum of x x^T (and of x) over the rows fed to it, on the inputs' device.

    Each batch's product is taken in float32 (twice the speed of float64 on CPUs and most GPUs) and
    added to a float64 sum: the only rounding is float32's within one batch, relative ~1e-6 per entry
    for batches of a few thousand rows (tests/test_reconstruction.py bounds it against float64),
    three orders of magnitude below the ridge term. Memory: d_in^2 x 8 bytes (SmolLM2 down_proj:
    1536^2 x 8 = 18.9 MB; LLaMA-7B: 11008^2 x 8 = 0.97 GB).
    """

    def __init__(self) -> None:
        self.gram: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        product = (rows.T @ rows).double()
        total = rows.double().sum(0)
        if self.gram is None:
            self.gram, self.total = product, total
        else:
            self.gram.add_(product)
            self.total.add_(total)
        self.count += rows.shape[0]

    def to(self, device: torch.device | str) -> GramAccumulator:
        """Move the sums (e.g. to host memory once their layer has run); exact, returns self."""
        if self.gram is not None:
            self.gram, self.total = self.gram.to(device), self.total.to(device)
        return self


class StopForward(Exception):
    """Raised by a hook once the last wanted input was seen: the rest of the forward pass is skipped."""


def forward_batches(model: nn.Module, input_ids: torch.Tensor, batch_size: int, device) -> None:
    """Run the calibration ids through the model for its hooks' sake; a hook may end a pass early."""
    for chunk in input_ids.split(batch_size):
        with contextlib.suppress(StopForward):
            model(input_ids=chunk.to(device), use_cache=False)


def projection_of(layer: nn.Module, name: str) -> nn.Linear:
    return projection(layer, name)


def cached_gram(activations: Mapping[str, torch.Tensor] | None, layer_index: int,
                projection: str) -> GramAccumulator | None:
    """The Gram matrix of (layer, projection)'s input from the activation cache, or None if not cached."""
    if activations is None:
        return None
    base = f"layers.{layer_index}.{projection}_in"
    if f"{base}.gram" not in activations or "num_tokens" not in activations:
        return None
    acc = GramAccumulator()
    acc.gram = activations[f"{base}.gram"].double()
    acc.total = activations[f"{base}.sum"].double()
    acc.count = int(activations["num_tokens"].reshape(-1)[0])
    return acc


def gram_matrices(model: nn.Module, targets: Sequence[tuple[int, str]], *,
                  activations: Mapping[str, torch.Tensor] | None, calibration_ids: torch.Tensor | None,
                  batch_size: int, device: torch.device | str = "cpu", layer_weights=None,
                  consume: Callable[[tuple[int, str], GramAccumulator], None] | None = None,
                  ) -> dict[tuple[int, str], GramAccumulator]:
    """Gram matrices of the dense inputs: from the activation cache where it holds them, else by a
    forward pass over the calibration ids (one layer at a time with `layer_weights`).

    With `consume`, each target goes to `consume(target, gram)` in the order of `targets` and nothing
    is returned; layer by layer a layer's targets go as soon as that layer has run, so the sums of one
    layer wait in memory rather than every layer's (a 70B model's are 7 GB per layer, 570 GB in all).
    The layer has finished every batch by then: changing its weights in `consume` leaves the hidden
    states already passed on, and so every later Gram matrix, as they were."""
    found = {t: cached_gram(activations, *t) for t in targets}
    missing = [t for t, acc in found.items() if acc is None]
    if missing and calibration_ids is None:
        raise ValueError(f"no cached Gram matrix for {missing[0]} and no calibration ids to compute one")
    if consume is None:
        if missing:
            found.update(collect_grams(model, calibration_ids, missing, batch_size=batch_size, device=device,
                                       layer_weights=layer_weights))
        return found
    pending = list(targets)

    def release(through_layer: float) -> None:
        while pending and pending[0][0] <= through_layer and found[pending[0]] is not None:
            target = pending.pop(0)
            consume(target, found.pop(target))

    if missing:
        def layer_done(index: int, grams: dict[tuple[int, str], GramAccumulator]) -> None:
            found.update(grams)
            release(index)

        found.update(collect_grams(model, calibration_ids, missing, batch_size=batch_size, device=device,
                                   layer_weights=layer_weights, on_layer=layer_done))
    release(float("inf"))
    return {}


@torch.no_grad()
def collect_grams(model: nn.Module, input_ids: torch.Tensor, targets: Sequence[tuple[int, str]], *,
                  batch_size: int, device: torch.device | str = "cpu", layer_weights=None,
                  on_layer: Callable[[int, dict[tuple[int, str], GramAccumulator]], None] | None = None,
                  ) -> dict[tuple[int, str], GramAccumulator]:
    """Gram matrices of the inputs of the named projections ((layer, "o_proj" | "down_proj")) over the
    calibration ids; the forward pass stops after the last one (later layers are never run). With
    `layer_weights` (`pruneflow.layerwise`) the pass runs one layer at a time, up to the last target,
    and each layer's sums go to host memory once it has run; with `on_layer` too they go to
    `on_layer(index, sums)` then instead of being returned."""
    blocks = decoder_layers(model)
    wanted = sorted(set(targets), key=lambda t: (t[0], PROJECTIONS.index(t[1])))
    accumulators = {t: GramAccumulator() for t in wanted}
    last = wanted[-1]
    handles = []

    def make_hook(target: tuple[int, str]):
        def hook(_module: nn.Module, args: tuple) -> None:
            accumulators[target].add(args[0])
            if target == last and layer_weights is None:
                raise StopForward

        return hook

    for target in wanted:
        handles.append(projection_of(blocks[target[0]], target[1]).register_forward_pre_hook(make_hook(target)))
    try:
        if layer_weights is None:
            forward_batches(model, input_ids, batch_size, device)
        else:
            from pruneflow import layerwise

            def to_host(index: int) -> None:  # a finished layer's sums leave the device
                done = {t: accumulators[t].to("cpu") for t in wanted if t[0] == index}
                if on_layer is not None and done:
                    for target in done:
                        del accumulators[target]
                    on_layer(index, done)

            layerwise.forward(model, input_ids, batch_size=batch_size, device=device, weights=layer_weights,
                              layers=range(last[0] + 1), after_layer=to_host)
    finally:
        for handle in handles:
            handle.remove()
    return accumulators
