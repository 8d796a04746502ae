"""Zero-shot core: prompts equal lm-eval's own templates, scores equal an independent loop, bad input fails early."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
from pathlib import Path

import lm_eval
import numpy as np
import pytest
import torch
import yaml

from pruneflow import zeroshot
from pruneflow.config import BUILTIN_ZEROSHOT_TASKS, ZEROSHOT_TASKS
from pruneflow.errors import ConfigError, DataError
from pruneflow.zeroshot import HEADLINE_METRIC, evaluate_zeroshot, zeroshot_average

from .conftest import PROJECT_ROOT

CPU = torch.device("cpu")
FILES = {name: spec.file for name, spec in zeroshot._SPECS.items()}

# Small records in the llm-foundry layout of each file; varied choice lengths make acc_norm differ from acc.
DOCS: dict[str, list[dict]] = {
    "arc_easy": [
        {
            "query": "Question: What is the capital of France?",
            "choices": ["Paris", "the fox", "dog", "a lazy one"],
            "gold": 0,
        },
        {
            "query": "Question: Which one jumps?",
            "choices": ["fox", "The quick brown fox", "Paris.", "a"],
            "gold": 1,
        },
        {
            "query": "Question: What removes heads?",
            "choices": ["Pruning", "0 1 2", "the request", "x"],
            "gold": 0,
        },
        {"query": "Question: Which is a number?", "choices": ["fox", "dog", "7", "Answer"], "gold": 2},
        {
            "query": "Question: What is lazy?",
            "choices": ["the dog", "the quick fox", "France", "9"],
            "gold": 0,
        },
        {
            "query": "Question: Pick a city.",
            "choices": ["Paris", "channels", "attention heads", "="],
            "gold": 0,
        },
    ],
    "arc_challenge": [
        {"query": "Question: What does pruning remove?", "choices": ["heads", "cities", "foxes"], "gold": 0},
        {
            "query": "Question: Which task is described?",
            "choices": ["a request", "an instruction", "none"],
            "gold": 1,
        },
        {"query": "Question: Which is largest?", "choices": ["1", "5", "9"], "gold": 2},
    ],
    "piqa": [
        {
            "query": "Question: How do I make the fox jump?\n",
            "choices": ["Ask the dog.", "Prune the fox."],
            "gold": 0,
        },
        {"query": "Question: How to find Paris?\n", "choices": ["Go to France.", "Count to 9."], "gold": 0},
        {"query": "Question: How to rest?\n", "choices": ["Be lazy like the dog.", "Jump."], "gold": 1},
    ],
    "boolq": [
        {
            "query": "Passage: The quick brown fox jumps over the lazy dog.\nQuestion: is the dog lazy?",
            "choices": ["no", "yes"],
            "gold": 1,
        },
        {
            "query": "Passage: Paris is the capital of France.\nQuestion: is paris in spain?",
            "choices": ["no", "yes"],
            "gold": 0,
        },
        {
            "query": "Passage: Pruning removes channels.\nQuestion: does pruning add heads?",
            "choices": ["no", "yes"],
            "gold": 0,
        },
    ],
    "openbookqa": [
        {
            "query": "The lazy dog is jumped over by",
            "choices": ["the fox", "Paris", "a task", "9"],
            "gold": 0,
        },
        {"query": "Pruning removes", "choices": ["attention heads", "France", "dogs", "0"], "gold": 0},
        {"query": "The capital of France is", "choices": ["1", "Paris", "fox", "lazy"], "gold": 1},
    ],
    "winogrande": [
        {
            "context_options": [
                "The fox jumped over the dog because the fox",
                "The fox jumped over the dog because the dog",
            ],
            "continuation": "was quick.",
            "gold": 0,
        },
        {
            "context_options": [
                "The fox jumped over the dog because the fox",
                "The fox jumped over the dog because the dog",
            ],
            "continuation": "was lazy.",
            "gold": 1,
        },
        {
            "context_options": ["Paris beat the fox since Paris", "Paris beat the fox since the fox"],
            "continuation": "is a capital.",
            "gold": 0,
        },
        {
            "context_options": [
                "The task beat the request as the task",
                "The task beat the request as the request",
            ],
            "continuation": "was short.",
            "gold": 1,
        },
    ],
    "lambada": [
        {"context": "The quick brown fox jumps over the lazy", "continuation": "dog"},
        {"context": "Question: What is the capital of France?\nAnswer:", "continuation": "Paris."},
        {"context": "Pruning removes attention heads and", "continuation": "channels"},
    ],
}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and 2 threads on a busy 2-core box stall on every op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_data(root: Path, docs: dict[str, list[dict]] | None = None) -> Path:
    """`root/zeroshot/<file>.jsonl` for every task (or the given ones); returns `root` (the data_dir)."""
    folder = root / "zeroshot"
    folder.mkdir(parents=True, exist_ok=True)
    for name, records in (docs or DOCS).items():
        (folder / FILES[name]).write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


class Untouchable:
    """Stands in for the model (and tokenizer) where validation must fail before either is used."""

    def __getattr__(self, name):
        raise AssertionError(f"model/tokenizer touched ({name}) before input validation finished")


def samples_of(raw: dict, name: str) -> list[dict]:
    return sorted(raw["samples"][zeroshot.TASK_PREFIX + name], key=lambda s: s["doc_id"])


# ----------------------------------------------------------------------------- results


def test_results_for_every_task_and_state_is_restored(llama, tokenizer, tmp_path):
    data_dir = write_data(tmp_path)
    llama.train()
    llama.model.layers[0].eval()  # a mixed mode that a plain model.train()/eval() would lose
    env_before = dict(os.environ)
    level_before = logging.getLogger("lm_eval").level
    vocab_before, pad_before = len(tokenizer), tokenizer.pad_token

    results = evaluate_zeroshot(
        llama, tokenizer, list(ZEROSHOT_TASKS), data_dir, limit=2, batch_size=3, device=CPU
    )

    assert list(results) == list(ZEROSHOT_TASKS)
    for name, metrics in results.items():
        assert metrics["n"] == 2
        assert metrics["headline_metric"] == HEADLINE_METRIC[name]
        assert 0.0 <= metrics["acc"] <= 1.0
        assert metrics["acc_stderr"] is not None and metrics["acc_stderr"] >= 0.0
        has_norm = name in ("arc_easy", "arc_challenge", "piqa", "openbookqa")
        assert (metrics["acc_norm"] is not None) == has_norm
        if has_norm:
            assert 0.0 <= metrics["acc_norm"] <= 1.0
    assert math.isfinite(results["lambada"]["perplexity"]) and results["lambada"]["perplexity"] > 1.0
    assert llama.training and not llama.model.layers[0].training and llama.model.layers[1].training
    changed = {k for k in set(env_before) | set(os.environ) if env_before.get(k) != os.environ.get(k)}
    assert changed <= {"KMP_DUPLICATE_LIB_OK"}  # set once by sklearn/threadpoolctl on first import
    assert logging.getLogger("lm_eval").level == level_before
    assert (len(tokenizer), tokenizer.pad_token) == (vocab_before, pad_before)


def test_rng_state_is_restored(llama, tokenizer, tmp_path):
    data_dir = write_data(tmp_path, {"boolq": DOCS["boolq"]})
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    expected = (torch.rand(3).tolist(), random.random(), float(np.random.rand()))
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    evaluate_zeroshot(llama, tokenizer, ["boolq"], data_dir, limit=1, batch_size=2, device=CPU)
    assert (torch.rand(3).tolist(), random.random(), float(np.random.rand())) == expected


def test_limit_takes_the_first_documents_and_runs_are_deterministic(llama, tokenizer, tmp_path):
    data_dir = write_data(tmp_path, {"arc_easy": DOCS["arc_easy"]})
    full = evaluate_zeroshot(llama, tokenizer, ["arc_easy"], data_dir, limit=None, batch_size=4, device=CPU)
    again = evaluate_zeroshot(llama, tokenizer, ["arc_easy"], data_dir, limit=None, batch_size=1, device=CPU)
    beyond = evaluate_zeroshot(llama, tokenizer, ["arc_easy"], data_dir, limit=100, batch_size=4, device=CPU)
    assert full["arc_easy"]["n"] == beyond["arc_easy"]["n"] == len(DOCS["arc_easy"])
    assert full == again == beyond

    raw = zeroshot._run(llama, tokenizer, ["arc_easy"], data_dir, 2, 4, CPU, log_samples=True)
    assert [s["doc"]["query"] for s in samples_of(raw, "arc_easy")] == [
        d["query"] for d in DOCS["arc_easy"][:2]
    ]
    assert raw["n-samples"]["pruneflow_arc_easy"]["effective"] == 2


# ----------------------------------------------------------------------------- prompts


def test_rendered_prompts_and_continuations(llama, tokenizer, tmp_path):
    data_dir = write_data(tmp_path)
    raw = zeroshot._run(llama, tokenizer, list(ZEROSHOT_TASKS), data_dir, 1, 8, CPU, log_samples=True)
    args = {name: [tuple(a) for a in samples_of(raw, name)[0]["arguments"]] for name in ZEROSHOT_TASKS}
    assert args["arc_easy"] == [
        ("Question: What is the capital of France?\nAnswer:", " Paris"),
        ("Question: What is the capital of France?\nAnswer:", " the fox"),
        ("Question: What is the capital of France?\nAnswer:", " dog"),
        ("Question: What is the capital of France?\nAnswer:", " a lazy one"),
    ]
    assert args["arc_challenge"][1] == ("Question: What does pruning remove?\nAnswer:", " cities")
    assert args["piqa"] == [
        ("Question: How do I make the fox jump?\nAnswer:", " Ask the dog."),
        ("Question: How do I make the fox jump?\nAnswer:", " Prune the fox."),
    ]
    assert args["boolq"] == [
        ("The quick brown fox jumps over the lazy dog.\nQuestion: is the dog lazy?\nAnswer:", " no"),
        ("The quick brown fox jumps over the lazy dog.\nQuestion: is the dog lazy?\nAnswer:", " yes"),
    ]
    assert args["openbookqa"][3] == ("The lazy dog is jumped over by", " 9")
    assert args["winogrande"] == [
        ("The fox jumped over the dog because the fox", " was quick."),
        ("The fox jumped over the dog because the dog", " was quick."),
    ]
    assert args["lambada"] == [("The quick brown fox jumps over the lazy", " dog")]


def _builtin_template(relative: str) -> dict:
    """One of lm-eval's own task YAMLs (those without `!function` tags)."""
    return yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / relative).read_text())


