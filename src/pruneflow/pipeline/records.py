"""What made an output, recorded inside it, so a stale output is found whatever the engine remembers.

Every stage output carries a record: for its own stage instance and for every instance upstream of
it, the params it read, the hash of the source files it ran (its import closure) and the md5 of the
data files it read; plus the md5 of the upstream outputs it read. Folders hold it in
`pruneflow_record.json` (the report's in reports/plots/), safetensors and GGUF files in their metadata,
metrics JSON under "pruneflow_record".

`expected_chain` computes the same chain from the current params, code and data, without running
anything; an output is fresh when its recorded fingerprint equals the expected one. This does not
depend on Snakemake's metadata (which a failed job rewrites as if it had succeeded, and which
`dvc repro` or a `dvc checkout` never write) nor on the intermediate outputs being present: the
expected chain of `evaluate_recovered` holds the recover params even when the recovered model is
gone. The Snakefile turns the verdicts into stamps (`update_stamps`): one small input file per rule
instance whose time is 0 while its output is fresh and "now" (with a new content, so Snakemake's
checksum shortcut cannot hide it) while it is stale or missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pruneflow.config import Params, stage_params
from pruneflow.pipeline.graph import (
    STAGES,
    STATE_DIR,
    Stage,
    fill,
    grid_values,
    instance_id,
    outputs_of,
    upstream_instances,
)
from pruneflow.pipeline.hashing import HashCache

RECORD_FILE = "pruneflow_record.json"
RECORD_KEY = "pruneflow_record"
RECORD_FORMAT = 1


def _canonical(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def fingerprint(chain: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(chain, sort_keys=True).encode("utf-8")).hexdigest()


def code_hash(src_root: str | Path, module: str) -> str:
    """sha256 over the (path, content hash) of every project file `module` can import."""
    from pruneflow.pipeline.code_deps import import_closure

    src_root = Path(src_root)
    digest = hashlib.sha256()
    for path in import_closure(src_root, module):
        digest.update(path.relative_to(src_root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).hexdigest().encode() + b"\n")
    return digest.hexdigest()


def running_src_root() -> Path:
    """The folder holding the `pruneflow` package this process runs."""
    import pruneflow

    return Path(pruneflow.__file__).resolve().parents[1]


def record_sections(stage: Stage) -> tuple[str, ...]:
    """The params sections an entry records: the stage's keys with the preset already applied
    (`scale` and `laptop.*` only choose effective values, which the sections hold)."""
    return tuple(key for key in stage.params if key != "scale" and not key.startswith("laptop."))


def stage_entry(params: Params, stage: Stage, root: str | Path, cache: HashCache,
                src_root: str | Path | None = None, data: Iterable[str] | None = None) -> dict[str, Any]:
    """One instance's own part of a chain: its params, code hash and data hashes."""
    root = Path(root)
    files = list(data) if data is not None else stage.data(params, root)
    return _canonical({
        "params": stage_params(params, *record_sections(stage)),
        "code": code_hash(src_root if src_root is not None else root / "src", f"pruneflow.stages.{stage.module}"),
        "data": {path: cache.dvc_hash(root / path) for path in files},
    })


class ChainBuilder:
    """Expected chains of every instance of a grid, each entry computed once."""

    def __init__(self, params: Params, root: str | Path, cache: HashCache | None = None) -> None:
        self.params = params
        self.root = Path(root)
        self.cache = cache if cache is not None else HashCache(self.root / STATE_DIR)
        self._entries: dict[str, dict] = {}
        self._chains: dict[str, dict] = {}

    def entry(self, stage: Stage) -> dict:
        # every instance of a stage has the same params, code and data: computed once per stage
        if stage.name not in self._entries:
            self._entries[stage.name] = stage_entry(self.params, stage, self.root, self.cache)
        return self._entries[stage.name]

    def chain(self, stage: Stage, values: Mapping[str, str]) -> dict[str, dict]:
        key = instance_id(stage, values)
        if key not in self._chains:
            chain = {key: self.entry(stage)}
            for upstreams in upstream_instances(self.params, stage, values).values():
                for upstream, upstream_values in upstreams:
                    chain.update(self.chain(upstream, upstream_values))
            self._chains[key] = dict(sorted(chain.items()))
        return self._chains[key]


# ------------------------------------------------------------------------------------ reading, writing


def make_record(instance: str, chain: Mapping[str, Any], inputs: Mapping[str, Any] | None = None) -> dict:
    chain = dict(sorted(_canonical(chain).items()))
    return {"format": RECORD_FORMAT, "instance": instance, "fingerprint": fingerprint(chain),
            "chain": chain, "inputs": _canonical(inputs or {})}


def read_record(path: str | Path) -> dict | None:
    """The record an output carries, or None (no output, no record, unreadable)."""
    path = Path(path)
    try:
        if path.is_dir():
            record = json.loads((path / RECORD_FILE).read_text())
        elif path.suffix == ".safetensors":
            from pruneflow.tensor_files import read_metadata

            record = json.loads(read_metadata(path)[RECORD_KEY])
        elif path.suffix == ".json":
            record = json.loads(path.read_text())[RECORD_KEY]
        elif path.suffix == ".gguf":
            from pruneflow.gguf_export import read_first_string

            record = json.loads(read_first_string(path, RECORD_KEY) or "null")
        else:
            return None
    except Exception:  # missing, truncated, foreign: no usable record
        return None
    return record if isinstance(record, dict) and isinstance(record.get("chain"), dict) else None


