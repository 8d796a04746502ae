"""Recovery: data loading and validation, prompt/labels, training, distillation, full, best checkpoint, merge."""

from __future__ import annotations

import copy
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pruneflow import recovery
from pruneflow.config import RecoverParams
from pruneflow.errors import ConfigError, DataError
from pruneflow.recovery import (
    ALPACA_TEMPLATE_NO_INPUT,
    ALPACA_TEMPLATE_WITH_INPUT,
    alpaca_prompt,
    load_instruction_data,
    merge_lora,
    recover,
    tokenize_for_training,
    train_recovery,
)
from pruneflow.tiny_models import tiny_model, tiny_tokenizer

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _records(n: int = 40, distinct: int | None = None) -> list[dict]:
    out = []
    for i in range(n):
        k = i % distinct if distinct else i
        record = {"instruction": f"Say the number {k}.", "output": f"The number is {k}."}
        if k % 2:
            record["input"] = f"n={k}"
        elif k % 3:
            record["input"] = ""
        out.append(record)
    return out


def _write(path: Path, payload) -> Path:
    path.write_text(json.dumps(payload))
    return path


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    return _write(tmp_path / "alpaca.json", _records())


def _params(data_file: Path, **overrides) -> RecoverParams:
    base = dict(
        objective="lm",
        method="lora",
        data=(str(data_file),),
        batch_size=4,
        micro_batch_size=2,
        cutoff_len=256,
        learning_rate=1e-3,
        warmup_steps=2,
        eval_every_steps=3,
        max_steps=6,
        val_size=8,
    )
    base.update(overrides)
    return RecoverParams(**base)


def _split(data_file: Path, params: RecoverParams, seed: int = 0):
    return load_instruction_data(
        [data_file], val_size=params.val_size, seed=seed, max_train_samples=params.max_train_samples
    )


def _run(model, tok, data_file: Path, params: RecoverParams, seed: int = 0, **kwargs):
    train, val = _split(data_file, params)
    return recover(
        model, tok, train, val, params, seed=seed, device=CPU, dtype=torch.float32, progress=False, **kwargs
    )


def _shrink_mlp(model, layer: int, width: int) -> None:
    """Mimic a structurally pruned FFN: narrower gate/up/down in one layer only."""
    mlp = model.model.layers[layer].mlp
    hidden = mlp.gate_proj.in_features
    with torch.no_grad():
        for name, shape in (
            ("gate_proj", (width, hidden)),
            ("up_proj", (width, hidden)),
            ("down_proj", (hidden, width)),
        ):
            old = getattr(mlp, name)
            new = torch.nn.Linear(shape[1], shape[0], bias=False)
            new.weight.copy_(old.weight[: shape[0], : shape[1]])
            setattr(mlp, name, new)


def _batch(tok, texts: list[str]) -> dict[str, torch.Tensor]:
    enc = tok(texts, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _assert_plain(model) -> None:
    for name, module in model.named_modules():
        assert "lora" not in name
        if "proj" in name.split(".")[-1]:
            assert type(module) is torch.nn.Linear, name
    assert not hasattr(model, "peft_config")
    hooks = [
        name
        for name, module in model.named_modules()
        for registry in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
        if getattr(module, registry)
    ]
    assert hooks == []


# ------------------------------------------------------------------------------- prompt & labels


def test_alpaca_templates_are_the_stanford_strings():
    assert ALPACA_TEMPLATE_WITH_INPUT == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
        "### Input:\n{input}\n\n### Response:\n"
    )
    assert ALPACA_TEMPLATE_NO_INPUT == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    )
    assert (
        alpaca_prompt("Add.", "2 2", "4")
        == ALPACA_TEMPLATE_WITH_INPUT.format(instruction="Add.", input="2 2") + "4"
    )
    assert alpaca_prompt("Hi.") == ALPACA_TEMPLATE_NO_INPUT.format(instruction="Hi.")
    assert alpaca_prompt("Hi.", "", "Hello").endswith("### Response:\nHello")


