"""Recovery of a structurally pruned model: next-token loss or distillation, LoRA or every parameter.

`objective: lm` with `method: lora` is LLM-Pruner's post-training: LoRA on every linear layer of the
decoder, Alpaca-format instructions with the Stanford Alpaca prompt. `objective: distill` trains the
pruned student towards the dense teacher's next-token distributions (KL at a temperature, mixed
with the next-token loss), as Minitron recovers its pruned models; plain text (.txt files, cut into
blocks of `cutoff_len` tokens the way transformers' run_clm example groups texts) is its usual data.
Both use AdamW with linear warm-up and linear decay, gradient accumulation up to the effective batch,
gradient clipping at 1.0, and a held-out validation split whose best weights are kept.

Training runs on `transformers.Trainer`, which brings what a hand-written loop would have to copy:
DDP across processes (`torchrun`, `accelerate launch`; gloo on CPUs) or, with `recover.sharding: fsdp`,
FSDP2 through accelerate (each GPU holds 1/N of the weights, gradients and optimizer state; the
teacher is sharded the same way with torch's `fully_shard`), gradient accumulation with
the loss normalised by the label tokens of the whole effective batch on every process
(`average_tokens_across_devices`), gradient checkpointing, and checkpoints that hold the weights,
the optimizer, the scheduler and every process's RNG state, resumed exactly (`resume_from_checkpoint`).
Its seeded sampler orders the data: epoch e is a permutation seeded with `seed + e`, the same on
every process, and each process takes every world_size-th micro-batch of it, so one process with
accumulation and N processes see the same examples in each optimizer step. A subclass adds only the
loss (the distillation objective needs the teacher on the same micro-batch), the schedule
(`learning_rate_at` as a LambdaLR) and autocast (bf16 / fp16 on CUDA around the student, the teacher
and the loss; LoRA adapters stay fp32). Trainer lacks, and callbacks add:

- validation before the first step, every `eval_every_steps` and after the last (token-weighted,
  shared out across processes), and keep-best: the trainable weights are snapshotted when the
  validation loss improves and restored at the end, the untrained model included;
- a history entry per optimizer step (loss, next-token loss, learning rate, gradient norm, epoch,
  tokens) handed to `on_log` (the stage sends it to MLflow; Trainer's own reporting is off);
- a ConfigError naming recover.learning_rate as soon as the loss is not finite;
- a run record (history, best step, best weights) written into every checkpoint, last, so a checkpoint
  counts as complete only when it is there, and a resumed run continues the same history and keep-best;
  the checkpoint's files are fsynced first and the record lists their sizes, and a checkpoint whose
  files do not match is skipped with a warning (an earlier one, or step 0, is resumed instead);
- SIGTERM (a cluster's notice before it kills or requeues a job): a checkpoint at the end of the current
  step, then `TrainingPreempted`; repeated SIGTERMs change nothing; a SIGKILL leaves the last periodic
  checkpoint.

Nothing depends on the layers having equal widths, so pruned models train as they are.

`recover` = (`prepare_lora_model` +) `train_recovery` (+ `merge_lora`); the pieces are public so
tests can compare the un-merged adapter model with the merged one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor
from tqdm import tqdm
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging as hf_logging

from pruneflow.architectures import decoder_layers
from pruneflow.config import RecoverParams
from pruneflow.errors import ConfigError, DataError
from pruneflow.pipeline.atomic import fsync_path
from pruneflow.progress import progress
from pruneflow.text_data import check_instruction_file, check_recovery_suffixes, read_rows

ALPACA_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

IGNORE_INDEX = -100
# transformers.Trainer's default, which LLM-Pruner's post-training ran with.
MAX_GRAD_NORM = 1.0
# in a checkpoint folder of the state folder, next to Trainer's files
RECORD_FILE = "pruneflow_record.json"  # written last: the checkpoint is complete
BEST_WEIGHTS_FILE = "best_trainable.safetensors"
FINGERPRINT_FILE = "fingerprint.txt"  # in the state folder: which run's checkpoints these are
logger = logging.getLogger(__name__)
_COLUMNS = ("instruction", "input", "output")


def alpaca_prompt(instruction: str, input: str = "", output: str | None = None) -> str:
    """The Alpaca prompt; with `output` the full training text (the EOS token is added at tokenization)."""
    if input:
        prompt = ALPACA_TEMPLATE_WITH_INPUT.format(instruction=instruction, input=input)
    else:
        prompt = ALPACA_TEMPLATE_NO_INPUT.format(instruction=instruction)
    return prompt if output is None else prompt + output


# --------------------------------------------------------------------------------------------- data


def _normalise_record(record: Mapping[str, Any]) -> dict[str, str]:
    return {key: record.get(key) or "" for key in _COLUMNS}


def load_instruction_data(
    paths: Sequence[str | Path],
    *,
    val_size: int,
    seed: int,
    max_train_samples: int | None = None,
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Mix the Alpaca JSON files, shuffle with `seed`, split off `val_size` records, cap the train split.

    Returns (train, val) with exactly the string columns instruction, input, output; extra keys
    are dropped and a missing or null input becomes "". The split is a pure function of the files
    and the seed, so every stage and rerun sees the same validation records.
    """
    if not paths:
        raise ConfigError(
            "recover.data=[] is not allowed; allowed: a non-empty list of Alpaca-format JSON files"
        )
    features = datasets.Features({key: datasets.Value("string") for key in _COLUMNS})
    parts = []
    total = 0
    for raw_path in paths:
        path = Path(raw_path)
        total += check_instruction_file(path)
        part = datasets.load_dataset("json", data_files=str(path), split="train")
        part = part.map(
            _normalise_record,
            remove_columns=part.column_names,
            features=features,
            keep_in_memory=True,
            desc=f"reading {path.name}",
        )
        parts.append(part)
    if val_size < 0 or val_size >= total:
        raise ConfigError(
            f"recover.val_size={val_size} is not allowed for {total} instruction records; allowed: "
            f"0 <= val_size <= {total - 1} (at least one record must remain for training)"
        )
    mixed = datasets.concatenate_datasets(parts).shuffle(seed=seed).flatten_indices(keep_in_memory=True)
    val = mixed.select(range(val_size))
    train = mixed.select(range(val_size, total))
    if max_train_samples is not None:
        train = train.select(range(min(max_train_samples, len(train))))
    return train, val