@pytest.mark.skipif(
    not (PROJECT_ROOT / "data/raw/zeroshot").is_dir(), reason="real zero-shot data not present"
)
def test_real_first_records_render_as_lm_eval_builtin_templates(llama, tokenizer):
    """Rebuild each first real record in the original HF schema and render it with lm-eval's own YAML."""
    from lm_eval.utils import apply_template

    names = ["arc_easy", "arc_challenge", "piqa", "boolq", "openbookqa", "lambada", "winogrande"]
    raw = zeroshot._run(llama, tokenizer, names, PROJECT_ROOT / "data/raw", 1, 8, CPU, log_samples=True)
    for name in names:
        sample = samples_of(raw, name)[0]
        doc, args = sample["doc"], [tuple(a) for a in sample["arguments"]]
        if name in ("arc_easy", "arc_challenge", "openbookqa", "piqa", "boolq"):
            if name.startswith("arc"):
                template = _builtin_template("arc/arc_easy.yaml")["doc_to_text"]  # arc_challenge includes it
                original = {"question": doc["query"].removeprefix("Question: ")}
            elif name == "piqa":
                template = _builtin_template("piqa/piqa.yaml")["doc_to_text"]
                assert doc["query"].startswith("Question: ") and doc["query"].endswith("\n")
                original = {"goal": doc["query"].removeprefix("Question: ")[:-1]}
            elif name == "boolq":
                template = _builtin_template("super_glue/boolq/default.yaml")["doc_to_text"]
                passage, question = doc["query"].removeprefix("Passage: ").split("\nQuestion: ")
                original = {"passage": passage, "question": question.removesuffix("?")}
            else:
                template, original = "{{question_stem}}", {"question_stem": doc["query"]}
            expected_context = apply_template(template, original)
            assert args == [(expected_context, " " + choice) for choice in doc["choices"]], name
        elif name == "lambada":
            lambada = _builtin_template("lambada/lambada_openai.yaml")
            original = {"text": doc["context"] + " " + doc["continuation"]}
            expected = (
                apply_template(lambada["doc_to_text"], original),
                apply_template(lambada["doc_to_target"], original),
            )
            assert args == [expected]
        else:  # winogrande: lm-eval's partial scoring, the options are contexts, the rest is the target
            assert args == [(option, " " + doc["continuation"]) for option in doc["context_options"]]
            assert not doc["continuation"].startswith(" ")


