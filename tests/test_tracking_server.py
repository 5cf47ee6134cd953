"""A shared MLflow tracking server on a PostgreSQL backend, written to by many processes at once.

The module fixture starts a throwaway PostgreSQL cluster (the distribution's `initdb`/`pg_ctl`,
listening on loopback only, data in a temporary directory) and an `mlflow server` on it. Eight
writer processes are released together; each logs runs through optlab's own `MlflowSink`
(live upload, the same code path as a training run with `tracking.upload: live`). The test then
counts what the server holds, through `MlflowClient` and directly in the database: every run
FINISHED, every metric history complete, every value exact, nothing duplicated, nothing spooled.

Without the PostgreSQL binaries the test skips, unless `OPTLAB_REQUIRE_POSTGRES=1` (set by
`.ci/run` once it has installed them), where it fails instead.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from optlab.tracking import flatten_params

mlflow = pytest.importorskip("mlflow")

ROOT = Path(__file__).resolve().parents[1]
MLFLOW_CLI = Path(sys.executable).parent / "mlflow"
PG_TOOLS = ("initdb", "pg_ctl", "postgres")
PG_USER = "optlab"  # the cluster's superuser (trust auth on loopback; the cluster is throwaway)
PG_DB = "mlflow"
UNPRIVILEGED = "nobody"  # initdb and postgres refuse to run as root

WRITERS = 8
RUNS_PER_WRITER = 3
STEPS = 400
BATCH_STEPS = 20  # steps per log_metrics call, like an engine's log interval
FLUSH_EVERY = 250  # points buffered by the sink per log_batch request
EXPERIMENT = "optlab-server-test"

# Shared by the writers and the checks: what each metric point must be. Values are awkward
# floats (many significant digits, tiny and large magnitudes) so any rounding shows.
_PLAN = f"""
import math

STEPS = {STEPS}
EVERY = {{"train_loss": 1, "grad_norm": 1, "val_acc": 25}}

def value(writer, run, key, step):
    k = {{"train_loss": 1, "grad_norm": 2, "val_acc": 3}}[key]
    x = math.sin(0.7 * step + 1.3 * writer + 2.9 * run + k) / (1.0 + 0.01 * step)
    return x * 10.0 ** ((step + k) % 9 - 4) + k / 3.0

def summary(writer, run):
    return {{"train_loss": value(writer, run, "train_loss", STEPS - 1), "val_acc": 0.5 + writer / 97.0 + run / 89.0}}

def params(writer, run):
    return {{"optimizer": "sgd", "lr": 0.1 / (1 + run), "seed": writer * 10 + run,
             "sn": {{"enabled": True, "every": 4}}, "width": [8, 16]}}

def tags(writer, run):
    return {{"phase": "debug", "study": "server", "seed": writer * 10 + run, "device": "cpu",
             "scale": "quick", "git_commit": "0" * 40, "git_dirty": False, "writer": writer}}
"""

_WRITER = (
    _PLAN
    + f"""
import json, sys, time, warnings
from pathlib import Path
from optlab.tracking import MlflowSink

uri, writer, out, go = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
out.with_suffix(".ready").write_text("ready")
while not go.exists():
    time.sleep(0.01)
done = []
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for run in range({RUNS_PER_WRITER}):
        artifact = out.parent / f"note-{{writer}}-{{run}}.txt"
        artifact.write_text(f"writer {{writer}} run {{run}}\\n")
        sink = MlflowSink(tracking_uri=uri, experiment={EXPERIMENT!r}, run_name=f"w{{writer}}-r{{run}}",
                          flush_every={FLUSH_EVERY})
        sink.start(params(writer, run), tags(writer, run))
        for first in range(0, STEPS, {BATCH_STEPS}):
            batch = [(key, value(writer, run, key, step), step)
                     for step in range(first, first + {BATCH_STEPS})
                     for key, every in EVERY.items() if step % every == 0]
            sink.log_metrics(batch)
        sink.log_artifact(artifact)
        sink.finish("completed", summary(writer, run))
        done.append({{"run": run, "run_id": sink.run_id, "spooled": sink.spooling}})
outages = [str(w.message) for w in caught if w.category.__name__ == "TrackingOutageWarning"]
out.write_text(json.dumps({{"runs": done, "outages": outages}}))
"""
)


def _plan() -> dict:
    namespace: dict = {}
    exec(_PLAN, namespace)  # noqa: S102 (our own constant)
    return namespace


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unavailable(reason: str) -> None:
    """Skip, or fail when the environment promises PostgreSQL (`OPTLAB_REQUIRE_POSTGRES=1`)."""
    if os.environ.get("OPTLAB_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"OPTLAB_REQUIRE_POSTGRES=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def find_pg_bin() -> Path | None:
    """A directory holding initdb, pg_ctl and postgres: PATH first, then Debian's layout."""
    candidates: list[Path] = []
    found = shutil.which("initdb")
    if found:
        candidates += [Path(found).parent, Path(found).resolve().parent]

    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parent.name
        return tuple(int(p) for p in name.split(".") if p.isdigit()) or (0,)

    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)]
    for directory in candidates:
        if all(os.access(directory / tool, os.X_OK) for tool in PG_TOOLS):
            return directory
    return None


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"(no log: {exc})"