def test_tokenize_labels_mask_exactly_the_prompt(tok, data_file):
    train, _ = load_instruction_data([data_file], val_size=0, seed=0)
    full = tokenize_for_training(train, tok, cutoff_len=256, train_on_inputs=True)
    masked = tokenize_for_training(train, tok, cutoff_len=256, train_on_inputs=False)
    for i in range(4):
        record = train[i]
        ids, labels = masked[i]["input_ids"], masked[i]["labels"]
        assert ids == full[i]["input_ids"] and full[i]["labels"] == ids  # train_on_inputs: loss on everything
        assert ids[-1] == tok.eos_token_id
        n_prompt = len(tok(alpaca_prompt(record["instruction"], record["input"]))["input_ids"])
        assert labels[:n_prompt] == [-100] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:]
        assert tok.decode(ids[:n_prompt]) == alpaca_prompt(record["instruction"], record["input"])
        assert tok.decode(ids[n_prompt:-1]) == record["output"]
    truncated = tokenize_for_training(train, tok, cutoff_len=20, train_on_inputs=True)
    assert all(len(r) == 20 and r[-1] != tok.eos_token_id for r in truncated["input_ids"])


def test_load_mixes_files_and_splits_with_the_seed(tmp_path):
    a = _write(tmp_path / "a.json", _records(30))
    extra = [{"instruction": f"b{i}", "input": None, "output": f"o{i}", "note": 1} for i in range(10)]
    b = _write(tmp_path / "b.json", extra)
    train, val = load_instruction_data([a, b], val_size=5, seed=3, max_train_samples=20)
    assert (len(train), len(val)) == (20, 5)
    assert train.column_names == ["instruction", "input", "output"]
    assert all(isinstance(x, str) for x in train["input"][:] + val["input"][:])
    again_train, again_val = load_instruction_data([a, b], val_size=5, seed=3, max_train_samples=20)
    assert again_train["instruction"][:] == train["instruction"][:]
    assert again_val["instruction"][:] == val["instruction"][:]
    _, other_val = load_instruction_data([a, b], val_size=5, seed=4)
    assert other_val["instruction"][:] != val["instruction"][:]
    assert not set(train["instruction"]) & set(val["instruction"])
    full_train, _ = load_instruction_data([a, b], val_size=5, seed=3)
    assert {r.startswith("b") for r in full_train["instruction"]} == {True, False}  # files are mixed


# ------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("payload", "needles"),
    [
        (None, ["missing.json", "does not exist", "instruction"]),
        ([], ["empty", "instruction"]),
        ({"instruction": "x", "output": "y"}, ["not a list", "instruction"]),
        (
            [{"instruction": "x", "output": "y"}, {"instruction": "z"}],
            ["record 1", "'output'", "instruction"],
        ),
        ([{"instruction": 3, "output": "y"}], ["record 0", "'instruction'"]),
    ],
)
def test_bad_data_files_raise_data_error(tmp_path, payload, needles):
    path = tmp_path / "missing.json"
    if payload is not None:
        path = _write(tmp_path / "bad.json", payload)
    with pytest.raises(DataError) as info:
        load_instruction_data([path], val_size=0, seed=0)
    message = str(info.value)
    assert path.name in message
    for needle in needles:
        assert needle in message


def test_val_size_too_large(data_file):
    with pytest.raises(ConfigError, match=r"recover\.val_size=40 .*val_size <= 39"):
        load_instruction_data([data_file], val_size=40, seed=0)


def test_bad_target_module_and_rank_fail_before_training(tok, data_file):
    model = tiny_model("llama", vocab_size=len(tok))
    logged: list[dict] = []
    bad = _params(data_file, target_modules=("q_proj", "qkv_proj"))
    with pytest.raises(ConfigError) as info:
        _run(model, tok, data_file, bad, on_log=logged.append)
    message = str(info.value)
    assert "recover.target_modules" in message and "'qkv_proj'" in message
    assert "'gate_proj'" in message and "'lm_head'" not in message
    # k_proj/v_proj of the tiny model are 64 -> 32 (2 KV heads x 16)
    with pytest.raises(ConfigError, match=r"recover\.lora_r=33 .*lora_r <= 32"):
        _run(model, tok, data_file, _params(data_file, lora_r=33), on_log=logged.append)
    _shrink_mlp(model, 1, 6)
    with pytest.raises(ConfigError, match=r"recover\.lora_r=8 .*lora_r <= 6.*layers\.1\.mlp"):
        _run(model, tok, data_file, _params(data_file), on_log=logged.append)
    assert logged == []
    _assert_plain(model)


# -------------------------------------------------------------------------------------- training