# ----------------------------------------------------------------------------- scores


def reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of log p(continuation | context) from one unbatched forward; lm-eval's token split rule."""
    context_ids = tokenizer(context).input_ids
    whole = tokenizer(context + continuation).input_ids
    continuation_ids = whole[len(context_ids) :]
    ids = torch.tensor(context_ids + continuation_ids)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids[None, :-1]).logits[0].double(), dim=-1)
    positions = range(len(context_ids) - 1, len(ids) - 1)
    total = sum(log_probs[p, ids[p + 1]].item() for p in positions)
    greedy = all(log_probs[p].argmax().item() == ids[p + 1].item() for p in positions)
    return total, greedy


def rotate_gold(records: list[dict], key: str) -> list[dict]:
    """Each record once per possible gold index: exactly one copy per record is right, whatever the model."""
    return [dict(r, gold=g) for r in records for g in range(len(r[key]))]


def test_multiple_choice_and_partial_scores_equal_a_reference_loop(llama, tokenizer, tmp_path):
    docs = {
        "arc_easy": rotate_gold(DOCS["arc_easy"], "choices"),
        "winogrande": rotate_gold(DOCS["winogrande"], "context_options"),
        "lambada": DOCS["lambada"],
    }
    data_dir = write_data(tmp_path, docs)
    raw = zeroshot._run(llama, tokenizer, list(docs), data_dir, None, 5, CPU, log_samples=True)
    results = {name: zeroshot._summarize(name, raw) for name in docs}
    llama.eval()

    acc, acc_norm = [], []
    for doc, sample in zip(docs["arc_easy"], samples_of(raw, "arc_easy"), strict=True):
        context = doc["query"] + "\nAnswer:"
        lls = [reference_loglikelihood(llama, tokenizer, context, " " + c)[0] for c in doc["choices"]]
        assert [r[0][0] for r in sample["resps"]] == pytest.approx(lls, abs=1e-4)
        acc.append(float(np.argmax(lls) == doc["gold"]))
        normed = [ll / len(c) for ll, c in zip(lls, doc["choices"], strict=True)]
        acc_norm.append(float(np.argmax(normed) == doc["gold"]))
        # per document, so the gold index is read right
        assert (sample["acc"], sample["acc_norm"]) == (acc[-1], acc_norm[-1])
    assert results["arc_easy"]["acc"] == results["arc_easy"]["acc_norm"] == pytest.approx(0.25, abs=1e-12)
    assert results["arc_easy"]["acc"] == pytest.approx(np.mean(acc), abs=1e-12)
    assert results["arc_easy"]["acc_norm"] == pytest.approx(np.mean(acc_norm), abs=1e-12)
    assert results["arc_easy"]["acc_stderr"] == pytest.approx(np.std(acc, ddof=1) / math.sqrt(len(acc)))
    assert acc != acc_norm  # the varied choice lengths do make length normalisation matter

    acc = []
    for doc, sample in zip(docs["winogrande"], samples_of(raw, "winogrande"), strict=True):
        lls = [
            reference_loglikelihood(llama, tokenizer, o, " " + doc["continuation"])[0]
            for o in doc["context_options"]
        ]
        assert [r[0][0] for r in sample["resps"]] == pytest.approx(lls, abs=1e-4)
        acc.append(float(np.argmax(lls) == doc["gold"]))
        assert sample["acc"] == acc[-1]
    assert results["winogrande"]["acc"] == pytest.approx(np.mean(acc), abs=1e-12) == 0.5

    lls, greedy = [], []
    for doc in DOCS["lambada"]:
        ll, is_greedy = reference_loglikelihood(llama, tokenizer, doc["context"], " " + doc["continuation"])
        lls.append(ll), greedy.append(float(is_greedy))
    assert results["lambada"]["acc"] == pytest.approx(np.mean(greedy), abs=1e-12)
    assert results["lambada"]["perplexity"] == pytest.approx(math.exp(-np.mean(lls)), rel=1e-4)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("tasks", "suggestion"),
    [(["arc_easy", "hellaswg"], "hellaswag"), ("arc_eazy", "arc_easy"), (["ARC_EASY"], None), (["zzqx_9"], None)],
)
def test_unknown_task_is_a_config_error_naming_it(tmp_path, tasks, suggestion):
    """Not built-in, not in lm-eval's registry, not under the include path: refused before any model work."""
    bad = tasks if isinstance(tasks, str) else tasks[-1]
    with pytest.raises(ConfigError) as info:
        evaluate_zeroshot(Untouchable(), Untouchable(), tasks, tmp_path, None, 4, CPU)
    message = str(info.value)
    assert f"evaluate.zeroshot_tasks={bad!r} is not allowed" in message and "lm-eval's registry" in message
    assert all(repr(name) in message for name in BUILTIN_ZEROSHOT_TASKS)
    assert (f"did you mean {suggestion!r}?" in message) if suggestion else "did you mean" not in message
    with pytest.raises(ConfigError, match=re.escape(repr(bad))):  # the plan's check says the same
        zeroshot.check_task_files([bad], tmp_path)


