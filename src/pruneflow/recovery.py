"""Recovery of a structurally pruned model: next-token loss or distillation, LoRA or every parameter.

`objective: lm` with `method: lora` is LLM-Pruner's post-training: LoRA on every linear layer of the
decoder, Alpaca-format instructions with the Stanford Alpaca prompt. `objective: distill` trains the
pruned student towards the dense teacher's next-token distributions (KL at a temperature, mixed
with the next-token loss), as Minitron recovers its pruned models; plain text (.txt files, cut into
blocks of `cutoff_len` tokens the way transformers' run_clm example groups texts) is its usual data.
Both use AdamW with linear warm-up and linear decay, gradient accumulation up to the effective batch,
and a held-out validation split whose best weights are kept. The loop is written out here (no
`transformers.Trainer`) because it must be deterministic on CPU, run a second (teacher) model on
every micro-batch, work on models whose layers have different widths after pruning, and report every
optimizer step to a callback (MLflow).

`recover` = (`prepare_lora_model` +) `train_recovery` (+ `merge_lora`); the pieces are public so
tests can compare the un-merged adapter model with the merged one.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pruneflow.config import RecoverParams
from pruneflow.errors import ConfigError, DataError
from pruneflow.progress import progress_stream
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


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------- training


@dataclass
class RecoveryResult:
    """What a recovery run produced; `model` is merged and in eval mode (un-merged from `train_recovery`)."""

    model: torch.nn.Module
    history: list[dict] = field(default_factory=list)
    initial_val_loss: float | None = None
    best_val_loss: float | None = None
    best_step: int | None = None
    optimizer_steps: int = 0
    train_examples: int = 0
    seconds: float = 0.0
    teacher_seconds: float = 0.0  # forward passes of the teacher (distillation), within `seconds`


@dataclass(frozen=True)
class Distillation:
    """The dense teacher and how its distributions enter the loss (`recover.objective: distill`)."""

    teacher: torch.nn.Module
    temperature: float = 1.0
    weight: float = 1.0  # share of the KL term; 1 - weight goes to the next-token loss


def planned_steps(num_examples: int, params: RecoverParams) -> int:
    """Optimizer steps for `num_epochs` passes over the data at the effective batch, capped by max_steps."""
    steps = max(1, math.ceil(params.num_epochs * num_examples / params.batch_size))
    return min(steps, params.max_steps) if params.max_steps is not None else steps


def warmup_for(total_steps: int, params: RecoverParams) -> int:
    """`warmup_steps`, but at most 10% of a short run (100 warm-up steps would swallow a 50-step run)."""
    return min(params.warmup_steps, total_steps // 10)


def learning_rate_at(step: int, total_steps: int, warmup: int, base_lr: float) -> float:
    """Linear warm-up then linear decay for 0-based optimizer `step`; never exactly 0 (no wasted step)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return base_lr * (total_steps - step) / max(1, total_steps - warmup)


def _example_stream(num_examples: int, seed: int) -> Iterator[tuple[int, int]]:
    """Yield (epoch, index) forever: a fresh seeded permutation per epoch, no sorting by length."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    epoch = 0
    while True:
        for index in torch.randperm(num_examples, generator=generator).tolist():
            yield epoch, index
        epoch += 1


def _collate(
    rows: Sequence[int],
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Right-pad one micro-batch to its own longest example; padded labels are -100."""
    length = max(len(input_ids[r]) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    lab = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(input_ids[r])
        ids[i, :n] = torch.tensor(input_ids[r], dtype=torch.long)
        lab[i, :n] = torch.tensor(labels[r], dtype=torch.long)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": lab.to(device)}


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
) -> tuple[float, float]:
    """Token-weighted mean (objective, next-token loss) over a tokenized dataset, in eval mode."""
    was_training = model.training
    model.eval()
    input_ids, labels = dataset["input_ids"][:], dataset["labels"][:]  # plain lists: fast row access
    objective, cross_entropy, count = 0.0, 0.0, 0
    try:
        for start in range(0, len(input_ids), micro_batch_size):
            rows = range(start, min(start + micro_batch_size, len(input_ids)))
            batch = _collate(rows, input_ids, labels, pad_id, device)
            with _autocast(device, dtype):
                sums = _loss_sums(model, batch, distillation)
            objective += float(sums[0])
            cross_entropy += float(sums[1])
            count += _n_targets(batch)
    finally:
        model.train(was_training)
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