def test_lora_merge_keeps_outputs(tok, data_file):
    model = tiny_model("llama", vocab_size=len(tok))
    original = copy.deepcopy(model)
    params = _params(data_file, learning_rate=1e-2, max_steps=5, val_size=0)
    train, _ = _split(data_file, params)
    result = train_recovery(
        model, tok, train, None, params, seed=0, device=CPU, dtype=torch.float32, progress=False
    )
    peft_model = result.model
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 7 * 4  # every targeted linear of the 4 decoder layers, no LM head
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)
    batch = _batch(tok, [alpaca_prompt("Say the number 7.", "n=7"), "The number is"])
    with torch.no_grad():
        before = peft_model(**batch).logits
        reference = original(**batch).logits
        merged = merge_lora(peft_model)
        after = merged(**batch).logits
    assert type(merged) is type(original)
    _assert_plain(merged)
    assert not merged.training
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert (after - reference).abs().max() > 1e-4  # the adapters did change the model


def test_training_reduces_loss(tok, tmp_path):
    data = _write(tmp_path / "repeat.json", _records(40, distinct=4))
    params = _params(data, learning_rate=1e-2, num_epochs=5.0, max_steps=30, val_size=0, lora_dropout=0.0)
    result = _run(tiny_model("llama", vocab_size=len(tok)), tok, data, params)
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert len(losses) == result.optimizer_steps == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 5.5  # a random model over a 384-token vocabulary: about ln(384) = 5.95
    assert last < first - 0.4, (first, last)  # measured: 5.79 -> 5.10
    assert result.initial_val_loss is None and result.best_step is None


def test_history_schedule_and_determinism(tok, data_file):
    params = _params(data_file, max_steps=None, num_epochs=1.5, warmup_steps=100, eval_every_steps=100)
    logged: list[dict] = []
    first = _run(tiny_model("llama", vocab_size=len(tok)), tok, data_file, params, on_log=logged.append)
    second = _run(tiny_model("llama", vocab_size=len(tok)), tok, data_file, params)
    other = _run(tiny_model("llama", vocab_size=len(tok)), tok, data_file, params, seed=1)
    assert logged == first.history
    steps = [h for h in first.history if "loss" in h]
    # 32 training records x 1.5 epochs / batch 4 = 12 steps; warm-up capped at 10% of them (1 step)
    assert first.optimizer_steps == len(steps) == 12 and first.train_examples == 32
    assert [h["step"] for h in steps] == list(range(1, 13))
    assert steps[-1]["epoch"] == pytest.approx(1.5)
    assert all(h["tokens"] > 0 for h in steps)
    rates = [h["learning_rate"] for h in steps]
    assert rates[0] == pytest.approx(1e-3) and rates == sorted(rates, reverse=True) and rates[-1] > 0
    # the trainer's scheduler is learning_rate_at: each step logs the rate it ran with
    assert rates == pytest.approx([recovery.learning_rate_at(s, 12, 1, 1e-3) for s in range(12)], rel=1e-12)
    assert all(h["grad_norm"] > 0 for h in steps)
    assert [h["loss"] for h in first.history if "loss" in h] == [
        h["loss"] for h in second.history if "loss" in h
    ]
    assert first.history == second.history
    assert [h["loss"] for h in other.history if "loss" in h] != [h["loss"] for h in steps]


def test_data_order_is_a_seeded_permutation_per_epoch(tok, data_file, monkeypatch):
    """Trainer's seeded sampler: epoch e visits the training examples in torch.randperm order seeded with
    seed + e (one process, or the same permutation split by micro-batch across processes)."""
    batches: list[list[tuple[int, ...]]] = []
    pad_batch = recovery.pad_batch

    def recording(features, pad_id):
        batches.append([tuple(f["input_ids"]) for f in features])
        return pad_batch(features, pad_id)

    monkeypatch.setattr(recovery, "pad_batch", recording)
    params = _params(data_file, max_steps=None, num_epochs=2.0, val_size=8, max_train_samples=12)
    train, val = _split(data_file, params)
    tokenized = tokenize_for_training(train, tok, cutoff_len=params.cutoff_len, train_on_inputs=True)
    rows = {tuple(ids): i for i, ids in enumerate(tokenized["input_ids"])}
    assert len(rows) == 12

    def order(seed: int) -> list[int]:
        batches.clear()
        train_recovery(tiny_model("llama", vocab_size=len(tok)), tok, tokenized, None, params, seed=seed,
                       device=CPU, dtype=torch.float32, progress=False)
        return [rows[ids] for batch in batches for ids in batch]

    seen = order(seed=3)
    assert len(seen) == 24 and sorted(seen[:12]) == sorted(seen[12:]) == list(range(12))  # 2 epochs, each whole
    for epoch in (0, 1):
        expected = torch.randperm(12, generator=torch.Generator().manual_seed(3 + epoch)).tolist()
        assert seen[12 * epoch:12 * (epoch + 1)] == expected
    assert order(seed=3) == seen and order(seed=4) != seen


