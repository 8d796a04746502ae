"""Cluster resources of every rule, derived from the model's config.json and params.yaml.

A cluster job must say up front how much host memory, how many GPUs of what memory, how many CPUs
and how much time it needs. These follow from the model's shape and the stage's work, so they are
computed here instead of written per rule into each profile. Torch-free and pure: the Snakefile
calls it while it plans (`pipeline.snakemake_support`), and `python -m pruneflow.pipeline.resources`
prints the table for a params file and a config.json.

Parameters (`ModelShape.parameters`), from config.json (GQA: k/v have `num_key_value_heads` heads):

    embedding  V*h                          lm_head  V*h, or 0 when tie_word_embeddings
    attention  h*(H*d) + 2*h*(K*d) + (H*d)*h per layer (+ q/k/v/o biases where the family has them)
    mlp        3*h*f per layer (gate, up, down; + biases with mlp_bias)
    norms      h per hidden-width norm of the family, d per q/k norm, + the final norm

A pruned model (grid ratio r = the fraction of all parameters removed) has P_s = P*(1 - r).

Bytes (b = 2 for the bf16 weights a GPU job runs in, 4 for float32):

    weights         b*P; host memory for loading a checkpoint: its stored dtype (config.json)
    Gram sums       8*(h^2 + f^2)*L on the device (float64, every layer: activations.gram_matrices)
    activations     2*L*(10*h + 4*f) per token kept for the backward pass (bf16; with
                    recover.gradient_checkpointing only 2*L*h per token plus one layer)
    logits          18*V per token in training (bf16 logits + fp32 copies for the loss / KL)
    Taylor scoring  weights + one bf16 gradient of the layers + activations of one micro-batch;
                    taylor_element2 adds fp32 gradient and Fisher buffers; when that does not fit one
                    GPU, gradients one layer at a time (one layer + its gradient + embeddings and head
                    on the GPU, every layer's input hidden states in host memory)
    recovery        on every GPU: teacher b*P (distill) + student: full 16*P_s (fp32 weights, gradients,
                    two AdamW moments) + 2*P_s (its bf16 autocast copy); LoRA b*P_s frozen + 16 bytes per
                    adapter parameter; plus activations and logits of one micro-batch
    checkpoint      16 bytes per trained parameter (fp32 weights and two AdamW moments, + the fp32 best
                    validation weights); full: 16*P_s, LoRA: 16 per adapter parameter

A GPU job fits when its bytes are at most `USABLE_FRACTION` of `gpu_memory_gb` (the CUDA context,
NCCL buffers and allocator slack take the rest). Forward-only stages (cache_activations, scoring
without gradients, evaluation, and the prune stage's forward passes in float32) run the whole model on
one GPU when weights x `LOAD_HEADROOM` fit, else layer by layer (`runtime.execution`): one GPU holding
one decoder layer, the embeddings and the hidden states, and host memory for all weights. Recovery
runs on N GPUs of one node (`torchrun --standalone --nproc_per_node N`, `launcher`). Data-parallel
(recover.sharding: none; DDP) every GPU holds the whole teacher, student state and one micro-batch's
activations: teacher + state + activations <= usable, else it is refused, and each process loads the
models through host memory. Sharded (fsdp; FSDP2) each GPU holds (teacher + state) / N + activations
+ what FSDP holds whole (gathered units, the head group, full training's bf16 autocast copies: see
`recover`), N at least what fits on one node, and only
the main process loads the models. More GPUs beyond that add speed: wanted = ceil(one-GPU minutes /
`RECOVERY_TARGET_MINUTES`), at most `gpus_per_node`, and N is the largest N <= max(wanted, what fits)
with recover.batch_size divisible by micro_batch_size x N (recovery's own check). Gradient scoring runs
on one GPU, layer by layer when the whole backward pass does not fit.

Runtime (minutes) is an estimate, adjustable by `ClusterSettings`: floating point work at
`gpu_tflops` sustained per GPU (`cpu_gflops` for the CPU stages), plus reading and writing the
weights at `storage_gb_per_s`, times `runtime_margin`, plus `STARTUP_MINUTES`:

    training   6*P_s per token (full) or 4*P_s (LoRA: no weight gradients of the base) + 2*P teacher,
               over N GPUs
    forward    2*P per token (calibration, validation and evaluation tokens); the prune stage's in
               float32, at gpu_tflops / `FP32_SLOWDOWN`
    gradients  6*P per token whole, 8*P layer by layer (each layer runs forward twice)
    solves     2*L*(h^3 + f^3) for the re-fit (the prune job's CPUs) and structured OBS (float64)

Tokens come from params.yaml and the sizes of the data files (`BYTES_PER_TOKEN` bytes of text per
token). A setting that cannot fit at all (recovery's teacher and state larger than its GPUs, a
gradient criterion or a single layer larger than one GPU) is refused with a `ConfigError` that names
the setting, the model's size and the budget; every such problem of the grid is reported at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from pruneflow.config import Params
from pruneflow.criteria import CRITERIA, without_gradients
from pruneflow.errors import ConfigError

GIB = 2**30
USABLE_FRACTION = 0.9  # of a GPU's memory; the rest: CUDA context, NCCL buffers, fragmentation
LOAD_HEADROOM = 1.25  # whole-model execution needs weights x this (pruneflow.layerwise.HEADROOM)
HOST_BASE_BYTES = 4 * GIB  # Python, torch, CUDA runtime, tokenizer, data of one job
BYTES_PER_TOKEN = 4  # of English text, for token counts estimated from file sizes
CHOICES_PER_EXAMPLE = 4  # a zero-shot example is scored once per answer choice
STARTUP_MINUTES = 5  # environment, imports, CUDA initialisation
MIN_RUNTIME_MINUTES = 15
HOST_TO_DEVICE_GB_PER_S = 10.0  # layer-by-layer execution copies every layer once per pass
SHARDED_STAGES = frozenset({"recover"})  # stages that run on several GPUs (torchrun: DDP or FSDP)
RECOVERY_TARGET_MINUTES = 60  # recovery asks for ceil(one-GPU minutes / this) GPUs, for speed only
MIB = 2**20
FP32_SLOWDOWN = 8  # float32 matmuls without TF32 (torch's default) run at about 1/8 of the bf16 rate

# what the profiles asked for before the derivation, used when config.json cannot be read while planning
FALLBACK: dict[str, dict[str, int]] = {
    "default": {"mem_mb": 8000, "runtime": 30, "cpus_per_task": 2},
    "cache_activations": {"mem_mb": 32000, "runtime": 30, "cpus_per_task": 4},
    "score": {"mem_mb": 64000, "runtime": 60, "cpus_per_task": 4},
    "prune": {"mem_mb": 64000, "runtime": 30, "cpus_per_task": 2},
    "prune_servable": {"mem_mb": 64000, "runtime": 30, "cpus_per_task": 2},
    "recover": {"mem_mb": 64000, "runtime": 720, "cpus_per_task": 8},
    **{f"evaluate_{kind}": {"mem_mb": 32000, "runtime": 120, "cpus_per_task": 4}
       for kind in ("dense", "pruned", "recovered", "servable")},
}


@dataclass(frozen=True)
class ClusterSettings:
    """What the cluster offers and how fast it runs; each field is a `snakemake --config KEY=VALUE`."""

    gpu_memory_gb: float = 80.0  # memory of one GPU, GiB (A100 / H100: 80; H200: 141)
    gpus_per_node: int = 8  # the most GPUs one job may ask for (torchrun --standalone: one node)
    gpu_tflops: float = 120.0  # sustained bf16 TFLOP/s of one GPU (~40% of an A100's peak)
    cpu_gflops: float = 200.0  # sustained float64 GFLOP/s of one CPU job (the prune stage's solves)
    storage_gb_per_s: float = 1.0  # reading and writing checkpoints (shared file system)
    runtime_margin: float = 2.0  # factor on the time estimate (a job over its limit is killed)

    @classmethod
    def from_config(cls, values: Mapping[str, object]) -> ClusterSettings:
        """Settings from `--config` values; every bad one reported at once."""
        problems, chosen = [], {}
        for spec in fields(cls):
            if spec.name not in values:
                continue
            value = values[spec.name]
            integer = spec.type in ("int", int)
            ok = not isinstance(value, bool) and isinstance(value, int if integer else int | float) and value > 0
            if spec.name == "runtime_margin":
                ok = ok and value >= 1
            if not ok:
                allowed = "an integer >= 1" if integer else ("a number >= 1" if spec.name == "runtime_margin"
                                                            else "a number > 0")
                problems.append(f"--config {spec.name}={value!r} is not allowed; allowed: {allowed}")
            else:
                chosen[spec.name] = value
        unknown = sorted(set(values) - set(CLUSTER_KEYS))
        if unknown:
            problems.append(f"--config {unknown[0]}={values[unknown[0]]!r} is not allowed; allowed keys: "
                            f"{', '.join(CLUSTER_KEYS)}")
        if problems:
            raise ConfigError("; ".join(problems))
        return cls(**chosen)

    @property
    def usable_bytes(self) -> float:
        return self.gpu_memory_gb * GIB * USABLE_FRACTION


CLUSTER_KEYS = tuple(spec.name for spec in fields(ClusterSettings))


# ------------------------------------------------------------------------------------------ the model


@dataclass(frozen=True)
class ParameterCount:
    embedding: int
    attention: int  # all layers
    mlp: int  # all layers
    norms: int  # all layers and the final norm
    lm_head: int  # 0 when tied to the embedding

    @property
    def layers(self) -> int:
        return self.attention + self.mlp + self.norms

    @property
    def total(self) -> int:
        return self.embedding + self.layers + self.lm_head


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_REQUIRED_WIDTHS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_OPTIONAL_WIDTHS = ("num_key_value_heads", "head_dim")  # absent or null: the attention heads' values


def _is_width(value: object) -> bool:
    """A positive integer, as config.json writes widths (not a bool, a float or a quoted number)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_widths(config: Mapping, where: str) -> None:
    """Refuse every width of `config` that is not a positive integer, all in one ConfigError."""
    source = where if where.endswith(".json") else f"the config.json of {where}"
    bad = [f"{key}={json.dumps(config[key], default=repr)}" for key in (*_REQUIRED_WIDTHS, *_OPTIONAL_WIDTHS)
           if config.get(key) is not None and not _is_width(config[key])]
    if bad:
        raise ConfigError(f"{source}: {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not allowed; allowed: "
                          "positive integers (JSON numbers without quotes or a fraction)")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") is None and hidden < heads:  # head_dim would be hidden_size // heads = 0
        raise ConfigError(f"{source}: num_attention_heads={heads} with hidden_size={hidden} and no head_dim is not "
                          "allowed; allowed: num_attention_heads at most hidden_size, or a head_dim")


