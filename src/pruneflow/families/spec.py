"""What pruneflow needs to know about a decoder family, as data (no torch: the plan reads it too).

A `Family` names where a block's prunable parts live and what else a block may hold. The generic code
in `pruneflow.architectures` does the rest: scoring, surgery and checkpoints never name a family.
Logical projection names are Llama's (`q_proj` ... `down_proj`); each family maps them to its own
module paths inside a decoder layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# the seven logical projections every family has (possibly fused in storage)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# a width kind per projection side: hidden (the residual stream), q (query heads x head_dim),
# kv (KV heads x head_dim), ffn (intermediate channels); fused matrices concatenate kinds
_KINDS = {"q_proj": ("hidden", "q"), "k_proj": ("hidden", "kv"), "v_proj": ("hidden", "kv"),
          "o_proj": ("q", "hidden"), "gate_proj": ("hidden", "ffn"), "up_proj": ("hidden", "ffn"),
          "down_proj": ("ffn", "hidden")}


def _llama_paths() -> dict[str, str]:
    return {name: f"{'self_attn' if name in PROJECTIONS[:4] else 'mlp'}.{name}" for name in PROJECTIONS}


@dataclass(frozen=True)
class Family:
    """One decoder family's layout.

    - `projections`: logical name -> module path inside a decoder layer. A path through a fused module
      (`fused`) names the part pruneflow splits it into while it works (Phi-3's `self_attn.qkv_proj`
      holds q, k and v rows one after the other; they are separate Linears during scoring and surgery
      and fused again when the checkpoint is written).
    - `fused`: stored module path -> the logical projections it concatenates (output rows, in order).
    - `sliced_norms`: norms whose weight spans a whole projection output ("q" or "kv" width, OLMo 2's
      q_norm / k_norm): they lose the rows of removed heads.
    - `other_modules`: every other module with parameters a layer holds (norms over hidden or head_dim);
      a module found in a layer and listed nowhere stops pruning before any scoring.
    - `output_bias_flags`: the config switches that give o_proj and down_proj biases (bias compensation
      needs both); empty when the family cannot express them.
    - `gguf_export`: whether `export_gguf` writes this family for llama.cpp (the pipeline skips the
      stage for the others).
    - `tiny_configs`: name -> config.json overrides of the tiny random test models, scaled down from
      the published configs named in the comments of each family's module.
    """

    name: str
    model_type: str
    architecture: str
    config_class: str
    decoder_layer: str
    structures: str  # one line for the README: what this family has that the code handles
    projections: Mapping[str, str] = field(default_factory=_llama_paths)
    fused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    sliced_norms: Mapping[str, str] = field(default_factory=dict)
    other_modules: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    layers_path: str = "model.layers"
    output_bias_flags: tuple[str, ...] = ()
    gguf_export: bool = False
    tiny_configs: Mapping[str, Mapping] = field(default_factory=dict)

    @property
    def pruned_model_type(self) -> str:
        """The model type of this family's per-layer-width checkpoints."""
        return f"pruneflow_{self.model_type}"

    @property
    def pruned_architecture(self) -> str:
        return f"Pruneflow{self.architecture}"

    @property
    def pruned_config_class(self) -> str:
        return f"Pruneflow{self.config_class}"

    def fused_parent(self, projection: str) -> str | None:
        """The stored fused module a logical projection lives in (None when it is stored on its own)."""
        for path, parts in self.fused.items():
            if projection in parts:
                return path
        return None

    def stored_layout(self) -> dict[str, list[str]]:
        """Every module a per-layer-width checkpoint resizes, as stored: path -> [in kind, out kind] for
        Linears (fused outputs joined by '+'), [kind] for sliced norms. Written into config.json, where
        the checkpoint's own loading code reads it."""
        layout: dict[str, list[str]] = {}
        for name in PROJECTIONS:
            parent = self.fused_parent(name)
            if parent is None:
                layout[self.projections[name]] = list(_KINDS[name])
            elif parent not in layout:
                parts = self.fused[parent]
                layout[parent] = [_KINDS[parts[0]][0], "+".join(_KINDS[part][1] for part in parts)]
        for path, kind in self.sliced_norms.items():
            layout[path] = [kind]
        return layout

    def stored_modules(self) -> set[str]:
        """Paths of every parameterised module a layer of this family holds as stored."""
        paths = {path for name, path in self.projections.items() if self.fused_parent(name) is None}
        return paths | set(self.fused) | set(self.sliced_norms) | set(self.other_modules)

    @property
    def lora_modules(self) -> dict[str, str]:
        """Logical projection -> the stored module's name (what LoRA targets on a loaded checkpoint)."""
        return {name: (self.fused_parent(name) or self.projections[name]).rsplit(".", 1)[-1] for name in PROJECTIONS}