def test_learning_rate_schedule():
    total, warmup = 200, 20
    rates = [recovery.learning_rate_at(s, total, warmup, 1e-4) for s in range(total)]
    assert rates[0] == pytest.approx(5e-6) and rates[19] == pytest.approx(1e-4)
    assert rates[:20] == sorted(rates[:20]) and rates[20:] == sorted(rates[20:], reverse=True)
    assert min(rates) > 0
    p = RecoverParams(warmup_steps=100)
    assert recovery.warmup_for(30, p) == 3 and recovery.warmup_for(5000, p) == 100


def test_non_uniform_widths_survive_recovery(tok, data_file, tmp_path):
    model = tiny_model("llama", vocab_size=len(tok))
    _shrink_mlp(model, 1, 40)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    result = _run(model, tok, data_file, _params(data_file, max_steps=3))
    merged = result.model
    assert {n: tuple(p.shape) for n, p in merged.named_parameters()} == shapes
    assert merged.model.layers[1].mlp.up_proj.out_features == 40
    assert merged.model.layers[0].mlp.up_proj.out_features == 96
    _assert_plain(merged)
    assert all(p.requires_grad for p in merged.parameters())  # flags restored, no frozen leftovers
    merged.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()


def test_qwen2_with_attention_biases(tok, data_file):
    model = tiny_model("qwen2", vocab_size=len(tok))
    bias = model.model.layers[0].self_attn.q_proj.bias.detach().clone()
    result = _run(model, tok, data_file, _params(data_file, max_steps=3, train_on_inputs=False))
    merged = result.model
    assert type(merged).__name__ == "Qwen2ForCausalLM"
    _assert_plain(merged)
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.bias, bias)  # bias="none"
    assert result.best_val_loss is not None and result.best_val_loss <= result.initial_val_loss


# ----------------------------------------------------------------------------- best checkpoint


def test_best_checkpoint_is_the_val_argmin_and_is_merged(tok, data_file):
    params = _params(data_file, max_steps=7, eval_every_steps=2, learning_rate=1e-2)
    train, val = _split(data_file, params)
    result = recover(
        tiny_model("llama", vocab_size=len(tok)),
        tok,
        train,
        val,
        params,
        seed=0,
        device=CPU,
        dtype=torch.float32,
        progress=False,
    )
    evals = [h for h in result.history if "val_loss" in h]
    assert [h["step"] for h in evals] == [0, 2, 4, 6, 7]
    best = min(evals, key=lambda h: h["val_loss"])
    assert result.best_step == best["step"] and result.best_val_loss == best["val_loss"]
    assert result.initial_val_loss == evals[0]["val_loss"]
    tokenized = tokenize_for_training(val, tok, cutoff_len=params.cutoff_len, train_on_inputs=True)
    merged_loss = recovery.evaluate_loss(
        result.model, tokenized, micro_batch_size=2, pad_id=tok.pad_token_id, device=CPU, dtype=torch.float32
    )
    assert merged_loss == pytest.approx(result.best_val_loss, abs=1e-5)


def _scripted_val_losses(monkeypatch, values: list[float]) -> list[dict]:
    """Replace the validation pass by scripted losses and snapshot the adapters at each evaluation."""
    snapshots: list[dict] = []
    queue = list(values)

    def fake(model, dataset, **kwargs):
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        value = queue.pop(0)
        return value, value

    monkeypatch.setattr(recovery, "evaluate_losses", fake)
    return snapshots


