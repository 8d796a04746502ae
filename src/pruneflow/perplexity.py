"""Perplexity as LLM-Pruner measures it: the text tokenised once (no BOS), cut into
non-overlapping windows of `seq_len` tokens (the remainder dropped), ppl = exp(mean next-token NLL
over every predicted position of every window)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pruneflow import layerwise
from pruneflow.layerwise import LayerWeights
from pruneflow.progress import progress


@dataclass
class PerplexityResult:
    ppl: float
    windows: int
    total_windows: int
    predicted_tokens: int
    seq_len: int

    def to_dict(self) -> dict[str, float | int]:
        return {
            "ppl": self.ppl,
            "windows": self.windows,
            "total_windows": self.total_windows,
            "predicted_tokens": self.predicted_tokens,
            "seq_len": self.seq_len,
        }


def tokenize_text(text: str, tokenizer) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    *,
    seq_len: int = 128,
    batch_size: int = 16,
    max_windows: int | None = None,
    device: torch.device | str = "cpu",
    layer_weights: LayerWeights | None = None,
) -> PerplexityResult:
    """Batched perplexity over the first `max_windows` windows (all when None).

    With `layer_weights` the windows go through the model one decoder layer at a time
    (`pruneflow.layerwise`; the hidden states of every window stay on the device between layers):
    the same logits, so the same perplexity, on a device that cannot hold the whole model.
    """
    total_windows = token_ids.numel() // seq_len
    if total_windows == 0:
        raise ValueError(f"the text has {token_ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = total_windows if max_windows is None else min(max_windows, total_windows)
    batches = token_ids[: windows * seq_len].view(windows, seq_len)
    nll_sum = 0.0
    count = 0

    def add(batch: torch.Tensor, logits: torch.Tensor) -> None:
        nonlocal nll_sum, count
        logits = logits[:, :-1].float()
        targets = batch[:, 1:].to(logits.device)
        nll_sum += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()

    if layer_weights is not None:
        layerwise.forward(model, batches, batch_size=batch_size, device=device, weights=layer_weights,
                          logits=lambda _b, batch, logits: add(batch, logits))
    else:
        for start in progress(range(0, windows, batch_size), desc=f"perplexity @{seq_len}", unit="batch"):
            batch = batches[start : start + batch_size].to(device)
            add(batch, model(input_ids=batch, use_cache=False).logits)
    return PerplexityResult(
        ppl=math.exp(nll_sum / count),
        windows=windows,
        total_windows=total_windows,
        predicted_tokens=count,
        seq_len=seq_len,
    )
