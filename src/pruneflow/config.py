"""Typed, validated parameters: `params.yaml` -> frozen dataclasses.

One schema serves Snakemake (common.smk calls `load_params`) and every stage CLI, so a bad value
stops the pipeline before any model is loaded. Errors name the key, the value and what is allowed;
unknown keys get a "did you mean" suggestion.

`scale` is the one switch between the laptop preset (caps under `laptop:` applied over the
sections) and `full` (the papers' settings, no caps).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pruneflow.criteria import CRITERIA, check_mutual_information_settings
from pruneflow.errors import ConfigError

EMBEDDED_SMOLLM2 = "embedded:smollm2-135m-instruct"
SCALES = ("laptop", "full")
PPL_DATASETS = ("wikitext2", "ptb", "ptb_test")
# the default zero-shot suite: the built-in tasks whose local files data/raw holds (LAMBADA stands in for
# HellaSwag, whose data is not here)
ZEROSHOT_TASKS = (
    "boolq",
    "piqa",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
    "lambada",
)
# every built-in task (a local file under <data_dir>/zeroshot/); any other name is looked up in lm-eval's
# registry and evaluate.zeroshot_include_path at plan time (pruneflow.zeroshot_tasks)
BUILTIN_ZEROSHOT_TASKS = (*ZEROSHOT_TASKS, "hellaswag")
# the seven tasks of LLM-Pruner's Table 1, whose mean is its "average" column
PAPER_ZEROSHOT_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
ZEROSHOT_TASKS_ALLOWED = (f"a built-in task ({', '.join(repr(t) for t in BUILTIN_ZEROSHOT_TASKS)}), a task or group "
                          "of lm-eval's registry, or a task under evaluate.zeroshot_include_path (a name without spaces)")
STRUCTURES = ("attention", "ffn")
AGGREGATIONS = ("sum", "product", "max", "last")
ALLOCATIONS = ("uniform", "global")
GGUF_TYPES = ("f32", "bf16", "f16", "q8_0")
ATTENTION_UNITS = ("kv_group", "query_head")
ATTENTION_UNIT_CHOICES = (*ATTENTION_UNITS, "auto")  # auto: measured per model (pruneflow.layout_search)
# how the kept weights of o_proj / down_proj are re-fitted after removal (pruneflow.reconstruction)
RECONSTRUCTIONS = ("none", "bias", "least_squares", "least_squares_bias")
RECONSTRUCTION_MODES = ("parallel", "sequential")
BIAS_RECONSTRUCTIONS = ("bias", "least_squares_bias")  # these add o_proj / down_proj biases
# keys that were replaced: named in the unknown-key error so an old params.yaml gets a way forward
REPLACED_KEYS = {
    "prune.bias_compensation": "prune.reconstruction ('bias' is FLAP's bias compensation, 'none' is off)",
}
RECOVERY_OBJECTIVES = ("lm", "distill")  # next-token loss | KL to the dense teacher (+ next-token loss)
RECOVERY_METHODS = ("lora", "full")  # adapters merged afterwards | every parameter
RECOVERY_SHARDING = ("none", "fsdp")  # every process holds the whole model (DDP) | FSDP2 shards it
RECOVERY_DATA_SUFFIXES = {".json": "Alpaca-format instructions", ".txt": "plain text"}
RECOVERY_DATA_ALLOWED = "a non-empty list of Alpaca-format JSON files (.json) and/or plain-text files (.txt)"
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _criterion_names() -> tuple[str, ...]:
    return tuple(CRITERIA)


def _allowed(values: typing.Iterable[Any]) -> str:
    return ", ".join(repr(v) for v in values)


def _fail(key: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ConfigError(f"{key}={value!r} is not allowed; allowed: {allowed}")


@dataclass(frozen=True)
class RuntimeParams:
    device: str = "auto"
    dtype: str = "auto"
    # whole_model: the model on the device at once; layer_by_layer: forward-only stages bring one decoder
    # layer at a time to the device (weights on disk or in host memory); auto: whole_model when it fits
    execution: str = "auto"

    def validate(self, prefix: str) -> None:
        if self.execution not in ("auto", "whole_model", "layer_by_layer"):
            _fail(f"{prefix}.execution", self.execution, "'auto', 'whole_model', 'layer_by_layer'")
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            _fail(f"{prefix}.device", self.device, "'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            _fail(f"{prefix}.dtype", self.dtype, "'auto', 'float32', 'bfloat16', 'float16'")


@dataclass(frozen=True)
class ModelParams:
    source: str = EMBEDDED_SMOLLM2
    revision: str | None = None

    def validate(self, prefix: str) -> None:
        if not self.source.strip():
            _fail(f"{prefix}.source", self.source, f"{EMBEDDED_SMOLLM2!r}, a local folder or a hub id")
        if self.source.startswith("embedded:") and self.source != EMBEDDED_SMOLLM2:
            _fail(f"{prefix}.source", self.source, f"{EMBEDDED_SMOLLM2!r}, a local folder or a hub id")


@dataclass(frozen=True)
class CalibrationParams:
    # never an evaluation file: pipeline.preflight compares resolved paths and contents
    source: str = "data/raw/wikitext-2/train.txt"
    num_samples: int = 512
    seq_len: int = 128

    def validate(self, prefix: str) -> None:
        if not self.source.strip():
            _fail(f"{prefix}.source", self.source, "a path to a training text file")
        _check_positive(f"{prefix}.num_samples", self.num_samples)
        _check_positive(f"{prefix}.seq_len", self.seq_len)


@dataclass(frozen=True)
class ActivationParams:
    batch_size: int = 4
    max_tokens: int = 512
    gram_matrices: bool = True  # X^T X at o_proj / down_proj inputs (reconstruction, obs); else recomputed

    def validate(self, prefix: str) -> None:
        _check_positive(f"{prefix}.batch_size", self.batch_size)
        _check_positive(f"{prefix}.max_tokens", self.max_tokens)


@dataclass(frozen=True)
class ScoreParams:
    micro_batch_size: int = 2
    aggregation: str = "sum"
    mi_alpha: float = 2.0
    mi_bandwidth: str = "silverman"
    mi_bandwidth_scale: float = 1.0
    mi_tokens: int = 256
    mi_threshold: float | None = None
    mi_pairs_per_neuron: int | None = None
    obs_damping: float = 1e-3

    def validate(self, prefix: str) -> None:
        _check_positive(f"{prefix}.micro_batch_size", self.micro_batch_size)
        _check_damping(f"{prefix}.obs_damping", self.obs_damping)
        if self.aggregation not in AGGREGATIONS:
            _fail(f"{prefix}.aggregation", self.aggregation, _allowed(AGGREGATIONS))
        check_mutual_information_settings(self.mi_alpha, self.mi_bandwidth, self.mi_bandwidth_scale, self.mi_tokens,
                                          self.mi_threshold, self.mi_pairs_per_neuron)


class Ratio(float):
    """A pruning ratio that remembers how params.yaml spelled it.

    DVC names a grid folder by the YAML scalar as written (`0` -> "0", `0.0` -> "0.0", `1e-5` ->
    "1e-05"), so Snakemake, DVC, the report and the stage CLIs all take a ratio's folder name from
    `name` (see `format_ratio`), and the two engines always agree on paths.
    """

    name: str

    def __new__(cls, value: Any) -> Ratio:
        ratio = super().__new__(cls, value)
        if isinstance(value, Ratio):
            ratio.name = value.name
        elif isinstance(value, int) and not isinstance(value, bool):
            ratio.name = str(value)
        else:
            ratio.name = repr(float(value))
        return ratio

    def __reduce__(self) -> tuple[Any, ...]:
        return (_ratio_from_name, (self.name,))

    def __repr__(self) -> str:
        return self.name

    __str__ = __repr__


def _ratio_from_name(name: str) -> Ratio:
    return Ratio(int(name) if name.lstrip("-").isdigit() else float(name))


# Every ratio folder name `format_ratio` can give for a ratio in [0, 1): "0", "0.x", "ye-z", "y.xe-z"
RATIO_PATTERN = r"0|0\.[0-9]+|[1-9](\.[0-9]+)?e-[0-9]+"


@dataclass(frozen=True)
class GridParams:
    criteria: tuple[str, ...] = ("taylor_element1", "l2_magnitude")
    ratios: tuple[Ratio, ...] = (Ratio(0.2),)
    recovered_criteria: tuple[str, ...] = ("taylor_element1",)
    # criteria that also get a servable checkpoint: every layer the same widths (prune.servable_multiple)
    servable_criteria: tuple[str, ...] = ()

    def validate(self, prefix: str) -> None:
        known = _criterion_names()
        if not self.criteria:
            _fail(f"{prefix}.criteria", list(self.criteria), f"a non-empty list of {_allowed(known)}")
        for name in self.criteria:
            if name not in known:
                _fail(f"{prefix}.criteria", name, _allowed(known) + _did_you_mean(name, known))
        if len(set(self.criteria)) != len(self.criteria):
            _fail(f"{prefix}.criteria", list(self.criteria), "a list without duplicates")
        if not self.ratios:
            _fail(f"{prefix}.ratios", list(self.ratios), "a non-empty list of ratios in [0, 1)")
        for ratio in self.ratios:
            check_ratio(ratio, f"{prefix}.ratios")
        if len(set(self.ratios)) != len(self.ratios):
            _fail(f"{prefix}.ratios", list(self.ratios), "a list without duplicates")
        for key in ("recovered_criteria", "servable_criteria"):
            for name in getattr(self, key):
                if name not in self.criteria:
                    _fail(f"{prefix}.{key}", name, f"criteria listed in {prefix}.criteria ({_allowed(self.criteria)})")
            if len(set(getattr(self, key))) != len(getattr(self, key)):
                _fail(f"{prefix}.{key}", list(getattr(self, key)), "a list without duplicates")


@dataclass(frozen=True)
class PruneParams:
    layer_start: int = 4
    layer_end: int = -2
    structures: tuple[str, ...] = STRUCTURES
    allocation: str = "uniform"
    attention_unit: str = "auto"
    reconstruction: str = "least_squares"
    reconstruction_mode: str = "parallel"
    damping: float = 1e-2
    search_samples: int = 8  # calibration sequences that rank the layouts of attention_unit: auto
    servable_multiple: int = 64  # servable checkpoints: FFN widths a multiple of this (GPU kernels' tile)

    def validate(self, prefix: str) -> None:
        _check_damping(f"{prefix}.damping", self.damping)
        _check_positive(f"{prefix}.search_samples", self.search_samples)
        _check_positive(f"{prefix}.servable_multiple", self.servable_multiple)
        for key, value, allowed in (("allocation", self.allocation, ALLOCATIONS),
                                    ("attention_unit", self.attention_unit, ATTENTION_UNIT_CHOICES),
                                    ("reconstruction", self.reconstruction, RECONSTRUCTIONS),
                                    ("reconstruction_mode", self.reconstruction_mode, RECONSTRUCTION_MODES)):
            if value not in allowed:
                _fail(f"{prefix}.{key}", value, _allowed(allowed) + _did_you_mean(str(value), allowed))
        for name in self.structures:
            if name not in STRUCTURES:
                _fail(f"{prefix}.structures", name, _allowed(STRUCTURES))
        if not self.structures:
            _fail(f"{prefix}.structures", [], f"a non-empty list of {_allowed(STRUCTURES)}")

    def layer_range(self, num_layers: int) -> range:
        """Resolve python-style [layer_start, layer_end) against a model's depth, or fail clearly."""
        start = self.layer_start + num_layers if self.layer_start < 0 else self.layer_start
        end = self.layer_end + num_layers if self.layer_end < 0 else self.layer_end
        if not (0 <= start < end <= num_layers):
            raise ConfigError(
                f"prune.layer_start={self.layer_start}, prune.layer_end={self.layer_end} select no layers "
                f"of a model with {num_layers} layers; allowed: -{num_layers} <= layer_start < layer_end "
                f"<= {num_layers} (negative values count from the end)"
            )
        return range(start, end)


