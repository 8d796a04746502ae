"""Every output records what made it, and the plan finds stale outputs from those records alone
(no engine metadata): a changed setting anywhere upstream, changed data, changed code, an output gone."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from pruneflow.config import load_params
from pruneflow.pipeline.graph import STAGES
from pruneflow.pipeline.records import read_record, stamp_path, update_stamps, verdicts

from .tiny_project import set_param

BUILT = {"prepare_model", "calibrate", "cache_activations", "score/l2_magnitude", "prune/l2_magnitude/0.3"}


@pytest.fixture()
def root(staged_project, tmp_path):
    copy = tmp_path / "p"
    shutil.copytree(staged_project, copy)
    set_param(copy, "grid.criteria", ["l2_magnitude"])
    set_param(copy, "grid.recovered_criteria", ["l2_magnitude"])
    set_param(copy, "grid.ratios", [0.3])
    return copy


def _status(root) -> dict[str, tuple[str, list[str]]]:
    return {v.instance: (v.status, v.reasons) for v in verdicts(load_params(root / "params.yaml"), root)}


def test_outputs_made_by_the_stages_are_fresh_and_the_rest_missing(root):
    status = _status(root)
    assert {name for name, (state, _) in status.items() if state == "fresh"} == BUILT
    assert {name for name, (state, _) in status.items() if state == "missing"} == set(status) - BUILT


def test_every_kind_of_output_carries_its_whole_upstream_chain(root):
    prune = read_record(root / "data/pruned/l2_magnitude/0.3")
    assert prune["instance"] == "prune/l2_magnitude/0.3"
    assert set(prune["chain"]) == BUILT
    assert prune["chain"]["calibrate"]["params"]["calibration.num_samples"] == 4
    assert set(prune["chain"]["calibrate"]["data"]) == {"data/raw/wikitext-2/train.txt"}
    assert len(prune["chain"]["prune/l2_magnitude/0.3"]["code"]) == 64
    assert set(prune["inputs"]) == {"model", "scores", "activations", "calibration"}
    assert prune["inputs"]["model"]["md5"].endswith(".dir")
    scores = read_record(root / "data/scores/l2_magnitude.safetensors")  # safetensors metadata
    assert set(scores["chain"]) == {"prepare_model", "calibrate", "cache_activations", "score/l2_magnitude"}
    assert read_record(root / "data/raw/wikitext-2/train.txt") is None  # not an output
    assert read_record(root / "nowhere") is None


@pytest.mark.parametrize(
    ("change", "stale", "reason"),
    [
        (("calibration.num_samples", 3), {"calibrate", "cache_activations", "score/l2_magnitude",
                                          "prune/l2_magnitude/0.3"}, "calibration.num_samples: 4 -> 3"),
        (("prune.allocation", "global"), {"prune/l2_magnitude/0.3"}, "prune.allocation: 'uniform' -> 'global'"),
        (("score.aggregation", "max"), {"score/l2_magnitude", "prune/l2_magnitude/0.3"},
         "score.aggregation: 'sum' -> 'max'"),
        (("recover.lora_r", 4), set(), None),  # nothing recovered yet: nothing stale
    ],
)
def test_a_changed_setting_makes_its_stage_and_everything_after_it_stale(root, change, stale, reason):
    set_param(root, *change)
    status = _status(root)
    assert {name for name, (state, _) in status.items() if state == "stale"} == stale
    for name in stale:
        assert reason in status[name][1], status[name]


def test_changed_data_and_changed_code_are_named(root):
    train = root / "data/raw/wikitext-2/train.txt"
    train.write_text(train.read_text() + "one more line\n")
    status = _status(root)
    assert status["calibrate"] == ("stale", ["data data/raw/wikitext-2/train.txt changed"])
    assert status["prune/l2_magnitude/0.3"][0] == "stale"
    pruning = root / "src/pruneflow/pruning.py"
    pruning.write_text(pruning.read_text() + "\n# edited\n")
    assert "the source of prune changed" in _status(root)["prune/l2_magnitude/0.3"][1]


def test_a_missing_intermediate_does_not_hide_a_stale_downstream_output(root):
    """A downstream output records the chain of what it was made from; the intermediate need not exist."""
    shutil.rmtree(root / "data/models/dense")
    set_param(root, "model.revision", "v2")  # a setting of the (now missing) first stage
    status = _status(root)
    assert status["prepare_model"][0] == "missing"
    assert status["calibrate"] == ("stale", ["model.revision: None -> 'v2'"])


def test_stamps_are_dated_zero_when_fresh_and_now_with_new_content_when_stale(root):
    params = load_params(root / "params.yaml")
    update_stamps(root, verdicts(params, root))
    calibrate = stamp_path(root, STAGES["calibrate"], {})
    assert calibrate.stat().st_mtime_ns == 0
    assert json.loads(calibrate.read_text())["status"] == "fresh"
    set_param(root, "calibration.num_samples", 3)
    params = load_params(root / "params.yaml")
    update_stamps(root, verdicts(params, root))
    first = calibrate.read_text()
    assert json.loads(first)["status"] == "stale"
    assert abs(calibrate.stat().st_mtime - time.time()) < 60
    update_stamps(root, verdicts(params, root))
    assert calibrate.read_text() != first  # Snakemake's checksum shortcut must not see "unchanged"


def test_snakemake_keeps_registered_outputs_in_place_when_a_job_fails(tmp_path):
    """The hook behind `update()` outputs: no copy before the job, the output kept after a failure."""
    from snakemake.persistence import FileBackupMixin

    from pruneflow.pipeline.snakemake_support import keep_outputs_in_place

    kept = tmp_path / "data/pruned/x/0.2"
    kept.mkdir(parents=True)
    (kept / "model.safetensors").write_text("earlier")
    other = tmp_path / "elsewhere.txt"
    other.write_text("someone else's output")
    keep_outputs_in_place([str(kept)])

    class Persistence(FileBackupMixin):
        path = tmp_path / ".snakemake"

    persistence = Persistence()
    persistence.backup_output(kept)
    assert not (tmp_path / ".snakemake/backups").exists(), "no copy of a kept output"
    assert persistence.restore_output(kept) is True and (kept / "model.safetensors").read_text() == "earlier"
    persistence.cleanup_backup(kept)
    assert (kept / "model.safetensors").read_text() == "earlier"
    assert persistence.restore_output(tmp_path / "data/pruned/x/0.5") is False  # never made: nothing to keep
    persistence.backup_output(other)  # not registered: Snakemake's own copy
    assert (tmp_path / ".snakemake/backups").exists()
    os.remove(other)
    assert persistence.restore_output(other) is True and other.read_text() == "someone else's output"
