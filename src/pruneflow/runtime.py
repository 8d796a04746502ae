"""Device, dtype and seed resolution: never hard-code `cuda`, always seed explicitly."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from pruneflow.errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPE_CHOICES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """`auto` picks cuda when present, else cpu; explicit names are checked against the machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"runtime.device={name!r} but no CUDA device is visible; allowed here: 'auto' or 'cpu'"
            )
        return torch.device(name)
    if name == "mps":
        return torch.device("mps")
    raise ConfigError(f"runtime.device={name!r} is not allowed; allowed: {', '.join(DEVICE_CHOICES)}")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on GPU (fp16 gives NaN in Taylor scoring and LoRA on Llama) and fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPE_CHOICES:
        raise ConfigError(
            f"runtime.dtype={name!r} is not allowed; allowed: auto, {', '.join(DTYPE_CHOICES)}"
        )
    return DTYPE_CHOICES[name]


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator for explicit sampling."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def configure_threads() -> None:
    """Use the cores Snakemake grants (`PRUNEFLOW_THREADS`), else torch's default."""
    threads = os.environ.get("PRUNEFLOW_THREADS")
    if threads:
        torch.set_num_threads(max(1, int(threads)))