@dataclass(frozen=True)
class RecoverParams:
    data: tuple[str, ...] = ("data/raw/wikitext-2/train.txt",)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = LORA_TARGET_MODULES
    learning_rate: float = 1e-4
    num_epochs: float = 2.0
    batch_size: int = 64
    micro_batch_size: int = 4
    cutoff_len: int = 256
    train_on_inputs: bool = True
    val_size: int = 2000
    max_steps: int | None = None
    max_train_samples: int | None = None
    warmup_steps: int = 100
    eval_every_steps: int = 200
    # a resumable checkpoint (in .<out>.state/) every this many optimizer steps; null: every eval_every_steps
    save_every_steps: int | None = None
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~30% slower
    # under several processes: none (DDP, each GPU holds the whole model) | fsdp (student and teacher sharded)
    sharding: str = "none"
    objective: str = "distill"
    method: str = "full"
    distill_temperature: float = 1.0
    distill_weight: float = 1.0  # share of the KL term; the rest is the next-token loss on the labels

    def validate(self, prefix: str) -> None:
        if not self.data:
            _fail(f"{prefix}.data", [], RECOVERY_DATA_ALLOWED)
        for path in self.data:
            if Path(path).suffix not in RECOVERY_DATA_SUFFIXES:
                _fail(f"{prefix}.data", path, RECOVERY_DATA_ALLOWED)
        for key, value, allowed in (("objective", self.objective, RECOVERY_OBJECTIVES),
                                    ("method", self.method, RECOVERY_METHODS),
                                    ("sharding", self.sharding, RECOVERY_SHARDING)):
            if value not in allowed:
                _fail(f"{prefix}.{key}", value, _allowed(allowed))
        if not (isinstance(self.distill_temperature, (int, float)) and 0 < self.distill_temperature <= 100):
            _fail(f"{prefix}.distill_temperature", self.distill_temperature, "a number in (0, 100]")
        if not (isinstance(self.distill_weight, (int, float)) and 0 <= self.distill_weight <= 1):
            _fail(f"{prefix}.distill_weight", self.distill_weight, "a number in [0, 1]")
        _check_positive(f"{prefix}.lora_r", self.lora_r)
        _check_positive(f"{prefix}.lora_alpha", self.lora_alpha)
        if not 0.0 <= self.lora_dropout < 1.0:
            _fail(f"{prefix}.lora_dropout", self.lora_dropout, "a float in [0, 1)")
        for name in self.target_modules:
            if name not in LORA_TARGET_MODULES:
                _fail(f"{prefix}.target_modules", name, _allowed(LORA_TARGET_MODULES))
        if not self.target_modules:
            _fail(f"{prefix}.target_modules", [], f"a non-empty list of {_allowed(LORA_TARGET_MODULES)}")
        if not (0.0 < self.learning_rate < 1.0):
            _fail(f"{prefix}.learning_rate", self.learning_rate, "a float in (0, 1)")
        if not self.num_epochs > 0:
            _fail(f"{prefix}.num_epochs", self.num_epochs, "a number > 0")
        _check_positive(f"{prefix}.micro_batch_size", self.micro_batch_size)
        _check_positive(f"{prefix}.batch_size", self.batch_size)
        if self.batch_size % self.micro_batch_size:
            _fail(
                f"{prefix}.batch_size",
                self.batch_size,
                f"a multiple of {prefix}.micro_batch_size={self.micro_batch_size}",
            )
        _check_positive(f"{prefix}.cutoff_len", self.cutoff_len)
        if self.val_size < 0:
            _fail(f"{prefix}.val_size", self.val_size, "an integer >= 0")
        if self.max_steps is not None:
            _check_positive(f"{prefix}.max_steps", self.max_steps)
        if self.max_train_samples is not None:
            _check_positive(f"{prefix}.max_train_samples", self.max_train_samples)
        if self.warmup_steps < 0:
            _fail(f"{prefix}.warmup_steps", self.warmup_steps, "an integer >= 0")
        _check_positive(f"{prefix}.eval_every_steps", self.eval_every_steps)
        if self.save_every_steps is not None:
            _check_positive(f"{prefix}.save_every_steps", self.save_every_steps)


