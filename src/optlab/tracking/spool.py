"""The spool: what could not be sent to the tracking store, kept on disk and uploaded later.

When a tracking call fails (server down, timeout, 5xx after a short bounded retry, a locked or
unreadable database), `MlflowSink` stops talking to the store for the rest of that run and
appends every remaining operation to a spool file instead; `parent_run`/`end_run` do the same
for sweep parents. `sync()` (CLI: `python -m optlab.tracking sync`) replays the files into the
store; `try_sync()` does it best effort at the start of the next run.

Layout of the spool directory (default `<repo root>/.optlab/spool/`, git-ignored;
`OPTLAB_SPOOL_DIR` overrides):

    <id>.jsonl           a header line, then one operation per line:
                           run      create the run (tags, params, parent, diff) or, when the
                                    run was created before the outage, its run_id to append to
                           metrics  [[key, value, timestamp_ms, step], ...]
                           artifact a file or folder copied into <id>.files/
                           finish   the outcome tag and MLflow status
    <id>.files/          copies of the artifacts logged while spooling
    <id>.progress.json   operations already replayed and the run id, after a partial sync
    resolved/<id>        the MLflow run id a spooled run got (children of a spooled parent
                         refer to it as `spool:<id>`)

Guarantees: a file is deleted only after every operation in it was replayed; progress is
recorded after each operation, so a retried sync never resends a metric batch (and metric
points keep their original timestamps, which MLflow's SQL store deduplicates anyway); a run
created during a sync carries the tag `optlab.spool_id`, so a sync interrupted between
creating it and recording that is found again instead of created twice. A spool file is locked
(flock) by the process writing it and by the process replaying it: concurrent syncs (parallel
runs starting together) skip files another process holds.

No mlflow import at module level."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import socket
import sys
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from optlab.tracking.flatten import redact_url_password
from optlab.tracking.provenance import find_repo_root
from optlab.tracking.transport import bounded_http, reachable

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process locking
    fcntl = None  # type: ignore[assignment]

SPOOL_ENV = "OPTLAB_SPOOL_DIR"
SPOOL_REF = "spool:"
SPOOL_TAG = "optlab.spool_id"
LOST_PARENT_TAG = "optlab.lost_parent"
FORMAT = 1
RESOLVED_DIR = "resolved"
KINDS = ("run", "parent")
_LOCK_WAIT_S = 30.0


class SpoolError(RuntimeError):
    """A spool file cannot be replayed as it is."""


class TrackingOutageWarning(RuntimeWarning):
    """The tracking store failed; the run is being spooled (nothing is lost)."""


def default_spool_dir() -> Path:
    """`OPTLAB_SPOOL_DIR`, else `<repo root>/.optlab/spool` (the original repository even in a
    `dvc exp run --temp/--queue` workspace), else `./.optlab/spool`."""
    env = os.environ.get(SPOOL_ENV)
    if env:
        return Path(env).expanduser().resolve()
    root = find_repo_root() or Path.cwd()
    return (Path(root) / ".optlab" / "spool").resolve()


def resolve_dir(spool_dir: str | Path | None) -> Path:
    return Path(spool_dir).expanduser().resolve() if spool_dir else default_spool_dir()


def is_spool_ref(run_id: str | None) -> bool:
    """True for the id of a run that exists only in the spool (`spool:<id>`)."""
    return bool(run_id) and str(run_id).startswith(SPOOL_REF)


def resolve(ref: str, spool_dir: str | Path | None = None) -> str | None:
    """The MLflow run id of spooled run `ref` (`spool:<id>` or `<id>`) once uploaded, else None."""
    spool_id = str(ref)[len(SPOOL_REF) :] if is_spool_ref(ref) else str(ref)
    try:
        text = (resolve_dir(spool_dir) / RESOLVED_DIR / spool_id).read_text().strip()
    except OSError:
        return None
    return text or None


def _new_spool_id() -> str:
    now = _dt.datetime.now(_dt.timezone.utc)
    return f"{now:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:12]}"


# -- locking ---------------------------------------------------------------------------------
def _try_lock(handle: IO[Any]) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _lock(handle: IO[Any], wait_s: float = _LOCK_WAIT_S) -> bool:
    deadline = time.monotonic() + wait_s
    while not _try_lock(handle):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _unlock(handle: IO[Any]) -> None:
    if fcntl is not None:
        with contextlib.suppress(OSError, ValueError):
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _same_file(handle: IO[Any], path: Path) -> bool:
    """The open file is still the one at `path` (not deleted by a concurrent sync)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    fs = os.fstat(handle.fileno())
    return (st.st_ino, st.st_dev) == (fs.st_ino, fs.st_dev)


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