@dataclass(frozen=True)
class ModelShape:
    """The widths of a decoder model, from its config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_norms: int = 2  # hidden-width norms per layer (Gemma: 4; OLMo 2: 2 after the blocks)
    head_norms: int = 0  # q/k norms over head_dim (Qwen 3, Gemma 3)
    q_width_norms: int = 0  # OLMo 2's q_norm spans q heads x head_dim, its k_norm the kv width
    stored_bytes: int = 4  # bytes per weight of the checkpoint on disk (config.json's dtype)

    @classmethod
    def from_config(cls, config: Mapping, where: str = "config.json") -> ModelShape:
        """Read the widths. A config without them, or with a width that is not a positive integer, is
        refused naming the keys: a negative or zero width would plan negative memory or divide by zero."""
        from pruneflow.families import family_for_config

        missing = [key for key in _REQUIRED_WIDTHS if config.get(key) is None]
        if missing:
            raise ConfigError(f"{where} lacks {', '.join(missing)}; allowed: a decoder config.json with "
                              f"{', '.join(_REQUIRED_WIDTHS)}")
        _check_widths(config, where)
        heads = config["num_attention_heads"]
        family = family_for_config(dict(config))
        other = family.other_modules if family else ("input_layernorm", "post_attention_layernorm")
        model_type = config.get("model_type", "")
        dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
        attention_bias = bool(config.get("attention_bias", False))
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias or model_type.startswith(("qwen2", "pruneflow_qwen2")),
            o_bias=attention_bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
            hidden_norms=sum(1 for name in other if not name.endswith(("q_norm", "k_norm"))),
            head_norms=sum(1 for name in other if name.endswith(("q_norm", "k_norm"))),
            q_width_norms=len(family.sliced_norms) if family else 0,
            stored_bytes=_DTYPE_BYTES.get(dtype, 4),
        )

    def parameters(self) -> ParameterCount:
        h, f, d, layers = self.hidden_size, self.intermediate_size, self.head_dim, self.num_hidden_layers
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attention = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.qkv_bias else 0) + (h if self.o_bias else 0)
        mlp = 3 * h * f + (2 * f + h if self.mlp_bias else 0)
        norms = self.hidden_norms * h + self.head_norms * d + (q + kv if self.q_width_norms else 0)
        embedding = self.vocab_size * h
        return ParameterCount(embedding=embedding, attention=attention * layers, mlp=mlp * layers,
                              norms=norms * layers + h, lm_head=0 if self.tie_word_embeddings else embedding)


# ----------------------------------------------------------------------------------------- the work


@dataclass(frozen=True)
class Workload:
    """Tokens each stage processes, estimated from params.yaml and the data files' sizes."""

    calibration_tokens: int
    train_tokens: int  # recovery: optimizer steps x batch x cutoff_len
    validation_tokens: int  # recovery: forward passes over the validation split, all evaluations
    perplexity_tokens: int  # evaluation: every perplexity window, every length
    zeroshot_tokens: int  # evaluation: every scored (context, choice) pair
    evaluation_passes: int  # separate passes over the model in one evaluation (layer-by-layer copies)
    largest_pass_tokens: int  # evaluation: tokens of its largest perplexity pass (one text at one length)