@pytest.mark.parametrize(
    ("limit", "batch_size", "key"), [(0, 4, "limit"), (True, 4, "limit"), (None, 0, "batch_size")]
)
def test_bad_limit_or_batch_size_is_a_config_error(tmp_path, limit, batch_size, key):
    with pytest.raises(ConfigError, match=key):
        evaluate_zeroshot(
            Untouchable(), Untouchable(), ["arc_easy"], write_data(tmp_path), limit, batch_size, CPU
        )


def test_missing_data_file_is_a_data_error_before_any_model_work(tmp_path):
    data_dir = write_data(tmp_path, {"arc_easy": DOCS["arc_easy"]})
    with pytest.raises(DataError) as info:
        evaluate_zeroshot(Untouchable(), Untouchable(), ["arc_easy", "piqa"], data_dir, 2, 4, CPU)
    assert str((data_dir / "zeroshot" / "piqa.jsonl").resolve()) in str(info.value)


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_data_file_is_a_data_error(tmp_path, content):
    data_dir = write_data(tmp_path, {"winogrande": DOCS["winogrande"]})
    path = data_dir / "zeroshot" / "openbook_qa.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        evaluate_zeroshot(Untouchable(), Untouchable(), ["winogrande", "openbookqa"], data_dir, None, 4, CPU)
    assert str(path.resolve()) in str(info.value) and "empty" in str(info.value)