# -- writing ---------------------------------------------------------------------------------
class SpoolWriter:
    """Appends operations to one spool file, holding its lock until `close()`."""

    def __init__(self, spool_dir: Path, spool_id: str, handle: IO[str]) -> None:
        self.spool_dir = spool_dir
        self.spool_id = spool_id
        self.path = spool_dir / f"{spool_id}.jsonl"
        self.files_dir = spool_dir / f"{spool_id}.files"
        self._handle: IO[str] | None = handle
        self._n_files = 0

    @property
    def ref(self) -> str:
        return SPOOL_REF + self.spool_id

    @classmethod
    def create(
        cls,
        spool_dir: str | Path | None,
        *,
        kind: str,
        tracking_uri: str,
        experiment: str,
        run_name: str | None,
    ) -> SpoolWriter:
        """A new spool file, locked, with its header written. It appears under its final name
        only once locked, so a concurrent sync never sees it half made."""
        if kind not in KINDS:
            raise ValueError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
        directory = resolve_dir(spool_dir)
        directory.mkdir(parents=True, exist_ok=True)
        spool_id = _new_spool_id()
        tmp = directory / f".{spool_id}.jsonl.tmp"
        handle = open(tmp, "a", encoding="utf-8")  # noqa: SIM115 (kept open while writing)
        try:
            _lock(handle)
            header = {
                "optlab_spool": FORMAT,
                "spool_id": spool_id,
                "kind": kind,
                "tracking_uri": redact_url_password(tracking_uri),
                "experiment": experiment,
                "run_name": run_name,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "host": socket.gethostname(),
                "pid": os.getpid(),
            }
            handle.write(json.dumps(header) + "\n")
            handle.flush()
            os.replace(tmp, directory / f"{spool_id}.jsonl")
        except BaseException:
            handle.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return cls(directory, spool_id, handle)

    @classmethod
    def reopen(cls, spool_dir: str | Path | None, spool_id: str) -> SpoolWriter | None:
        """Append to an existing spool file (to end a spooled parent run); None when it is gone
        (uploaded meanwhile) or stays locked."""
        directory = resolve_dir(spool_dir)
        path = directory / f"{spool_id}.jsonl"
        try:
            handle = open(path, "a", encoding="utf-8")  # noqa: SIM115
        except FileNotFoundError:
            return None
        if not _lock(handle) or not _same_file(handle, path):
            handle.close()
            return None
        writer = cls(directory, spool_id, handle)
        if writer.files_dir.is_dir():
            writer._n_files = sum(1 for _ in writer.files_dir.iterdir())
        return writer

    def append(self, op: dict[str, Any]) -> None:
        if self._handle is None:
            raise RuntimeError(f"spool {self.path} is closed")
        self._handle.write(json.dumps(op, separators=(",", ":")) + "\n")
        self._handle.flush()

    def add_file(self, src: str | Path) -> str:
        """Copy a file or folder into the spool; returns its path relative to `files_dir`."""
        src = Path(src)
        rel = f"{self._n_files:04d}/{src.name}"
        self._n_files += 1
        dest = self.files_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest)
        else:
            shutil.copy2(src, dest)
        return rel

    def add_text(self, name: str, text: str) -> str:
        rel = f"{self._n_files:04d}/{name}"
        self._n_files += 1
        dest = self.files_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text, encoding="utf-8")
        return rel

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is None:
            return
        try:
            handle.flush()
            os.fsync(handle.fileno())
        except OSError:
            pass
        finally:
            _unlock(handle)
            handle.close()

    def __del__(self) -> None:  # a sink dropped without finish(): release the lock
        with contextlib.suppress(Exception):
            self.close()


