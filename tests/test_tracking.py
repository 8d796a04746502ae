"""pruneflow.pipeline.tracking: parent/nested runs per invocation, and tracking that never breaks a stage.

One sqlite store is shared by most tests (creating it runs MLflow's migrations, seconds); each test
gets its own experiment so counts stay exact. The concurrency test uses a fresh store on purpose:
two processes racing to create it is the case the store lock exists for.
"""

from __future__ import annotations

import contextlib
import io
import math
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from pruneflow.config import MlflowParams
from pruneflow.pipeline import tracking
from pruneflow.pipeline.tracking import (
    INVOCATION_ENV,
    ProcessInfo,
    describe_ui,
    engine_of,
    find_pipeline_ancestor,
    finish_invocation,
    new_invocation_id,
    resolve_invocation,
    resolve_tracking_uri,
    stage_run,
)

REAL_PROCESS_CHAIN = tracking.process_chain
HTTP_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
PLAIN_CHAIN = (
    ProcessInfo(100, 1.0, ("python", "-m", "pytest")),
    ProcessInfo(50, 0.5, ("-bash",)),
    ProcessInfo(1, 0.1, ("/sbin/init",)),
)


def _unset_env(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Unset `name` and make sure monkeypatch also undoes values the code under test sets later."""
    monkeypatch.setenv(name, "placeholder")
    monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _isolated_invocation(monkeypatch: pytest.MonkeyPatch) -> None:
    # No invocation id and no dvc/snakemake ancestor, even if pytest itself runs under one.
    _unset_env(monkeypatch, INVOCATION_ENV)
    monkeypatch.setattr(tracking, "process_chain", lambda: iter(PLAIN_CHAIN))


@pytest.fixture(scope="module")
def shared_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("project")


@pytest.fixture
def project(shared_project: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Path:
    monkeypatch.chdir(shared_project)
    return shared_project


@pytest.fixture
def settings(request: pytest.FixtureRequest) -> MlflowParams:
    """Default URI (relative sqlite), one experiment per test."""
    return MlflowParams(experiment=f"exp-{request.node.name}")


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=resolve_tracking_uri("sqlite:///mlflow.db"))


def _runs(settings: MlflowParams) -> list:
    client = _client()
    experiment = client.get_experiment_by_name(settings.experiment)
    assert experiment is not None
    return list(client.search_runs([experiment.experiment_id], max_results=100))


# --------------------------------------------------------------------------------------------------
# (a) one invocation: one parent, nested stage runs with params / metrics / artifacts
# --------------------------------------------------------------------------------------------------


def test_one_invocation_has_one_parent_and_nested_stage_runs(
    project: Path, settings: MlflowParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    uri_before = mlflow.get_tracking_uri()
    monkeypatch.setenv(INVOCATION_ENV, "inv-a")
    (project / "scores.json").write_text("{}")

    with stage_run("score", settings=settings, params={"grid.ratios": (0.2, 0.4), "weird key!": 1}) as score:
        score.log_params({"long": "x" * 7000})
        score.log_metrics(
            {"ppl": {"wikitext2": 12.5, "ptb": None}, "nan": math.nan, "text": "x", "flag": True}, step=2
        )
        score.log_artifact(project / "scores.json", artifact_path="out")
        score.set_tags({"custom": "yes"})
    with stage_run("prune", settings=settings, tags={"ratio": "0.2"}) as prune:
        prune.log_metrics({"kept": 0.8})

    assert (project / "mlflow.db").is_file()  # the relative default URI resolved against the cwd
    assert mlflow.active_run() is None and mlflow.get_tracking_uri() == uri_before

    runs = {run.info.run_id: run for run in _runs(settings)}
    assert len(runs) == 3
    parents = [run for run in runs.values() if run.data.tags.get("pruneflow.kind") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_name.startswith("pipeline ")
    assert parent.data.tags["pruneflow.invocation"] == "inv-a"
    assert parent.info.status == "RUNNING"  # until finish_invocation
    assert score.parent_run_id == prune.parent_run_id == parent.info.run_id

    child = runs[score.run_id]
    assert child.info.run_name == "score"
    assert child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.tags["pruneflow.stage"] == "score"
    assert child.data.tags["custom"] == "yes"
    assert child.data.params["grid.ratios"] == "[0.2, 0.4]"
    assert child.data.params["weird key_"] == "1"
    assert len(child.data.params["long"]) == 6000
    assert child.data.metrics == {"ppl.wikitext2": 12.5}
    history = _client().get_metric_history(score.run_id, "ppl.wikitext2")
    assert [(m.step, m.value) for m in history] == [(2, 12.5)]

    assert child.info.artifact_uri.startswith((project / "mlartifacts").as_uri())
    assert (project / "mlartifacts" / score.run_id / "artifacts" / "out" / "scores.json").is_file()

    other = runs[prune.run_id]
    assert other.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert other.data.tags["ratio"] == "0.2"
    assert other.data.metrics == {"kept": 0.8}


# --------------------------------------------------------------------------------------------------
# (b) no invocation -> top-level run; (c) failures of the body
# --------------------------------------------------------------------------------------------------


def test_without_invocation_the_stage_run_is_top_level(project: Path, settings: MlflowParams) -> None:
    with stage_run("evaluate", settings=settings) as run:
        run.log_metrics({"acc": 0.5})
    runs = _runs(settings)
    assert [r.info.run_id for r in runs] == [run.run_id]
    assert run.parent_run_id is None
    assert "mlflow.parentRunId" not in runs[0].data.tags
    assert runs[0].data.tags["pruneflow.engine"] == "standalone"
    assert runs[0].info.status == "FINISHED"


def test_failing_body_marks_run_failed_and_reraises_the_same_exception(
    project: Path, settings: MlflowParams
) -> None:
    error = RuntimeError("boom")
    with pytest.raises(RuntimeError) as excinfo, stage_run("prune", settings=settings) as failed:
        raise error
    assert excinfo.value is error
    with pytest.raises(KeyboardInterrupt), stage_run("recover", settings=settings) as killed:
        raise KeyboardInterrupt
    status = {r.info.run_id: r.info.status for r in _runs(settings)}
    assert status == {failed.run_id: "FAILED", killed.run_id: "KILLED"}


# --------------------------------------------------------------------------------------------------
# (d), (e) broken tracking never breaks the stage
# --------------------------------------------------------------------------------------------------


def test_unreachable_server_warns_once_and_the_stage_still_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in HTTP_ENV:
        _unset_env(monkeypatch, name)
    monkeypatch.chdir(tmp_path)
    settings = MlflowParams(tracking_uri="http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.monotonic()
    with stage_run("score", settings=settings, params={"a": 1}) as run:
        (tmp_path / "output.txt").write_text("done")
        run.log_metrics({"loss": 1.0})
        run.log_params({"b": 2})
        run.log_artifact(tmp_path / "output.txt")
    elapsed = time.monotonic() - start

    assert (tmp_path / "output.txt").read_text() == "done"
    assert run.run_id is None
    assert elapsed < 20, f"a down server cost {elapsed:.1f} s"
    err = capsys.readouterr().err
    assert err.count("pruneflow: MLflow tracking failed for stage score:") == 1
    assert "127.0.0.1:9" in err and "the stage's outputs are unaffected" in err
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] in ("0", "1")


def test_user_http_settings_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "33")
    _unset_env(monkeypatch, "MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    tracking._configure_http("https://mlflow.example.org")
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "33"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"


def test_bad_uri_scheme_is_a_warning_not_an_exception(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    with stage_run("calibrate", settings=MlflowParams(tracking_uri="bogus://nowhere")) as run:
        run.log_metrics({"x": 1.0})
        result = 42
    assert result == 42 and run.run_id is None
    err = capsys.readouterr().err
    assert err.count("pruneflow: MLflow tracking failed for stage calibrate:") == 1
    assert "bogus://nowhere" in err


def test_database_is_locked_is_retried_then_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking.time, "sleep", lambda _s: None)
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("wrapped") from sqlite3.OperationalError("database is locked")
        return "ok"

    assert tracking._with_retries(flaky) == "ok" and len(calls) == 3

    calls.clear()

    def always_locked() -> None:
        calls.append(1)
        raise sqlite3.OperationalError("database is locked")

    with pytest.raises(sqlite3.OperationalError):
        tracking._with_retries(always_locked)
    assert len(calls) == tracking._LOCKED_RETRIES

    calls.clear()

    def other_error() -> None:
        calls.append(1)
        raise ValueError("bad key")

    with pytest.raises(ValueError):
        tracking._with_retries(other_error)
    assert len(calls) == 1


# --------------------------------------------------------------------------------------------------
# (f) enabled=False never touches mlflow
# --------------------------------------------------------------------------------------------------


class _NoMlflow(types.ModuleType):
    def __getattr__(self, name: str):
        raise AssertionError(f"mlflow.{name} was used although tracking is disabled")


def test_disabled_tracking_never_touches_mlflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(INVOCATION_ENV, "inv-disabled")
    sentinel = _NoMlflow("mlflow")
    for name in [n for n in sys.modules if n == "mlflow" or n.startswith("mlflow.")]:
        monkeypatch.setitem(sys.modules, name, sentinel)
    monkeypatch.setitem(sys.modules, "mlflow", sentinel)

    settings = MlflowParams(enabled=False)
    with stage_run("score", settings=settings, params={"a": 1}, tags={"t": "1"}) as run:
        run.log_params({"b": 2})
        run.log_metrics({"c": 3.0})
        run.set_tags({"d": "4"})
        (tmp_path / "f.txt").write_text("x")
        run.log_artifact(tmp_path / "f.txt")
    finish_invocation(settings)

    assert run.run_id is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]  # no mlflow.db, lock or mlartifacts
    assert capsys.readouterr().err == ""


def test_importing_tracking_does_not_import_mlflow() -> None:
    code = "import sys, pruneflow.pipeline.tracking; print(sorted(m for m in sys.modules if m.startswith('mlflow')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------------
# (g) two processes, same store, same invocation
# --------------------------------------------------------------------------------------------------


def _concurrent_stage(project: str, invocation: str, stage: str, barrier, results) -> None:
    """Spawned worker: one stage of the shared invocation, started at the same moment as the other."""
    os.chdir(project)
    os.environ[INVOCATION_ENV] = invocation
    import mlflow.tracking  # noqa: F401  (warm import so both reach the store lock together)

    err = io.StringIO()
    barrier.wait(timeout=120)
    with (
        contextlib.redirect_stderr(err),
        stage_run(stage, settings=MlflowParams(), params={"s": stage}) as run,
    ):
        for step in range(20):
            run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    results.put((stage, run.run_id, run.parent_run_id, err.getvalue()))


def _run_stages_at_once(project: Path, jobs: list[tuple[str, str]]) -> list[tuple]:
    """Start one spawned worker per (invocation, stage), released together; their outcomes."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(len(jobs)), ctx.Queue()
    workers = [ctx.Process(target=_concurrent_stage, args=(str(project), invocation, stage, barrier, results))
               for invocation, stage in jobs]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=180) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    return outcomes


