"""A checkpoint as one GGUF file for llama.cpp (and transformers' GGUF loader), written with `gguf`.

llama.cpp's own converter (`convert_hf_to_gguf.py`) ships with llama.cpp's sources, not as a package,
so this writes the same layout with the `gguf` package (llama.cpp's Python writer): llama.cpp's
tensor names, its rotary row order for q/k weights and biases (the converter's `permute`), the
architecture keys it reads (`key_length`: the head size, which pruning heads decouples from hidden /
heads), and the byte-level BPE vocabulary as `tokenizer.ggml.*`. The llama.cpp graph:
- one width in every layer: `llama` (Llama, Mistral; Qwen2 once its heads were pruned, with its q/k/v
  biases: llama.cpp's `qwen2` graph assumes query width = hidden size); `qwen2` for Qwen2 otherwise;
- widths per layer: `deci` (NVIDIA's Nemotron-NAS layout), whose graph reads the query-head, KV-head
  and FFN width of each layer from arrays.
All three take optional q/k/v/o and MLP biases (bias compensation). transformers' GGUF loader reads
`llama` and `qwen2` files without biases (not `deci`). Tensor types: f32 (exact), bf16, f16, q8_0
(2-D weights; norms and biases stay f32, as in llama.cpp; a row whose length is not a multiple of 32
falls back to f16 for q8_0). Llama-3 rope scaling is written as the `rope_freqs` tensor, computed as
llama.cpp's converter does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from pruneflow.config import GGUF_TYPES
from pruneflow.errors import ConfigError, ModelError
from pruneflow.families import FAMILIES as ALL_FAMILIES

FAMILIES = tuple(family.model_type for family in ALL_FAMILIES if family.gguf_export)  # llama, mistral, qwen2
# Hugging Face parameter suffix -> llama.cpp tensor name (per block)
_BLOCK_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.weight": "ffn_down.weight", "mlp.down_proj.bias": "ffn_down.bias",
}


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary row order for q/k (what its converter does and its GGUF readers undo)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _llama3_rope_factors(config) -> np.ndarray | None:
    """Per-frequency rope factors of Llama-3 scaling (llama.cpp's `rope_freqs`), or None without it."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    base = rope.get("rope_theta") or getattr(config, "rope_theta", 10000.0)
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)):
        wavelength = 2 * math.pi / freq
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _vocabulary(model_dir: Path) -> tuple[list[str], list[int], list[str]]:
    """tokens (by id), llama.cpp token types and merges of a byte-level BPE tokenizer.json."""
    from gguf import TokenType

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ModelError(f"{model_dir} has no tokenizer.json; GGUF export needs the (fast) tokenizer's file")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ModelError(f"the tokenizer in {model_dir} is not byte-level BPE (model type {model.get('type')!r}); "
                         "GGUF export writes byte-level BPE vocabularies (Llama 3, Qwen2, SmolLM, GPT-2 style)")
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {entry["content"]: entry for entry in spec.get("added_tokens") or []}
    for content, entry in added.items():
        vocab[content] = entry["id"]
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [int(TokenType.UNUSED)] * size
    for content, index in vocab.items():
        tokens[index] = content
        entry = added.get(content)
        types[index] = int(TokenType.NORMAL if entry is None else
                           TokenType.CONTROL if entry.get("special") else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return tokens, types, merges


def _tensor(array: np.ndarray, gguf_type: str):
    """(data, raw dtype or None) for the writer, in the requested type (1-D tensors stay f32)."""
    from gguf import GGMLQuantizationType, quants

    if array.ndim == 1 or gguf_type == "f32":
        return array.astype(np.float32), None
    if gguf_type == "f16" or (gguf_type == "q8_0" and array.shape[-1] % 32):
        return array.astype(np.float16), None
    qtype = GGMLQuantizationType.BF16 if gguf_type == "bf16" else GGMLQuantizationType.Q8_0
    return quants.quantize(array.astype(np.float32), qtype), qtype


def read_first_string(path: str | Path, key: str, fields: int = 4) -> str | None:
    """A string value among the first `fields` metadata pairs of a GGUF file, reading only those bytes
    (GGUFReader parses the whole vocabulary: seconds per file, too slow for checking every output)."""
    import struct

    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            return None
        version, _, count = struct.unpack("<IQQ", handle.read(20))
        if version < 2:
            return None
        for _ in range(min(count, fields)):
            (length,) = struct.unpack("<Q", handle.read(8))
            name = handle.read(length).decode("utf-8", "replace")
            (kind,) = struct.unpack("<I", handle.read(4))
            if kind != 8:  # GGUFValueType.STRING; the record and general.architecture are strings
                return None
            (length,) = struct.unpack("<Q", handle.read(8))
            value = handle.read(length)
            if name == key:
                return value.decode("utf-8")
    return None


def export_gguf(model_dir: str | Path, out: str | Path, gguf_type: str = "q8_0", *, name: str | None = None,
                tokenizer_pre: str = "default", metadata: dict[str, str] | None = None) -> Path:
    """Write the checkpoint in `model_dir` as one GGUF file at `out` (written elsewhere, then renamed);
    `metadata`: extra string keys, written first (`read_first_string` finds them cheaply)."""
    from gguf import GGUFWriter, LlamaFileType

    from pruneflow.checkpoint import load_pruned
    from pruneflow.pipeline.atomic import atomic_path
    from pruneflow.sources import PRUNED_MODEL_TYPES, read_config_dict

    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"gguf_type={gguf_type!r} is not allowed; allowed: {', '.join(GGUF_TYPES)}")
    model_dir = Path(model_dir)
    config = read_config_dict(model_dir)
    per_layer = config.get("model_type") in PRUNED_MODEL_TYPES
    family = PRUNED_MODEL_TYPES.get(config.get("model_type"), config.get("model_type"))
    if family not in FAMILIES:
        raise ModelError(f"model_type={config.get('model_type')!r} has no GGUF export; allowed: {', '.join(FAMILIES)}")
    tokens, token_types, merges = _vocabulary(model_dir)
    model = load_pruned(model_dir, dtype=torch.float32, device="cpu")
    cfg = model.config
    from pruneflow.architectures import head_dim as head_size
    from pruneflow.architectures import layer_shapes

    shapes = layer_shapes(model)
    head_dim = head_size(model)
    if per_layer:
        arch = "deci"
    elif family == "qwen2" and shapes[0].num_attention_heads * head_dim == cfg.hidden_size:
        arch = "qwen2"
    else:
        arch = "llama"
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}

    def per_layer_or_one(values: list[int]) -> int | list[int]:
        return values if per_layer else values[0]

    with atomic_path(Path(out)) as tmp:
        writer = GGUFWriter(str(tmp), arch)
        for key, value in (metadata or {}).items():
            writer.add_string(key, value)
        writer.add_name(name or model_dir.name)
        writer.add_file_type({"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                              "bf16": LlamaFileType.MOSTLY_BF16, "q8_0": LlamaFileType.MOSTLY_Q8_0}[gguf_type])
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_feed_forward_length(per_layer_or_one([s.intermediate_size for s in shapes]))
        writer.add_head_count(per_layer_or_one([s.num_attention_heads for s in shapes]))
        writer.add_head_count_kv(per_layer_or_one([s.num_key_value_heads for s in shapes]))
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
                                        or getattr(cfg, "rope_theta", 10000.0)))
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        writer.add_vocab_size(len(tokens))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(tokenizer_pre)
        writer.add_token_list(tokens)
        writer.add_token_types(token_types)
        writer.add_token_merges(merges)
        for key, value in (("bos", cfg.bos_token_id), ("eos", cfg.eos_token_id), ("pad", cfg.pad_token_id)):
            if isinstance(value, int):
                getattr(writer, f"add_{key}_token_id")(value)
        writer.add_add_bos_token(False)
        template = json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template") \
            if (model_dir / "tokenizer_config.json").is_file() else None
        if isinstance(template, str):
            writer.add_chat_template(template)

        def add(name: str, array: np.ndarray) -> None:
            data, raw = _tensor(array, gguf_type)
            writer.add_tensor(name, data, raw_dtype=raw)

        add("token_embd.weight", state["model.embed_tokens.weight"])
        rope_factors = _llama3_rope_factors(cfg)
        if rope_factors is not None:
            add("rope_freqs.weight", rope_factors)
        for index, shape in enumerate(shapes):
            prefix = f"model.layers.{index}."
            for suffix, gguf_name in _BLOCK_TENSORS.items():
                if prefix + suffix not in state:
                    continue
                array = state[prefix + suffix]
                if arch != "qwen2" and suffix.startswith("self_attn.q_proj"):  # llama.cpp's qwen2: HF's order
                    array = _permute(array, shape.num_attention_heads)
                elif arch != "qwen2" and suffix.startswith("self_attn.k_proj"):
                    array = _permute(array, shape.num_key_value_heads)
                add(f"blk.{index}.{gguf_name}", array)
        add("output_norm.weight", state["model.norm.weight"])
        if not cfg.tie_word_embeddings:
            add("output.weight", state["lm_head.weight"])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(out)