def estimate_workload(params: Params, recovery_bytes: int, perplexity_bytes: Mapping[str, int],
                      zeroshot_files: Mapping[str, tuple[int, int]]) -> Workload:
    """Token counts from the settings and the data sizes.

    Arguments:
        recovery_bytes: total size of `recover.data`.
        perplexity_bytes: `evaluate.ppl_datasets` name -> size of its text.
        zeroshot_files: task -> (bytes, examples) of its file (tasks without a file are left out).
    """
    rec = params.recover
    if rec.max_steps:
        steps = rec.max_steps
    else:
        examples = max(1, recovery_bytes // BYTES_PER_TOKEN // rec.cutoff_len - rec.val_size)
        if rec.max_train_samples:
            examples = min(examples, rec.max_train_samples)
        steps = math.ceil(rec.num_epochs * examples / rec.batch_size)
    evaluations = steps // max(1, rec.eval_every_steps) + 1
    ev = params.evaluate
    passes = [0]
    for name in ev.ppl_datasets:
        text_tokens = perplexity_bytes.get(name, 0) // BYTES_PER_TOKEN
        for seq_len in ev.ppl_seq_lens:
            cap = ev.ppl_max_windows * seq_len if ev.ppl_max_windows else text_tokens
            passes.append(min(text_tokens, cap))
    perplexity, largest = sum(passes), max(passes)
    for size, examples in zeroshot_files.values():
        kept = min(examples, ev.zeroshot_limit) if ev.zeroshot_limit else examples
        passes.append(size * kept // max(1, examples) // BYTES_PER_TOKEN * CHOICES_PER_EXAMPLE)
    zeroshot = sum(passes) - perplexity
    throughput = ev.latency_repeats * ev.throughput_batch_size * (ev.ppl_seq_lens[0] if ev.ppl_seq_lens else 128)
    return Workload(
        calibration_tokens=params.calibration.num_samples * params.calibration.seq_len,
        train_tokens=steps * rec.batch_size * rec.cutoff_len,
        validation_tokens=evaluations * rec.val_size * rec.cutoff_len,
        perplexity_tokens=perplexity + throughput,
        zeroshot_tokens=zeroshot,
        evaluation_passes=len(passes),
        largest_pass_tokens=largest,
    )


def measure_workload(params: Params, root: str | Path) -> Workload:
    """`estimate_workload` with the sizes of the data files under `root` (missing files count 0)."""
    from pruneflow.pipeline.graph import DATA_DIR
    from pruneflow.text_data import PPL_SOURCES
    from pruneflow.zeroshot_tasks import task_file

    root = Path(root)

    def size(path: str | Path) -> int:
        full = root / path
        return full.stat().st_size if full.is_file() else 0

    zeroshot = {}
    for task in params.evaluate.zeroshot_tasks:
        try:
            path = root / task_file(task, DATA_DIR)
        except KeyError:  # a task of the user's include path: no file to measure
            continue
        if path.is_file():
            with path.open("rb") as handle:
                zeroshot[task] = (path.stat().st_size, sum(1 for _ in handle))
    return estimate_workload(params, sum(size(p) for p in params.recover.data),
                             {name: size(Path(DATA_DIR) / PPL_SOURCES[name][0]) for name in params.evaluate.ppl_datasets
                              if name in PPL_SOURCES}, zeroshot)


# ------------------------------------------------------------------------------------- the resources


@dataclass(frozen=True)
class RuleResources:
    """What one job of a rule asks the scheduler for, and why."""

    mem_mb: int  # host memory, MiB
    runtime: int  # minutes
    cpus_per_task: int
    gpu: int = 0  # GPUs (0: a CPU job)
    gpu_mem_mb: int = 0  # needed on each GPU, MiB
    execution: str = ""  # whole_model | layer_by_layer | data_parallel | cpu
    checkpoint_seconds: int = 0  # recover: SIGTERM this long before the time limit (write a checkpoint)
    notes: tuple[str, ...] = field(default=(), compare=False)

    def snakemake(self) -> dict[str, int]:
        """The Snakemake resources (the GPU count only for GPU jobs: the Kubernetes plugin asks for a
        GPU whenever `gpu` is set)."""
        found = {"mem_mb": self.mem_mb, "runtime": self.runtime, "cpus_per_task": self.cpus_per_task}
        if self.gpu:
            found.update(gpu=self.gpu, gpu_mem_mb=self.gpu_mem_mb)
        return found


def _mib(n_bytes: float) -> int:
    """MiB, rounded up to a multiple of 1000 (schedulers prefer round numbers)."""
    return int(math.ceil(n_bytes / MIB / 1000) * 1000)


def _minutes(flops: float, rate: float, io_bytes: float, settings: ClusterSettings) -> int:
    seconds = flops / rate + io_bytes / (settings.storage_gb_per_s * 1e9)
    return max(MIN_RUNTIME_MINUTES, math.ceil(settings.runtime_margin * seconds / 60) + STARTUP_MINUTES)


def _billions(n: float) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e8 else f"{n / 1e6:.0f}M"


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.1f} GiB"


@dataclass(frozen=True)
class Derivation:
    """Everything a rule's resources depend on, fixed for one pipeline plan."""

    shape: ModelShape
    params: Params
    workload: Workload
    settings: ClusterSettings = ClusterSettings()
    source: str = "model.source"  # how messages name the model

    @property
    def dense(self) -> ParameterCount:
        return self.shape.parameters()

    @property
    def weight_bytes(self) -> int:
        """Bytes per weight on the GPU: bf16 unless runtime.dtype says float32."""
        return 4 if self.params.runtime.dtype == "float32" else 2

    def _budget(self) -> str:
        return f"{self.settings.gpu_memory_gb:g} GB per GPU (--config gpu_memory_gb)"

    def _model(self, params: float) -> str:
        return f"{self.source} ({_billions(params)} parameters)"

    # --------------------------------------------------------------------------- forward-only stages

    def _forward(self, stage: str, params: float, tokens: float, batch_tokens: int, state: float,
                 host_extra: float, passes: int, pass_tokens: float, extra_flops: float = 0.0,
                 weight_bytes: int | None = None, layer_state: float | None = None,
                 layer_host_extra: float = 0.0) -> RuleResources:
        """A stage that only runs forward passes: whole model on one GPU, else layer by layer (which
        keeps the hidden states of one pass, `pass_tokens`, on the GPU). `weight_bytes` 4: the stage
        computes in float32, at 1/`FP32_SLOWDOWN` of the bf16 rate. `state` is what the pass adds on the
        GPU; layer by layer that is `layer_state` there (default: the same) and `layer_host_extra` more
        in host memory (what finished layers leave there, as pruneflow.layerwise.memory_need counts)."""
        shape, b = self.shape, weight_bytes or self.weight_bytes
        h, f, vocab = shape.hidden_size, shape.intermediate_size, shape.vocab_size
        scale = params / self.dense.total
        weights = b * params
        workspace = batch_tokens * (8 * vocab + 16 * (h + f))  # logits in fp32, one layer's transients
        execution = getattr(self.params.runtime, "execution", "auto")
        whole = weights * LOAD_HEADROOM + workspace + state
        layer = (b * self.dense.layers * scale / shape.num_hidden_layers + b * (self.dense.embedding + self.dense.lm_head)
                 + 2 * b * pass_tokens * h + workspace
                 + (state if layer_state is None else layer_state))  # one layer, embeddings and head, hidden states
        usable = self.settings.usable_bytes
        if execution != "layer_by_layer" and whole <= usable:
            chosen, device, copies = "whole_model", whole, 0.0
        elif execution != "whole_model" and layer <= usable:
            chosen, device, copies = "layer_by_layer", layer, weights * passes
            host_extra += layer_host_extra
        else:
            what = (f"runtime.execution={execution!r}" if execution == "whole_model" and layer <= usable
                    else f"stage {stage}")
            need = whole if execution == "whole_model" else layer
            allowed = ("'auto' or 'layer_by_layer'" if what.startswith("runtime")
                       else "GPUs with more memory, or fewer calibration / evaluation tokens")
            raise ConfigError(f"{what} is not allowed for {self._model(params)}: it needs {_gib(need)} on one GPU, "
                              f"more than {self._budget()} allows; allowed: {allowed}")
        flops = 2 * params * tokens + extra_flops
        io = self.shape.stored_bytes * params
        rate = self.settings.gpu_tflops * 1e12 / (FP32_SLOWDOWN if b == 4 else 1)
        runtime = _minutes(flops, rate, io, self.settings)
        runtime += math.ceil(self.settings.runtime_margin * copies / (HOST_TO_DEVICE_GB_PER_S * 1e9) / 60)
        return RuleResources(mem_mb=_mib(HOST_BASE_BYTES + max(weights, self.shape.stored_bytes * params) + host_extra),
                             runtime=runtime, cpus_per_task=4, gpu=1, gpu_mem_mb=_mib(device), execution=chosen)

    def cache_activations(self) -> RuleResources:
        shape, act = self.shape, self.params.activations
        h, f, layers = shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers
        gram_device = 8 * (h * h + f * f) * layers if act.gram_matrices else 0  # float64 sums, every layer
        gram_host = 4 * (h * h + f * f) * layers if act.gram_matrices else 0  # saved as float32
        rows = 4 * act.max_tokens * (h + f) * layers  # sampled token rows at o_proj / down_proj inputs
        tokens = self.workload.calibration_tokens
        if gram_device > self.settings.usable_bytes:
            raise ConfigError(f"activations.gram_matrices=True is not allowed for {self._model(self.dense.total)}: "
                              f"its Gram sums take {_gib(gram_device)} on the GPU, more than {self._budget()} "
                              "allows; allowed: false (the prune stage then computes them layer by layer)")
        grams = 2 * (h * h + f * f) * layers * tokens if act.gram_matrices else 0
        # layer by layer the running layer's sums are on the GPU (with one batch's float32 product and its
        # float64 copy) and each finished layer's go to host memory
        one_layer = (8 * (h * h + f * f) + 12 * max(h, f) ** 2) if act.gram_matrices else 0
        return self._forward("cache_activations", self.dense.total, tokens, act.batch_size * self.params.calibration.seq_len,
                             gram_device, gram_host + rows, passes=1, pass_tokens=tokens, extra_flops=grams,
                             layer_state=one_layer, layer_host_extra=gram_device)

    def score(self, criterion: str) -> RuleResources:
        info = CRITERIA.get(criterion)
        shape, b, dense = self.shape, self.weight_bytes, self.dense
        h, f, layers = shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers
        stats = 4 * (h * h + f * f) * layers if self.params.activations.gram_matrices else 0
        if info is None or not info.needs_gradients:
            solves = 2 * layers * (h**3 + f**3) if info is not None and info.needs_activations else 0
            return self._forward("score", dense.total, 0, 1, 8 * f * f, stats, passes=1, pass_tokens=0,
                                 extra_flops=solves)
        micro_tokens = self.params.score.micro_batch_size * self.params.calibration.seq_len
        activations = micro_tokens * (2 * layers * (10 * h + 4 * f) + 18 * shape.vocab_size)
        # per projection parameter: its gradient (bf16), + fp32 gradient and Fisher sums for Element^2;
        # the layer being scored also holds its float64 element scores (pruneflow.layerwise.memory_need)
        gradient = b + (8 if criterion == "taylor_element2" else 0)
        scoring = 8 * dense.layers / layers
        device = b * dense.total + gradient * dense.layers + scoring + activations
        tokens = self.workload.calibration_tokens
        execution = getattr(self.params.runtime, "execution", "auto")
        host = HOST_BASE_BYTES + max(b, shape.stored_bytes) * dense.total + stats
        flops = 6 * dense.total * tokens
        chosen = "whole_model"
        if execution == "layer_by_layer" or (execution == "auto" and device > self.settings.usable_bytes):
            # gradients one layer at a time (pruneflow.importance.taylor.layerwise_scores): one layer with its
            # gradient on the GPU, the embeddings and head, and the transients of one micro-batch; the hidden
            # states of every micro-batch stay on the GPU, two copies of all calibration tokens (a layer's
            # inputs and outputs going forward, the upstream and downstream gradients going backward, as
            # pruneflow.layerwise.memory_need counts them); every layer's input hidden states also wait in
            # host memory; each layer runs forward twice and backward once
            one_layer = (b + gradient) * dense.layers / layers + scoring
            device = (one_layer + b * (dense.embedding + dense.lm_head) + 2 * b * tokens * h
                      + micro_tokens * (10 * h + 4 * f + 18 * shape.vocab_size))
            host = HOST_BASE_BYTES + b * (layers + 1) * tokens * h + (b + gradient) * dense.layers / layers + stats
            flops = 8 * dense.total * tokens
            chosen = "layer_by_layer"
        if device > self.settings.usable_bytes:
            whole_only = chosen == "whole_model" and execution == "whole_model"
            raise ConfigError(f"grid.criteria: {criterion!r} is not allowed for {self._model(dense.total)}: its "
                              f"gradients need {_gib(device)} on one GPU "
                              f"{'(runtime.execution: whole_model) ' if whole_only else '(one layer at a time) '}"
                              f"more than {self._budget()} allows; allowed: "
                              + ("runtime.execution 'auto' or 'layer_by_layer'" if whole_only else
                                 "a criterion without gradients ("
                                 + ", ".join(without_gradients()) + ")"))
        return RuleResources(mem_mb=_mib(host),
                             runtime=_minutes(flops, self.settings.gpu_tflops * 1e12, shape.stored_bytes * dense.total,
                                              self.settings),
                             cpus_per_task=4, gpu=1, gpu_mem_mb=_mib(device), execution=chosen)

    def evaluate(self, name: str, params: float) -> RuleResources:
        ev = self.params.evaluate
        batch_tokens = max(ev.ppl_batch_size * max(ev.ppl_seq_lens, default=128), ev.zeroshot_batch_size * 512)
        tokens = self.workload.perplexity_tokens + self.workload.zeroshot_tokens
        return self._forward(name, params, tokens, batch_tokens, 0, 0, passes=self.workload.evaluation_passes,
                             pass_tokens=self.workload.largest_pass_tokens)

    # ------------------------------------------------------------------------------------ CPU stages

    def prepare_model(self) -> RuleResources:
        stored = self.shape.stored_bytes * self.dense.total
        return RuleResources(mem_mb=_mib(HOST_BASE_BYTES + 2 * stored),
                             runtime=_minutes(0, 1, 2 * stored, self.settings), cpus_per_task=4, execution="cpu")

    def prune(self, params_after: float) -> RuleResources:
        """fp32 surgery: forward passes (re-fit inputs, Gram matrices the cache lacks, the layout search) on
        one GPU, whole or layer by layer with the model in host memory; the float64 solves on the CPU."""
        shape, dense, cfg = self.shape, self.dense, self.params.prune
        h, f, layers = shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers
        gram_host = 4 * (h * h + f * f) * layers if self.params.activations.gram_matrices else 8 * (h * h + f * f)
        solves = 2 * layers * (h**3 + f**3) if cfg.reconstruction != "none" else 0
        layouts = 3 if cfg.attention_unit == "auto" else 1
        calibration_tokens = self.workload.calibration_tokens
        search_tokens = cfg.search_samples * self.params.calibration.seq_len * layouts
        recompute = 0 if self.params.activations.gram_matrices else calibration_tokens
        sequential = calibration_tokens if cfg.reconstruction != "none" and cfg.reconstruction_mode == "sequential" \
            else 0
        forward = self._forward("prune", dense.total, search_tokens + recompute + sequential,
                                self.params.activations.batch_size * self.params.calibration.seq_len,
                                8 * (h * h + f * f), gram_host + shape.stored_bytes * params_after,
                                passes=1 + layouts, pass_tokens=calibration_tokens, weight_bytes=4)
        cpu_minutes = math.ceil(self.settings.runtime_margin * solves / (self.settings.cpu_gflops * 1e9) / 60)
        return dataclasses.replace(forward, runtime=forward.runtime + cpu_minutes, cpus_per_task=8)

    def export_gguf(self, params_after: float) -> RuleResources:
        stored = self.shape.stored_bytes * params_after
        return RuleResources(mem_mb=_mib(HOST_BASE_BYTES + 4 * params_after + stored),
                             runtime=_minutes(0, 1, 3 * stored, self.settings), cpus_per_task=4, execution="cpu")

    # -------------------------------------------------------------------------------------- recovery

    def recover(self, params_after: float) -> RuleResources:
        """Training on N GPUs of one node. Data-parallel (recover.sharding: none): every GPU holds the whole
        teacher and training state, more GPUs (up to the one-GPU time / `RECOVERY_TARGET_MINUTES`, and
        dividing recover.batch_size) only add speed. Sharded (fsdp): each GPU holds 1/N of both plus the
        layers being gathered, N at least what fits."""
        cfg, shape, b, dense = self.params.recover, self.shape, self.weight_bytes, self.dense
        h, f, layers, vocab = shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers, shape.vocab_size
        teacher = b * dense.total if cfg.objective == "distill" else 0
        if cfg.method == "full":
            state = 18 * params_after  # fp32 weights, gradients, 2 AdamW moments + a bf16 autocast copy
            trained, student_bytes = params_after, 4
        else:
            d = shape.head_dim
            widths = {"q_proj": (h, shape.num_attention_heads * d), "k_proj": (h, shape.num_key_value_heads * d),
                      "v_proj": (h, shape.num_key_value_heads * d), "o_proj": (shape.num_attention_heads * d, h),
                      "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}
            trained = cfg.lora_r * layers * sum(sum(widths[m]) for m in cfg.target_modules if m in widths)
            state = b * params_after + 16 * trained
            student_bytes = b
        saved = 16 * trained  # a checkpoint: fp32 weights and 2 AdamW moments + the best validation weights (fp32)
        host_copy = 4 * trained  # the best validation weights, fp32 on the CPU (main process)
        micro_tokens = cfg.micro_batch_size * cfg.cutoff_len
        checkpointing = getattr(cfg, "gradient_checkpointing", False)
        full_per_token = 2 * layers * (10 * h + 4 * f)
        per_token = 2 * layers * h if checkpointing else full_per_token
        logits = 20 * vocab  # student and teacher logits, fp32 loss copies
        activations = micro_tokens * (per_token + logits)
        # FSDP holds whole: the unit running and the next one prefetched (a decoder layer or the
        # embeddings, whichever is larger), the student's head group (accelerate keeps the final norm and
        # head gathered from forward through backward), with full training one unit's fp32 gradients
        # before they are reduce-scattered, and the bf16 autocast copies of the student's weights that
        # autograd keeps for the backward pass (whole, on every GPU); the teacher's root group (embeddings,
        # head) stays gathered through its forward pass next to one layer and the next
        head = dense.lm_head or dense.embedding
        student_layer = (params_after - dense.embedding - dense.lm_head) / layers
        unit = max(student_layer, dense.embedding)
        gathered = student_bytes * (head + 2 * unit) + (4 * unit + 2 * params_after if cfg.method == "full" else 0) \
            + (b * (dense.embedding + dense.lm_head + 2 * dense.layers / layers) if teacher else 0)
        sharded = getattr(cfg, "sharding", "none") == "fsdp"
        usable, most = self.settings.usable_bytes, self.settings.gpus_per_node

        # what FSDP spreads over the GPUs: the teacher and the state without the autocast copy (in `gathered`)
        shared = teacher + state - (2 * params_after if cfg.method == "full" else 0)

        def per_gpu(n: int) -> float:
            if sharded and n > 1:
                return shared / n + activations + gathered
            return teacher + state + activations

        def divides(n: int) -> bool:
            return n == 1 or cfg.batch_size % (cfg.micro_batch_size * n) == 0

        fitting = [n for n in range(1, most + 1) if divides(n) and per_gpu(n) <= usable]
        if not fitting:
            raise ConfigError(self._recovery_does_not_fit(params_after, teacher, state, shared, activations, gathered,
                                                          micro_tokens * (full_per_token - 2 * layers * h)))
        per_token_flops = (6 if cfg.method == "full" else 4) * params_after + (2 * dense.total if teacher else 0)
        flops = per_token_flops * self.workload.train_tokens + 2 * (params_after + (dense.total if teacher else 0)) \
            * self.workload.validation_tokens
        io = shape.stored_bytes * (params_after + dense.total) + saved
        rate = self.settings.gpu_tflops * 1e12
        wanted = max(fitting[0], min(most, math.ceil(_minutes(flops, rate, io, self.settings)
                                                      / RECOVERY_TARGET_MINUTES)))
        gpus = max(n for n in fitting if n <= wanted)
        checkpoint = max(300, math.ceil((saved / (self.settings.storage_gb_per_s * 1e9) + 120) / 60) * 60)
        if sharded and gpus > 1:
            # the main process reads the models (the student cast to fp32 for full training) and gathers the
            # trained one at the end; the others hold placeholders that are never written
            host = gpus * HOST_BASE_BYTES + student_bytes * params_after + b * (dense.total if teacher else 0) \
                + host_copy
            execution = "fsdp"
        else:  # every process loads the bf16 student (and teacher) through host memory
            host = gpus * (HOST_BASE_BYTES + b * (params_after + (dense.total if teacher else 0))) + host_copy
            execution = "data_parallel" if gpus > 1 else "whole_model"
        return RuleResources(
            mem_mb=_mib(host), runtime=_minutes(flops, gpus * rate, io, self.settings),
            cpus_per_task=8 * gpus, gpu=gpus, gpu_mem_mb=_mib(per_gpu(gpus)),
            execution=execution, checkpoint_seconds=checkpoint)

    def _recovery_does_not_fit(self, params_after: float, teacher: float, state: float, shared: float,
                               activations: float, gathered: float, checkpointing_saves: float) -> str:
        """The refusal of a recovery whose teacher, training state and activations exceed its GPUs."""
        cfg = self.params.recover
        usable, most = self.settings.usable_bytes, self.settings.gpus_per_node
        teacher_part = f"teacher {_gib(teacher)} + " if teacher else ""
        held = "teacher and training state" if teacher else "training state"
        spare = usable - activations - gathered  # what one GPU has left for its share of teacher and state
        sharded = getattr(cfg, "sharding", "none") == "fsdp"
        checkpointing = getattr(cfg, "gradient_checkpointing", False)

        def fewest(room: float) -> int | None:
            """The fewest GPUs of one node whose shares fit `room`, recover.batch_size divisible."""
            return next((n for n in range(2, most + 1) if cfg.batch_size % (cfg.micro_batch_size * n) == 0
                         and room > 0 and shared / n <= room), None)

        sharding_hint = []
        if not sharded and fewest(spare):
            sharding_hint = [f"recover.sharding: fsdp (on {fewest(spare)} GPUs)"]
        elif not sharded and not checkpointing and fewest(spare + checkpointing_saves):
            sharding_hint = [f"recover.sharding: fsdp with recover.gradient_checkpointing: true (on "
                             f"{fewest(spare + checkpointing_saves)} GPUs)"]
        allowed = sharding_hint \
            + (["recover.method: lora"] if cfg.method == "full" else []) \
            + (["recover.objective: lm (no teacher)"] if teacher else []) \
            + ([f"recover.gradient_checkpointing: true (saves {_gib(checkpointing_saves)})"]
               if not checkpointing and checkpointing_saves >= GIB else []) \
            + ["GPUs with more memory (--config gpu_memory_gb)", "grid.recovered_criteria: [] (no recovery)"]
        if sharded:
            need = (f"{math.ceil(shared / spare)} GPUs" if spare > 0
                    else "more than any number of GPUs: what each holds whole exceeds one already")
            why = (f"sharded (FSDP), each of N GPUs holds 1/N of {_gib(shared)} ({teacher_part}training state "
                   f"{_gib(state)}{' without its bf16 autocast copy' if cfg.method == 'full' else ''}) + activations "
                   f"{_gib(activations)} + {_gib(gathered)} held whole (gathered layers"
                   f"{', autocast copies' if cfg.method == 'full' else ''}): at {self._budget()} ({_gib(usable)} "
                   f"usable) that needs {need}, more than gpus_per_node={most} (one node) with recover.batch_size a "
                   "multiple of micro_batch_size x N")
        else:
            why = (f"data-parallel (each GPU holds the whole {held}), so every GPU needs "
                   f"{_gib(teacher + state + activations)} ({teacher_part}training state {_gib(state)} + activations "
                   f"{_gib(activations)}), more than {self._budget()} allows ({_gib(usable)} usable)")
        return (f"recover.method={cfg.method!r} is not allowed for {self._model(params_after)} after pruning"
                + (f", {_billions(self.dense.total)} as the teacher" if teacher else "")
                + f": recovery is {why}; allowed: {', '.join(allowed)}")

    # ------------------------------------------------------------------------------------------ rules

    def rule(self, name: str, criterion: str | None = None, ratio: float | None = None) -> RuleResources:
        """The resources of one job of rule `name` (its criterion and ratio where it has them)."""
        after = self.dense.total * (1 - (ratio or 0.0))
        if name == "prepare_model":
            return self.prepare_model()
        if name == "cache_activations":
            return self.cache_activations()
        if name == "score":
            return self.score(criterion or "")
        if name in ("prune", "prune_servable"):
            return self.prune(after)
        if name == "recover":
            return self.recover(after)
        if name == "export_gguf":
            return self.export_gguf(after)
        if name.startswith("evaluate_"):
            return self.evaluate(name, self.dense.total if name == "evaluate_dense" else after)
        fixed = FALLBACK["default"]
        return RuleResources(mem_mb=fixed["mem_mb"], runtime=fixed["runtime"], cpus_per_task=fixed["cpus_per_task"],
                             execution="cpu")


def fallback(name: str, gpu: bool) -> RuleResources:
    """The fixed resources used when the model's config.json cannot be read while planning."""
    fixed = FALLBACK.get(name, FALLBACK["default"])
    return RuleResources(mem_mb=fixed["mem_mb"], runtime=fixed["runtime"], cpus_per_task=fixed["cpus_per_task"],
                         gpu=1 if gpu else 0, execution="fallback")


def plan_resources(derivation: Derivation, jobs: Sequence[tuple[str, Mapping[str, str]]]) -> dict[str, RuleResources]:
    """Resources of every job (rule name, its placeholder values), keyed by instance id
    (`recover/obs/0.2`); every job that cannot fit is reported in one ConfigError."""
    from pruneflow.pipeline.graph import STAGES, instance_id

    found, problems = {}, []
    for name, values in jobs:
        ratio = float(values["ratio"]) if "ratio" in values else None
        try:
            found[instance_id(STAGES[name], values)] = derivation.rule(name, values.get("criterion"), ratio)
        except ConfigError as exc:
            if str(exc) not in problems:
                problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(problems))
    return found


@dataclass
class ClusterPlan:
    """The resources of every job of one pipeline plan, for a cluster executor.

    `derivation` is None when the model's config.json could not be read while planning: every job
    then gets the fixed `FALLBACK` resources and one GPU.
    """

    derivation: Derivation | None
    jobs: dict[str, RuleResources] = field(default_factory=dict)
    reason: str = ""  # why there is no derivation

    @classmethod
    def build(cls, params: Params, root: str | Path, settings: ClusterSettings) -> ClusterPlan:
        """Plan the grid's jobs; a job that cannot fit raises ConfigError (all of them at once)."""
        from pruneflow.errors import PruneflowError
        from pruneflow.pipeline.graph import instances

        try:
            derivation = derivation_for(params, root, settings)
        except (PruneflowError, OSError, ValueError) as exc:
            return cls(None, reason=str(exc).splitlines()[0])
        return cls(derivation, plan_resources(derivation, [(stage.name, values) for stage, values in instances(params)]))

    def job(self, name: str, values: Mapping[str, str]) -> RuleResources:
        """One job's resources (a target outside the grid is derived when asked for)."""
        from pruneflow.pipeline.graph import STAGES, instance_id

        stage = STAGES[name]
        values = {key: values[key] for key in stage.placeholders}
        if self.derivation is None:
            return fallback(name, stage.gpu)
        key = instance_id(stage, values)
        if key not in self.jobs:
            self.jobs.update(plan_resources(self.derivation, [(name, values)]))
        return self.jobs[key]

    def launcher(self, name: str, values: Mapping[str, str]) -> str:
        planned = self.job(name, values)
        return launcher(planned.gpu, planned.checkpoint_seconds)


def launcher(gpus: int, checkpoint_seconds: int = 0) -> str:
    """How a stage's Python module starts: one process, or one per GPU under torchrun.

    torchrun forwards SIGTERM to its workers and kills them `TORCH_ELASTIC_SHUTDOWN_TIMEOUT` seconds
    later (30 by default): that time is raised to the checkpoint's, so the workers can write it.
    """
    if gpus <= 1:
        return "python"
    timeout = f"env TORCH_ELASTIC_SHUTDOWN_TIMEOUT={checkpoint_seconds} " if checkpoint_seconds else ""
    return f"{timeout}torchrun --standalone --nproc_per_node {gpus}"


def slurm_extra(resources: RuleResources) -> str:
    """sbatch flags of a resumable job: SIGTERM to every job step `checkpoint_seconds` before the time
    limit (not `B:`, which signals only the batch shell; the stage runs in an srun step). `--requeue`
    is not among them: the SLURM profile's `slurm-requeue: true` adds it to every job, and only then
    does the plugin wait for a job SLURM requeues after a node failure instead of submitting it again."""
    return f"--signal=TERM@{resources.checkpoint_seconds}" if resources.checkpoint_seconds else ""


# ------------------------------------------------------------------------------------------------ CLI


def derivation_for(params: Params, root: str | Path, settings: ClusterSettings, config: Mapping | None = None,
                   name: str | None = None) -> Derivation:
    """The derivation for a project (data files under `root`): `config` (a config.json's contents, called
    `name` in messages) given, or read from `model.source` without loading weights."""
    from pruneflow.pipeline.graph import STATE_DIR
    from pruneflow.sources import resolve_source, source_config

    root = Path(root)
    if config is None:
        source = resolve_source(params.model.source, base_dir=root)
        config = source_config(source, params.model.revision, cache_dir=root / STATE_DIR)
    where = f"model.source={params.model.source!r}" if name is None else name
    return Derivation(ModelShape.from_config(config, where), params, measure_workload(params, root), settings,
                      source=where)


def table(derivation: Derivation) -> list[dict]:
    """One row per job of the grid (rule, wildcards, resources)."""
    from pruneflow.pipeline.graph import instances

    jobs = [(stage.name, values) for stage, values in instances(derivation.params)]
    planned = plan_resources(derivation, jobs)
    return [{"job": key, **asdict(value)} for key, value in planned.items()]


def main(argv: Sequence[str] | None = None) -> None:
    from pruneflow.config import load_params
    from pruneflow.errors import PruneflowError

    parser = argparse.ArgumentParser(prog="python -m pruneflow.pipeline.resources",
                                     description="Print the cluster resources of every job of the grid.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--config-json", type=Path, default=None,
                        help="a model's config.json (default: model.source's, read without weights)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help=f"cluster settings ({', '.join(CLUSTER_KEYS)})")
    parser.add_argument("--json", action="store_true", help="JSON rows instead of a table")
    args = parser.parse_args(argv)
    try:
        values = {}
        for item in args.set:
            key, _, value = item.partition("=")
            values[key] = float(value) if "." in value else int(value)
        settings = ClusterSettings.from_config(values)
        params = load_params(args.params)
        config = json.loads(args.config_json.read_text()) if args.config_json else None
        derivation = derivation_for(params, Path.cwd(), settings, config,
                                    str(args.config_json) if args.config_json else None)
        rows = table(derivation)
    except (PruneflowError, ValueError) as exc:
        parser.exit(2, f"pruneflow resources: error: {exc}\n")
    count = derivation.dense
    print(f"# {derivation.source}: {count.total:,} parameters (embedding {count.embedding:,}, attention "
          f"{count.attention:,}, mlp {count.mlp:,}, norms {count.norms:,}, lm_head {count.lm_head:,})")
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print("| job | gpu | gpu_mem_mb | mem_mb | runtime (min) | cpus_per_task | execution |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['job']} | {row['gpu']} | {row['gpu_mem_mb']} | {row['mem_mb']} | {row['runtime']} | "
              f"{row['cpus_per_task']} | {row['execution']} |")


if __name__ == "__main__":
    main()