def test_two_processes_share_one_parent_in_one_sqlite_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a fresh store: both workers race to create it
    outcomes = _run_stages_at_once(tmp_path, [("inv-g", "score_a"), ("inv-g", "score_b")])

    by_stage = {stage: (run_id, parent_id, err) for stage, run_id, parent_id, err in outcomes}
    assert set(by_stage) == {"score_a", "score_b"}
    for run_id, parent_id, err in by_stage.values():
        assert run_id is not None and parent_id is not None
        assert "MLflow tracking failed" not in err
    assert by_stage["score_a"][1] == by_stage["score_b"][1]

    runs = _runs(MlflowParams())
    assert len(runs) == 3
    assert sum(r.data.tags.get("pruneflow.kind") == "pipeline" for r in runs) == 1
    for stage, (run_id, _, _) in by_stage.items():
        run = next(r for r in runs if r.info.run_id == run_id)
        assert run.info.status == "FINISHED" and run.data.params == {"s": stage}
        assert len(_client().get_metric_history(run_id, "loss")) == 20


def test_two_invocations_at_once_keep_separate_parents_in_one_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two pipeline runs (two users, or snakemake and dvc) write one fresh store at the same moment."""
    monkeypatch.chdir(tmp_path)
    outcomes = _run_stages_at_once(tmp_path, [(invocation, f"{stage}@{invocation}") for invocation in ("inv-1", "inv-2")
                                              for stage in ("score", "prune")])
    assert all("MLflow tracking failed" not in err for *_, err in outcomes)

    runs = _runs(MlflowParams())
    parents = {r.info.run_id: r for r in runs if r.data.tags.get("pruneflow.kind") == "pipeline"}
    assert len(parents) == 2 and len(runs) == 6
    children: dict[str, set[str]] = {}
    for stage, run_id, parent_id, _ in outcomes:
        children.setdefault(parent_id, set()).add(stage.split("@")[1])
        assert len(_client().get_metric_history(run_id, "loss")) == 20
    assert sorted(map(sorted, children.values())) == [["inv-1"], ["inv-2"]], "stages must nest under their own run"
    assert set(children) == set(parents)
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


# --------------------------------------------------------------------------------------------------
# (h) finish_invocation
# --------------------------------------------------------------------------------------------------


def test_finish_invocation_ends_the_parent_and_orphaned_stage_runs(
    project: Path, settings: MlflowParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(INVOCATION_ENV, "inv-h")
    with stage_run("score", settings=settings) as run:
        pass
    # A stage whose process was killed leaves its run RUNNING.
    orphan = _client().create_run(
        run.experiment_id, run_name="prune", tags={"mlflow.parentRunId": run.parent_run_id}
    )
    finish_invocation(settings)

    status = {r.info.run_id: r.info.status for r in _runs(settings)}
    assert status == {run.parent_run_id: "FINISHED", run.run_id: "FINISHED", orphan.info.run_id: "KILLED"}

    finish_invocation(settings, "failed")
    assert _client().get_run(run.parent_run_id).info.status == "FAILED"
    with pytest.raises(ValueError, match="status"):
        finish_invocation(settings, "DONE")


def test_finish_invocation_without_store_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(INVOCATION_ENV, "inv-none")
    finish_invocation(MlflowParams())
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# (i) ancestor detection
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmdline", "engine"),
    [
        (["snakemake", "--cores", "2"], "snakemake"),
        (["/venv/bin/python3", "/venv/bin/snakemake", "-c2"], "snakemake"),
        (["python", "-m", "snakemake", "all"], "snakemake"),
        (["python3.11", "-X", "utf8", "-u", "-m", "dvc", "repro"], "dvc"),
        (["/usr/local/bin/dvc", "exp", "run"], "dvc"),
        (["python", "-mdvc", "repro"], "dvc"),
        (["C:\\Py\\Scripts\\dvc.exe", "repro"], "dvc"),
        (["python", "-m", "pruneflow.stages.score"], None),
        (["python", "-c", "import snakemake"], None),
        (["/bin/bash", "-c", "snakemake --cores 1"], None),
        (["grep", "dvc"], None),
        (["python", "/home/u/dvc_helper.py"], None),
        ([], None),
    ],
)
def test_engine_of(cmdline: list[str], engine: str | None) -> None:
    assert engine_of(cmdline) == engine


def test_nearest_pipeline_ancestor_defines_the_invocation(monkeypatch: pytest.MonkeyPatch) -> None:
    chain = [
        ProcessInfo(400, 40.0, ("python", "-m", "pruneflow.stages.score", "--params", "params.yaml")),
        ProcessInfo(300, 30.0, ("/bin/bash", "-c", "set -euo pipefail; python -m pruneflow.stages.score")),
        ProcessInfo(200, 20.5, ("/venv/bin/python", "/venv/bin/snakemake", "--cores", "2")),
        ProcessInfo(150, 15.0, ("dvc", "repro")),
        ProcessInfo(1, 0.1, ("/sbin/init",)),
    ]
    ancestor = find_pipeline_ancestor(chain)
    assert ancestor is not None
    assert (ancestor.engine, ancestor.pid) == ("snakemake", 200)
    assert ancestor.key == "snakemake-200-20.50"

    invocation = resolve_invocation(chain)
    assert invocation is not None
    assert (invocation.key, invocation.engine) == ("snakemake-200-20.50", "snakemake")
    assert invocation.command == "/venv/bin/python /venv/bin/snakemake --cores 2"

    monkeypatch.setenv(INVOCATION_ENV, "20250101T000000-abcd'; drop")
    invocation = resolve_invocation(chain)
    assert invocation is not None
    assert (invocation.key, invocation.engine) == ("20250101T000000-abcd___drop", "snakemake")


def test_snakemake_job_runner_defers_to_the_snakemake_that_spawned_it() -> None:
    chain = [
        ProcessInfo(500, 5.0, ("python", "-m", "pruneflow.stages.score")),
        ProcessInfo(
            400, 4.0, ("python", "-m", "snakemake", "--target-jobs", "score:ratio=0.2", "--cores", "1")
        ),
        ProcessInfo(300, 3.0, ("snakemake", "--cores", "4")),
    ]
    ancestor = find_pipeline_ancestor(chain)
    assert ancestor is not None and ancestor.pid == 300
    alone = find_pipeline_ancestor(chain[:2])
    assert alone is not None and alone.pid == 400


def test_no_pipeline_ancestor_means_standalone() -> None:
    assert find_pipeline_ancestor(PLAIN_CHAIN) is None
    assert resolve_invocation(PLAIN_CHAIN) is None


def test_real_process_chain_starts_with_this_process() -> None:
    chain = list(REAL_PROCESS_CHAIN())
    assert chain[0].pid == os.getpid()
    assert chain[0].cmdline and len({info.pid for info in chain}) == len(chain)


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------


def test_uri_resolution_and_ui_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path.as_posix()}/mlflow.db"
    assert resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert resolve_tracking_uri("http://host:5000") == "http://host:5000"
    assert describe_ui(MlflowParams()) == "mlflow ui --backend-store-uri sqlite:///mlflow.db"
    assert describe_ui(MlflowParams(tracking_uri="http://h:5000")) == "python -m webbrowser http://h:5000"
    first, second = new_invocation_id(), new_invocation_id()
    assert first != second and tracking._sanitize_invocation_key(first) == first


def test_flatten_metrics() -> None:
    class Scalar:  # a torch / numpy scalar stand-in
        def item(self) -> float:
            return 2.5

    flat = tracking.flatten_metrics(
        {"a": {"b": {"c": 1}}, "inf": math.inf, "none": None, "nan": math.nan, "s": "1", "t": Scalar()}
    )
    assert flat == {"a.b.c": 1.0, "inf": math.inf, "t": 2.5}


@pytest.fixture(autouse=True)
def _no_open_runs_leak() -> Iterator[None]:
    yield
    assert not tracking._OPEN_RUNS


# --------------------------------------------------------------------------------------------------
# (i) a team's tracking server (`mlflow server` on 127.0.0.1) and the inputs' DVC hashes
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` (sqlite backend, proxied artifacts) on a free local port."""
    import urllib.request

    root = tmp_path_factory.mktemp("server")
    port = _free_port()
    log = (root / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    try:
        yield uri
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()


def test_stage_runs_reach_a_tracking_server_with_input_hashes(
    tracking_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    from pruneflow.pipeline.versioning import dvc_hash

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(INVOCATION_ENV, "inv-server")
    settings = MlflowParams(tracking_uri=tracking_server, experiment="team-sweep")
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\x00" * 1000)
    (tmp_path / "calibration.safetensors").write_bytes(b"\x01" * 100)
    inputs = {"model": model, "calibration": tmp_path / "calibration.safetensors", "absent": tmp_path / "nope"}
    with stage_run("score", settings=settings, params={"criterion": "flap"}, inputs=inputs) as score:
        score.log_metrics({"seconds": 1.5})
        (tmp_path / "scores.json").write_text("{}")
        score.log_artifact(tmp_path / "scores.json")
    with stage_run("prune", settings=settings, params={"ratio": 0.2}) as prune:
        prune.log_metrics({"achieved_ratio": 0.2})
    finish_invocation(settings)

    assert not (tmp_path / "mlflow.db").exists()  # nothing went to a local store
    client = MlflowClient(tracking_uri=tracking_server)
    experiment = client.get_experiment_by_name("team-sweep")
    runs = {run.info.run_id: run for run in client.search_runs([experiment.experiment_id])}
    assert len(runs) == 3
    parent = next(run for run in runs.values() if run.data.tags.get("pruneflow.kind") == "pipeline")
    assert parent.info.status == "FINISHED"
    child = runs[score.run_id]
    assert child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id == runs[prune.run_id].data.tags[
        "mlflow.parentRunId"]
    assert child.data.params == {"criterion": "flap"} and child.data.metrics == {"seconds": 1.5}
    assert child.data.tags["pruneflow.input.model"] == str(model)
    assert child.data.tags["pruneflow.input.model.dvc_md5"] == dvc_hash(model)
    assert child.data.tags["pruneflow.input.calibration.dvc_md5"] == dvc_hash(tmp_path / "calibration.safetensors")
    assert child.data.tags["pruneflow.input.absent.dvc_md5"].startswith("unavailable (FileNotFoundError")
    assert [a.path for a in client.list_artifacts(score.run_id)] == ["scores.json"]
    # the runs of a sweep are compared by their params in the UI / search API
    found = client.search_runs([experiment.experiment_id], filter_string="params.criterion = 'flap'")
    assert [run.info.run_id for run in found] == [score.run_id]