@dataclass(frozen=True)
class EvaluateParams:
    ppl_datasets: tuple[str, ...] = ("wikitext2", "ptb")
    ppl_seq_lens: tuple[int, ...] = (128, 2048)
    ppl_batch_size: int = 16
    ppl_max_windows: int | None = None
    zeroshot_tasks: tuple[str, ...] = ZEROSHOT_TASKS
    # folders of the user's own lm-eval task YAMLs (lm-eval's TaskManager include_path); null: none
    zeroshot_include_path: tuple[str, ...] | None = None
    zeroshot_limit: int | None = None
    zeroshot_batch_size: int = 32
    latency_repeats: int = 5
    throughput_batch_size: int = 16
    generation_tokens: int = 64

    def validate(self, prefix: str) -> None:
        if not self.ppl_datasets and not self.zeroshot_tasks:
            _fail(f"{prefix}.ppl_datasets", [], f"a non-empty list when {prefix}.zeroshot_tasks is empty too "
                  "(one of the two may be [] for a perplexity-only or zero-shot-only run)")
        if len(set(self.ppl_datasets)) != len(self.ppl_datasets):
            _fail(f"{prefix}.ppl_datasets", list(self.ppl_datasets), "a list without duplicates")
        if len(set(self.zeroshot_tasks)) != len(self.zeroshot_tasks):
            _fail(f"{prefix}.zeroshot_tasks", list(self.zeroshot_tasks), "a list without duplicates")
        for name in self.ppl_datasets:
            if name not in PPL_DATASETS:
                _fail(f"{prefix}.ppl_datasets", name, _allowed(PPL_DATASETS) + _did_you_mean(name, PPL_DATASETS))
        for name in self.zeroshot_tasks:
            # only the spelling here: lm-eval's registry and the include path are read at plan time
            if not name or any(c.isspace() for c in name):
                _fail(f"{prefix}.zeroshot_tasks", name, ZEROSHOT_TASKS_ALLOWED)
        for folder in self.zeroshot_include_path or ():
            if not folder.strip():
                _fail(f"{prefix}.zeroshot_include_path", folder, "null or a list of folders of lm-eval task YAML files")
        if len(set(self.zeroshot_include_path or ())) != len(self.zeroshot_include_path or ()):
            _fail(f"{prefix}.zeroshot_include_path", list(self.zeroshot_include_path or ()), "a list without duplicates")
        if not self.ppl_seq_lens:
            _fail(f"{prefix}.ppl_seq_lens", [], "a non-empty list of window lengths (the first is the headline)")
        for index, length in enumerate(self.ppl_seq_lens):
            if length < 2:
                _fail(f"{prefix}.ppl_seq_lens[{index}]", length, "an integer >= 2 (tokens per window)")
        if len(set(self.ppl_seq_lens)) != len(self.ppl_seq_lens):
            _fail(f"{prefix}.ppl_seq_lens", list(self.ppl_seq_lens), "a list of distinct window lengths")
        _check_positive(f"{prefix}.ppl_batch_size", self.ppl_batch_size)
        if self.ppl_max_windows is not None:
            _check_positive(f"{prefix}.ppl_max_windows", self.ppl_max_windows)
        if self.zeroshot_limit is not None:
            _check_positive(f"{prefix}.zeroshot_limit", self.zeroshot_limit)
        _check_positive(f"{prefix}.zeroshot_batch_size", self.zeroshot_batch_size)
        _check_positive(f"{prefix}.latency_repeats", self.latency_repeats)
        _check_positive(f"{prefix}.throughput_batch_size", self.throughput_batch_size)
        _check_positive(f"{prefix}.generation_tokens", self.generation_tokens)