# -- reading ---------------------------------------------------------------------------------
def _parse(lines: Sequence[str], path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    if not lines:
        raise SpoolError(f"{path.name}: empty spool file")
    docs: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if last and not line.endswith("\n"):
            break  # a line cut short by a crash while appending: never completed
        try:
            doc = json.loads(line)
        except ValueError as exc:
            raise SpoolError(f"{path.name}: line {i + 1} is not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise SpoolError(f"{path.name}: line {i + 1} is not an object")
        docs.append(doc)
    if not docs or docs[0].get("optlab_spool") != FORMAT:
        raise SpoolError(f"{path.name}: not an optlab spool file (format {FORMAT})")
    return docs[0], docs[1:]


def _read_path(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    with open(path, encoding="utf-8") as handle:
        return _parse(handle.readlines(), path)


def _read_handle(handle: IO[str], path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    handle.seek(0)
    return _parse(handle.readlines(), path)


def _progress_path(path: Path) -> Path:
    return path.with_name(path.name[: -len(".jsonl")] + ".progress.json")


def _files_dir(path: Path) -> Path:
    return path.with_name(path.name[: -len(".jsonl")] + ".files")


def _spool_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*.jsonl") if not p.name.startswith("."))


@dataclass
class SpooledRun:
    """One pending spool file, as `status` lists it."""

    spool_id: str
    path: Path
    kind: str
    tracking_uri: str
    experiment: str
    run_name: str | None
    run_id: str | None  # the MLflow run it appends to; None: created on upload
    parent: str | None
    operations: int
    done: int
    metric_points: int
    artifacts: int
    status: str | None  # outcome recorded by finish; None: not finished (yet)
    in_use: bool
    error: str | None
    created: str

    def line(self) -> str:
        target = f"appends to run {self.run_id}" if self.run_id else "new run"
        name = self.run_name or "-"
        what = "parent run" if self.kind == "parent" else "run"
        parts = [
            f"{self.spool_id}  {what} {name!r} -> {self.tracking_uri} "
            f"(experiment {self.experiment}; {target})",
            f"{self.metric_points} metric points, {self.artifacts} artifacts",
            f"finished: {self.status}" if self.status else "not finished",
        ]
        if self.done:
            parts.append(f"{self.done}/{self.operations} operations uploaded")
        if self.in_use:
            parts.append("in use (a run is still writing it)")
        if self.error:
            parts.append(f"last error: {self.error}")
        return "; ".join(parts)


def pending(spool_dir: str | Path | None = None) -> list[SpooledRun]:
    """The spooled runs waiting for upload, oldest first."""
    directory = resolve_dir(spool_dir)
    out: list[SpooledRun] = []
    for path in _spool_files(directory):
        try:
            header, ops = _read_path(path)
        except FileNotFoundError:
            continue
        except (OSError, SpoolError) as exc:
            out.append(
                SpooledRun(path.stem, path, "?", "?", "?", None, None, None, 0, 0, 0, 0, None,
                           False, str(exc), "?")
            )
            continue
        in_use = False
        try:
            with open(path, encoding="utf-8") as handle:
                in_use = not _try_lock(handle)
        except OSError:
            continue
        progress = _read_json(_progress_path(path))
        run_op = next((op for op in ops if op.get("op") == "run"), {})
        finish = next((op for op in ops if op.get("op") == "finish"), None)
        out.append(
            SpooledRun(
                spool_id=str(header.get("spool_id", path.stem)),
                path=path,
                kind=str(header.get("kind", "run")),
                tracking_uri=str(header.get("tracking_uri")),
                experiment=str(header.get("experiment")),
                run_name=header.get("run_name"),
                run_id=run_op.get("run_id") or progress.get("run_id"),
                parent=(run_op.get("tags") or {}).get("mlflow.parentRunId"),
                operations=len(ops),
                done=int(progress.get("done", 0)),
                metric_points=sum(len(op.get("metrics", ())) for op in ops if op.get("op") == "metrics"),
                artifacts=sum(1 for op in ops if op.get("op") == "artifact"),
                status=finish.get("status") or finish.get("mlflow_status") if finish else None,
                in_use=in_use,
                error=progress.get("error"),
                created=str(header.get("created", "")),
            )
        )
    return out


# -- replay ----------------------------------------------------------------------------------
@dataclass
class SyncSummary:
    """What one `sync` did: runs uploaded, files that failed, files left for later."""

    spool_dir: Path
    uploaded: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def metric_points(self) -> int:
        return sum(int(u.get("metric_points", 0)) for u in self.uploaded)

    def lines(self) -> list[str]:
        out = []
        for u in self.uploaded:
            verb = "created" if u.get("created") else "appended to"
            out.append(
                f"uploaded {u['spool_id']}: {verb} run {u['run_id']} ({u.get('run_name') or '-'}, "
                f"experiment {u.get('experiment')}) at {u['tracking_uri']}: "
                f"{u['metric_points']} metric points, {u['artifacts']} artifacts, "
                f"status {u.get('status') or 'unchanged'}"
            )
        for f in self.failed:
            out.append(f"failed   {f['spool_id']} ({f.get('tracking_uri')}): {f['error']}")
        for s in self.skipped:
            out.append(f"skipped  {s['spool_id']}: {s['reason']}")
        if not (self.uploaded or self.failed or self.skipped):
            out.append(f"nothing to upload in {self.spool_dir}")
        else:
            out.append(
                f"{len(self.uploaded)} uploaded ({self.metric_points} metric points), "
                f"{len(self.failed)} failed, {len(self.skipped)} left for later"
            )
        return out


class _OutOfTime(Exception):
    pass


def _target_uri(header: dict[str, Any], override: str | None) -> str:
    """Where a spooled run goes: `override`, else the store it was meant for. A recorded URI
    with its password redacted is completed from the current `MLFLOW_TRACKING_URI`."""
    if override:
        return override
    recorded = str(header.get("tracking_uri") or "")
    if "***@" in recorded:
        from optlab.tracking.store import default_tracking_uri

        current = default_tracking_uri()
        if redact_url_password(current) == recorded:
            return current
    if not recorded:
        raise SpoolError("the spool file names no tracking store")
    return recorded


def _cleanup_orphans(directory: Path) -> None:
    """Progress files and artifact copies whose spool file is gone (a sync that stopped
    between deleting them), and temp files of writers that died before naming their file."""
    live = {p.name[: -len(".jsonl")] for p in _spool_files(directory)}
    for p in directory.glob("*.progress.json"):
        if p.name[: -len(".progress.json")] not in live:
            with contextlib.suppress(OSError):
                p.unlink()
    for p in directory.glob("*.files"):
        if p.is_dir() and p.name[: -len(".files")] not in live:
            shutil.rmtree(p, ignore_errors=True)
    for p in directory.glob(".*.jsonl.tmp"):
        try:
            if time.time() - p.stat().st_mtime < 60:
                continue
            with open(p, encoding="utf-8") as handle:
                if _try_lock(handle):
                    p.unlink()
        except OSError:
            pass


def sync(
    tracking_uri: str | None = None,
    spool_dir: str | Path | None = None,
    *,
    budget_s: float | None = None,
    probe: bool = True,
    retries: int | None = None,
    timeout_s: int | None = None,
) -> SyncSummary:
    """Replay every spooled run into its tracking store (or into `tracking_uri` when given).

    Parent runs go first, then runs oldest first. A file is deleted only once fully replayed;
    a failed or interrupted replay keeps its progress and resumes there next time. Files that a
    running process is still writing are skipped. With `budget_s`, no new operation starts after
    that many seconds (the rest waits for the next sync). Never raises for store errors: they
    are listed in the returned summary's `failed`."""
    directory = resolve_dir(spool_dir)
    summary = SyncSummary(spool_dir=directory)
    if not directory.is_dir():
        return summary
    _cleanup_orphans(directory)
    deadline = time.monotonic() + budget_s if budget_s is not None else None
    entries: list[tuple[int, str, Path]] = []
    for path in _spool_files(directory):
        try:
            header, _ = _read_path(path)
            kind = str(header.get("kind", "run"))
        except (OSError, SpoolError):
            kind = "run"
        entries.append((0 if kind == "parent" else 1, path.name, path))
    clients: dict[str, Any] = {}
    down: dict[str, str] = {}
    for _, _, path in sorted(entries):
        spool_id = path.name[: -len(".jsonl")]
        if deadline is not None and time.monotonic() > deadline:
            summary.skipped.append({"spool_id": spool_id, "reason": "time budget used up"})
            continue
        try:
            handle = open(path, encoding="utf-8")  # noqa: SIM115
        except FileNotFoundError:
            continue  # uploaded meanwhile by another process
        try:
            if not _try_lock(handle):
                summary.skipped.append(
                    {"spool_id": spool_id, "reason": "in use (a run is still writing it, or "
                     "another sync is uploading it)"}
                )
                continue
            if not _same_file(handle, path):
                continue
            uri = "?"
            try:
                header, ops = _read_handle(handle, path)
                uri = _target_uri(header, tracking_uri)
                if uri in down:
                    summary.skipped.append(
                        {"spool_id": spool_id, "reason": f"store {uri} unreachable: {down[uri]}"}
                    )
                    continue
                if probe and not reachable(uri):
                    down[uri] = "no answer from its /health endpoint"
                    summary.skipped.append(
                        {"spool_id": spool_id, "reason": f"store {uri} unreachable: {down[uri]}"}
                    )
                    continue
                with bounded_http(retries, timeout_s):
                    if uri not in clients:
                        from optlab.tracking.mlflow_sink import _client

                        clients[uri] = _client(uri)[0]
                    report = _replay(path, header, ops, uri, clients[uri], directory, deadline)
            except _OutOfTime as exc:
                summary.skipped.append({"spool_id": spool_id, "reason": f"time budget used up ({exc})"})
                continue
            except Exception as exc:  # noqa: BLE001 (the summary reports it)
                error = f"{type(exc).__name__}: {exc}"[:2000]
                prog = _progress_path(path)
                with contextlib.suppress(OSError):
                    _write_json(prog, {**_read_json(prog), "error": error})
                summary.failed.append({"spool_id": spool_id, "tracking_uri": uri, "error": error})
                if uri != "?" and not reachable(uri):
                    down[uri] = error
                continue
            # fully replayed: the spool file goes first, so a crash below leaves only orphans
            path.unlink()
            with contextlib.suppress(OSError):
                _progress_path(path).unlink()
            shutil.rmtree(_files_dir(path), ignore_errors=True)
            summary.uploaded.append(report)
        finally:
            _unlock(handle)
            handle.close()
    return summary


def _replay(
    path: Path,
    header: dict[str, Any],
    ops: list[dict[str, Any]],
    uri: str,
    client: Any,
    directory: Path,
    deadline: float | None,
) -> dict[str, Any]:
    from optlab.tracking.mlflow_sink import MAX_METRICS_PER_CALL, _retry

    spool_id = str(header.get("spool_id") or path.name[: -len(".jsonl")])
    progress_path = _progress_path(path)
    progress = _read_json(progress_path)
    done = int(progress.get("done", 0))
    run_id: str | None = progress.get("run_id")
    created = bool(progress.get("created", False))
    same_store = redact_url_password(uri) == header.get("tracking_uri")
    files = _files_dir(path)
    report = {
        "spool_id": spool_id,
        "tracking_uri": redact_url_password(uri),
        "experiment": header.get("experiment"),
        "run_name": header.get("run_name"),
        "run_id": run_id,
        "created": created,
        "metric_points": 0,
        "artifacts": 0,
        "status": None,
        "missing_artifacts": [],
    }
    finished = False
    pending: list[Any] = []  # metric points of consecutive `metrics` operations, sent together

    def send_pending(upto: int) -> None:
        nonlocal done
        if not pending:
            return
        for j in range(0, len(pending), MAX_METRICS_PER_CALL):
            _retry(client.log_batch, run_id, metrics=pending[j : j + MAX_METRICS_PER_CALL], synchronous=True)
        report["metric_points"] += len(pending)
        pending.clear()
        done = upto
        _write_json(progress_path, {"done": done, "run_id": run_id, "created": created})

    for i, op in enumerate(ops):
        kind = op.get("op")
        if kind != "metrics" or len(pending) >= MAX_METRICS_PER_CALL:
            send_pending(i)
        if kind == "finish":
            finished = True
            report["status"] = op.get("status") or op.get("mlflow_status")
        if i < done:
            continue
        if deadline is not None and time.monotonic() > deadline:
            raise _OutOfTime(f"{i} of {len(ops)} operations uploaded")
        if kind == "run":
            run_id, created = _apply_run(client, uri, header, op, same_store, directory, files, spool_id)
            report["created"] = created
        elif run_id is None:
            raise SpoolError(f"{path.name}: operation {i + 1} ({kind}) comes before the run")
        elif kind == "metrics":  # sent with the consecutive ones (one log_batch per 1000 points)
            from mlflow.entities import Metric

            pending.extend(Metric(str(k), float(v), int(ts), int(step)) for k, v, ts, step in op["metrics"])
            continue
        elif kind == "artifact":
            local = files / str(op["file"])
            if not local.exists():
                report["missing_artifacts"].append(str(op["file"]))
            elif local.is_dir():
                _retry(client.log_artifacts, run_id, str(local), op.get("artifact_path"))
                report["artifacts"] += 1
            else:
                _retry(client.log_artifact, run_id, str(local), op.get("artifact_path"))
                report["artifacts"] += 1
        elif kind == "finish":
            if op.get("status"):
                _retry(client.set_tag, run_id, "status", str(op["status"]), synchronous=True)
            _retry(client.set_terminated, run_id, str(op.get("mlflow_status") or "FINISHED"),
                   op.get("end_time"))
        else:
            raise SpoolError(f"{path.name}: unknown operation {kind!r} on line {i + 2}")
        done = i + 1
        _write_json(progress_path, {"done": done, "run_id": run_id, "created": created})
    send_pending(len(ops))
    if header.get("kind", "run") == "run" and not finished and run_id is not None:
        # nobody holds the file's lock, so the process that wrote it ended without finishing
        _retry(client.set_terminated, run_id, "KILLED")
        report["status"] = "killed (the run's process ended before it finished)"
    report["run_id"] = run_id
    return report


def _run_exists(client: Any, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException as exc:
        if getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def _apply_run(
    client: Any,
    uri: str,
    header: dict[str, Any],
    op: dict[str, Any],
    same_store: bool,
    directory: Path,
    files: Path,
    spool_id: str,
) -> tuple[str, bool]:
    """Create the run (or find the one created by an earlier, interrupted sync; or the parent
    to reuse; or the run created before the outage) and make its tags and params complete."""
    from mlflow.entities import Param, RunTag

    from optlab.tracking.mlflow_sink import (
        MAX_PARAMS_PER_CALL,
        PARENT_TAG,
        _retry,
        ensure_experiment,
        find_reusable_parent,
    )

    tags = {str(k): str(v) for k, v in (op.get("tags") or {}).items()}
    parent = tags.get(PARENT_TAG)
    if parent and is_spool_ref(parent):
        real = resolve(parent, directory)
        if real is not None:
            tags[PARENT_TAG] = real
        elif (directory / f"{parent[len(SPOOL_REF) :]}.jsonl").exists():
            raise SpoolError(f"its parent run {parent} has not been uploaded yet")
        else:  # the parent's spool file was deleted by hand: upload the run without a parent
            del tags[PARENT_TAG]
            tags[LOST_PARENT_TAG] = parent
    run_id = op.get("run_id") if same_store else None
    if run_id and not _run_exists(client, str(run_id)):
        run_id = None
    complete = bool(run_id) and bool(op.get("complete"))
    created = False
    if not run_id:
        experiment_id = ensure_experiment(client, str(header.get("experiment") or "optlab"), uri)
        found = _retry(
            client.search_runs,
            [experiment_id],
            filter_string=f"tags.`{SPOOL_TAG}` = '{spool_id}'",
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
        elif op.get("reuse"):
            run_id = find_reusable_parent(client, experiment_id, tags)
            complete = run_id is not None
        if not run_id:
            run = _retry(
                client.create_run,
                experiment_id,
                start_time=op.get("start_time"),
                tags={**tags, SPOOL_TAG: spool_id},
                run_name=op.get("run_name"),
            )
            run_id, created = run.info.run_id, True
    run_id = str(run_id)
    if not complete:
        if not created:
            items = [RunTag(k, v) for k, v in tags.items()]
            for i in range(0, len(items), MAX_PARAMS_PER_CALL):
                _retry(client.log_batch, run_id, tags=items[i : i + MAX_PARAMS_PER_CALL],
                       synchronous=True)
        params = [Param(str(k), str(v)) for k, v in (op.get("params") or {}).items()]
        for i in range(0, len(params), MAX_PARAMS_PER_CALL):
            _retry(client.log_batch, run_id, params=params[i : i + MAX_PARAMS_PER_CALL],
                   synchronous=True)
        if op.get("diff_file") and (files / op["diff_file"]).is_file():
            _retry(client.log_artifact, run_id, str(files / op["diff_file"]), "provenance")
    resolved = directory / RESOLVED_DIR
    resolved.mkdir(parents=True, exist_ok=True)
    _write_text(resolved / spool_id, run_id)
    return run_id, created


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)


def try_sync(
    tracking_uri: str | None = None,
    spool_dir: str | Path | None = None,
    *,
    budget_s: float = 10.0,
    quiet: bool = False,
) -> SyncSummary | None:
    """Best-effort upload of the spool at the start of a run: returns at once when the spool is
    empty, checks each store with one short request first (2 s at most when it is down), and
    starts no new upload after `budget_s` seconds. Never raises; prints one line to stderr when
    it uploaded something or runs remain pending."""
    try:
        directory = resolve_dir(spool_dir)
        if not _spool_files(directory):
            return None
        summary = sync(tracking_uri, directory, budget_s=budget_s, probe=True, retries=1, timeout_s=5)
    except Exception as exc:  # noqa: BLE001 (best effort by design)
        warnings.warn(f"optlab: could not upload the tracking spool ({exc})", TrackingOutageWarning,
                      stacklevel=2)
        return None
    if not quiet:
        left = len(summary.failed) + len(summary.skipped)
        if summary.uploaded:
            print(
                f"optlab: uploaded {len(summary.uploaded)} spooled run(s) "
                f"({summary.metric_points} metric points) from {directory}",
                file=sys.stderr,
            )
        if left:
            print(
                f"optlab: {left} spooled run(s) still pending in {directory} "
                "(`python -m optlab.tracking status`)",
                file=sys.stderr,
            )
    return summary
