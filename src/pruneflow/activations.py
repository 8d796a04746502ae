"""Activation statistics that activation-aware criteria need, collected once per model.

For every decoder layer, at the inputs of q/k/v (`attn_in`), o_proj (`o_proj_in`), gate/up
(`mlp_in`) and down_proj (`down_proj_in`): per-feature sum and sum of squares over all calibration
tokens (float64), and for o_proj_in / down_proj_in a seeded sample of token rows, which the
mutual-information criterion compares neuron by neuron. With `gram_matrices`, also the Gram matrix
X^T X of the o_proj and down_proj inputs (float32 products per batch summed in float64, stored as
float32: 4 x (h^2 + f^2) bytes per layer, 10.8 MB for SmolLM2-135M, 0.55 GB for LLaMA-7B), which
weight reconstruction and the structured-OBS criterion solve with.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from torch import nn

from pruneflow import layerwise
from pruneflow.architectures import decoder_layers, projection
from pruneflow.gram import GramAccumulator
from pruneflow.layerwise import LayerWeights

# statistic -> the logical projection whose input it is (q/k/v and gate/up share theirs)
HOOKED_INPUTS = {
    "attn_in": "q_proj",
    "o_proj_in": "o_proj",
    "mlp_in": "gate_proj",
    "down_proj_in": "down_proj",
}
SAMPLED_INPUTS = ("o_proj_in", "down_proj_in")
log = logging.getLogger(__name__)


@torch.inference_mode()
def collect_activation_stats(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    batch_size: int,
    max_tokens: int,
    seed: int,
    device: torch.device | str = "cpu",
    gram_matrices: bool = False,
    layer_weights: LayerWeights | None = None,
) -> dict[str, torch.Tensor]:
    """Run the calibration ids through the model once and return the named statistics.

    With `layer_weights` the pass runs one decoder layer at a time (`pruneflow.layerwise`); every
    statistic is accumulated in the same order, so both paths give the same tensors, and a layer's
    sums move to host memory once it has run, so the device holds one layer's Gram sums, not all.
    """
    num_samples, seq_len = input_ids.shape
    total_tokens = num_samples * seq_len
    generator = torch.Generator().manual_seed(seed)
    keep = min(max_tokens, total_tokens)
    sampled_positions = torch.randperm(total_tokens, generator=generator)[:keep].sort().values
    sums: dict[str, torch.Tensor] = {}
    squares: dict[str, torch.Tensor] = {}
    samples: dict[str, list[torch.Tensor]] = defaultdict(list)
    grams: dict[str, GramAccumulator] = defaultdict(GramAccumulator)
    chunks = input_ids.split(batch_size)
    offsets = [0]
    for chunk in chunks:
        offsets.append(offsets[-1] + chunk.numel())
    current_batch = [0]

    def make_hook(key: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[key] = sums[key] + x.sum(0) if key in sums else x.sum(0)
            squares[key] = squares[key] + x.pow(2).sum(0) if key in squares else x.pow(2).sum(0)
            name = key.split(".", 2)[2]
            if name in SAMPLED_INPUTS and gram_matrices:
                grams[key].add(args[0])
            if name in SAMPLED_INPUTS:
                start = offsets[current_batch[0]]
                local = sampled_positions[(sampled_positions >= start) & (sampled_positions < start + x.shape[0])] - start
                samples[key].append(x[local.to(x.device)].float().cpu())

        return hook

    handles = []
    for index, layer in enumerate(decoder_layers(model)):
        for name, logical in HOOKED_INPUTS.items():
            module = projection(layer, logical)
            handles.append(module.register_forward_pre_hook(make_hook(f"layers.{index}.{name}")))
    try:
        if layer_weights is not None:
            def before_batch(batch: int) -> None:
                current_batch[0] = batch

            def to_host(index: int) -> None:  # a finished layer's sums leave the device: one layer's stay there
                for name in HOOKED_INPUTS:
                    key = f"layers.{index}.{name}"
                    for table in (sums, squares):
                        if key in table:
                            table[key] = table[key].cpu()
                    if key in grams:
                        grams[key].to("cpu")

            layerwise.forward(model, input_ids, batch_size=batch_size, device=device, weights=layer_weights,
                              before_batch=before_batch, after_layer=to_host)
        else:
            # progress as log lines: with a tqdm bar around this loop, the peak memory of this function on
            # SmolLM2-135M (fp32, CPU, 48 calibration sequences x 128 tokens, batch 4, Gram matrices on) went
            # from 2.2 to 5.2 GB (peak RSS of one process, bar on vs PRUNEFLOW_PROGRESS=0; cause not found);
            # the full 512-sequence cache then outgrew a 24 GB machine
            step = max(1, len(chunks) // 10)
            for done, chunk in enumerate(chunks, start=1):
                current_batch[0] = done - 1
                model(input_ids=chunk.to(device), use_cache=False)
                if done % step == 0 or done == len(chunks):
                    log.info("activation statistics: %d / %d batches", done, len(chunks))
    finally:
        for handle in handles:
            handle.remove()

    stats: dict[str, torch.Tensor] = {}
    for key in sums:
        stats[f"{key}.sum"] = sums[key].cpu()
        stats[f"{key}.sq_sum"] = squares[key].cpu()
    for key, parts in samples.items():
        stats[f"{key}.sample"] = torch.cat(parts).contiguous()
    for key, acc in grams.items():
        stats[f"{key}.gram"] = acc.gram.float().cpu().contiguous()
    stats["num_tokens"] = torch.tensor([total_tokens], dtype=torch.long)
    stats["sampled_positions"] = sampled_positions.contiguous()
    return stats


def load_activation_stats(path, needed_by: str) -> dict[str, torch.Tensor]:
    """Read the cache written by cache_activations; a missing or corrupt file is a DataError naming who needs it."""
    from pathlib import Path

    from safetensors.torch import load_file

    from pruneflow.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{needed_by} needs the activation cache, but {str(path)!r} does not exist; "
                        "run the cache_activations stage first (snakemake / dvc repro make it)")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types on truncated files
        raise DataError(f"activation cache {str(path)!r} is not a readable safetensors file "
                        f"(truncated or corrupt?): {exc}; delete it and rerun cache_activations") from exc


def activation_statistics(model: nn.Module, calibration_ids: torch.Tensor, params,
                          device: torch.device, layer_weights: LayerWeights | None = None) -> dict[str, torch.Tensor]:
    """`collect_activation_stats` with the `activations` settings and the seed of `params` (a `Params`):
    what the cache_activations stage stores and `pruneflow.prune` computes in memory."""
    from pruneflow.runtime import seed_everything

    seed_everything(params.seed)
    settings = params.activations
    return collect_activation_stats(model, calibration_ids, batch_size=settings.batch_size,
                                    max_tokens=settings.max_tokens, seed=params.seed, device=device,
                                    gram_matrices=settings.gram_matrices, layer_weights=layer_weights)