@dataclass
class Postgres:
    """A throwaway cluster on 127.0.0.1; as root, its commands run as an unprivileged user."""

    bin: Path
    home: Path  # data directory, socket directory and log live here
    port: int
    as_user: list[str]  # command prefix (empty when not root)

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def log(self) -> Path:
        return self.home / "postgres.log"

    def uri(self, db: str = PG_DB) -> str:
        # The driver named: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg (3), which the
        # lock does not install; psycopg2-binary is what requirements.lock pins.
        return f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{self.port}/{db}"

    def _run(self, *args: str, timeout: float = 60) -> None:
        cmd = [*self.as_user, *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.home)
        if proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}\n"
                f"postgres log:\n{_tail(self.log)}"
            )

    def init(self) -> None:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", PG_USER, "--auth=trust",
                  "-E", "UTF8", "--no-locale", "--no-sync")

    def start(self) -> None:
        # Loopback TCP only, the Unix socket inside the throwaway directory. fsync off: the test
        # is about what a live server receives, not about surviving a power cut.
        options = f"-k {self.home} -h 127.0.0.1 -p {self.port} -c fsync=off -c full_page_writes=off"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", options, "start", timeout=90)

    def stop(self) -> None:
        for mode in ("fast", "immediate"):  # immediate only if fast did not stop it
            try:
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "30",
                          "stop", timeout=45)
                return
            except (AssertionError, subprocess.TimeoutExpired):
                if not (self.data / "postmaster.pid").exists():
                    return

    def create_db(self) -> None:
        import psycopg2

        con = psycopg2.connect(host="127.0.0.1", port=self.port, user=PG_USER, dbname="postgres")
        try:
            con.autocommit = True
            with con.cursor() as cur:
                cur.execute(f"CREATE DATABASE {PG_DB}")
        finally:
            con.close()