def test_best_weights_are_restored_not_the_last(tok, data_file, monkeypatch):
    snapshots = _scripted_val_losses(monkeypatch, [5.0, 4.0, 3.0, 3.5, 4.5])
    params = _params(data_file, max_steps=8, eval_every_steps=2, learning_rate=1e-2)
    train, val = _split(data_file, params)
    result = train_recovery(
        tiny_model("llama", vocab_size=len(tok)), tok, train, val, params, seed=0, device=CPU,
        dtype=torch.float32, progress=False,
    )  # fmt: skip
    assert result.best_step == 4 and result.best_val_loss == 3.0 and result.initial_val_loss == 5.0
    final = {n: p for n, p in result.model.named_parameters() if p.requires_grad}
    for name, value in snapshots[2].items():
        torch.testing.assert_close(final[name], value, atol=0, rtol=0)
    assert any(not torch.equal(snapshots[4][n], snapshots[2][n]) for n in final)


def test_no_improvement_keeps_the_pruned_model(tok, data_file, monkeypatch):
    _scripted_val_losses(monkeypatch, [1.0, 2.0, 3.0])
    model = tiny_model("llama", vocab_size=len(tok))
    original = copy.deepcopy(model)
    result = _run(
        model, tok, data_file, _params(data_file, max_steps=4, eval_every_steps=2, learning_rate=1e-2)
    )
    assert result.best_step == 0 and result.best_val_loss == 1.0
    batch = _batch(tok, ["The number is 3."])
    with torch.no_grad():
        torch.testing.assert_close(result.model(**batch).logits, original(**batch).logits, atol=1e-6, rtol=0)


def test_failure_mid_training_leaves_the_model_unwrapped(tok, data_file):
    model = tiny_model("llama", vocab_size=len(tok))
    original = copy.deepcopy(model)

    def explode(entry: dict) -> None:
        if entry.get("step") == 2:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _run(model, tok, data_file, _params(data_file, learning_rate=1e-2, val_size=0), on_log=explode)
    _assert_plain(model)
    batch = _batch(tok, ["The number is 3."])
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, original(**batch).logits, atol=0, rtol=0)


# -------------------------------------------------------------------------- text and distillation


def _text_file(tmp_path: Path, lines: int = 60) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f" = Section {i} = \nThe value {i} follows {i - 1} and precedes {i + 1}.\n"
                            for i in range(lines)))
    return path


def test_text_blocks_are_the_concatenated_tokens_cut_in_order(tok, tmp_path):
    path = _text_file(tmp_path, lines=20)
    blocks = recovery.text_blocks(path, tok, block_len=32)
    expected = [t for line in path.read_text().splitlines(keepends=True)
                for t in tok(line, add_special_tokens=False)["input_ids"]]
    assert len(blocks) == len(expected) // 32 > 2
    assert [t for row in blocks["input_ids"] for t in row] == expected[: len(blocks) * 32]
    assert blocks["labels"] == blocks["input_ids"] and all(sum(m) == 32 for m in blocks["attention_mask"])
    (tmp_path / "short.txt").write_text("tiny\n")
    with pytest.raises(DataError, match=r"short\.txt.*fewer than one block of recover\.cutoff_len=32"):
        recovery.text_blocks(tmp_path / "short.txt", tok, block_len=32)


def test_training_data_mixes_text_and_instructions(tok, tmp_path, data_file):
    text = _text_file(tmp_path)
    n_blocks = len(recovery.text_blocks(text, tok, block_len=48))
    train, val = recovery.load_training_data([str(data_file), str(text)], tok, cutoff_len=48, train_on_inputs=False,
                                             val_size=6, seed=1)
    assert len(train) + len(val) == 40 + n_blocks and len(val) == 6
    again, _ = recovery.load_training_data([str(data_file), str(text)], tok, cutoff_len=48, train_on_inputs=False,
                                           val_size=6, seed=1)
    assert train["input_ids"] == again["input_ids"]
    masked = [row for row in train["labels"] if recovery.IGNORE_INDEX in row]
    assert masked and len(masked) < len(train)  # instructions mask their prompts, text blocks do not
    with pytest.raises(ConfigError, match=r"recover\.data='notes\.md' is not allowed; allowed: .*\.json.*\.txt"):
        recovery.load_training_data(["notes.md"], tok, cutoff_len=48, train_on_inputs=True, val_size=0, seed=0)
    with pytest.raises(ConfigError, match=r"recover\.val_size=999 .* training examples"):
        recovery.load_training_data([str(text)], tok, cutoff_len=48, train_on_inputs=True, val_size=999, seed=0)