@pytest.mark.parametrize(
    ("name", "bad_record", "fragment"),
    [
        ("arc_easy", {"query": "Question: q", "choices": ["a", "b"]}, "gold"),
        ("arc_easy", {"query": "Question: q", "choices": ["a", "b"], "gold": 2}, "gold"),
        ("piqa", {"query": "Question: q\n", "choices": "ab", "gold": 0}, "choices"),
        ("winogrande", {"context_options": ["a", "b"], "gold": 0}, "continuation"),
        ("lambada", {"text": "a whole passage"}, "context"),
    ],
)
def test_bad_record_is_a_data_error_naming_file_line_and_keys(tmp_path, name, bad_record, fragment):
    records = [DOCS[name][0], bad_record, DOCS[name][0]]
    data_dir = write_data(tmp_path, {name: records})
    with pytest.raises(DataError) as info:
        evaluate_zeroshot(Untouchable(), Untouchable(), [name], data_dir, 1, 4, CPU)
    message = str(info.value)
    path = (data_dir / "zeroshot" / FILES[name]).resolve()
    assert f"{path}:2:" in message and fragment in message
    assert ", ".join(zeroshot._SCHEMAS[zeroshot._SPECS[name].schema]) in message


def test_invalid_json_line_is_a_data_error(tmp_path):
    data_dir = write_data(tmp_path, {"boolq": DOCS["boolq"]})
    path = data_dir / "zeroshot" / "boolq.jsonl"
    path.write_text(path.read_text() + '{"query": "Passage: x\n')
    with pytest.raises(DataError, match=r"boolq\.jsonl:4: not valid JSON"):
        evaluate_zeroshot(Untouchable(), Untouchable(), ["boolq"], data_dir, None, 4, CPU)


# ----------------------------------------------------------------------------- average


