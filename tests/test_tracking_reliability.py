"""Tracking reliability: outages of the tracking store (spool, sync) and parallel runs.

Fast tests use an unreachable loopback port or a failing sqlite store. The `slow` ones start a
real `mlflow server` on loopback and stop it mid-run, run four training processes against one
fresh SQLite store, and run four queued DVC experiments with two workers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from optlab import engine
from optlab.config import RunConfig, SNConfig
from optlab.tracking.sink import REQUIRED_TAGS
from tests.conftest import make_splits
from tests.repo_copy import tiny_repo
from conftest import every

ROOT = Path(__file__).resolve().parents[1]
MLFLOW_CLI = Path(sys.executable).parent / "mlflow"

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path: Path) -> Path:
    """Never touch the repository's own spool or store."""
    spool = tmp_path / "spool"
    monkeypatch.setenv("OPTLAB_SPOOL_DIR", str(spool))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return spool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_cfg(**kw) -> RunConfig:
    base = dict(optimizer="sgd", lr=0.1, depth=2, width=8, epochs=4, batch_size=32, log_every=1,
                device="cpu", run_id="outage")
    base.update(kw)
    return RunConfig(probes=every(8), **base)


def base_tags(**extra) -> dict:
    tags = {"phase": "debug", "git_commit": "0123abcd", "git_dirty": "false", "study": "reliab",
            "dvc_stage": "train", "scale": "quick"}
    tags.update(extra)
    return tags


def points(result: engine.RunResult, key: str) -> list[tuple[int, float]]:
    return sorted((s, v) for s, _, k, v in result.curves if k == key and math.isfinite(v))


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def spool_files(spool: Path) -> list[Path]:
    return sorted(spool.glob("*.jsonl")) if spool.is_dir() else []


def assert_spool_empty(spool: Path) -> None:
    left = [p.name for p in spool.iterdir() if p.name != "resolved"] if spool.is_dir() else []
    assert left == [], left


