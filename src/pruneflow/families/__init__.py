"""The decoder families pruneflow prunes: one module per family, each a `Family` (pure data).

Adding a family is one module here (its layout and its tiny test configs) and its line below; the
generic code in `pruneflow.architectures` reads nothing else. Torch-free: the plan imports it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pruneflow.errors import ConfigError
from pruneflow.families import gemma2, gemma3, llama, mistral, olmo2, phi3, qwen2, qwen3
from pruneflow.families.spec import PROJECTIONS, Family

FAMILIES: tuple[Family, ...] = tuple(module.FAMILY for module in (llama, mistral, qwen2, qwen3, gemma2, gemma3,
                                                                   phi3, olmo2))
BY_MODEL_TYPE = {family.model_type: family for family in FAMILIES}
BY_MODEL_TYPE.update({family.pruned_model_type: family for family in FAMILIES})
BY_ARCHITECTURE = {family.architecture: family for family in FAMILIES}
BY_ARCHITECTURE.update({family.pruned_architecture: family for family in FAMILIES})
BY_DECODER_LAYER = {family.decoder_layer: family for family in FAMILIES}
TINY_CONFIGS = {name: (family, overrides) for family in FAMILIES for name, overrides in family.tiny_configs.items()}

__all__ = ["BY_ARCHITECTURE", "BY_DECODER_LAYER", "BY_MODEL_TYPE", "FAMILIES", "PROJECTIONS", "TINY_CONFIGS",
           "Family", "check_attention_unit", "family_for_config", "multi_head_message", "multi_query_message",
           "ruled_out_units", "supported_names"]


def supported_names() -> str:
    """The supported architectures, for error messages."""
    return ", ".join(family.architecture for family in FAMILIES)


def family_for_config(config: dict) -> Family | None:
    """The family a config.json names (by architecture first, then model_type); None when unsupported."""
    architectures = config.get("architectures") or []
    if architectures:
        return BY_ARCHITECTURE.get(architectures[0])
    return BY_MODEL_TYPE.get(config.get("model_type") or "")


def multi_query_message(where: str) -> str:
    """The refusal of whole-KV-group pruning on a model with one KV head per layer."""
    return (f"{where} has one KV head (multi-query attention): a whole KV group cannot be removed, so "
            "prune.attention_unit='kv_group' cannot prune its attention; allowed: 'query_head' (removes query "
            "heads), 'auto' (picks among the layouts that apply), or prune.structures ['ffn']")


def multi_head_message(where: str) -> str:
    """The refusal of query-head pruning on a model with one query head per KV head (plain multi-head)."""
    return (f"{where} has one query head per KV head (multi-head attention): a query head cannot go without "
            "its KV head, so prune.attention_unit='query_head' cannot prune its attention; allowed: 'kv_group' "
            "(removes whole heads), 'auto' (picks among the layouts that apply), or prune.structures ['ffn']")


_REFUSALS = {"kv_group": multi_query_message, "query_head": multi_head_message}


def ruled_out_units(shapes: Mapping[str, Any]) -> dict[str, str]:
    """Attention units some layer cannot lose -> the first such layer: whole KV groups with one KV head
    (MQA), single query heads with one query head per KV head (MHA). `shapes`: where (e.g. "layer 3")
    -> anything with `num_attention_heads` and `num_key_value_heads`."""
    ruled: dict[str, str] = {}
    for where, shape in shapes.items():
        if shape.num_key_value_heads == 1:
            ruled.setdefault("kv_group", where)
        if shape.num_key_value_heads == shape.num_attention_heads:
            ruled.setdefault("query_head", where)
    return ruled


def check_attention_unit(shapes: Mapping[str, Any], structures: Sequence[str], attention_unit: str) -> None:
    """Refuse an attention unit a pruned layer cannot lose (`ruled_out_units`), naming where and what is
    allowed: the planner, `pruneflow.prune` and the plan (from config.json) share this rule."""
    ruled = ruled_out_units(shapes)
    if "attention" in structures and attention_unit in ruled:
        raise ConfigError(_REFUSALS[attention_unit](ruled[attention_unit]))