def test_headline_metrics_cover_every_task():
    assert set(HEADLINE_METRIC) == set(BUILTIN_ZEROSHOT_TASKS) == set(ZEROSHOT_TASKS) | {"hellaswag"}
    assert {HEADLINE_METRIC[t] for t in ("arc_easy", "arc_challenge", "openbookqa", "hellaswag")} == {"acc_norm"}
    assert {HEADLINE_METRIC[t] for t in ("boolq", "piqa", "winogrande", "lambada")} == {"acc"}


def test_zeroshot_average_uses_headline_metrics_or_overrides():
    results = {
        "arc_easy": {"acc": 0.6, "acc_norm": 0.5, "headline_metric": "acc_norm"},
        "piqa": {"acc": 0.7, "acc_norm": 0.8, "headline_metric": "acc"},
        "winogrande": {"acc": 0.4, "acc_norm": None, "headline_metric": "acc"},
    }
    assert zeroshot_average(results) == pytest.approx((0.5 + 0.7 + 0.4) / 3)
    assert zeroshot_average(results, {"arc_easy": "acc", "piqa": "acc_norm"}) == pytest.approx(
        (0.6 + 0.8 + 0.4) / 3
    )
    with pytest.raises(ConfigError, match="winogrande"):
        zeroshot_average(results, {"winogrande": "acc_norm"})
    with pytest.raises(ConfigError):
        zeroshot_average({})


# ----------------------------------------------------------------------------- hellaswag

# Records in Rowan/hellaswag's layout, with what lm-eval's preprocessing rewrites: WikiHow's "[title]" and
# "[step]" markers, double spaces, a lower-case ctx_b, an empty ctx_b, labels as strings (as in the
# dataset) and as integers, extra keys the task does not read.
HELLASWAG = [
    {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering "
     "the window of a car, and a woman wearing winter clothes smiles.", "ctx_b": "then",
     "endings": [", the man adds wax to the windshield.", ", a person boards a ski lift.",
                 ", the man puts on a coat.", ", the man continues removing the snow on his car."],
     "label": "3", "split": "val"},
    {"activity_label": "Home and Garden", "ctx_a": "[header] How to grow a lawn [title] Pick  seed.", "ctx_b": "",
     "endings": ["[step] Water it.", "Dig a hole [title] Done.", "Sing  loudly.", "Sleep."], "label": 1},
    {"activity_label": "Fun sliding down", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "endings": ["is using wrap to wrap a pair of skis.", "starts pulling up roofing on a roof.",
                 "is ripping level tiles off.", "holds a rubik's cube."], "label": 2},
]