# -- fast: store unreachable from the start, replay into a sqlite store -----------------------
def test_server_down_from_start_spools_and_sync_creates_the_run(tmp_path, _isolated):
    from mlflow import MlflowClient

    from optlab.tracking import MlflowSink, pending, sync

    dead = f"http://127.0.0.1:{free_port()}"
    sink = MlflowSink(dead, run_name="down", flush_every=5)
    t0 = time.monotonic()
    with pytest.warns(RuntimeWarning, match="spooled"):
        res = engine.train(tiny_cfg(), data=make_splits(), sinks=[sink], run_dir=tmp_path / "run",
                           tags=base_tags(git_dirty="true", _diff="diff --git a/x b/x\n"), progress=False)
    assert time.monotonic() - t0 < 60  # not minutes of MLflow retries
    assert res.status == "completed" and (tmp_path / "run" / "metrics.json").exists()
    assert sink.spooling and sink.run_id is None
    [entry] = pending()
    assert entry.run_id is None and entry.status == "completed" and entry.artifacts == 4
    assert entry.metric_points == sum(1 for c in res.curves if math.isfinite(c[3])) + len(
        [v for v in res.final.values() if isinstance(v, (int, float)) and math.isfinite(v)]
    )

    store = f"sqlite:///{(tmp_path / 'store.db').as_posix()}"
    summary = sync(tracking_uri=store)
    assert summary.ok and len(summary.uploaded) == 1 and summary.uploaded[0]["created"]
    assert_spool_empty(_isolated)
    client = MlflowClient(store)
    run = client.get_run(summary.uploaded[0]["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "completed"
    assert run.data.tags["mlflow.runName"] == "down"
    for tag in REQUIRED_TAGS:
        assert tag in run.data.tags, tag
    assert run.data.params["optimizer"] == "sgd"
    for key in ("train_loss", "val_acc"):
        assert history(client, run.info.run_id, key) == points(res, key)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "curves.csv", "layers.csv", "epochs.csv", "provenance"} <= names
    assert sync(tracking_uri=store).uploaded == []  # nothing left, nothing duplicated


def test_store_failure_mid_run_appends_to_the_same_run(tmp_path, _isolated, monkeypatch):
    """A sqlite store that starts failing mid-run (here: log_batch raises): the run created
    before the failure is completed by sync, with every metric point exactly once."""
    from mlflow import MlflowClient

    from optlab.tracking import MlflowSink, sync

    store = f"sqlite:///{(tmp_path / 'store.db').as_posix()}"
    original = MlflowClient.log_batch
    sent = {"metric_calls": 0}

    def failing(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        if metrics:
            sent["metric_calls"] += 1
            if sent["metric_calls"] > 3:
                raise mlflow.exceptions.MlflowException("API request failed: connection refused")
        return original(self, run_id, metrics=metrics, params=params, tags=tags, synchronous=synchronous)

    monkeypatch.setattr(MlflowClient, "log_batch", failing)
    sink = MlflowSink(store, run_name="mid", flush_every=4)
    with pytest.warns(RuntimeWarning, match="spooled"):
        res = engine.train(tiny_cfg(), data=make_splits(), sinks=[sink], run_dir=tmp_path / "run",
                           tags=base_tags(), progress=False)
    assert res.status == "completed" and sink.run_id is not None and sink.spooling
    client = MlflowClient(store)
    assert client.get_run(sink.run_id).info.status == "RUNNING"
    monkeypatch.setattr(MlflowClient, "log_batch", original)

    summary = sync()
    assert summary.ok and [u["run_id"] for u in summary.uploaded] == [sink.run_id]
    assert not summary.uploaded[0]["created"]
    run = client.get_run(sink.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "completed"
    for key in ("train_loss", "val_acc", "val_loss"):
        assert history(client, sink.run_id, key) == points(res, key)
    assert run.data.metrics["final.test_acc"] == res.final["test_acc"]
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert_spool_empty(_isolated)


def test_partial_replay_resumes_without_resending(tmp_path, _isolated, monkeypatch):
    from mlflow import MlflowClient

    from optlab.tracking import MlflowSink, pending, sync

    sink = MlflowSink(f"http://127.0.0.1:{free_port()}", run_name="partial", flush_every=1)
    with pytest.warns(RuntimeWarning):
        sink.start({"lr": 0.1}, base_tags())
    for step in range(30):  # thirty metric operations of 100 points each: replayed as 3 batches of 1000
        sink.log_metrics([("train_loss", 1.0 / (step * 100 + i + 1), step * 100 + i) for i in range(100)])
    sink.finish("completed", {"val_acc": 0.5})

    store = f"sqlite:///{(tmp_path / 'store.db').as_posix()}"
    original = MlflowClient.log_batch
    calls: list[int] = []
    failed: list[bool] = []

    def flaky(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        if metrics:
            calls.append(len(metrics))
            if len(calls) == 2 and not failed:
                failed.append(True)
                raise mlflow.exceptions.MlflowException("503 Service Unavailable")
        return original(self, run_id, metrics=metrics, params=params, tags=tags, synchronous=synchronous)

    monkeypatch.setattr(MlflowClient, "log_batch", flaky)
    first = sync(tracking_uri=store)
    assert len(first.failed) == 1 and "503" in first.failed[0]["error"]
    [entry] = pending()
    assert entry.done == 11 and entry.error  # the run + the 10 metric operations of the first batch replayed
    calls.clear()
    second = sync(tracking_uri=store)
    assert second.ok and len(second.uploaded) == 1
    assert calls == [1000, 1000, 1]  # only what the first attempt had not sent (and the summary point)
    run_id = second.uploaded[0]["run_id"]
    client = MlflowClient(store)
    assert len(client.get_metric_history(run_id, "train_loss")) == 3000
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    assert_spool_empty(_isolated)


def test_spooled_parent_and_children(tmp_path, _isolated):
    from mlflow import MlflowClient

    from optlab.tracking import MlflowSink, end_run, parent_run, sync

    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.warns(RuntimeWarning):
        with parent_run("sweepy", tracking_uri=dead, tags=base_tags()) as parent:
            assert parent.startswith("spool:")
            for seed in (0, 1):
                child = MlflowSink(dead, run_name=f"child{seed}", parent_run_id=parent)
                child.start({"seed": seed}, base_tags(seed=seed))
                child.log_metrics([("train_loss", 1.0, 0)])
                child.finish("completed", {})
    end_run("", "completed")  # no parent (tracking off): nothing to do
    store = f"sqlite:///{(tmp_path / 'store.db').as_posix()}"
    summary = sync(tracking_uri=store)
    assert summary.ok and len(summary.uploaded) == 3
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("optlab").experiment_id])
    parents = [r for r in runs if r.data.tags.get("optlab.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("optlab.role") == "run"]
    assert len(parents) == 1 and len(children) == 2
    assert parents[0].info.status == "FINISHED" and parents[0].data.tags["status"] == "completed"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert_spool_empty(_isolated)


def test_try_sync_is_quick_when_the_server_is_down(_isolated):
    from optlab.tracking import MlflowSink, try_sync

    assert try_sync() is None  # empty spool: returns at once
    sink = MlflowSink(f"http://127.0.0.1:{free_port()}", run_name="quick")
    with pytest.warns(RuntimeWarning):
        sink.start({}, base_tags())
    sink.finish("completed", {})
    t0 = time.monotonic()
    summary = try_sync(quiet=True)
    assert time.monotonic() - t0 < 10  # one refused /health probe, no retries
    assert summary is not None and not summary.uploaded and len(summary.skipped) == 1
    assert len(spool_files(_isolated)) == 1


def test_a_running_writer_is_never_replayed(tmp_path, _isolated):
    from optlab.tracking import MlflowSink, pending, sync

    sink = MlflowSink(f"http://127.0.0.1:{free_port()}", run_name="live")
    with pytest.warns(RuntimeWarning):
        sink.start({}, base_tags())
    sink.log_metrics([("train_loss", 1.0, 0)])
    store = f"sqlite:///{(tmp_path / 'store.db').as_posix()}"
    summary = sync(tracking_uri=store)
    assert summary.uploaded == [] and "in use" in summary.skipped[0]["reason"]
    assert pending()[0].in_use
    sink.finish("completed", {})
    assert len(sync(tracking_uri=store).uploaded) == 1


# -- slow: a real tracking server stopped mid-run ---------------------------------------------
class Server:
    """`mlflow server` on loopback, in its own process group (stopped as a group)."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port, self.proc = root, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 120.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        self.log = open(self.root / f"server-{time.time_ns()}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(MLFLOW_CLI), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{(self.root / 'db.sqlite').as_posix()}",
             "--artifacts-destination", str(self.root / "art"), "--workers", "1"],
            cwd=self.root, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mlflow server exited: {(self.root / self.log.name).read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.25)
        raise AssertionError("mlflow server did not become healthy")

    def stop(self) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the server's pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(timeout=15)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # uvicorn child gone: the port refuses connections
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
            except OSError:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            time.sleep(0.2)
        self.proc = None
        self.log.close()


class StopServerAt:
    """Forwards to a sink; stops the server when a batch reaches `step`."""

    def __init__(self, inner, server: Server, step: int) -> None:
        self.inner, self.server, self.step, self.stopped_at = inner, server, step, None

    def start(self, params, tags):
        self.inner.start(params, tags)

    def log_metrics(self, batch):
        if self.stopped_at is None and any(s >= self.step for _, _, s in batch):
            self.server.stop()
            self.stopped_at = max(s for _, _, s in batch)
        self.inner.log_metrics(batch)

    def log_artifact(self, path):
        self.inner.log_artifact(path)

    def finish(self, status, summary):
        self.inner.finish(status, summary)


@pytest.mark.slow
def test_server_stopped_mid_run_then_restarted_and_synced(tmp_path, _isolated, monkeypatch):
    from mlflow import MlflowClient

    from optlab.tracking import MlflowSink, end_run, parent_run

    server = Server(tmp_path, free_port())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    server.start()
    try:
        # 1. outage mid-run: the run exists on the server, the rest of it is spooled
        online = MlflowSink(run_name="mid-run", flush_every=4)  # URI from MLFLOW_TRACKING_URI
        wrapper = StopServerAt(online, server, step=12)
        with pytest.warns(RuntimeWarning, match="spooled"):
            res_a = engine.train(tiny_cfg(run_id="a"), data=make_splits(), sinks=[wrapper],
                                 run_dir=tmp_path / "a", tags=base_tags(), progress=False)
        assert wrapper.stopped_at is not None and res_a.status == "completed"
        for name in ("metrics.json", "curves.csv", "layers.csv", "epochs.csv"):
            assert (tmp_path / "a" / name).exists()
        assert online.run_id is not None and online.spooling

        # 2. the server is down from the start: parent and child exist only in the spool
        t0 = time.monotonic()
        with pytest.warns(RuntimeWarning, match="spooled"):
            parent = parent_run("reliab", tags=base_tags())
            down = MlflowSink(run_name="down", parent_run_id=parent)
            res_b = engine.train(tiny_cfg(run_id="b", seed=1), data=make_splits(), sinks=[down],
                                 run_dir=tmp_path / "b", tags=base_tags(seed=1), progress=False)
            end_run(parent, "completed")
        assert time.monotonic() - t0 < 60 and res_b.status == "completed" and down.run_id is None

        from optlab.tracking import pending

        spooled = {e.run_name: e for e in pending()}
        final = [v for v in res_a.final.values() if isinstance(v, (int, float)) and math.isfinite(v)]
        total_a = sum(1 for c in res_a.curves if math.isfinite(c[3])) + len(final)
        assert 0 < spooled["mid-run"].metric_points < total_a  # part went out before the outage
        assert spooled["mid-run"].run_id == online.run_id and spooled["down"].run_id is None
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        status = subprocess.run([sys.executable, "-m", "optlab.tracking", "status"], env=env,
                                capture_output=True, text=True, check=True).stdout
        assert "3 spooled run(s)" in status and f"appends to run {online.run_id}" in status

        # 3. back up on the same port and backend: upload everything
        server.start()
        proc = subprocess.run([sys.executable, "-m", "optlab.tracking", "sync"], env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "3 uploaded" in proc.stdout and f"appended to run {online.run_id}" in proc.stdout
        assert_spool_empty(_isolated)

        client = MlflowClient(server.uri)
        run_a = client.get_run(online.run_id)
        assert run_a.info.status == "FINISHED" and run_a.data.tags["status"] == "completed"
        for tag in REQUIRED_TAGS:
            assert tag in run_a.data.tags, tag
        for key in ("train_loss", "val_acc"):
            assert history(client, online.run_id, key) == points(res_a, key)
        assert {"metrics.json", "curves.csv"} <= {a.path for a in client.list_artifacts(online.run_id)}

        exp = client.get_experiment_by_name("optlab").experiment_id
        [run_b] = client.search_runs([exp], filter_string="tags.`mlflow.runName` = 'down'")
        [par] = client.search_runs([exp], filter_string="tags.`optlab.role` = 'parent'")
        assert run_b.info.status == "FINISHED" and run_b.data.tags["mlflow.parentRunId"] == par.info.run_id
        assert par.info.status == "FINISHED"
        for tag in REQUIRED_TAGS:
            assert tag in run_b.data.tags, tag
        for key in ("train_loss", "val_acc"):
            assert history(client, run_b.info.run_id, key) == points(res_b, key)
        assert len(client.search_runs([exp])) == 3
    finally:
        server.stop()


# -- slow: parallel runs against one fresh SQLite store ---------------------------------------
_WORKER = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from optlab import engine
from optlab.config import RunConfig, SNConfig
from optlab.tracking import MlflowSink
from tests.conftest import make_splits
from tests.repo_copy import tiny_repo
seed, out, go = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
data = make_splits(seed=seed)
out.with_suffix(".ready").write_text("ready")
while not go.exists():
    time.sleep(0.01)
cfg = RunConfig(probes={{"grad_norm": {{"every": 8}}, "sigma_max": {{"every": 8}}}}, optimizer="sgd", lr=0.1, depth=2, width=8, epochs=6,
                batch_size=16, log_every=1, device="cpu", seed=seed, run_id=f"par{{seed}}")
sink = MlflowSink(run_name=f"par{{seed}}", flush_every=20)
res = engine.train(cfg, data=data, sinks=[sink], progress=False)
curves = [[s, k, v] for s, _, k, v in res.curves if v == v and abs(v) != float("inf")]
out.write_text(json.dumps({{"run_id": sink.run_id, "spooled": sink.spooling, "curves": curves}}))
"""


def _db_counts(db: Path) -> dict[str, dict]:
    con = sqlite3.connect(db)
    try:
        out = {}
        for run_uuid, status in con.execute("SELECT run_uuid, status FROM runs"):
            n = dict(con.execute("SELECT key, COUNT(*) FROM metrics WHERE run_uuid=? GROUP BY key",
                                 (run_uuid,)).fetchall())
            out[run_uuid] = {"status": status, "metrics": n}
        return out
    finally:
        con.close()


@pytest.mark.slow
def test_four_parallel_processes_one_fresh_sqlite_store(tmp_path, _isolated):
    db = tmp_path / "mlflow.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{db.as_posix()}"
    env["OPTLAB_SPOOL_DIR"] = str(_isolated)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"  # four processes, few cores
    go = tmp_path / "go"
    script = _WORKER.format(root=str(ROOT))
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(seed), str(tmp_path / f"out{seed}.json"), str(go)],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for seed in range(4)
    ]
    deadline = time.monotonic() + 180
    while len(list(tmp_path.glob("out*.ready"))) < 4:  # all four imported torch and mlflow
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a worker died"
        time.sleep(0.05)
    go.write_text("go")  # released together: four runs create and write to one fresh store
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    counts = _db_counts(db)
    assert len(counts) == 4
    for seed in range(4):
        doc = json.loads((tmp_path / f"out{seed}.json").read_text())
        assert not doc["spooled"], "a parallel run fell back to the spool"
        want: dict[str, int] = {}
        for _, key, _ in doc["curves"]:
            want[key] = want.get(key, 0) + 1
        got = counts[doc["run_id"]]
        assert got["status"] == "FINISHED"
        assert {k: v for k, v in got["metrics"].items() if not k.startswith("final.")} == want
    assert spool_files(_isolated) == []


# -- slow: four queued DVC experiments, two workers, one store at the original repo root -------
def _sh(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def _tiny_repo(tmp: Path) -> dict[str, str]:
    """A committed copy of the project with tiny params and a reproduced baseline."""
    return tiny_repo(tmp, lrs=[0.1], seeds=[0], methods=["sgd"],
                     variants={"mlp_sgd": {"arch": "mlp", "depth": 2, "optimizer": "sgd", "lr": 0.1}})


def _exp_curves(repo: Path, env: dict[str, str]) -> dict[str, dict[str, int]]:
    """seed -> {metric: finite points} of runs/train/curves.csv in each experiment commit
    (a DVC out: its md5 comes from the experiment's dvc.lock, its content from the cache)."""
    import csv
    import io

    import yaml

    out: dict[str, dict[str, int]] = {}
    refs = _sh(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo, env).split()
    for ref in refs:
        if "stash" in ref or "/celery/" in ref:  # queue bookkeeping, not experiments
            continue
        seed = str(yaml.safe_load(_sh(["git", "show", f"{ref}:params.yaml"], repo, env))["seed"])
        lock = yaml.safe_load(_sh(["git", "show", f"{ref}:dvc.lock"], repo, env))
        [md5] = [o["md5"] for o in lock["stages"]["train"]["outs"] if o["path"] == "runs/train/curves.csv"]
        text = (repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).read_text()
        counts: dict[str, int] = {}
        for row in csv.DictReader(io.StringIO(text)):
            if math.isfinite(float(row["value"])):
                counts[row["metric"]] = counts.get(row["metric"], 0) + 1
        out[seed] = counts
    return out


@pytest.mark.slow
def test_dvc_queue_two_workers_four_experiments_one_store(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    env = _tiny_repo(repo)
    for seed in (1, 2, 3, 4):
        _sh(["dvc", "exp", "run", "--queue", "-S", f"seed={seed}"], repo, env)
    try:
        _sh(["dvc", "queue", "start", "-j", "2"], repo, env)
        deadline = time.monotonic() + 540
        while True:
            status = _sh(["dvc", "queue", "status"], repo, env)
            rows = [line for line in status.splitlines()[1:] if line.strip() and not line.startswith("Worker")]
            if not any(s in line for line in rows for s in ("Queued", "Running")):
                break
            assert time.monotonic() < deadline, status
            time.sleep(2)
    finally:
        subprocess.run(["dvc", "queue", "stop"], cwd=repo, env=env, capture_output=True, timeout=120)
    assert sum("Success" in line for line in rows) == 4, status

    counts = _db_counts(repo / "mlflow.db")  # the original root's store, not the temp workspaces'
    con = sqlite3.connect(repo / "mlflow.db")
    try:
        tags = {rid: dict(con.execute("SELECT key, value FROM tags WHERE run_uuid=?", (rid,)).fetchall())
                for rid in counts}
    finally:
        con.close()
    train = {t["seed"]: rid for rid, t in tags.items() if t.get("dvc_stage") == "train"}
    assert sorted(train) == ["0", "1", "2", "3", "4"]  # the baseline and the four experiments
    curves = _exp_curves(repo, env)
    assert sorted(curves) == ["1", "2", "3", "4"]
    for seed, want in curves.items():
        got = counts[train[seed]]
        assert got["status"] == "FINISHED"
        assert {k: v for k, v in got["metrics"].items() if not k.startswith("final.")} == want
    assert not list((repo / ".optlab" / "spool").glob("*.jsonl"))  # nothing had to be spooled
    assert not list(repo.glob(".dvc/tmp/exps/**/mlflow.db"))
