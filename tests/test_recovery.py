"""LoRA recovery: data loading and validation, prompt/labels, training, best checkpoint, merge."""

from __future__ import annotations

import copy
import json
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
    recover_with_lora,
    tokenize_for_training,
    train_lora,
)
from pruneflow.tiny_models import tiny_model, tiny_tokenizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and do not slow down when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    return recover_with_lora(
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
    result = train_lora(
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
    assert [h["loss"] for h in first.history if "loss" in h] == [
        h["loss"] for h in second.history if "loss" in h
    ]
    assert first.history == second.history
    assert [h["loss"] for h in other.history if "loss" in h] != [h["loss"] for h in steps]


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
    result = recover_with_lora(
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
        return queue.pop(0)

    monkeypatch.setattr(recovery, "evaluate_loss", fake)
    return snapshots


def test_best_weights_are_restored_not_the_last(tok, data_file, monkeypatch):
    snapshots = _scripted_val_losses(monkeypatch, [5.0, 4.0, 3.0, 3.5, 4.5])
    params = _params(data_file, max_steps=8, eval_every_steps=2, learning_rate=1e-2)
    train, val = _split(data_file, params)
    result = train_lora(
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