def write_hellaswag(root: Path, records: list) -> Path:
    folder = root / "zeroshot"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hellaswag.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def test_hellaswag_runs_with_lm_evals_own_preprocessing(llama, tokenizer, tmp_path):
    """The contexts and endings lm-eval scores are its hellaswag preprocessing of the raw fields, computed here
    independently; the headline metric is acc_norm (LLM-Pruner's table)."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    data_dir = write_hellaswag(tmp_path, HELLASWAG)
    raw = zeroshot._run(llama, tokenizer, ["hellaswag"], data_dir, None, 4, CPU, log_samples=True)
    samples = samples_of(raw, "hellaswag")
    assert len(samples) == len(HELLASWAG)
    for doc, sample in zip(HELLASWAG, samples, strict=True):
        context = preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
        assert [tuple(a) for a in sample["arguments"]] == [(context, " " + preprocess(e)) for e in doc["endings"]]
        assert sample["target"] == int(doc["label"])
    contexts = [s["arguments"][0][0] for s in samples]
    assert contexts[1] == "Home and Garden: How to grow a lawn. Pick seed."  # not just the raw text
    assert contexts[0].endswith("smiles. Then")

    results = evaluate_zeroshot(llama, tokenizer, ["hellaswag", "boolq"], write_data(data_dir, {"boolq": DOCS["boolq"]}),
                                None, 4, CPU)
    scores = results["hellaswag"]
    assert scores["headline_metric"] == "acc_norm" and scores["n"] == len(HELLASWAG)
    assert scores["acc_norm"] == pytest.approx(np.mean([s["acc_norm"] for s in samples]))
    assert scores["acc"] == pytest.approx(np.mean([s["acc"] for s in samples]))


def test_hellaswag_without_its_file_is_a_data_error_naming_it(tmp_path):
    write_data(tmp_path, {"boolq": DOCS["boolq"]})
    path = (tmp_path / "zeroshot" / "hellaswag.jsonl").resolve()
    with pytest.raises(DataError) as info:
        evaluate_zeroshot(Untouchable(), Untouchable(), ["boolq", "hellaswag"], tmp_path, None, 4, CPU)
    assert f"zero-shot data file {path} is missing" in str(info.value) and "Rowan/hellaswag" in str(info.value)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'zeroshot' / 'hellaswag.jsonl'} is missing")):
        zeroshot.check_task_files(["hellaswag"], tmp_path)  # at plan time too


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"endings": None}, "missing key(s) endings"),
        ({"endings": ["only one"]}, "'endings' must be a list of at least 2"),
        ({"label": 4}, "'label' must be an index into 'endings'"),
        ({"label": "two"}, "'label' must be an index into 'endings'"),
        ({"label": True}, "'label' must be an index into 'endings'"),
        ({"ctx_b": None}, "'ctx_b' must be a string"),
        ({"ctx_a": " "}, "'ctx_a' must not be empty"),
    ],
)
def test_hellaswag_bad_record_is_a_data_error_naming_file_line_and_keys(tmp_path, change, fragment):
    bad = {k: v for k, v in {**HELLASWAG[1], **change}.items() if not (k == "endings" and v is None)}
    data_dir = write_hellaswag(tmp_path, [HELLASWAG[0], bad, HELLASWAG[2]])
    with pytest.raises(DataError) as info:
        zeroshot.check_task_files(["hellaswag"], data_dir)
    message = str(info.value)
    assert f"{data_dir / 'zeroshot' / 'hellaswag.jsonl'}:2: {fragment}" in message
    assert "expected keys: activity_label, ctx_a, ctx_b, endings, label" in message


# ----------------------------------------------------------------------------- other lm-eval tasks

COLORS_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
num_fewshot: 3
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: options
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_colors_task(folder: Path, name: str = "my_colors") -> Path:
    """A user's own lm-eval task (multiple choice over a local jsonl) in `folder`; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "colors.jsonl"
    docs = [{"question": f"Which color is thing {i}?", "options": ["red", "green", "dark blue"], "answer": i % 3}
            for i in range(5)]
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{name}.yaml").write_text(COLORS_YAML.format(name=name, data=data))
    return folder


def test_a_task_from_the_include_path_runs_through_lm_eval(llama, tokenizer, tmp_path):
    """evaluate.zeroshot_tasks: [my_colors] with evaluate.zeroshot_include_path: [<folder>], as the stage runs it."""
    from pruneflow.config import params_from_mapping

    from .conftest import PROJECT_ROOT

    folder = write_colors_task(tmp_path / "my_tasks")
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    raw["scale"] = "full"
    raw["evaluate"].update(zeroshot_tasks=["my_colors", "boolq"], zeroshot_include_path=[str(folder)],
                           zeroshot_limit=4)
    cfg = params_from_mapping(raw).evaluate
    data_dir = write_data(tmp_path / "data", {"boolq": DOCS["boolq"]})
    assert zeroshot.check_task_files(cfg.zeroshot_tasks, data_dir, include_path=cfg.zeroshot_include_path) == {
        "my_colors": "include_path", "boolq": "builtin"}

    results = evaluate_zeroshot(llama, tokenizer, cfg.zeroshot_tasks, data_dir, cfg.zeroshot_limit, 4, CPU,
                                include_path=cfg.zeroshot_include_path)
    assert list(results) == ["my_colors", "boolq"]
    colors = results["my_colors"]
    assert colors["n"] == 4 and colors["headline_metric"] == "acc"
    assert set(colors) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "headline_metric"}
    assert 0.0 <= colors["acc"] <= 1.0 and 0.0 <= colors["acc_norm"] <= 1.0
    assert results["boolq"]["n"] == 3 and results["boolq"]["headline_metric"] == "acc"
    assert zeroshot_average(results) == pytest.approx((colors["acc"] + results["boolq"]["acc"]) / 2)

    raw_run = zeroshot._run(llama, tokenizer, ["my_colors"], data_dir, 1, 4, CPU, log_samples=True,
                            include_path=[folder])
    assert raw_run["n-shot"]["my_colors"] == 0  # zero-shot, although the task's YAML asks for 3
    assert [tuple(a) for a in raw_run["samples"]["my_colors"][0]["arguments"]] == [
        ("Q: Which color is thing 0?\nA:", " " + c) for c in ("red", "green", "dark blue")]

    with pytest.raises(ConfigError) as info:
        zeroshot.check_task_files(["my_colours"], data_dir, include_path=cfg.zeroshot_include_path)
    assert "evaluate.zeroshot_tasks='my_colours' is not allowed" in str(info.value)
    assert str(folder) in str(info.value) and "did you mean 'my_colors'?" in str(info.value)


