"""Text corpora for perplexity and calibration, read from data/raw.

The evaluation strings follow the recipes the papers' numbers depend on:
- wikitext2: rows of WikiText-2 *raw* test, blank rows as "", joined by "\\n\\n" (GPTQ/Wanda/LLM-Pruner).
- ptb: the Mikolov PTB **validation** split (what LLM-Pruner's `get_ptb` returns), lines stripped,
  joined by "\\n\\n"; `ptb_test` is the test split the same way.
"""

from __future__ import annotations

import codecs
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pruneflow.config import RECOVERY_DATA_ALLOWED, RECOVERY_DATA_SUFFIXES
from pruneflow.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

EXPECTED_INSTRUCTION_KEYS = "'instruction' (string), 'input' (string, optional), 'output' (string)"
PPL_SOURCES = {
    "wikitext2": ("wikitext-2-raw/test.txt", "WikiText-2 raw test"),
    "ptb": ("ptb/ptb.valid.txt", "PTB validation (LLM-Pruner's PTB)"),
    "ptb_test": ("ptb/ptb.test.txt", "PTB test"),
}


def check_text_file(path: str | Path, what: str) -> Path:
    """Fail clearly on a missing, empty or non-UTF-8 text file, before any model work."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"{what} file {str(path)!r} is empty")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                decoder.decode(chunk)
                offset += len(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} file {str(path)!r} is not UTF-8 text: byte {offset + exc.start} "
                        f"({exc.object[exc.start:exc.start + 1]!r}) is invalid; re-encode it as UTF-8") from None
    return path


def read_rows(path: str | Path, what: str) -> list[str]:
    """Lines of a text file, newlines kept: exactly the rows of `datasets`' text builder with
    `keep_linebreaks=True` (universal newlines, then a split on "\n" only; a test compares the two),
    without needing `datasets` or writing its cache."""
    path = check_text_file(path, what)
    with open(path, encoding="utf-8") as handle:
        rows = handle.readlines()
    if not any(row.strip() for row in rows):
        raise DataError(f"{what} file {str(path)!r} holds only blank lines")
    return rows


def evaluation_text(name: str, data_dir: str | Path) -> str:
    """The exact evaluation string of a perplexity dataset."""
    if name not in PPL_SOURCES:
        raise DataError(f"perplexity dataset {name!r} is unknown; allowed: {', '.join(PPL_SOURCES)}")
    relative, what = PPL_SOURCES[name]
    rows = read_rows(Path(data_dir) / relative, what)
    if name == "wikitext2":
        return "\n\n".join(row if row.strip() else "" for row in rows)
    return "\n\n".join(row.strip() for row in rows)


@dataclass
class CalibrationSet:
    input_ids: torch.Tensor  # [num_samples, seq_len], int64
    row_indices: list[int]
    offsets: list[int]


def sample_calibration(rows: list[str], tokenizer, num_samples: int, seq_len: int, seed: int) -> CalibrationSet:
    """LLM-Pruner's recipe: random distinct rows with >= seq_len tokens, a random window in each."""
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    samples, used, offsets = [], [], []
    for index in order:
        text = rows[index].strip()
        if not text:
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < seq_len:
            continue
        start = rng.randint(0, len(ids) - seq_len)
        samples.append(ids[start : start + seq_len])
        used.append(index)
        offsets.append(start)
        if len(samples) == num_samples:
            break
    if len(samples) < num_samples:
        raise DataError(
            f"calibration.num_samples={num_samples} with calibration.seq_len={seq_len}: the source has only "
            f"{len(samples)} rows of at least {seq_len} tokens; allowed: a smaller num_samples or seq_len"
        )
    import torch

    return CalibrationSet(torch.tensor(samples, dtype=torch.long), used, offsets)


def check_instruction_file(path: str | Path) -> int:
    """Check one Alpaca-format file with plain `json`, so errors name the file and record (datasets' do
    not); returns its number of records."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"instruction data file {str(path)!r} does not exist; expected an Alpaca-format JSON list of "
            f"records with keys {EXPECTED_INSTRUCTION_KEYS} (recover.data)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"instruction data file {str(path)!r} is not UTF-8 text ({exc}); re-encode it as UTF-8 "
                        f"JSON with keys {EXPECTED_INSTRUCTION_KEYS}") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"instruction data file {str(path)!r} is not valid JSON ({exc}); expected a JSON list of records "
            f"with keys {EXPECTED_INSTRUCTION_KEYS}"
        ) from exc
    if not isinstance(records, list):
        raise DataError(
            f"instruction data file {str(path)!r} holds a JSON {type(records).__name__}, not a list; expected "
            f"a JSON list of records with keys {EXPECTED_INSTRUCTION_KEYS}"
        )
    if not records:
        raise DataError(
            f"instruction data file {str(path)!r} is an empty list; expected at least one record with keys "
            f"{EXPECTED_INSTRUCTION_KEYS}"
        )
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(
                f"instruction data file {str(path)!r}: record {index} is a {type(record).__name__}, not an "
                f"object; expected keys {EXPECTED_INSTRUCTION_KEYS}"
            )
        for key in ("instruction", "output"):
            if record.get(key) is None:
                raise DataError(
                    f"instruction data file {str(path)!r}: record {index} has no {key!r}; expected keys "
                    f"{EXPECTED_INSTRUCTION_KEYS}"
                )
        for key in ("instruction", "input", "output"):
            value = record.get(key)
            if value is not None and not isinstance(value, str):
                raise DataError(
                    f"instruction data file {str(path)!r}: record {index} has {key!r} of type "
                    f"{type(value).__name__}; expected keys {EXPECTED_INSTRUCTION_KEYS}"
                )
    return len(records)


def check_recovery_suffixes(paths: Sequence[str | Path]) -> None:
    """`recover.data` is a non-empty list of .json / .txt files (names only; nothing is read)."""
    if not paths:
        raise ConfigError(f"recover.data=[] is not allowed; allowed: {RECOVERY_DATA_ALLOWED}")
    for raw_path in paths:
        if Path(raw_path).suffix not in RECOVERY_DATA_SUFFIXES:
            raise ConfigError(f"recover.data={str(raw_path)!r} is not allowed; allowed: files ending in "
                              + ", ".join(f"{k} ({v})" for k, v in RECOVERY_DATA_SUFFIXES.items()))


def check_recovery_files(paths: Sequence[str | Path], root: str | Path = ".") -> None:
    """Fail on a missing, empty or malformed data file (JSON: Alpaca records; .txt: UTF-8 text) before
    anything is loaded (the plan checks)."""
    check_recovery_suffixes(paths)
    for raw_path in paths:
        path = Path(root) / Path(raw_path).expanduser()
        if path.suffix == ".json":
            check_instruction_file(path)
        else:
            check_text_file(path, "recovery text")