@dataclass(frozen=True)
class ExportParams:
    gguf_type: str = "q8_0"  # tensor type of the GGUF files: f32 | bf16 | f16 | q8_0
    # llama.cpp's pre-tokenizer name (tokenizer.ggml.pre); null: the source GGUF's, else llama.cpp's "default"
    gguf_tokenizer_pre: str | None = None

    def validate(self, prefix: str) -> None:
        if self.gguf_type not in GGUF_TYPES:
            _fail(f"{prefix}.gguf_type", self.gguf_type, _allowed(GGUF_TYPES) + _did_you_mean(str(self.gguf_type), GGUF_TYPES))
        if self.gguf_tokenizer_pre is not None and (not isinstance(self.gguf_tokenizer_pre, str)
                                                    or not self.gguf_tokenizer_pre.strip()):
            _fail(f"{prefix}.gguf_tokenizer_pre", self.gguf_tokenizer_pre, "null or a llama.cpp pre-tokenizer name")


@dataclass(frozen=True)
class MlflowParams:
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "pruneflow"
    enabled: bool = True

    def validate(self, prefix: str) -> None:
        if not self.experiment.strip():
            _fail(f"{prefix}.experiment", self.experiment, "a non-empty experiment name")


@dataclass(frozen=True)
class Params:
    """All pipeline parameters after the `scale` preset has been applied."""

    scale: str = "laptop"
    seed: int = 0
    runtime: RuntimeParams = field(default_factory=RuntimeParams)
    model: ModelParams = field(default_factory=ModelParams)
    calibration: CalibrationParams = field(default_factory=CalibrationParams)
    activations: ActivationParams = field(default_factory=ActivationParams)
    score: ScoreParams = field(default_factory=ScoreParams)
    grid: GridParams = field(default_factory=GridParams)
    prune: PruneParams = field(default_factory=PruneParams)
    recover: RecoverParams = field(default_factory=RecoverParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    export: ExportParams = field(default_factory=ExportParams)
    mlflow: MlflowParams = field(default_factory=MlflowParams)
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def validate(self) -> None:
        if self.scale not in SCALES:
            _fail("scale", self.scale, _allowed(SCALES))
        if self.seed < 0:
            _fail("seed", self.seed, "an integer >= 0")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "validate"):
                value.validate(f.name)
        if self.activations.max_tokens < self.score.mi_tokens and "mutual_information" in self.grid.criteria:
            _fail("score.mi_tokens", self.score.mi_tokens,
                  f"at most activations.max_tokens={self.activations.max_tokens} (the cached token rows)")