def test_distillation_kl_equals_a_hand_computation():
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(2, 5, 7, generator=generator, dtype=torch.float64)
    teacher = torch.randn(2, 5, 7, generator=generator, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, True, True], [False, True, True, True, False]])
    for temperature in (1.0, 2.0, 0.5):
        expected = 0.0
        for b in range(2):
            for t in range(5):
                if not mask[b, t]:
                    continue
                p = [math.exp(x / temperature) for x in teacher[b, t].tolist()]
                q = [math.exp(x / temperature) for x in student[b, t].tolist()]
                p = [x / sum(p) for x in p]
                q = [x / sum(q) for x in q]
                expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        got = recovery.distillation_kl_sum(student, teacher, mask, temperature)
        assert float(got) == pytest.approx(expected * temperature**2, rel=1e-5)
    assert float(recovery.distillation_kl_sum(teacher, teacher, mask, 2.0)) == pytest.approx(0.0, abs=1e-6)


def test_distillation_objective_mixes_kl_and_next_token_loss(tok, data_file):
    student, teacher = tiny_model("llama", vocab_size=len(tok)), tiny_model("llama", vocab_size=len(tok), seed=1)
    train, _ = _split(data_file, _params(data_file))
    batch = recovery._collate(range(3), tokenize_for_training(train, tok, cutoff_len=64, train_on_inputs=False)
                              ["input_ids"][:], tokenize_for_training(train, tok, cutoff_len=64,
                                                                      train_on_inputs=False)["labels"][:],
                              tok.pad_token_id, CPU)
    with torch.no_grad():
        lm, lm_again = recovery._loss_sums(student, batch, None)
        kl_only, ce = recovery._loss_sums(student, batch, recovery.Distillation(teacher, 2.0, 1.0))
        mixed, _ = recovery._loss_sums(student, batch, recovery.Distillation(teacher, 2.0, 0.25))
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    kl = recovery.distillation_kl_sum(s_logits, t_logits, batch["labels"][:, 1:] != recovery.IGNORE_INDEX, 2.0)
    assert float(lm) == float(lm_again) == pytest.approx(float(ce))
    assert float(kl_only) == pytest.approx(float(kl), rel=1e-5)
    assert float(mixed) == pytest.approx(0.25 * float(kl) + 0.75 * float(ce), rel=1e-5)


def test_distillation_moves_the_student_towards_the_teacher(tok, tmp_path):
    text = _text_file(tmp_path)
    params = _params(text, objective="distill", method="full", cutoff_len=32, val_size=4, max_steps=12,
                     eval_every_steps=4, learning_rate=3e-3, distill_temperature=2.0)
    train, val = recovery.load_training_data([str(text)], tok, cutoff_len=32, train_on_inputs=True, val_size=4, seed=0)
    student = tiny_model("llama", vocab_size=len(tok))
    teacher = tiny_model("llama", vocab_size=len(tok), seed=5)
    teacher_before = copy.deepcopy(teacher.state_dict())
    logged: list[dict] = []
    result = recover(student, tok, train, val, params, seed=0, device=CPU, dtype=torch.float32,
                     teacher=teacher, on_log=logged.append, progress=False)
    evals = [h for h in logged if "val_loss" in h]
    assert {"val_loss", "val_lm_loss"} <= set(evals[0]) and {"loss", "lm_loss"} <= set(logged[1])
    assert result.best_val_loss < 0.8 * result.initial_val_loss, evals  # KL to the teacher fell
    assert result.teacher_seconds > 0
    for name, value in teacher.state_dict().items():  # the teacher is read, never trained
        torch.testing.assert_close(value, teacher_before[name], atol=0, rtol=0)
    _assert_plain(result.model)
    assert all(p.requires_grad for p in result.model.parameters())
    with pytest.raises(ConfigError, match=r"recover\.objective='distill' needs the dense teacher"):
        recover(tiny_model("llama", vocab_size=len(tok)), tok, train, val, params, seed=0, device=CPU,
                dtype=torch.float32, progress=False)
    with pytest.raises(ConfigError, match=r"teacher has 400 tokens, the pruned model"):
        recover(tiny_model("llama", vocab_size=len(tok)), tok, train, val, params, seed=0, device=CPU,
                dtype=torch.float32, teacher=tiny_model("llama", vocab_size=400), progress=False)