def _optimizer_step(
    model: torch.nn.Module,
    micro_batches: Sequence[Mapping[str, torch.Tensor]],
    trainable: Sequence[tuple[str, torch.nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    distillation: Distillation | None,
) -> tuple[float, float]:
    """Accumulate gradients over the micro-batches, clip, step.

    Returns the effective batch's mean objective and its mean next-token loss. The losses are normalised by the label tokens of the whole
    effective batch, so accumulating micro-batches of different lengths gives the same gradient as
    one big batch.
    """
    n_targets = max(1, sum(_n_targets(b) for b in micro_batches))
    step_loss = step_lm_loss = 0.0
    for batch in micro_batches:
        with _autocast(device, dtype):
            objective, cross_entropy = _loss_sums(model, batch, distillation)
            loss = objective / n_targets
        (scaler.scale(loss) if scaler is not None else loss).backward()
        step_loss += float(loss.detach())
        step_lm_loss += float(cross_entropy.detach()) / n_targets
    params = [p for _, p in trainable]
    if scaler is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        scaler.step(optimizer)
        scaler.update()
    else:
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, step_lm_loss


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
) -> RecoveryResult:
    """Train `model` as `params` say; the result's model is un-merged (peft) for LoRA, best weights loaded.

    `teacher` (the dense model) is required for `objective: distill`. Datasets may be raw Alpaca
    records or already tokenized (input_ids, labels). With `method: full` every parameter trains in
    float32 (bf16 autocast on GPU) and the model is returned in the dtype it came in.
    """
    started = time.perf_counter()
    distill = params.objective == "distill"
    if distill and teacher is None:
        raise ConfigError("recover.objective='distill' needs the dense teacher model; none was given")
    if params.method == "lora":
        check_lora_targets(model, params)
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
    pad_id = _pad_id(tokenizer)
    distillation = None
    if distill:
        assert teacher is not None
        _check_vocabularies(model, teacher)
        distillation = Distillation(_TimedTeacher(prepare_teacher(teacher, device)),
                                    temperature=float(params.distill_temperature), weight=float(params.distill_weight))

    if params.method == "lora":
        trained_model = prepare_lora_model(model, params, seed=seed, device=device)
        original_dtype = None
    else:
        original_dtype = next(model.parameters()).dtype
        trained_model = model.to(device=device, dtype=torch.float32)
        for param in trained_model.parameters():
            param.requires_grad_(True)
    try:
        trainable = _trainable(trained_model)
        optimizer = torch.optim.AdamW(
            [p for _, p in trainable], lr=params.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
        )
        scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and dtype == torch.float16 else None

        n_examples = len(train_dataset)
        total_steps = planned_steps(n_examples, params)
        warmup = warmup_for(total_steps, params)
        input_ids, labels = train_dataset["input_ids"][:], train_dataset["labels"][:]
        stream = _example_stream(n_examples, seed)
        history: list[dict] = []

        def log(entry: dict) -> None:
            history.append(entry)
            if on_log is not None:
                on_log(entry)

        def validate(step: int) -> float:
            assert val_dataset is not None
            loss, lm_loss = evaluate_losses(
                trained_model,
                val_dataset,
                micro_batch_size=params.micro_batch_size,
                pad_id=pad_id,
                device=device,
                dtype=dtype,
                distillation=distillation,
            )
            log({"step": step, "val_loss": loss, **({"val_lm_loss": lm_loss} if distill else {})})
            return loss

        def snapshot() -> dict[str, torch.Tensor]:
            return {name: p.detach().to("cpu", copy=True) for name, p in trainable}

        initial_val = best_val = None
        best_step: int | None = None
        best_weights: dict[str, torch.Tensor] | None = None
        if has_val:
            initial_val = best_val = validate(0)
            best_step, best_weights = 0, snapshot()

        trained_model.train()
        consumed = 0
        label = f"{'LoRA' if params.method == 'lora' else 'full'} {'distillation' if distill else 'recovery'}"
        bar = tqdm(total=total_steps, desc=label, unit="step", file=progress_stream(), disable=not progress)
        try:
            for step in range(total_steps):
                lr = learning_rate_at(step, total_steps, warmup, params.learning_rate)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                picks = [next(stream) for _ in range(params.batch_size)]
                consumed += len(picks)
                micro_batches = [
                    _collate(
                        [i for _, i in picks[k : k + params.micro_batch_size]],
                        input_ids,
                        labels,
                        pad_id,
                        device,
                    )
                    for k in range(0, len(picks), params.micro_batch_size)
                ]
                step_loss, step_lm_loss = _optimizer_step(
                    trained_model, micro_batches, trainable, optimizer, scaler, device=device, dtype=dtype,
                    distillation=distillation,
                )
                tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)
                done = step + 1
                log(
                    {
                        "step": done,
                        "loss": step_loss,
                        **({"lm_loss": step_lm_loss} if distill else {}),
                        "learning_rate": lr,
                        "epoch": consumed / n_examples,
                        "tokens": tokens,
                    }
                )
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                if has_val and (done % params.eval_every_steps == 0 or done == total_steps):
                    val_loss = validate(done)
                    trained_model.train()
                    if best_val is None or val_loss < best_val:
                        best_val, best_step, best_weights = val_loss, done, snapshot()
        finally:
            bar.close()
            optimizer.zero_grad(set_to_none=True)

        if best_weights is not None:
            with torch.no_grad():
                for name, p in trainable:
                    p.copy_(best_weights[name].to(p.device))
        if best_weights is None and not all(bool(torch.isfinite(p).all()) for _, p in trainable):
            raise ConfigError(
                f"recover.learning_rate={params.learning_rate} made training diverge (non-finite weights and "
                "no validation checkpoint to fall back on); allowed: a smaller learning rate"
            )
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
        history=history,
        initial_val_loss=initial_val,
        best_val_loss=best_val,
        best_step=best_step,
        optimizer_steps=total_steps,
        train_examples=n_examples,
        seconds=time.perf_counter() - started,
        teacher_seconds=distillation.teacher.seconds if distillation is not None else 0.0,
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
) -> RecoveryResult:
    """Train the pruned model, keep the best validation weights, merge LoRA: a plain model of the input class.

    With LoRA and `adapter_dir`, the best adapter is also saved there (peft format, safetensors)
    before the merge, so it can be shared or re-applied without the merged weights.

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
