"""LoRA recovery of a structurally pruned model (LLM-Pruner's post-training), then merge.

The method follows LLM-Pruner's `post_training.py`: LoRA on every linear layer of the decoder,
Alpaca-format instruction data with the Stanford Alpaca prompt, AdamW with linear warm-up and
linear decay, gradient accumulation up to the effective batch, a held-out validation split whose
best weights are kept. The loop is written out here (no `transformers.Trainer`) so that it is
deterministic on CPU, works on models whose layers have different widths after pruning, and
reports every optimizer step to a callback (MLflow) without extra dependencies.

`recover_with_lora` = `prepare_lora_model` + `train_lora` + `merge_lora`; the pieces are public so
tests can compare the un-merged adapter model with the merged one.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
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
from pruneflow.text_data import check_instruction_file

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

    Returns the full names of the targeted linear layers.
    """
    available = decoder_linear_names(model)
    for name in params.target_modules:
        if name not in available:
            raise ConfigError(
                f"recover.target_modules contains {name!r}, which is no linear layer of this model "
                f"({type(model).__name__}); allowed: {', '.join(repr(n) for n in sorted(available))}"
            )
    targets = [full for name in params.target_modules for full in available[name]]
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
    """What a recovery run produced; `model` is merged and in eval mode (un-merged from `train_lora`)."""

    model: torch.nn.Module
    history: list[dict] = field(default_factory=list)
    initial_val_loss: float | None = None
    best_val_loss: float | None = None
    best_step: int | None = None
    optimizer_steps: int = 0
    train_examples: int = 0
    seconds: float = 0.0


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


def _loss_sum(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy in float32 (the caller divides by the label count of the step)."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    shifted = logits[:, :-1, :].float()
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(
        shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _n_targets(batch: Mapping[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on CUDA (adapters stay fp32); plain precision elsewhere."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    dataset: datasets.Dataset,
    *,
    micro_batch_size: int,
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype,
) -> float:
    """Token-weighted mean next-token loss over a tokenized dataset, in eval mode."""
    was_training = model.training
    model.eval()
    input_ids, labels = dataset["input_ids"][:], dataset["labels"][:]  # plain lists: fast row access
    total, count = 0.0, 0
    try:
        for start in range(0, len(input_ids), micro_batch_size):
            rows = range(start, min(start + micro_batch_size, len(input_ids)))
            batch = _collate(rows, input_ids, labels, pad_id, device)
            with _autocast(device, dtype):
                total += float(_loss_sum(model, batch))
            count += _n_targets(batch)
    finally:
        model.train(was_training)
    return total / count if count else float("nan")


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
) -> float:
    """Accumulate gradients over the micro-batches, clip, step; returns the effective batch's mean loss.

    The loss is normalised by the label tokens of the whole effective batch, so accumulating
    micro-batches of different lengths gives the same gradient as one big batch.
    """
    n_targets = max(1, sum(_n_targets(b) for b in micro_batches))
    step_loss = 0.0
    for batch in micro_batches:
        with _autocast(device, dtype):
            loss = _loss_sum(model, batch) / n_targets
        (scaler.scale(loss) if scaler is not None else loss).backward()
        step_loss += float(loss.detach())
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
    return step_loss


def train_lora(
    model: torch.nn.Module,
    tokenizer: Any,
    train_dataset: datasets.Dataset,
    val_dataset: datasets.Dataset | None,
    params: RecoverParams,
    *,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    on_log: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> RecoveryResult:
    """Wrap `model` with LoRA and train it; the result's model is the un-merged peft model, best weights loaded.

    Datasets may be raw Alpaca records or already tokenized (input_ids, labels).
    """
    started = time.perf_counter()
    check_lora_targets(model, params)
    if len(train_dataset) == 0:
        raise DataError(
            "the instruction training split is empty; check recover.data and recover.max_train_samples"
        )
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

    peft_model = prepare_lora_model(model, params, seed=seed, device=device)
    try:
        trainable = _trainable(peft_model)
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
            loss = evaluate_loss(
                peft_model,
                val_dataset,
                micro_batch_size=params.micro_batch_size,
                pad_id=pad_id,
                device=device,
                dtype=dtype,
            )
            log({"step": step, "val_loss": loss})
            return loss

        def snapshot() -> dict[str, torch.Tensor]:
            return {name: p.detach().to("cpu", copy=True) for name, p in trainable}

        initial_val = best_val = None
        best_step: int | None = None
        best_weights: dict[str, torch.Tensor] | None = None
        if has_val:
            initial_val = best_val = validate(0)
            best_step, best_weights = 0, snapshot()

        peft_model.train()
        consumed = 0
        bar = tqdm(
            total=total_steps, desc="LoRA recovery", unit="step", file=sys.stderr, disable=not progress
        )
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
                step_loss = _optimizer_step(
                    peft_model, micro_batches, trainable, optimizer, scaler, device=device, dtype=dtype
                )
                tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)
                done = step + 1
                log(
                    {
                        "step": done,
                        "loss": step_loss,
                        "learning_rate": lr,
                        "epoch": consumed / n_examples,
                        "tokens": tokens,
                    }
                )
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                if has_val and (done % params.eval_every_steps == 0 or done == total_steps):
                    val_loss = validate(done)
                    peft_model.train()
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
                f"recover.learning_rate={params.learning_rate} made LoRA training diverge (non-finite adapter "
                "weights and no validation checkpoint to fall back on); allowed: a smaller learning rate"
            )
    except BaseException:
        # Leave the caller's model as it came in: strip the adapters without merging them.
        with contextlib.suppress(Exception):
            peft_model.unload()
        raise
    peft_model.eval()
    return RecoveryResult(
        model=peft_model,
        history=history,
        initial_val_loss=initial_val,
        best_val_loss=best_val,
        best_step=best_step,
        optimizer_steps=total_steps,
        train_examples=n_examples,
        seconds=time.perf_counter() - started,
    )


def recover_with_lora(
    model: torch.nn.Module,
    tokenizer: Any,
    train_dataset: datasets.Dataset,
    val_dataset: datasets.Dataset | None,
    params: RecoverParams,
    *,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    on_log: Callable[[dict], None] | None = None,
    progress: bool = True,
    adapter_dir: str | Path | None = None,
) -> RecoveryResult:
    """LoRA-train the pruned model, keep the best validation weights, merge: a plain model of the input class.

    With `adapter_dir`, the best LoRA adapter is also saved there (peft format, safetensors) before
    the merge, so it can be shared or re-applied without the merged weights.

    The merged model keeps every per-layer width, is in eval mode, has no peft wrappers (so the base
    class's `save_pretrained` works) and its parameters keep their original `requires_grad` flags.
    """
    started = time.perf_counter()
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    result = train_lora(
        model,
        tokenizer,
        train_dataset,
        val_dataset,
        params,
        seed=seed,
        device=device,
        dtype=dtype,
        on_log=on_log,
        progress=progress,
    )
    if adapter_dir is not None:
        result.model.save_pretrained(str(adapter_dir))
        _sort_adapter_config(Path(adapter_dir) / "adapter_config.json")
    merged = merge_lora(result.model)
    for name, p in merged.named_parameters():
        p.requires_grad_(requires_grad.get(name, True))
    result.model = merged
    result.seconds = time.perf_counter() - started
    return result