# Sections the `laptop:` preset may cap (full scale ignores it).
PRESET_SECTIONS = ("recover", "evaluate")


def check_ratio(value: Any, key: str = "ratio") -> float:
    """A pruning ratio is the fraction of all parameters to remove: a float in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(key, value, "a number in [0, 1)")
    if not (0.0 <= float(value) < 1.0) or math.isnan(float(value)):
        _fail(key, value, "a number in [0, 1) (the fraction of all parameters removed)")
    return float(value)


def parse_ratio(text: str, key: str = "--ratio") -> Ratio:
    """A ratio from the command line, spelled as a YAML number (`0`, `0.2`, `1e-05`)."""
    text = str(text).strip()
    try:
        value: int | float = int(text) if text.lstrip("+-").isdigit() else float(text)
    except ValueError:
        _fail(key, text, "a number in [0, 1)")
    check_ratio(value, key)
    return Ratio(value)


def format_ratio(value: float) -> str:
    """The canonical spelling of a ratio in paths and stage names: DVC's (see `Ratio`)."""
    return value.name if isinstance(value, Ratio) else Ratio(value).name


def _check_positive(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(key, value, "an integer > 0")


def _check_damping(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not 0 < value <= 1:
        _fail(key, value, "a number in (0, 1] (fraction of the Gram matrix's mean diagonal added to it)")


def _did_you_mean(name: str, candidates: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(str(name), list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field annotation; lists become tuples so params stay hashable."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(key, value, non_none[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            _fail(key, value, f"a list of {_type_name(args[0])}")
        return tuple(_coerce(f"{key}[{i}]", item, args[0]) for i, item in enumerate(value))
    if annotation is bool:
        if not isinstance(value, bool):
            _fail(key, value, "true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, value, "an integer")
        return value
    if annotation is float or annotation is Ratio:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, value, "a number")
        return Ratio(value) if annotation is Ratio else float(value)
    if annotation is str:
        if not isinstance(value, str):
            _fail(key, value, "a string")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")


def _type_name(annotation: Any) -> str:
    return {int: "integers", float: "numbers", Ratio: "numbers", str: "strings", bool: "booleans"}.get(
        annotation, str(annotation))


def _build(cls: type, mapping: Any, prefix: str) -> Any:
    if not isinstance(mapping, Mapping):
        _fail(prefix, mapping, f"a mapping with keys {_allowed(f.name for f in dataclasses.fields(cls))}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "raw"}
    for key in mapping:
        if key not in fields:
            full = f"{prefix}.{key}" if prefix else str(key)
            if full in REPLACED_KEYS:
                raise ConfigError(f"{full!r} was replaced by {REPLACED_KEYS[full]}")
            raise ConfigError(
                f"unknown key {full!r}; allowed keys{' in ' + prefix if prefix else ''}: "
                f"{', '.join(fields)}{_did_you_mean(str(key), fields)}"
            )
    kwargs = {}
    for name, value in mapping.items():
        key = f"{prefix}.{name}" if prefix else name
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value if value is not None else {}, key)
        else:
            kwargs[name] = _coerce(key, value, annotation)
    return cls(**kwargs)


def _preset_sections(raw: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    preset = raw.get("laptop") or {}
    if not isinstance(preset, Mapping):
        _fail("laptop", preset, f"a mapping of sections ({_allowed(PRESET_SECTIONS)}) to overrides")
    for section, overrides in preset.items():
        if section not in PRESET_SECTIONS:
            raise ConfigError(
                f"unknown key 'laptop.{section}'; allowed keys in laptop: {', '.join(PRESET_SECTIONS)}"
                f"{_did_you_mean(str(section), PRESET_SECTIONS)}"
            )
        if not isinstance(overrides, Mapping):
            _fail(f"laptop.{section}", overrides, "a mapping of keys to values")
    return dict(preset)


def params_from_mapping(raw: Mapping[str, Any]) -> Params:
    """Validate a params mapping (as read from params.yaml) and return typed params.

    The sections are checked as written (they are the `full` settings), then each `laptop:` section
    merged over its base, with errors named `laptop.<section>.<key>`; `scale` picks which applies.
    """
    if not isinstance(raw, Mapping):
        _fail("params", raw, "a YAML mapping at the top level")
    preset = _preset_sections(raw)
    full = _build(Params, {k: v for k, v in raw.items() if k != "laptop"}, "")
    full.validate()
    hints = typing.get_type_hints(Params)
    capped = {}
    for section, overrides in preset.items():
        base = {f.name: getattr(getattr(full, section), f.name) for f in dataclasses.fields(hints[section])}
        built = _build(hints[section], {**base, **overrides}, f"laptop.{section}")
        built.validate(f"laptop.{section}")
        capped[section] = built
    effective = dataclasses.replace(full, **capped) if full.scale == "laptop" else full
    return dataclasses.replace(effective, raw=dict(raw))


# Sections params.yaml must hold: DVC tracks each of them (a missing one stops `dvc repro`), so every
# engine and stage CLI refuses a file without them instead of filling in defaults only some can see.
# Keys inside a section may be left out (their defaults apply everywhere), except the grid keys DVC's
# foreach/matrix read.
REQUIRED_SECTIONS = ("scale", "seed", "runtime", "model", "calibration", "activations", "score", "grid", "prune",
                     "recover", "evaluate", "export", "laptop")
REQUIRED_KEYS = ("grid.criteria", "grid.ratios", "grid.recovered_criteria", "grid.servable_criteria",
                 "laptop.recover", "laptop.evaluate")


def _duplicate_keys(text: str) -> list[tuple[str, int, int]]:
    """(dotted key, first line, repeated line) of every key written twice in one mapping."""
    found: list[tuple[str, int, int]] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else repr(key_node.value)
                dotted = f"{prefix}.{key}" if prefix else str(key)
                line = key_node.start_mark.line + 1
                if key in seen:
                    found.append((dotted, seen[key], line))
                else:
                    seen[key] = line
                walk(value_node, dotted)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, f"{prefix}[{index}]")

    walk(yaml.compose(text, Loader=yaml.SafeLoader), "")
    return found


def _yaml_problem(exc: Exception) -> str:
    """A YAML parser error in one line: what is wrong and where."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}".replace("\n", " ")


def parse_params_text(text: str, name: str = "params.yaml") -> Any:
    """params.yaml text -> plain data, read exactly as DVC reads it.

    DVC parses params.yaml as YAML 1.2 (ruamel.yaml), where `2e-4` is a number and `off` a string;
    PyYAML's YAML 1.1 reads them as a string and a boolean. Both the stage CLIs and the Snakefile use
    this reader, so every engine sees the same values. A key written twice is refused (PyYAML would
    keep the last one silently; DVC refuses the file).
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError as RuamelYAMLError

    try:
        duplicates = _duplicate_keys(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"params file {name!r} is not valid YAML: {_yaml_problem(exc)}") from None
    if duplicates:
        key, first, again = duplicates[0]
        raise ConfigError(f"params file {name!r}: key {key!r} is written twice (lines {first} and {again}); "
                          "allowed: each key once")
    try:
        return YAML(typ="safe", pure=True).load(text)
    except RuamelYAMLError as exc:
        raise ConfigError(f"params file {name!r} is not valid YAML: {_yaml_problem(exc)}") from None


def check_sections(raw: Mapping[str, Any]) -> None:
    """Every section (and grid key) DVC tracks is present: refused everywhere rather than defaulted in some places."""
    missing = [key for key in REQUIRED_SECTIONS if key not in raw]
    for dotted in REQUIRED_KEYS:
        section, key = dotted.split(".")
        if isinstance(raw.get(section), Mapping) and key not in raw[section]:
            missing.append(dotted)
    if missing:
        raise ConfigError(
            f"missing {', '.join(repr(m) for m in missing)}; allowed: a params file with every section "
            f"({', '.join(REQUIRED_SECTIONS)}; mlflow may be left out) and the keys "
            f"{', '.join(REQUIRED_KEYS)} (DVC tracks them; copy them from the project's params.yaml)")
    hints = typing.get_type_hints(Params)
    for section in REQUIRED_SECTIONS:
        if (section == "laptop" or dataclasses.is_dataclass(hints[section])) and not isinstance(raw[section], Mapping):
            _fail(section, raw[section], "a mapping of keys to values (an empty section is written {})")
    for dotted in ("laptop.recover", "laptop.evaluate"):
        section, key = dotted.split(".")
        if not isinstance(raw[section].get(key), Mapping):
            _fail(dotted, raw[section].get(key), "a mapping of keys to values (no caps: {})")


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; errors name the file, key, value and what is allowed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {str(path)!r} does not exist; pass --params with a params.yaml path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"params file {str(path)!r} is not UTF-8 text: byte {exc.start} is invalid") from None
    raw = parse_params_text(text, str(path))
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise ConfigError(f"params file {str(path)!r} is empty; allowed: a YAML mapping with the sections "
                          f"{', '.join(REQUIRED_SECTIONS)}")
    try:
        if not isinstance(raw, Mapping):
            _fail("params", raw, "a YAML mapping at the top level")
        check_sections(raw)
        return params_from_mapping(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def stage_params(params: Params, *sections: str) -> dict[str, Any]:
    """A flat {"section.key": value} view of the sections a stage reads (for MLflow)."""
    flat: dict[str, Any] = {}
    for section in sections:
        if "." in section:  # one key of a section ("runtime.device")
            outer, key = section.split(".", 1)
            flat[section] = getattr(getattr(params, outer), key)
            continue
        value = getattr(params, section)
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                flat[f"{section}.{f.name}"] = getattr(value, f.name)
        else:
            flat[section] = value
    return flat


def _schema_for(annotation: Any) -> dict[str, Any]:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        inner = _schema_for(non_none[0])
        inner_type = inner.get("type")
        if isinstance(inner_type, str):
            inner["type"] = [inner_type, "null"]
        return inner
    if origin is tuple:
        return {"type": "array", "items": _schema_for(args[0])}
    if dataclasses.is_dataclass(annotation):
        hints = typing.get_type_hints(annotation)
        return {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                f.name: _schema_for(hints[f.name]) for f in dataclasses.fields(annotation) if f.name != "raw"
            },
        }
    return {"type": {bool: "boolean", int: "integer", float: "number", Ratio: "number", str: "string"}[annotation]}


def json_schema() -> dict[str, Any]:
    """The structural JSON schema of params.yaml (Snakemake validates config against it)."""
    schema = _schema_for(Params)
    preset_props = {name: {"type": "object"} for name in PRESET_SECTIONS}
    schema["properties"]["laptop"] = {"type": "object", "additionalProperties": False, "properties": preset_props}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "description":
            "Generated by `python -m pruneflow.config --schema`; the typed checks live in pruneflow.config.",
            **schema}


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--schema"]:
        print(yaml.safe_dump(json_schema(), sort_keys=False), end="")
    else:
        print(load_params(sys.argv[1] if len(sys.argv) > 1 else "params.yaml"))
