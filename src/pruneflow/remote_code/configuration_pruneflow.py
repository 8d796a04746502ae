"""Configurations of decoder models whose layers have different widths (written by pruneflow).

Each class is its family's own transformers configuration under a model type of its own
(`pruneflow_<model_type>`), so a plain `from_pretrained` without `trust_remote_code=True` stops with
transformers' message that the folder holds custom code, instead of a size-mismatch traceback. The
classes are made on first use from the family's name (`PruneflowLlamaConfig` extends `LlamaConfig`,
`PruneflowGemma3TextConfig` extends `Gemma3TextConfig`), so this file serves every family.
The per-layer widths live in `pruneflow_layer_shapes`: one {num_attention_heads, num_key_value_heads,
intermediate_size} per layer; `num_attention_heads` / `num_key_value_heads` / `intermediate_size` hold
the widest layer's values. This file imports only transformers: it runs without pruneflow installed.
"""

import copy

import transformers

LAYER_SHAPES_KEY = "pruneflow_layer_shapes"
LAYOUT_KEY = "pruneflow_layout"
SHAPE_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
PREFIX = "Pruneflow"
_MADE: dict = {}


def variant_class(name: str, suffix: str, extra, mixins: tuple = ()):
    """`Pruneflow<Base>` for transformers' class `<Base>` (ending in `suffix`), made once per process:
    `mixins` first, then the base; `extra(base)` gives the class attributes."""
    if name in _MADE:
        return _MADE[name]
    if not (name.startswith(PREFIX) and name.endswith(suffix)):
        raise AttributeError(name)
    base = getattr(transformers, name[len(PREFIX):], None)
    if base is None:
        raise AttributeError(f"{name}: transformers has no {name[len(PREFIX):]} (a newer transformers needed?)")
    attributes = {"__module__": __name__, "__qualname__": name, **extra(base)}
    _MADE[name] = type(name, (*mixins, base), attributes)
    return _MADE[name]


def _config_attributes(base) -> dict:
    validators = list(getattr(base, "__class_validators__", ()))

    def validate(self) -> None:
        """The family's own validators, run as if the heads were unpruned. Some take head_dim to be
        hidden_size / num_attention_heads (Llama's and Gemma's divisibility check, Phi-3's rotary width for
        longrope factors), which a pruned head count breaks although `head_dim` is explicit: they see the
        head count that gives the real head_dim (the divisibility check is skipped where none does)."""
        view = copy.copy(self)
        head_dim = getattr(self, "head_dim", None)
        exact = isinstance(head_dim, int) and head_dim > 0 and self.hidden_size % head_dim == 0
        if exact:
            view.__dict__["num_attention_heads"] = self.hidden_size // head_dim
        for validator in validators:
            if exact or validator.__name__ != "validate_architecture":
                validator(view)

    return {"model_type": f"pruneflow_{base.model_type}", "validate": validate}


def __getattr__(name: str):
    return variant_class(name, "Config", _config_attributes)


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