def test_full_recovery_trains_every_parameter_and_keeps_the_dtype(tok, data_file, tmp_path):
    from pruneflow.checkpoint import load_pruned, save_pruned

    model = tiny_model("llama", vocab_size=len(tok))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = _params(data_file, method="full", max_steps=3, val_size=0, learning_rate=1e-3)
    result = _run(model, tok, data_file, params)
    assert type(result.model).__name__ == "LlamaForCausalLM" and not hasattr(result.model, "peft_config")
    changed = [n for n, p in result.model.named_parameters() if not torch.equal(p, before[n])]
    assert set(changed) == set(before)  # embeddings and norms too, not only the linear layers
    recovered = result.model  # a saved full-recovered model reloads to identical logits
    save_pruned(recovered, tmp_path / "saved", tokenizer=tok)
    batch = _batch(tok, ["The number is 3."])
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path / "saved")(**batch).logits, recovered(**batch).logits)
    # a bf16 model trains in float32 and comes back in bf16
    half = _run(tiny_model("llama", vocab_size=len(tok)).to(torch.bfloat16), tok, data_file, params).model
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


# ------------------------------------------------------------------ trainer options, checkpoints, resume


def test_gradient_checkpointing_recomputes_and_changes_nothing(tok, data_file):
    """Each layer's MLP runs twice per training micro-batch (forward, then again in the backward pass),
    and the history and weights are those without it (dropout included: the RNG state is replayed)."""

    def run(checkpointing: bool):
        model = tiny_model("llama", vocab_size=len(tok))
        calls = [0]
        counter = model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        params = _params(data_file, max_steps=3, val_size=0, gradient_checkpointing=checkpointing)
        result = _run(model, tok, data_file, params)
        counter.remove()
        return result, calls[0]

    (plain, plain_calls), (checkpointed, checkpointed_calls) = run(False), run(True)
    assert plain_calls == 3 * 2 and checkpointed_calls == 2 * plain_calls  # 3 steps x 2 micro-batches
    assert checkpointed.history == plain.history
    for (name, value), (_, expected) in zip(checkpointed.model.state_dict().items(), plain.model.state_dict().items(),
                                            strict=True):
        torch.testing.assert_close(value, expected, atol=0, rtol=0, msg=name)
    assert not checkpointed.model.is_activation_checkpointing  # switched off again for the caller
    _assert_plain(checkpointed.model)


def test_batch_size_must_split_over_the_processes(tok, data_file, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    model = tiny_model("llama", vocab_size=len(tok))
    with pytest.raises(ConfigError, match=r"recover\.batch_size=4 is not allowed with 3 processes; allowed: a "
                                          r"multiple of recover\.micro_batch_size x processes = 6"):
        _run(model, tok, data_file, _params(data_file))
    _assert_plain(model)


def test_non_finite_loss_stops_training_naming_the_learning_rate(tok, data_file):
    model = tiny_model("llama", vocab_size=len(tok))
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")  # every logit row has a NaN: the loss is NaN from step 1
    logged: list[dict] = []
    with pytest.raises(ConfigError, match=r"recover\.learning_rate=0\.001 made training diverge \(non-finite loss "
                                          r"at step 1\); allowed: a smaller learning rate"):
        _run(model, tok, data_file, _params(data_file, val_size=0), on_log=logged.append)
    assert [h["step"] for h in logged] == [1]  # stopped at once, not after max_steps
    _assert_plain(model)


def test_interrupted_training_resumes_exactly_from_its_state_folder(tok, data_file, tmp_path, caplog):
    """Full fine-tuning stopped by an error after step 5 resumes from the checkpoint of step 4 to the
    uninterrupted result; a state folder of other settings is started afresh; no checkpoint is saved
    after the last step (the output comes next)."""
    params = _params(data_file, method="full", max_steps=9, eval_every_steps=3, save_every_steps=2,
                     learning_rate=1e-3)
    reference = _run(tiny_model("llama", vocab_size=len(tok)), tok, data_file, params)
    state = tmp_path / "out.state"

    def stop_after_step_5(entry: dict) -> None:
        if entry.get("step") == 5 and "loss" in entry:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tiny_model("llama", vocab_size=len(tok)), tok, data_file, params, state_dir=state,
             on_log=stop_after_step_5)
    assert sorted(p.name for p in state.iterdir()) == ["checkpoint-4", "fingerprint.txt"]

    replayed: list[dict] = []
    resumed = _run(tiny_model("llama", vocab_size=len(tok)), tok, data_file, params, state_dir=state,
                   on_log=replayed.append)
    assert resumed.resumed_from_step == 4
    assert resumed.history == reference.history and replayed == reference.history  # MLflow gets the whole curve
    assert (resumed.best_step, resumed.best_val_loss) == (reference.best_step, reference.best_val_loss)
    for (name, value), (_, expected) in zip(resumed.model.state_dict().items(), reference.model.state_dict().items(),
                                            strict=True):
        torch.testing.assert_close(value, expected, atol=0, rtol=0, msg=name)
    assert sorted(p.name for p in state.iterdir()) == ["checkpoint-8", "fingerprint.txt"]  # none at step 9

    other = _params(data_file, method="full", max_steps=9, eval_every_steps=3, save_every_steps=2,
                    learning_rate=2e-3)
    with caplog.at_level("INFO", logger="pruneflow.recovery"):
        fresh = _run(tiny_model("llama", vocab_size=len(tok)), tok, data_file, other, state_dir=state)
    assert "was written by other settings or inputs" in caplog.text and "starting fresh" in caplog.text
    assert fresh.resumed_from_step == 0
    assert fresh.history == _run(tiny_model("llama", vocab_size=len(tok)), tok, data_file, other).history