def tokenize_for_training(
    dataset: datasets.Dataset,
    tokenizer: Any,
    *,
    cutoff_len: int,
    train_on_inputs: bool,
) -> datasets.Dataset:
    """Tokenize prompt + output (+ EOS when not truncated) as LLM-Pruner does; labels are list copies.

    With `train_on_inputs=False` the labels of prompt tokens are -100. Prompt tokens are found by
    character offsets of the full text's tokenization (fast tokenizers), so input_ids are the same
    in both modes and a token straddling the prompt/response boundary counts as prompt; slow
    tokenizers fall back to LLM-Pruner's length of the separately tokenized prompt.
    """
    eos = tokenizer.eos_token_id
    use_offsets = not train_on_inputs and bool(getattr(tokenizer, "is_fast", False))

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        prompts = [alpaca_prompt(i, x) for i, x in zip(batch["instruction"], batch["input"], strict=True)]
        texts = [p + o for p, o in zip(prompts, batch["output"], strict=True)]
        encoded = tokenizer(
            texts,
            truncation=True,
            max_length=cutoff_len,
            padding=False,
            return_offsets_mapping=use_offsets,
        )
        prompt_lens: list[int] | None = None
        if not train_on_inputs and not use_offsets:
            prompt_enc = tokenizer(prompts, truncation=True, max_length=cutoff_len, padding=False)
            prompt_lens = [len(ids) for ids in prompt_enc["input_ids"]]
        out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for row, ids in enumerate(encoded["input_ids"]):
            ids = list(ids)
            added_eos = False
            if eos is not None and (not ids or ids[-1] != eos) and len(ids) < cutoff_len:
                ids.append(eos)
                added_eos = True
            labels = list(ids)
            if not train_on_inputs:
                if use_offsets:
                    # The prompt is a prefix: mask up to its last text token (a leading BOS included,
                    # special tokens after the output such as EOS excluded: their offsets are (0, 0)).
                    boundary = len(prompts[row])
                    prompt_tokens = [
                        j
                        for j, (start, end) in enumerate(encoded["offset_mapping"][row])
                        if end > start and start < boundary
                    ]
                    n_prompt = prompt_tokens[-1] + 1 if prompt_tokens else 0
                else:
                    assert prompt_lens is not None
                    n_prompt = min(prompt_lens[row], len(ids) - int(added_eos))
                labels[:n_prompt] = [IGNORE_INDEX] * n_prompt
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(labels)
        return out

    return dataset.map(
        tokenize,
        batched=True,
        batch_size=256,
        remove_columns=dataset.column_names,
        keep_in_memory=True,
        desc="tokenizing",
    )


def _is_tokenized(dataset: datasets.Dataset) -> bool:
    return {"input_ids", "labels"} <= set(dataset.column_names)