def _unprivileged_prefix() -> tuple[list[str], int, int] | str:
    """(command prefix, uid, gid) to run as UNPRIVILEGED, or the reason it cannot be done."""
    try:
        user = pwd.getpwnam(UNPRIVILEGED)
    except KeyError:
        return f"running as root and there is no user {UNPRIVILEGED!r} to run PostgreSQL as"
    search = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin:/usr/bin:/bin"
    runuser, setpriv = shutil.which("runuser", path=search), shutil.which("setpriv", path=search)
    if runuser:
        return [runuser, "-u", UNPRIVILEGED, "--"], user.pw_uid, user.pw_gid
    if setpriv:
        return ([setpriv, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--"],
                user.pw_uid, user.pw_gid)
    return "running as root and neither runuser nor setpriv is available to drop privileges"


@contextlib.contextmanager
def postgres_cluster() -> Iterator[Postgres]:
    pg_bin = find_pg_bin()
    if pg_bin is None:
        _unavailable("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH "
                     "or in /usr/lib/postgresql/*/bin (Debian: apt-get install postgresql)")
    try:
        import psycopg2  # noqa: F401  (MLflow's PostgreSQL driver)
    except ImportError:
        _unavailable("psycopg2 is not installed (MLflow needs it for a postgresql:// store)")
    prefix: list[str] = []
    # Not under pytest's tmp_path: as root that is mode 0700, which the unprivileged user cannot
    # enter; as root, /tmp (world-traversable) rather than a $TMPDIR that may be private to root.
    home = Path(tempfile.mkdtemp(prefix="optlab-pg-", dir="/tmp" if os.geteuid() == 0 else None))
    try:
        if os.geteuid() == 0:
            got = _unprivileged_prefix()
            if isinstance(got, str):
                _unavailable(got)
            prefix, uid, gid = got
            os.chown(home, uid, gid)
        home.chmod(0o700)
        pg = Postgres(bin=pg_bin, home=home, port=free_port(), as_user=prefix)
        pg.init()
        for attempt in range(3):  # the free port may be taken between probing and binding
            try:
                pg.start()
                break
            except AssertionError:
                if attempt == 2:
                    raise
                pg.port = free_port()
        try:
            pg.create_db()
            yield pg
        finally:
            pg.stop()
    finally:
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def mlflow_server(backend_uri: str, root: Path, timeout: float = 120.0) -> Iterator[str]:
    """`mlflow server` on loopback over `backend_uri`, in its own process group."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    log_path = root / "mlflow-server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(MLFLOW_CLI), "server", "--backend-store-uri", backend_uri,
             "--artifacts-destination", str(root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"mlflow server exited {proc.returncode}:\n{_tail(log_path)}")
                try:
                    with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                        if answer.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"mlflow server not healthy after {timeout:.0f} s:\n{_tail(log_path)}")
                time.sleep(0.25)
            yield uri
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # the group: uvicorn's workers too
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)


@dataclass
class Stack:
    uri: str  # the MLflow server
    pg: Postgres
    root: Path


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory) -> Iterator[Stack]:
    """PostgreSQL and an MLflow server on it, for the whole module; both torn down after."""
    root = tmp_path_factory.mktemp("tracking_server")
    with postgres_cluster() as pg, mlflow_server(pg.uri(), root) as uri:
        yield Stack(uri=uri, pg=pg, root=root)


def _sql_counts(pg: Postgres, experiment_id: str) -> tuple[dict[str, str], int]:
    """Straight from the database: {run_uuid: status} and the number of metric rows."""
    import psycopg2

    con = psycopg2.connect(host="127.0.0.1", port=pg.port, user=PG_USER, dbname=PG_DB)
    try:
        with con.cursor() as cur:
            cur.execute("SELECT run_uuid, status FROM runs WHERE experiment_id = %s", (int(experiment_id),))
            runs = dict(cur.fetchall())
            cur.execute("SELECT COUNT(*) FROM metrics m JOIN runs r ON r.run_uuid = m.run_uuid "
                        "WHERE r.experiment_id = %s", (int(experiment_id),))
            (points,) = cur.fetchone()
        return runs, int(points)
    finally:
        con.close()


def test_eight_parallel_writers_lose_nothing(tracking_server: Stack, tmp_path: Path):
    from mlflow import MlflowClient

    plan = _plan()
    spool = tmp_path / "spool"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["OPTLAB_SPOOL_DIR"] = str(spool)  # a fallback to the spool would show here
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, tracking_server.uri, str(w), str(tmp_path / f"out{w}.json"), str(go)],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for w in range(WRITERS)
    ]
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("out*.ready"))) < WRITERS:  # all imported optlab
            assert time.monotonic() < deadline, "writers did not start in time"
            dead = [p for p in procs if p.poll() is not None]
            assert not dead, dead[0].communicate()[1][-3000:]
            time.sleep(0.05)
        go.write_text("go")  # released together
        released = time.monotonic()
        for p in procs:
            _, err = p.communicate(timeout=240)
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    write_s = time.monotonic() - released

    # what the writers say they wrote
    expected: dict[str, tuple[int, int]] = {}  # run_id -> (writer, run)
    for w in range(WRITERS):
        doc = json.loads((tmp_path / f"out{w}.json").read_text())
        assert doc["outages"] == [], doc["outages"]
        assert len(doc["runs"]) == RUNS_PER_WRITER
        for entry in doc["runs"]:
            assert not entry["spooled"], f"writer {w} run {entry['run']} fell back to the spool"
            assert entry["run_id"]
            expected[entry["run_id"]] = (w, entry["run"])
    assert len(expected) == WRITERS * RUNS_PER_WRITER  # distinct run ids
    assert not spool.exists() or not any(spool.iterdir()), "something was spooled"

    # what the server holds, through the REST API
    client = MlflowClient(tracking_uri=tracking_server.uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert sorted(r.info.run_id for r in runs) == sorted(expected)
    every, steps = plan["EVERY"], plan["STEPS"]
    total_points = 0
    for run in runs:
        w, r = expected[run.info.run_id]
        assert run.info.status == "FINISHED", (w, r, run.info.status)
        assert run.info.run_name == f"w{w}-r{r}"
        assert run.data.tags["status"] == "completed"
        assert run.data.tags["study"] == "server" and run.data.tags["writer"] == str(w)
        assert run.data.params == flatten_params(plan["params"](w, r), ".")
        keys = set(every) | {f"final.{k}" for k in plan["summary"](w, r)}
        assert set(run.data.metrics) == keys
        for key, step_every in every.items():
            history = client.get_metric_history(run.info.run_id, key)
            got = sorted((m.step, m.value) for m in history)
            want = [(s, plan["value"](w, r, key, s)) for s in range(0, steps, step_every)]
            assert len(history) == len(want), (w, r, key, len(history), len(want))
            assert got == want, (w, r, key)  # exact: no rounding, no duplicate, no gap
            total_points += len(history)
        for key, value in plan["summary"](w, r).items():
            history = client.get_metric_history(run.info.run_id, f"final.{key}")
            assert [(m.step, m.value) for m in history] == [(steps - 1, value)]
            total_points += 1
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == [f"note-{w}-{r}.txt"]

    per_run = sum(len(range(0, steps, e)) for e in every.values()) + len(plan["summary"](0, 0))
    assert total_points == WRITERS * RUNS_PER_WRITER * per_run

    # and straight from PostgreSQL: the same runs, one row per metric point
    sql_runs, sql_points = _sql_counts(tracking_server.pg, exp.experiment_id)
    assert sql_runs == {run_id: "FINISHED" for run_id in expected}
    assert sql_points == total_points
    print(f"\n{len(sql_runs)} runs FINISHED, {sql_points} metric points "
          f"({WRITERS} writers x {RUNS_PER_WRITER} runs x {per_run} points), written in {write_s:.1f} s")