def write_record_file(folder: str | Path, record: Mapping[str, Any]) -> None:
    (Path(folder) / RECORD_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


@dataclass
class StageRecorder:
    """What a stage CLI needs to record its output: its instance and the inputs it was given."""

    stage: Stage
    values: dict[str, str]
    inputs: dict[str, list[Path]]
    name: str | None = None  # the instance's name when it is no grid instance

    @property
    def instance(self) -> str:
        return self.name or instance_id(self.stage, self.values)

    def record(self, params: Params, data: Iterable[str] | None = None, root: str | Path = ".") -> dict:
        """Own entry (from the running code and the data it read) + the chains of the inputs' records."""
        cache = HashCache(Path(root) / STATE_DIR)
        chain = {self.instance: stage_entry(params, self.stage, root, cache, src_root=running_src_root(), data=data)}
        inputs = {}
        for role, paths in self.inputs.items():
            for index, path in enumerate(paths):
                upstream = read_record(path)
                if upstream is not None:
                    chain.update(upstream["chain"])
                name = role if len(paths) == 1 else f"{role}[{index}]"
                try:
                    inputs[name] = {"path": str(path), "md5": cache.dvc_hash(path)}
                except OSError:
                    inputs[name] = {"path": str(path), "md5": None}
        cache.save()
        return make_record(self.instance, chain, inputs)


def recorder(stage_name: str, values: Mapping[str, str] | None = None,
             inputs: Mapping[str, str | Path | Iterable[str | Path]] | None = None,
             instance: str | None = None) -> StageRecorder:
    paths: dict[str, list[Path]] = {}
    for role, value in (inputs or {}).items():
        items = [value] if isinstance(value, str | os.PathLike) else list(value)
        paths[role] = [Path(item) for item in items]
    return StageRecorder(STAGES[stage_name], dict(values or {}), paths, instance)


# --------------------------------------------------------------------------------- freshness and stamps


@dataclass
class Verdict:
    stage: Stage
    values: dict[str, str]
    output: str
    expected: str  # fingerprint
    status: str  # "fresh" | "stale" | "missing"
    reasons: list[str]

    @property
    def instance(self) -> str:
        return instance_id(self.stage, self.values)


def explain(expected: Mapping[str, Any], recorded: Mapping[str, Any] | None, limit: int = 3) -> list[str]:
    """What differs between an expected chain and a recorded one, most upstream first, as short lines."""
    if recorded is None:
        return ["no record (made by an older pruneflow or by hand)"]
    order = list(STAGES)
    reasons: list[str] = []
    for key in sorted(set(expected) | set(recorded), key=lambda k: (order.index(k.split("/")[0]), k)):
        mine, theirs = expected.get(key), recorded.get(key)
        if theirs is None:
            reasons.append(f"{key} is new in the chain")
        elif mine is None:
            reasons.append(f"{key} is no longer in the chain")
        elif mine != theirs:
            for name in sorted(set(mine["params"]) | set(theirs["params"])):
                if mine["params"].get(name) != theirs["params"].get(name):
                    reasons.append(f"{name}: {theirs['params'].get(name)!r} -> {mine['params'].get(name)!r}")
            if mine["code"] != theirs["code"]:
                reasons.append(f"the source of {key.split('/')[0]} changed")
            for path in sorted(set(mine["data"]) | set(theirs["data"])):
                if mine["data"].get(path) != theirs["data"].get(path):
                    reasons.append(f"data {path} changed")
    unique = list(dict.fromkeys(reasons))
    return unique[:limit] + ([f"... {len(unique) - limit} more"] if len(unique) > limit else [])


def verdict(builder: ChainBuilder, stage: Stage, values: Mapping[str, str]) -> Verdict:
    """Fresh / stale / missing for one stage instance (any values, in the grid or not)."""
    values = dict(values)
    chain = builder.chain(stage, values)
    expected = fingerprint(chain)
    primary = fill(stage.primary.path, values)
    if not all((builder.root / path).exists() for path in outputs_of(stage, values).values()):
        return Verdict(stage, values, primary, expected, "missing", [])
    recorded = read_record(builder.root / primary)
    if recorded is not None and recorded.get("fingerprint") == expected:
        return Verdict(stage, values, primary, expected, "fresh", [])
    return Verdict(stage, values, primary, expected, "stale", explain(chain, recorded["chain"] if recorded else None))


def verdicts(params: Params, root: str | Path, cache: HashCache | None = None) -> list[Verdict]:
    """Fresh / stale / missing for every instance of the grid, from the records its outputs carry."""
    builder = ChainBuilder(params, root, cache)
    found = [verdict(builder, stage, values) for stage in STAGES.values() for values in grid_values(params, stage)]
    builder.cache.save()
    return found


def stamp_path(root: str | Path, stage: Stage, values: Mapping[str, str]) -> Path:
    return Path(root) / STATE_DIR / "stamps" / f"{instance_id(stage, values)}.json"


def stamp_template(stage: Stage) -> str:
    """The stamp of a rule, with Snakemake wildcards (relative to the project)."""
    parts = [stage.name, *("{" + key + "}" for key in stage.placeholders)]
    return f"{STATE_DIR}/stamps/{'/'.join(parts)}.json"


def update_stamps(root: str | Path, found: Iterable[Verdict]) -> None:
    """Date each stamp 0 while its output is fresh, now (with new content) while it is stale or missing."""
    from pruneflow.pipeline.atomic import write_text

    for verdict in found:
        path = stamp_path(root, verdict.stage, verdict.values)
        fresh = verdict.status == "fresh"
        content = {"instance": verdict.instance, "fingerprint": verdict.expected, "status": verdict.status,
                   "reasons": verdict.reasons}
        if not fresh:
            content["checked_ns"] = time.time_ns()  # a new checksum every time: Snakemake must not skip it
        text = json.dumps(content, indent=1, sort_keys=True) + "\n"
        current = path.read_text() if path.is_file() else None
        if current != text:
            write_text(path, text)
        if fresh:
            os.utime(path, ns=(0, 0))