def test_a_damaged_checkpoint_is_skipped_with_a_warning(tok, data_file, tmp_path, caplog):
    """A complete checkpoint one of whose files is cut short or empty (a node failure) is not resumed: the
    rerun names it and the error in a warning, removes it and resumes from an earlier complete checkpoint
    (one left by a run killed before it removed it) or, with none, from step 0, to the uninterrupted result.
    Its record lists the size of every file, fsynced before the record was written."""
    params = _params(data_file, method="full", max_steps=9, eval_every_steps=3, save_every_steps=2)
    reference = _run(tiny_model("llama", vocab_size=len(tok)), tok, data_file, params)
    state = tmp_path / "out.state"

    def stop_after(step: int) -> Callable[[dict], None]:
        def stop(entry: dict) -> None:
            if entry.get("step") == step and "loss" in entry:
                raise KeyboardInterrupt
        return stop

    def rerun() -> recovery.RecoveryResult:
        caplog.clear()
        with caplog.at_level("WARNING", logger="pruneflow.recovery"):
            return _run(tiny_model("llama", vocab_size=len(tok)), tok, data_file, params, state_dir=state)

    def assert_as_reference(result: recovery.RecoveryResult) -> None:
        assert result.history == reference.history
        assert (result.best_step, result.best_val_loss) == (reference.best_step, reference.best_val_loss)
        for (name, value), (_, expected) in zip(result.model.state_dict().items(),
                                                reference.model.state_dict().items(), strict=True):
            torch.testing.assert_close(value, expected, atol=0, rtol=0, msg=name)

    with pytest.raises(KeyboardInterrupt):
        _run(tiny_model("llama", vocab_size=len(tok)), tok, data_file, params, state_dir=state, on_log=stop_after(5))
    listed = json.loads((state / "checkpoint-4" / recovery.RECORD_FILE).read_text())["files"]
    assert {"optimizer.pt", "model.safetensors", "rng_state.pth", recovery.BEST_WEIGHTS_FILE} <= listed.keys()
    assert all(size == (state / "checkpoint-4" / name).stat().st_size for name, size in listed.items())
    kept = tmp_path / "checkpoint-4"
    shutil.copytree(state / "checkpoint-4", kept)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_model("llama", vocab_size=len(tok)), tok, data_file, params, state_dir=state, on_log=stop_after(7))
    shutil.copytree(kept, state / "checkpoint-4")  # as if killed after completing checkpoint-6, before removing 4
    optimizer = state / "checkpoint-6/optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])

    resumed = rerun()
    assert resumed.resumed_from_step == 4
    assert (f"checkpoint {state / 'checkpoint-6'} cannot be resumed (optimizer.pt has 100 bytes, "
            f"{listed['optimizer.pt']} were saved): resuming from checkpoint-4 instead") in caplog.text
    assert_as_reference(resumed)
    assert sorted(p.name for p in state.iterdir()) == ["checkpoint-8", "fingerprint.txt"]

    (state / "checkpoint-8/model.safetensors").write_bytes(b"")  # the only checkpoint: back to step 0
    fresh = rerun()
    assert fresh.resumed_from_step == 0
    assert (f"checkpoint {state / 'checkpoint-8'} cannot be resumed (model.safetensors has 0 bytes, "
            f"{listed['model.safetensors']} were saved): training from step 0") in caplog.text
    assert_as_reference(fresh)