def test_missing_include_path_is_a_config_error_naming_it(tmp_path):
    (tmp_path / "a_file.yaml").write_text("task: x\n")
    for value, problem in (("nowhere", "does not exist"), ("a_file.yaml", "is a file, not a folder")):
        with pytest.raises(ConfigError) as info:
            zeroshot.check_task_files(["boolq"], tmp_path, include_path=[value], root=tmp_path)
        message = str(info.value)
        assert f"evaluate.zeroshot_include_path={value!r} is not allowed: {tmp_path / value} {problem}" in message
        assert "allowed: null or a list of existing folders of lm-eval task YAML files" in message
    with pytest.raises(ConfigError, match="nowhere"):
        evaluate_zeroshot(Untouchable(), Untouchable(), ["boolq"], tmp_path, None, 4, CPU,
                          include_path=[tmp_path / "nowhere"])


def test_registry_tasks_are_known_and_tags_are_refused(tmp_path):
    """A registry name passes the plan's check (its data comes from the Hub or the datasets cache at run
    time); a tag has no one score, so its tasks must be listed."""
    assert zeroshot.task_sources(["lambada_openai", "arc_easy", "mmlu"]) == {
        "lambada_openai": "lm_eval", "arc_easy": "builtin", "mmlu": "lm_eval"}
    with pytest.raises(ConfigError, match=r"'ai2_arc' is not allowed: it is an lm-eval tag .*\(arc_challenge, arc_easy\)"):
        zeroshot.task_sources(["ai2_arc"])
    folder = write_colors_task(tmp_path / "tasks")
    (folder / "group.yaml").write_text("group: my_group\ntask: [my_colors]\n")
    with pytest.raises(ConfigError, match=r"'my_group' is not allowed: it is an lm-eval group without an aggregate"):
        zeroshot.task_sources(["my_group"], [folder])


def test_include_path_folder_is_an_input_of_the_evaluate_stage(tmp_path):
    """Its YAMLs and data change the scores, so both engines declare the folder and records hash it."""
    from pruneflow.config import params_from_mapping
    from pruneflow.pipeline.graph import STAGES, evaluation_files, stage_data

    from .conftest import PROJECT_ROOT

    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    raw["evaluate"].update(zeroshot_tasks=["my_colors", "arc_easy"], zeroshot_include_path=["my_tasks"])
    raw["laptop"]["evaluate"].pop("zeroshot_tasks", None)
    params = params_from_mapping(raw)
    assert "my_tasks" in stage_data(params, STAGES["evaluate_dense"], tmp_path)
    assert "data/raw/zeroshot/arc_easy.jsonl" in evaluation_files(params, root=tmp_path)
    assert not any("my_colors" in path for path in evaluation_files(params, root=tmp_path))


# ----------------------------------------------------------------------------- progress


@pytest.mark.parametrize("shown", [True, False])
def test_lm_eval_progress_bars_go_to_stderr_unless_turned_off(llama, tokenizer, tmp_path, capsys, monkeypatch,
                                                             shown):
    monkeypatch.delenv("PRUNEFLOW_PROGRESS_FD", raising=False)
    if shown:
        monkeypatch.delenv("PRUNEFLOW_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("PRUNEFLOW_PROGRESS", "0")
    data_dir = write_data(tmp_path, {"boolq": DOCS["boolq"]})
    evaluate_zeroshot(llama, tokenizer, ["boolq"], data_dir, 1, 2, CPU)
    captured = capsys.readouterr()
    assert ("Running loglikelihood requests" in captured.err) == shown
    assert "Running loglikelihood" not in captured.out

