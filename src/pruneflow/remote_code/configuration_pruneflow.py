"""Configurations of decoder models whose layers have different widths (written by pruneflow).

Each class is its family's own configuration under a model type of its own (`pruneflow_<family>`),
so a plain `from_pretrained` without `trust_remote_code=True` stops with transformers' message that
the folder holds custom code, instead of a size-mismatch traceback. The per-layer widths live in
`pruneflow_layer_shapes`: one {num_attention_heads, num_key_value_heads, intermediate_size} per layer;
`num_attention_heads` / `num_key_value_heads` / `intermediate_size` hold the widest layer's values.
This file imports only transformers: it runs without pruneflow installed.
"""

from transformers import LlamaConfig, MistralConfig, Qwen2Config

LAYER_SHAPES_KEY = "pruneflow_layer_shapes"
SHAPE_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


class PruneflowLlamaConfig(LlamaConfig):
    model_type = "pruneflow_llama"


class PruneflowMistralConfig(MistralConfig):
    model_type = "pruneflow_mistral"


class PruneflowQwen2Config(Qwen2Config):
    model_type = "pruneflow_qwen2"


def layer_shapes_of(config) -> list[dict]:
    """The per-layer widths of a config, checked: one entry per layer, positive integers, GQA-valid."""
    shapes = getattr(config, LAYER_SHAPES_KEY, None)
    if not isinstance(shapes, list) or len(shapes) != config.num_hidden_layers:
        found = len(shapes) if isinstance(shapes, list) else type(shapes).__name__
        raise ValueError(f"config.{LAYER_SHAPES_KEY} must list one shape per layer "
                         f"({config.num_hidden_layers}); found {found}")
    for index, shape in enumerate(shapes):
        if not isinstance(shape, dict) or set(shape) != set(SHAPE_KEYS):
            raise ValueError(f"config.{LAYER_SHAPES_KEY}[{index}]={shape!r}: expected exactly the keys "
                             f"{', '.join(SHAPE_KEYS)}")
        if any(not isinstance(shape[key], int) or shape[key] < 1 for key in SHAPE_KEYS):
            raise ValueError(f"config.{LAYER_SHAPES_KEY}[{index}]={shape!r}: widths must be integers >= 1")
        if shape["num_attention_heads"] % shape["num_key_value_heads"]:
            raise ValueError(f"config.{LAYER_SHAPES_KEY}[{index}]={shape!r}: num_attention_heads must be a "
                             "multiple of num_key_value_heads")
    return shapes
