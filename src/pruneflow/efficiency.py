"""Size and speed of a model: parameters, MACs per token, forward latency and throughput.

MACs are counted from the real weight shapes (every linear layer, the LM head included, plus the
attention score/value products at the given sequence length); timings are medians over repeats
after a warm-up, synchronised on CUDA.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from pruneflow.architectures import count_parameters, decoder_layers, head_dim, layer_shapes


def macs_per_token(model: nn.Module, seq_len: int) -> int:
    """Multiply-accumulates per token of a causal forward pass over `seq_len` tokens."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    mean_context = (seq_len + 1) / 2
    size = head_dim(model)
    attention = sum(2 * shape.num_attention_heads * size * mean_context for shape in layer_shapes(model))
    return int(linear + attention)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_forward(model: nn.Module, *, batch_size: int, seq_len: int, repeats: int, device: torch.device,
                 vocab_size: int, seed: int = 0) -> float:
    """Median seconds of one forward pass on random token ids."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator).to(device)
    model(input_ids=ids, use_cache=False)  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_efficiency(model: nn.Module, *, device: torch.device, repeats: int = 5, seq_len: int = 128,
                       throughput_batch_size: int = 16) -> dict[str, float | int | str | None]:
    """Parameter count, MACs/token, latency at batch 1 and throughput at a larger batch."""
    vocab = model.config.vocab_size
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    latency = time_forward(model, batch_size=1, seq_len=seq_len, repeats=repeats, device=device, vocab_size=vocab)
    batch_time = time_forward(model, batch_size=throughput_batch_size, seq_len=seq_len, repeats=repeats,
                              device=device, vocab_size=vocab)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "params": count_parameters(model),
        "layers": len(decoder_layers(model)),
        "macs_per_token": macs_per_token(model, seq_len),
        "latency_ms_bs1": 1000 * latency,
        "throughput_tokens_per_s": throughput_batch_size * seq_len / batch_time,
        "throughput_batch_size": throughput_batch_size,
        "seq_len": seq_len,
        "peak_memory_mib": peak,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
