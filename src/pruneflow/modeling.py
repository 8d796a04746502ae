"""Loading the dense model from its source (the embedded SmolLM2 GGUF, a local HF folder, or a hub id).

`prepare_model` materialises whichever source into a local safetensors folder once, so every later
stage reads the same bytes and DVC versions them. What a source is (and whether it is usable) is
decided without torch in `pruneflow.sources`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from pruneflow.architectures import check_supported
from pruneflow.errors import ModelError
from pruneflow.families import supported_names
from pruneflow.sources import (  # noqa: F401  (the source helpers live in the torch-free module)
    EMBEDDED_GGUF,
    EMBEDDED_PACKAGE,
    SUPPORTED_ARCHITECTURES,
    ModelSource,
    embedded_model_dir,
    portable_location,
    resolve_source,
)


def _check_vocabulary(tokenizer, vocab_size: int | None, where: str) -> None:
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ModelError(
            f"the tokenizer of {where} has {len(tokenizer)} tokens but the model's vocabulary has {vocab_size}: "
            "they do not belong together (was tokenizer.json copied from another model?)"
        )


def load_source(source: ModelSource, *, revision: str | None = None, dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer) from a resolved source, as plain float tensors (no quantizer state)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {"dtype": dtype}
    if source.kind == "embedded":
        kwargs["gguf_file"] = source.gguf_file
    if revision and source.kind == "hub":
        kwargs["revision"] = revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **{k: v for k, v in kwargs.items() if k != "dtype"})
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not load a tokenizer from {source.location!r}: {exc}") from exc
    if source.kind == "local":  # checked on config.json, before the weights are read
        from pruneflow.checkpoint import read_config_dict

        _check_vocabulary(tokenizer, read_config_dict(source.location).get("vocab_size"), repr(source.location))
    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    except (OSError, ValueError) as exc:
        hint = " (the machine may be offline: set model.source to a local folder)" if source.kind == "hub" else ""
        raise ModelError(f"could not load the model from {source.location!r}{hint}: {exc}") from exc
    if type(model).__name__ not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"architecture {type(model).__name__!r} of {source.location!r} is not supported; supported: "
            f"{supported_names()}"
        )
    check_supported(model)
    _check_vocabulary(tokenizer, model.config.vocab_size, repr(source.location))
    _drop_quantizer_state(model)
    return model.eval(), tokenizer


def _drop_quantizer_state(model: nn.Module) -> None:
    """A GGUF-loaded model holds dequantised tensors but refuses save_pretrained: forget the quantizer."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):  # else .float()/.to(dtype) refuse the model
        with contextlib.suppress(AttributeError):
            model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    from pruneflow.checkpoint import read_config_dict

    vocab_size = read_config_dict(model_dir).get("vocab_size")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise ModelError(f"model folder {str(model_dir)!r} has no usable tokenizer: {exc}") from exc
    _check_vocabulary(tokenizer, vocab_size, f"model folder {str(model_dir)!r}")
    return tokenizer


def offline_by_default() -> None:
    """Stages never reach a hub unless the user set a hub id (then HF's own settings apply)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