def text_blocks(path: str | Path, tokenizer: Any, *, block_len: int) -> datasets.Dataset:
    """A text file as consecutive blocks of exactly `block_len` tokens (labels = inputs).

    transformers' run_clm recipe: tokenize the lines (line breaks kept, no special tokens, as the
    perplexity windows are), concatenate, cut; the last partial block is dropped.
    """
    rows = read_rows(path, "recovery text")
    lines = datasets.Dataset.from_dict({"text": rows})
    tokenized = lines.map(lambda batch: {"ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]},
                          batched=True, batch_size=1000, remove_columns=["text"], keep_in_memory=True,
                          desc=f"tokenizing {Path(path).name}")
    flat = [token for ids in tokenized["ids"] for token in ids]
    n_blocks = len(flat) // block_len
    if n_blocks == 0:
        raise DataError(f"recovery text file {str(path)!r} has {len(flat)} tokens, fewer than one block of "
                        f"recover.cutoff_len={block_len}; allowed: a longer text or a smaller cutoff_len")
    blocks = [flat[i * block_len:(i + 1) * block_len] for i in range(n_blocks)]
    return datasets.Dataset.from_dict(
        {"input_ids": blocks, "attention_mask": [[1] * block_len] * n_blocks, "labels": blocks},
        features=text_blocks_features())


def load_training_data(
    paths: Sequence[str | Path],
    tokenizer: Any,
    *,
    cutoff_len: int,
    train_on_inputs: bool,
    val_size: int,
    seed: int,
    max_train_samples: int | None = None,
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Tokenized (train, val) from Alpaca JSON files and/or text files.

    Instructions alone split exactly as `load_instruction_data` does; with text, every file is
    tokenized (text in blocks of `cutoff_len`), the examples are mixed and shuffled with `seed`, the
    first `val_size` are held out and the train split is capped at `max_train_samples`. Each file's
    content is checked by its loader (`check_instruction_file`, `check_text_file`), once.
    """
    check_recovery_suffixes(paths)

    def tokenize(records: datasets.Dataset) -> datasets.Dataset:
        return tokenize_for_training(records, tokenizer, cutoff_len=cutoff_len, train_on_inputs=train_on_inputs)

    if all(Path(p).suffix == ".json" for p in paths):
        train, val = load_instruction_data(paths, val_size=val_size, seed=seed, max_train_samples=max_train_samples)
        return tokenize(train), tokenize(val)
    parts = []
    for path in paths:
        if Path(path).suffix == ".json":
            records, _ = load_instruction_data([path], val_size=0, seed=seed)
            parts.append(tokenize(records).cast(text_blocks_features()))
        else:
            parts.append(text_blocks(path, tokenizer, block_len=cutoff_len))
    mixed = datasets.concatenate_datasets(parts).shuffle(seed=seed).flatten_indices(keep_in_memory=True)
    if val_size < 0 or val_size >= len(mixed):
        raise ConfigError(
            f"recover.val_size={val_size} is not allowed for {len(mixed)} training examples; allowed: "
            f"0 <= val_size <= {len(mixed) - 1} (at least one example must remain for training)"
        )
    val = mixed.select(range(val_size))
    train = mixed.select(range(val_size, len(mixed)))
    if max_train_samples is not None:
        train = train.select(range(min(max_train_samples, len(train))))
    return train, val


def text_blocks_features() -> datasets.Features:
    return datasets.Features({key: datasets.Sequence(datasets.Value("int64"))
                              for key in ("input_ids", "attention_mask", "labels")})


# ---------------------------------------------------------------------------------------- model


def decoder_linear_names(model: torch.nn.Module) -> dict[str, list[str]]:
    """Leaf name -> full module names of the nn.Linear layers LoRA may target (all but the LM head)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names: dict[str, list[str]] = {}
    for full_name, module in model.named_modules():
        if (
            isinstance(module, torch.nn.Linear)
            and module is not output
            and full_name.split(".")[-1] != "lm_head"
        ):
            names.setdefault(full_name.split(".")[-1], []).append(full_name)
    return names


def _sort_adapter_config(path: Path) -> None:
    """peft writes target_modules from a set (hash order differs per process): sort it for stable bytes."""
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def check_lora_targets(model: torch.nn.Module, params: RecoverParams) -> list[str]:
    """Fail before any training when the targets or the rank do not fit this (pruned) model.

    Returns the full names of the targeted linear layers. The names are the logical projections
    (`q_proj` ... `down_proj`); in a family that stores some of them fused (Phi-3's qkv_proj,
    gate_up_proj) a name targets the fused matrix that holds it.
    """
    from pruneflow.architectures import family_of
    from pruneflow.errors import ModelError

    available = decoder_linear_names(model)
    try:
        stored = family_of(model).lora_modules
    except ModelError:
        stored = {}
    resolved: list[str] = []
    for name in params.target_modules:
        module_name = name if name in available else stored.get(name, name)
        if module_name not in available:
            raise ConfigError(
                f"recover.target_modules contains {name!r}, which is no linear layer of this model "
                f"({type(model).__name__}); allowed: {', '.join(repr(n) for n in sorted(available))}"
            )
        if module_name not in resolved:
            resolved.append(module_name)
    widened = sorted({f"{name} -> {stored[name]}" for name in params.target_modules if name not in available})
    if widened:
        import logging

        logging.getLogger(__name__).info(
            "recover.target_modules on %s: %s (fused matrices: the adapter trains each whole)",
            type(model).__name__, ", ".join(widened))
    targets = [full for name in resolved for full in available[name]]
    if not targets:
        raise ConfigError(
            f"recover.target_modules={list(params.target_modules)!r} selects no layer; allowed: a non-empty "
            f"list of {', '.join(repr(n) for n in sorted(available))}"
        )
    modules = dict(model.named_modules())
    narrowest = min(targets, key=lambda n: min(modules[n].in_features, modules[n].out_features))
    width = min(modules[narrowest].in_features, modules[narrowest].out_features)
    if params.lora_r > width:
        raise ConfigError(
            f"recover.lora_r={params.lora_r} is not allowed for this model; allowed: 1 <= lora_r <= {width} "
            f"(the narrowest targeted layer, {narrowest}, is {modules[narrowest].in_features} -> "
            f"{modules[narrowest].out_features} after pruning)"
        )
    return targets


def prepare_lora_model(
    model: torch.nn.Module,
    params: RecoverParams,
    *,
    seed: int,
    device: torch.device,
) -> torch.nn.Module:
    """Wrap `model` (in place) with float32 LoRA adapters and move it to `device`.

    The base weights keep the dtype they arrive in (a bf16 base trains with fp32 adapters under
    autocast; an fp32 base stays exact and merges without extra rounding). Casting here would also
    round the rotary `inv_freq` buffers of Hugging Face models to bf16.
    """
    from peft import LoraConfig, get_peft_model

    targets = check_lora_targets(model, params)
    model.to(device)
    torch.manual_seed(seed)  # LoRA A is initialised from the global RNG
    config = LoraConfig(
        r=params.lora_r,
        lora_alpha=params.lora_alpha,
        lora_dropout=params.lora_dropout,
        target_modules=targets,  # full names: exactly the layers checked above, never the LM head
        bias="none",
        task_type="CAUSAL_LM",
    )
    # autocast_adapter_dtype keeps the adapters in float32 when the base is bf16/fp16.
    with warnings.catch_warnings():
        # peft asks the deprecated `is_gradient_checkpointing`; the warning is noise for our users
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return peft_model


def merge_lora(peft_model: torch.nn.Module) -> torch.nn.Module:
    """Fold the adapters into the base weights and drop every peft wrapper; returns the base model."""
    merged = peft_model.merge_and_unload(progressbar=False)
    leftovers = [name for name, _ in merged.named_modules() if "lora_" in name.split(".")[-1]]
    if leftovers or hasattr(merged, "peft_config"):
        raise RuntimeError(f"LoRA merge left adapter modules behind: {leftovers[:5]}")
    return merged.eval()


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------- sharding


def _is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP2 holds the weights (DTensor shards): every forward pass is then a collective."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (an all-gather every process takes part in), a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _trainable_copy(model: torch.nn.Module, *, keep: bool) -> dict[str, torch.Tensor] | None:
    """The trainable weights as whole float CPU tensors for the processes that `keep` them. Under FSDP
    every process must call this (each weight is gathered from its shards); otherwise it is local."""
    copies = {}
    for name, p in _trainable(model):
        whole = _whole(p.detach())
        if keep:
            copies[name] = whole.to("cpu", copy=True)
    return copies if keep else None


def _meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The module tree of `model` with every parameter on the meta device (buffers copied): where the
    gathered weights of a sharded model go after training, without holding a second copy before."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _gather_into(sharded: torch.nn.Module, skeleton: torch.nn.Module, *, keep: bool) -> None:
    """Gather every weight of the FSDP2-sharded model into `skeleton` (its `_meta_copy`) on the CPU, in the
    processes that `keep` it; every process must call this. Shared (tied) parameters stay shared."""
    targets = dict(skeleton.named_parameters())
    gathered: dict[int, torch.nn.Parameter] = {}
    for name, p in sharded.named_parameters():
        whole = _whole(p.detach())
        if keep:
            gathered[id(targets[name])] = torch.nn.Parameter(whole.to("cpu", copy=True), requires_grad=p.requires_grad)
    if keep:
        for module in skeleton.modules():
            for key, p in module._parameters.items():
                if p is not None and id(p) in gathered:
                    module._parameters[key] = gathered[id(p)]


def shard_teacher(teacher: torch.nn.Module, *, main: bool) -> torch.nn.Module:
    """Shard the frozen teacher with torch's FSDP2 (`fully_shard`, each decoder layer, then the rest) over
    the processes: each GPU holds 1/N of it, and its forward pass gathers one layer at a time. The weights
    are the main process's, broadcast shard by shard (the others may hold placeholders). Done by hand
    because Trainer prepares only the model it trains."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    whole = teacher.state_dict() if main else {}
    for layer in decoder_layers(teacher):
        fully_shard(layer)
    fully_shard(teacher, reshard_after_forward=True)  # the root (embeddings, head) too: the teacher has no backward
    set_model_state_dict(teacher, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return teacher


# ------------------------------------------------------------------------------------- training


@dataclass
class RecoveryResult:
    """What a recovery run produced; `model` is merged and in eval mode (un-merged from `train_recovery`).

    Under several processes the losses, steps and best step are the same on every process, but only
    the main process's `model` holds the best weights (the others keep the last ones, or with sharding
    the module tree on the meta device, and write nothing).
    """

    model: torch.nn.Module
    history: list[dict] = field(default_factory=list)
    initial_val_loss: float | None = None
    best_val_loss: float | None = None
    best_step: int | None = None
    optimizer_steps: int = 0
    train_examples: int = 0
    seconds: float = 0.0
    teacher_seconds: float = 0.0  # forward passes of the teacher (distillation), within `seconds`
    resumed_from_step: int = 0  # the checkpoint's step this run continued from; 0: trained from the start
    processes: int = 1
    sharded: bool = False  # FSDP held 1/processes of the weights, gradients and optimizer state on each


class TrainingPreempted(Exception):
    """SIGTERM stopped training after its checkpoint was saved; the same command resumes from it."""


@dataclass(frozen=True)
class Distillation:
    """The dense teacher and how its distributions enter the loss (`recover.objective: distill`)."""

    teacher: torch.nn.Module
    temperature: float = 1.0
    weight: float = 1.0  # share of the KL term; 1 - weight goes to the next-token loss


def planned_steps(num_examples: int, params: RecoverParams) -> int:
    """Optimizer steps for `num_epochs` passes at the effective batch, capped by max_steps.

    An epoch is ceil(examples / batch_size) steps, its last one taking the remainder (Trainer's count).
    """
    per_epoch = math.ceil(num_examples / params.batch_size)
    steps = max(1, math.ceil(params.num_epochs * per_epoch))
    return min(steps, params.max_steps) if params.max_steps is not None else steps


def warmup_for(total_steps: int, params: RecoverParams) -> int:
    """`warmup_steps`, but at most 10% of a short run (100 warm-up steps would swallow a 50-step run)."""
    return min(params.warmup_steps, total_steps // 10)


def learning_rate_at(step: int, total_steps: int, warmup: int, base_lr: float) -> float:
    """Linear warm-up then linear decay for 0-based optimizer `step`; never exactly 0 (no wasted step).

    The trainer's scheduler is this function (`LambdaLR` with base_lr 1), so the logged rates are its values.
    """
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return base_lr * (total_steps - step) / max(1, total_steps - warmup)


def pad_batch(features: Sequence[Mapping[str, Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad tokenized examples to the longest one; padded labels are -100 (the trainer's collator)."""
    length = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), length), pad_id, dtype=torch.long)
    lab = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(features), length), dtype=torch.long)
    for i, feature in enumerate(features):
        n = len(feature["input_ids"])
        ids[i, :n] = torch.tensor(feature["input_ids"], dtype=torch.long)
        lab[i, :n] = torch.tensor(feature["labels"], dtype=torch.long)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def _collate(
    rows: Sequence[int],
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Rows of a tokenized dataset (as lists) as one padded micro-batch on `device`."""
    batch = pad_batch([{"input_ids": input_ids[r], "labels": labels[r]} for r in rows], pad_id)
    return {key: value.to(device) for key, value in batch.items()}


def distillation_kl_sum(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * sum over masked positions of KL(teacher || student), both softened by temperature T.

    The T^2 factor (Hinton et al.) keeps the gradient's size independent of T. Computed in float32.
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = F.kl_div(student, teacher, log_target=True, reduction="none").sum(dim=-1)
    return per_position.masked_fill(~mask, 0.0).sum() * temperature**2


def _loss_sums(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], distillation: Distillation | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective, next-token loss), each summed over the label positions (the caller divides by their count).

    Without distillation both are the next-token cross-entropy; with it the objective is
    weight * KL(teacher || student) + (1 - weight) * cross-entropy at the same positions.
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    shifted = model(**inputs).logits[:, :-1, :].float()
    targets = batch["labels"][:, 1:]
    cross_entropy = F.cross_entropy(
        shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    if distillation is None:
        return cross_entropy, cross_entropy
    with torch.no_grad():
        teacher_logits = distillation.teacher(**inputs).logits[:, :-1, :]
    kl = distillation_kl_sum(shifted, teacher_logits, targets != IGNORE_INDEX, distillation.temperature)
    objective = distillation.weight * kl + (1.0 - distillation.weight) * cross_entropy
    return objective, cross_entropy


def _n_targets(batch: Mapping[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on CUDA (trained weights stay fp32); plain precision elsewhere."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------ processes


def world_size() -> int:
    """Processes of this training job: WORLD_SIZE as `torchrun` and `accelerate launch` set it, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_sharded_run(params: RecoverParams) -> bool:
    """Whether this training job shards the models (FSDP): `recover.sharding: fsdp` under several processes;
    with one process the setting has no effect."""
    return params.sharding == "fsdp" and world_size() > 1


def is_main_process() -> bool:
    """The process that writes outputs (global rank 0); every process of a single-process run."""
    return int(os.environ.get("RANK", "0")) == 0


def process_device(device: torch.device) -> torch.device:
    """The GPU of this process under a launcher (cuda:LOCAL_RANK), else `device` unchanged."""
    if device.type == "cuda" and world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _in_process_group() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if _in_process_group():
        dist.barrier()


@torch.no_grad()
def evaluate_losses(
    model: torch.nn.Module,
    dataset: datasets.Dataset,
    *,
    micro_batch_size: int,
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype,
    distillation: Distillation | None = None,
    across_processes: bool = False,
) -> tuple[float, float]:
    """Token-weighted mean (objective, next-token loss) over a tokenized dataset, in eval mode.

    With `across_processes` inside a process group each process evaluates every world_size-th
    micro-batch and the sums are added up (all-reduce): the same micro-batches as one process, and the
    same result on every process, for a share of the work. A sharded (FSDP) model's forward pass is a
    collective, so there every process runs as many passes: one short of a share repeats its first
    micro-batch and leaves it out of the sums.
    """
    was_training = model.training
    model.eval()
    input_ids, labels = dataset["input_ids"][:], dataset["labels"][:]  # plain lists: fast row access
    rank, size = (dist.get_rank(), dist.get_world_size()) if across_processes and _in_process_group() else (0, 1)
    all_starts = range(0, len(input_ids), micro_batch_size)
    starts: list[int | None] = list(all_starts[rank::size])
    if size > 1 and _is_sharded(model):
        starts += [None] * (math.ceil(len(all_starts) / size) - len(starts))
    objective, cross_entropy, count = 0.0, 0.0, 0
    try:
        for start in starts:
            first = start if start is not None else 0
            rows = range(first, min(first + micro_batch_size, len(input_ids)))
            batch = _collate(rows, input_ids, labels, pad_id, device)
            with _autocast(device, dtype):
                sums = _loss_sums(model, batch, distillation)
            if start is None:  # a pass for the collective only
                continue
            objective += float(sums[0])
            cross_entropy += float(sums[1])
            count += _n_targets(batch)
    finally:
        model.train(was_training)
    if size > 1:
        totals = torch.tensor([objective, cross_entropy, count], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        objective, cross_entropy, count = totals[0].item(), totals[1].item(), int(totals[2].item())
    if not count:
        return float("nan"), float("nan")
    return objective / count, cross_entropy / count


def evaluate_loss(model: torch.nn.Module, dataset: datasets.Dataset, **kwargs) -> float:
    """Token-weighted mean objective over a tokenized dataset (next-token loss without distillation)."""
    return evaluate_losses(model, dataset, **kwargs)[0]


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


class _TimedTeacher(torch.nn.Module):
    """Wraps the teacher to add up the seconds of its forward passes (the cost distillation adds)."""

    def __init__(self, teacher: torch.nn.Module):
        super().__init__()
        self.teacher = teacher
        self.seconds = 0.0

    def forward(self, **kwargs):
        started = time.perf_counter()
        try:
            return self.teacher(**kwargs)
        finally:
            if next(self.teacher.parameters()).device.type == "cuda":
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - started


def prepare_teacher(teacher: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The dense model, frozen and in eval mode on the training device."""
    teacher.to(device).eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def _check_vocabularies(model: torch.nn.Module, teacher: torch.nn.Module) -> None:
    student_vocab = model.get_output_embeddings().weight.shape[0]
    teacher_vocab = teacher.get_output_embeddings().weight.shape[0]
    if student_vocab != teacher_vocab:
        raise ConfigError(
            f"recover.objective='distill' needs the teacher's vocabulary: the teacher has {teacher_vocab} "
            f"tokens, the pruned model {student_vocab}; allowed: the dense model the pruned one came from"
        )


# ------------------------------------------------------------------------------- the trainer


class _RecoveryTrainer(Trainer):
    """Trainer with pruneflow's loss, schedule and autocast; batches, accumulation, DDP, clipping,
    checkpoints and resume are Trainer's own."""

    # compute_loss divides by the label tokens of the whole effective batch (all micro-batches, all processes)
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, distillation: Distillation | None, autocast_dtype: torch.dtype, warmup: int,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.distillation = distillation
        self.autocast_dtype = autocast_dtype
        self.warmup = warmup
        self._step_lm_loss: torch.Tensor | float = 0.0
        self._step_tokens = 0

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is None:
            total, warmup = num_training_steps, self.warmup
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer, lambda step: learning_rate_at(step, total, warmup, 1.0))
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True) -> contextlib.AbstractContextManager:
        return _autocast(self.args.device, self.autocast_dtype)  # the student, the teacher and the loss

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device):
        """One optimizer step's micro-batches and the label tokens of the effective batch (every process)."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        counts = torch.tensor([sum(_n_targets(b) for b in batches), sum(int(b["attention_mask"].sum()) for b in batches)],
                              device=device)
        if self.args.world_size > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        self._step_tokens = int(counts[1])
        return batches, max(1, int(counts[0]))

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: int | None = None):
        objective, cross_entropy = _loss_sums(model, inputs, self.distillation)
        # DDP averages the processes' gradients, so each process's sum counts world_size times
        scale = self.args.world_size / (num_items_in_batch or max(1, _n_targets(inputs)))
        self._step_lm_loss = self._step_lm_loss + cross_entropy.detach() * scale
        loss = objective * scale
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training step: add its next-token loss (distillation) and tokens
            lm_loss = torch.as_tensor(self._step_lm_loss, device=self.args.device).reshape(1)
            if self.args.world_size > 1:
                lm_loss = self.accelerator.gather(lm_loss)
            if self.distillation is not None:
                logs["lm_loss"] = float(lm_loss.mean())
            logs["tokens"] = self._step_tokens
            self._step_lm_loss = 0.0
        super().log(logs, start_time)


@dataclass
class _RunRecord:
    """What the callbacks learn while training; every checkpoint stores it, so a resumed run continues it."""

    history: list[dict] = field(default_factory=list)
    initial_val_loss: float | None = None
    best_val_loss: float | None = None
    best_step: int | None = None
    best_weights: dict[str, torch.Tensor] | None = None  # trainable tensors on the CPU, main process only

    def add(self, entry: dict, on_log: Callable[[dict], None] | None) -> None:
        self.history.append(entry)
        if on_log is not None:
            on_log(entry)

    def save(self, folder: Path, fingerprint: str) -> None:
        """Best weights, then the record itself (written last, by rename: it marks the checkpoint complete).

        Every file of the checkpoint (Trainer's, of every process on this node) is fsynced before the record
        is written, and the record lists their sizes: without that, a node failure can leave a record on
        disk whose files never got there (empty or short), and resuming from it fails."""
        if self.best_weights is not None:
            save_file(self.best_weights, str(folder / BEST_WEIGHTS_FILE))
        files = _checkpoint_files(folder)
        for name in files:
            fsync_path(folder / name, best_effort=False)
        for subfolder in sorted({(folder / name).parent for name in files}):
            fsync_path(subfolder, best_effort=False)
        summary = {"fingerprint": fingerprint, "history": self.history, "initial_val_loss": self.initial_val_loss,
                   "best_val_loss": self.best_val_loss, "best_step": self.best_step, "files": files}
        partial = folder / f"{RECORD_FILE}.partial"
        with partial.open("w") as handle:
            handle.write(json.dumps(summary, indent=1) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, folder / RECORD_FILE)
        fsync_path(folder, best_effort=False)  # the rename
        fsync_path(folder.parent, best_effort=False)  # the checkpoint folder's own entry

    @classmethod
    def load(cls, folder: Path, *, weights: bool) -> _RunRecord:
        saved = json.loads((folder / RECORD_FILE).read_text())
        best = folder / BEST_WEIGHTS_FILE
        return cls(history=saved["history"], initial_val_loss=saved["initial_val_loss"],
                   best_val_loss=saved["best_val_loss"], best_step=saved["best_step"],
                   best_weights=load_file(str(best)) if weights and best.is_file() else None)


class _StepLog(TrainerCallback):
    """Trainer's per-step logs as history entries (and to `on_log`); a non-finite loss stops training."""

    def __init__(self, record: _RunRecord, on_log: Callable[[dict], None] | None, learning_rate: float) -> None:
        self.record, self.report, self.learning_rate = record, on_log, learning_rate

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        entry = {"step": state.global_step, "loss": logs["loss"],
                 **({"lm_loss": logs["lm_loss"]} if "lm_loss" in logs else {}),
                 "learning_rate": logs["learning_rate"], "grad_norm": logs.get("grad_norm"),
                 "epoch": logs["epoch"], "tokens": logs["tokens"]}
        self.record.add(entry, self.report)
        if not math.isfinite(entry["loss"]):
            raise ConfigError(
                f"recover.learning_rate={self.learning_rate} made training diverge (non-finite loss at step "
                f"{state.global_step}); allowed: a smaller learning rate")


class _KeepBest(TrainerCallback):
    """Validation before the first step, every `every` steps and after the last; the best weights kept.

    The untrained model counts: if training only hurts, its weights are the ones restored at the end.
    """

    def __init__(self, record: _RunRecord, on_log: Callable[[dict], None] | None,
                 validate: Callable[[torch.nn.Module], tuple[float, float]], *, every: int, distill: bool,
                 keep_weights: bool) -> None:
        self.record, self.report, self.validate = record, on_log, validate
        self.every, self.distill, self.keep_weights = every, distill, keep_weights

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0 and self.record.initial_val_loss is None:
            self._validate(model, 0)
            self.record.initial_val_loss = self.record.best_val_loss

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        step = state.global_step
        if logs and "loss" in logs and (step % self.every == 0 or step == state.max_steps):
            self._validate(model, step)

    def _validate(self, model: torch.nn.Module, step: int) -> None:
        loss, lm_loss = self.validate(model)
        self.record.add({"step": step, "val_loss": loss, **({"val_lm_loss": lm_loss} if self.distill else {})},
                        self.report)
        if self.record.best_val_loss is None or loss < self.record.best_val_loss:
            self.record.best_val_loss, self.record.best_step = loss, step
            if self.keep_weights or _is_sharded(model):  # a sharded model is gathered by every process
                self.record.best_weights = _trainable_copy(model, keep=self.keep_weights)


class _SaveRecord(TrainerCallback):
    """Completes each checkpoint Trainer saves with the run record; older checkpoints are then removed."""

    def __init__(self, record: _RunRecord, fingerprint: str) -> None:
        self.record, self.fingerprint = record, fingerprint

    def on_save(self, args, state, control, **kwargs):
        _barrier()  # every process has written its part (its RNG state)
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            self.record.save(folder, self.fingerprint)
            for other in Path(args.output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
                if other != folder:
                    shutil.rmtree(other, ignore_errors=True)
        _barrier()


class _StopOnSigterm(TrainerCallback):
    """SIGTERM (a cluster's notice before it kills or requeues a job): save at the end of this step, stop.

    Every process must stop after the same step, so under several processes the flag is all-reduced
    at each step's end (one small collective per step). After the last step there is nothing to resume:
    no checkpoint is saved (the output comes next) and a SIGTERM then lets the run finish. (Trainer
    resumed from a checkpoint at max_steps would also train one step more.)

    A repeated SIGTERM changes nothing, however late: SLURM's `--signal=TERM@S` (without `B:`) signals
    every process of the job step, so each torchrun worker gets it directly and again from torchrun a
    moment later, and the time limit S seconds on sends another while a large checkpoint may still be
    being written. Killing the process on a repeat would lose the very save the notice asks for, and no
    delay separates a forwarded copy from an impatient sender reliably. The deadline is the SIGKILL that
    follows (SLURM's KillWait, torchrun's shutdown timeout); SIGINT (Ctrl-C) still stops at once.
    """

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: int | None = None
        self._previous: Any = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: Any) -> None:
        # acted on at the step's end (no logging here: a handler may interrupt it); a repeat changes nothing
        self.requested = True

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = False
            return
        requested = self.requested
        if args.world_size > 1:
            flag = torch.tensor([int(requested)], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            requested = bool(flag.item())
        if requested:
            logger.info("SIGTERM: saving a checkpoint after step %d, then stopping", state.global_step)
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step


class _ProgressBar(TrainerCallback):
    """The console's progress bar (main process) with each step's loss and learning rate."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label, self.enabled = label, enabled
        self.bar: tqdm | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.enabled and state.is_world_process_zero:
            self.bar = progress(desc=self.label, total=state.max_steps, unit="step", initial=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.update(state.global_step - self.bar.n)
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['learning_rate']:.2e}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextlib.contextmanager
def _without_transformers_bars() -> Iterator[None]:
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


# ------------------------------------------------------------------------------- state folder


def _checkpoint_step(folder: Path) -> int:
    return int(folder.name.rsplit("-", 1)[1])


def _complete_checkpoints(state_dir: Path) -> list[Path]:
    """Checkpoints whose run record was written (the last file of a save), oldest first."""
    found = [p for p in state_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if (p / RECORD_FILE).is_file()]
    return sorted(found, key=_checkpoint_step)


def _checkpoint_files(folder: Path) -> dict[str, int]:
    """Every file of a checkpoint but its run record, by path relative to the folder: its size in bytes."""
    return {path.relative_to(folder).as_posix(): path.stat().st_size for path in sorted(folder.rglob("*"))
            if path.is_file() and not path.name.startswith(RECORD_FILE)}


def _check_checkpoint(folder: Path) -> None:
    """Raise ValueError (OSError where a file cannot be looked at) when a complete checkpoint cannot be
    resumed: its run record unreadable, or a file the record lists missing or of another size (what a
    node failure during or after a save leaves).

    Trainer would load a short file with an error on every rerun, and skip a missing optimizer or RNG
    file silently (resuming inexactly). A record without the list (an earlier version's) is trusted."""
    try:
        saved = json.loads((folder / RECORD_FILE).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{RECORD_FILE} is unreadable: {error}") from error
    keys = ("fingerprint", "history", "initial_val_loss", "best_val_loss", "best_step")
    if not isinstance(saved, dict) or any(key not in saved for key in keys):
        raise ValueError(f"{RECORD_FILE} lacks some of {', '.join(keys)}")
    files = saved.get("files", {})
    if not isinstance(files, dict):
        raise ValueError(f"{RECORD_FILE} lists its files as {type(files).__name__}, not a mapping")
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{name} is missing")
        if path.stat().st_size != size:
            raise ValueError(f"{name} has {path.stat().st_size} bytes, {size} were saved")


def _resumable_checkpoint(state_dir: Path) -> Path | None:
    """The newest complete checkpoint that passes `_check_checkpoint`; each newer one that fails is named in a
    warning with its error and the checkpoint (or step 0) training falls back to."""
    failed: list[tuple[Path, Exception]] = []
    chosen = None
    for folder in reversed(_complete_checkpoints(state_dir)):
        try:
            _check_checkpoint(folder)
        except (OSError, ValueError) as error:
            failed.append((folder, error))
            continue
        chosen = folder
        break
    for folder, error in failed:
        logger.warning("checkpoint %s cannot be resumed (%s): %s", folder, error,
                       f"resuming from {chosen.name} instead" if chosen is not None else "training from step 0")
    return chosen


def _open_state_dir(state_dir: Path, fingerprint: str) -> Path | None:
    """Make `state_dir` hold this run's checkpoints; the last complete one to resume from, or None.

    The main process starts it fresh (and says why) when it is missing or another run's (another
    fingerprint), and keeps only the checkpoint to resume from: incomplete ones (a save that was killed)
    and damaged ones (`_resumable_checkpoint`) are removed, their run record first, so that no process
    takes them for complete; the others wait for it.
    """
    if is_main_process():
        stamp = state_dir / FINGERPRINT_FILE
        previous = stamp.read_text().strip() if stamp.is_file() else None
        if state_dir.exists() and previous != fingerprint:
            logger.info("state folder %s was written by other settings or inputs (fingerprint %s, now %s): "
                        "starting fresh", state_dir, previous, fingerprint)
            shutil.rmtree(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        stamp.write_text(fingerprint + "\n")
        resumable = _resumable_checkpoint(state_dir)
        for folder in state_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
            if folder != resumable and folder.is_dir():
                (folder / RECORD_FILE).unlink(missing_ok=True)
                shutil.rmtree(folder, ignore_errors=True)
    _barrier()
    complete = _complete_checkpoints(state_dir)
    return complete[-1] if complete else None


def run_fingerprint(params: RecoverParams, *, seed: int, processes: int, inputs: Mapping[str, Any],
                    train_examples: int, val_examples: int) -> str:
    """A hash of what a training run depends on: a state folder is resumed only by the run that wrote it."""
    described = {"recover": dataclasses.asdict(params), "seed": seed, "processes": processes,
                 "train_examples": train_examples, "val_examples": val_examples, "inputs": inputs}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _training_arguments(params: RecoverParams, *, output_dir: Path, total_steps: int, seed: int,
                        device: torch.device, dtype: torch.dtype, checkpoints: bool,
                        shard_layers: Sequence[str] = ()) -> TrainingArguments:
    """TrainingArguments for pruneflow's recipe: AdamW(0.9, 0.999, 1e-8, no decay), clipping at 1.0, a log
    entry every step, no Trainer evaluation (the callbacks validate), no reporting integrations.

    `shard_layers` (decoder layer class names) turns on FSDP2: each of those layers is one sharded unit,
    checkpoints are sharded (every process writes its part), and gradient checkpointing stays
    transformers' own, which keeps the parameter names the best weights are stored under."""
    processes = world_size()
    fsdp = {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": list(shard_layers),
                                          "state_dict_type": "SHARDED_STATE_DICT", "reshard_after_forward": True,
                                          # FSDP's own checkpoint wrapper renames the parameters (an FSDP
                                          # launch config could switch it on through the environment)
                                          "activation_checkpointing": False,
                                          # the main process's weights are broadcast (the others may hold
                                          # placeholders: checkpoint.placeholder_model)
                                          "cpu_ram_efficient_loading": True}
            } if shard_layers else {}
    save_every = params.save_every_steps or params.eval_every_steps
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=params.micro_batch_size,
        gradient_accumulation_steps=params.batch_size // (params.micro_batch_size * processes),
        max_steps=total_steps,
        learning_rate=params.learning_rate,
        optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM,
        logging_strategy="steps", logging_steps=1, logging_nan_inf_filter=False,
        eval_strategy="no",
        save_strategy="steps" if checkpoints else "no", save_steps=save_every, save_total_limit=None,
        seed=seed, data_seed=seed,
        use_cpu=device.type == "cpu",
        fp16=device.type == "cuda" and dtype == torch.float16,  # Trainer's loss scaler; autocast is ours
        dataloader_pin_memory=device.type == "cuda",
        remove_unused_columns=False,
        ddp_backend="gloo" if device.type == "cpu" and processes > 1 else None,
        ddp_find_unused_parameters=False,
        average_tokens_across_devices=True,
        activation_checkpointing=params.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if params.gradient_checkpointing else None,
        report_to="none",
        disable_tqdm=True,
        **fsdp,
    )


def train_recovery(
    model: torch.nn.Module,
    tokenizer: Any,
    train_dataset: datasets.Dataset,
    val_dataset: datasets.Dataset | None,
    params: RecoverParams,
    *,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    teacher: torch.nn.Module | None = None,
    on_log: Callable[[dict], None] | None = None,
    progress: bool = True,
    state_dir: str | Path | None = None,
    inputs: Mapping[str, Any] | None = None,
) -> RecoveryResult:
    """Train `model` as `params` say; the result's model is un-merged (peft) for LoRA, best weights loaded.

    `teacher` (the dense model) is required for `objective: distill`. Datasets may be raw Alpaca
    records or already tokenized (input_ids, labels). With `method: full` every parameter trains in
    float32 (bf16 autocast on GPU) and the model is returned in the dtype it came in.

    With `state_dir` a checkpoint is saved there every `save_every_steps` and on SIGTERM (then
    `TrainingPreempted` is raised); a later call with the same settings, data and `inputs` (what the
    caller loaded the models from) resumes from the last complete checkpoint, any other starts fresh.
    Under `torchrun` / `accelerate launch` every process calls this; the effective batch is
    micro_batch_size x accumulation x processes = `batch_size`.
    """
    started = time.perf_counter()
    distill = params.objective == "distill"
    if distill and teacher is None:
        raise ConfigError("recover.objective='distill' needs the dense teacher model; none was given")
    if params.method == "lora":
        check_lora_targets(model, params)
    processes = world_size()
    if params.batch_size % (params.micro_batch_size * processes):
        raise ConfigError(
            f"recover.batch_size={params.batch_size} is not allowed with {processes} processes; allowed: a multiple "
            f"of recover.micro_batch_size x processes = {params.micro_batch_size * processes}")
    if len(train_dataset) == 0:
        raise DataError("the recovery training split is empty; check recover.data and recover.max_train_samples")
    if not _is_tokenized(train_dataset):
        train_dataset = tokenize_for_training(
            train_dataset, tokenizer, cutoff_len=params.cutoff_len, train_on_inputs=params.train_on_inputs
        )
    if val_dataset is not None and len(val_dataset) and not _is_tokenized(val_dataset):
        val_dataset = tokenize_for_training(
            val_dataset, tokenizer, cutoff_len=params.cutoff_len, train_on_inputs=params.train_on_inputs
        )
    has_val = val_dataset is not None and len(val_dataset) > 0
    sharded = is_sharded_run(params)
    pad_id = _pad_id(tokenizer)
    n_examples = len(train_dataset)
    total_steps = planned_steps(n_examples, params)
    main = is_main_process()

    with contextlib.ExitStack() as stack:
        output_dir = (Path(state_dir) if state_dir is not None
                      else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pruneflow-recover-"))))
        shard_layers = sorted({type(layer).__name__ for layer in decoder_layers(model)}) if sharded else []
        args = _training_arguments(params, output_dir=output_dir, total_steps=total_steps, seed=seed, device=device,
                                   dtype=dtype, checkpoints=state_dir is not None, shard_layers=shard_layers)
        if device.type == "cuda" and device.index not in (None, args.device.index):
            logger.warning("Trainer trains on %s, not %s: in one process it takes the first visible GPU; choose it "
                           "with CUDA_VISIBLE_DEVICES", args.device, device)
        device = args.device  # cuda:LOCAL_RANK under a launcher
        fingerprint = run_fingerprint(params, seed=seed, processes=processes, inputs=dict(inputs or {}),
                                      train_examples=n_examples, val_examples=len(val_dataset) if has_val else 0)
        resume = _open_state_dir(output_dir, fingerprint) if state_dir is not None else None

        distillation = None
        if distill:
            assert teacher is not None
            _check_vocabularies(model, teacher)
            # sharded: the weights stay where they were loaded (host memory) until FSDP moves each shard there
            frozen = prepare_teacher(teacher, _device_of(teacher) if sharded else device)
            distillation = Distillation(_TimedTeacher(frozen), temperature=float(params.distill_temperature),
                                        weight=float(params.distill_weight))
        placed = _device_of(model) if sharded else device
        if params.method == "lora":
            trained_model = prepare_lora_model(model, params, seed=seed, device=placed)
            original_dtype = None
        else:
            original_dtype = next(model.parameters()).dtype
            trained_model = model.to(device=placed, dtype=torch.float32)
            for param in trained_model.parameters():
                param.requires_grad_(True)
        # where the gathered weights go after sharded training: the module tree, no second copy of the weights
        skeleton = _meta_copy(trained_model) if sharded else None
        progress_bar = _ProgressBar(
            f"{'LoRA' if params.method == 'lora' else 'full'} {'distillation' if distill else 'recovery'}", progress)
        preemption = _StopOnSigterm()
        try:
            record = _RunRecord.load(resume, weights=main) if resume is not None else _RunRecord()
            if resume is not None:
                logger.info("resuming from %s (step %d of %d)", resume, _checkpoint_step(resume), total_steps)
                for entry in record.history:  # the whole curve reaches `on_log` (a new MLflow run) again
                    if on_log is not None:
                        on_log(entry)

            def validate(module: torch.nn.Module) -> tuple[float, float]:
                assert val_dataset is not None
                return evaluate_losses(module, val_dataset, micro_batch_size=params.micro_batch_size, pad_id=pad_id,
                                       device=device, dtype=dtype, distillation=distillation, across_processes=True)

            callbacks: list[TrainerCallback] = [_StepLog(record, on_log, params.learning_rate)]
            if has_val:
                callbacks.append(_KeepBest(record, on_log, validate, every=params.eval_every_steps, distill=distill,
                                           keep_weights=main))
            callbacks += [_SaveRecord(record, fingerprint), preemption, progress_bar]
            trainer = _RecoveryTrainer(
                model=trained_model, args=args, train_dataset=train_dataset,
                data_collator=functools.partial(pad_batch, pad_id=pad_id), callbacks=callbacks,
                distillation=distillation, autocast_dtype=dtype, warmup=warmup_for(total_steps, params))
            trainer.remove_callback(PrinterCallback)
            if sharded and not trainer.is_fsdp_enabled:  # accelerate shards across GPUs (and the like) only
                raise ConfigError(f"recover.sharding={params.sharding!r} is not allowed on {args.device.type} "
                                  f"processes: accelerate runs FSDP on GPUs only; allowed: 'none' (data-parallel)")
            if trainer.is_fsdp_enabled and not sharded:
                raise ConfigError(f"recover.sharding={params.sharding!r} is not allowed with an FSDP launch "
                                  f"(accelerate's FSDP settings, {processes} processes); allowed: 'fsdp' with several "
                                  "processes, or a launch without FSDP")
            if sharded and distillation is not None:
                shard_teacher(distillation.teacher.teacher, main=main)
            if state_dir is not None:
                preemption.install()
            try:
                with _without_transformers_bars():  # a "Writing model shards" bar per checkpoint is noise
                    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
                if sharded and preemption.stopped_at is None:  # the whole trained model in the main process
                    assert skeleton is not None and _is_sharded(trained_model), "FSDP left the weights whole"
                    _gather_into(trained_model, skeleton, keep=main)
                    trained_model = skeleton
                trainer.accelerator.free_memory()  # drop the optimizer state before the caller merges and saves
            finally:
                preemption.uninstall()
                progress_bar.close()
                if params.gradient_checkpointing:  # hand the model back as it came: no checkpointing, no hooks
                    trained_model.activation_checkpointing_disable()
                    if hasattr(trained_model, "_require_grads_hook"):  # set with checkpointing, for LoRA's inputs
                        trained_model.disable_input_require_grads()
            if preemption.stopped_at is not None:
                raise TrainingPreempted(
                    f"SIGTERM: training stopped after step {preemption.stopped_at} of {total_steps} with a checkpoint "
                    f"in {output_dir}; run the same command again to resume")
            trainable = _trainable(trained_model)
            if record.best_weights is not None:
                with torch.no_grad():
                    for name, p in trainable:
                        p.copy_(record.best_weights[name].to(p.device))
            if main and not all(bool(torch.isfinite(p).all()) for _, p in trainable):
                raise ConfigError(
                    f"recover.learning_rate={params.learning_rate} made training diverge (non-finite weights); "
                    "allowed: a smaller learning rate")
        except BaseException:
            # Leave the caller's model as it came in: strip the adapters without merging them.
            if params.method == "lora":
                with contextlib.suppress(Exception):
                    trained_model.unload()
            raise
    trained_model.eval()
    if original_dtype is not None:
        trained_model.to(dtype=original_dtype)
    return RecoveryResult(
        model=trained_model,
        history=record.history,
        initial_val_loss=record.initial_val_loss,
        best_val_loss=record.best_val_loss,
        best_step=record.best_step,
        optimizer_steps=total_steps,
        train_examples=n_examples,
        seconds=time.perf_counter() - started,
        teacher_seconds=distillation.teacher.seconds if distillation is not None else 0.0,
        resumed_from_step=_checkpoint_step(resume) if resume is not None else 0,
        processes=processes,
        sharded=sharded,
    )


def recover(
    model: torch.nn.Module,
    tokenizer: Any,
    train_dataset: datasets.Dataset,
    val_dataset: datasets.Dataset | None,
    params: RecoverParams,
    *,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    teacher: torch.nn.Module | None = None,
    on_log: Callable[[dict], None] | None = None,
    progress: bool = True,
    adapter_dir: str | Path | None = None,
    state_dir: str | Path | None = None,
    inputs: Mapping[str, Any] | None = None,
) -> RecoveryResult:
    """Train the pruned model, keep the best validation weights, merge LoRA: a plain model of the input class.

    With LoRA and `adapter_dir`, the best adapter is also saved there (peft format, safetensors)
    before the merge, so it can be shared or re-applied without the merged weights. `state_dir` and
    `inputs`: checkpoints, resume and SIGTERM as in `train_recovery`.

    The result keeps every per-layer width, is in eval mode, has no peft wrappers (so the base
    class's `save_pretrained` works) and its parameters keep their original `requires_grad` flags.
    """
    started = time.perf_counter()
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    result = train_recovery(
        model,
        tokenizer,
        train_dataset,
        val_dataset,
        params,
        seed=seed,
        device=device,
        dtype=dtype,
        teacher=teacher,
        on_log=on_log,
        progress=progress,
        state_dir=state_dir,
        inputs=inputs,
    )
    if params.method == "lora":
        if adapter_dir is not None:
            result.model.save_pretrained(str(adapter_dir))
            _sort_adapter_config(Path(adapter_dir) / "adapter_config.json")
        result.model = merge_lora(result.model)
    for name, p in result.model.named_parameters():
        p.requires_grad_(requires_grad.get(name, True))
    result.seconds = time.perf_counter() - started
    return result
