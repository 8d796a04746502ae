"""Size and speed of a model: parameters, MACs per token, latency, throughput, generation, memory.

MACs are counted from the real weight shapes (every linear layer, the LM head included, plus the
attention score/value products at the given sequence length); timings are medians over repeats
after a warm-up, synchronised on CUDA. Peak memory is what the allocator saw on CUDA; on the CPU,
where no allocator keeps a peak, it is the weights plus the largest rise of the process's resident
memory during the throughput forward pass, sampled every millisecond (an estimate, labelled so).
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Callable

import torch
from torch import nn

from pruneflow.architectures import count_parameters, decoder_layers, head_dim, layer_shapes

RSS_SAMPLE_SECONDS = 0.001


def macs_per_token(model: nn.Module, seq_len: int) -> int:
    """Multiply-accumulates per token of a causal forward pass over `seq_len` tokens."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    mean_context = (seq_len + 1) / 2
    size = head_dim(model)
    attention = sum(2 * shape.num_attention_heads * size * mean_context for shape in layer_shapes(model))
    return int(linear + attention)


def weights_mib(model: nn.Module) -> float:
    """Bytes of parameters and buffers (tied weights counted once), in MiB."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total / 2**20


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(run: Callable[[], object], *, repeats: int, device: torch.device) -> float:
    run()  # warm-up: kernels, allocator, caches
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_token_ids(batch_size: int, seq_len: int, vocab_size: int, device: torch.device, seed: int = 0
                     ) -> torch.Tensor:
    """Seeded random token ids: every model timed on the same input."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator).to(device)


@torch.inference_mode()
def time_forward(model: nn.Module, *, batch_size: int, seq_len: int, repeats: int, device: torch.device,
                 vocab_size: int, seed: int = 0) -> float:
    """Median seconds of one forward pass (no KV cache) on random token ids."""
    ids = random_token_ids(batch_size, seq_len, vocab_size, device, seed)
    return _median_seconds(lambda: model(input_ids=ids, use_cache=False), repeats=repeats, device=device)


@torch.inference_mode()
def time_generation(model: nn.Module, *, prompt_len: int, new_tokens: int, repeats: int, device: torch.device,
                    vocab_size: int, seed: int = 0) -> float:
    """Median seconds to greedily generate exactly `new_tokens` after a random prompt, batch 1, KV cache on."""
    ids = random_token_ids(1, prompt_len, vocab_size, device, seed)
    mask = torch.ones_like(ids)
    pad = getattr(model.config, "pad_token_id", None)
    pad = pad if pad is not None else getattr(model.config, "eos_token_id", None)
    if isinstance(pad, list):
        pad = pad[0]

    def generate() -> torch.Tensor:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=pad)
        if out.shape[1] != prompt_len + new_tokens:
            raise RuntimeError(f"generation produced {out.shape[1] - prompt_len} tokens, not {new_tokens}")
        return out

    return _median_seconds(generate, repeats=repeats, device=device)


class _RssPeak:
    """Largest rise of this process's resident memory while the block runs (sampled)."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self._stop = threading.Event()
        self.baseline = self.peak = self._process.memory_info().rss

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(RSS_SAMPLE_SECONDS)

    def __enter__(self) -> _RssPeak:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def rise_mib(self) -> float:
        return (self.peak - self.baseline) / 2**20


def measure_efficiency(model: nn.Module, *, device: torch.device, repeats: int = 5, seq_len: int = 128,
                       throughput_batch_size: int = 16, generation_tokens: int = 64
                       ) -> dict[str, float | int | str | None]:
    """Parameter count, MACs/token, latency at batch 1, throughput at a larger batch, generation speed, memory."""
    vocab = model.config.vocab_size
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    latency = time_forward(model, batch_size=1, seq_len=seq_len, repeats=repeats, device=device, vocab_size=vocab)
    rss = _RssPeak() if device.type == "cpu" else None
    with rss if rss is not None else contextlib.nullcontext():
        batch_time = time_forward(model, batch_size=throughput_batch_size, seq_len=seq_len, repeats=repeats,
                                  device=device, vocab_size=vocab)
    weights = weights_mib(model)
    if device.type == "cuda":
        peak, method = torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    elif rss is not None:
        peak, method = weights + rss.rise_mib, "weights + sampled RSS rise (CPU estimate)"
    else:
        peak, method = None, None
    generation = time_generation(model, prompt_len=seq_len, new_tokens=generation_tokens, repeats=repeats,
                                 device=device, vocab_size=vocab)
    return {
        "params": count_parameters(model),
        "layers": len(decoder_layers(model)),
        "macs_per_token": macs_per_token(model, seq_len),
        "latency_ms_bs1": 1000 * latency,
        "throughput_tokens_per_s": throughput_batch_size * seq_len / batch_time,
        "throughput_batch_size": throughput_batch_size,
        "generation_tokens_per_s": generation_tokens / generation,
        "generation_tokens": generation_tokens,
        "seq_len": seq_len,
        "weights_mib": weights,
        "peak_memory_mib": peak,
        "peak_memory_method": method,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }
