"""MLflow implementation of the Sink, and parent runs for sweeps and studies.

Uses `MlflowClient` only (no fluent global state), so several sinks can coexist in one
process. mlflow is imported when a client is first needed. Every call to the store runs under
`transport.bounded_http()` (a short retry) and a failure sends the rest of the run to the spool
(`optlab.tracking.spool`) instead of raising into training."""

from __future__ import annotations

import contextlib
import math
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from optlab.tracking.flatten import (
    MAX_TAG_VALUE_LENGTH,
    clean_key,
    clean_value,
    flatten_params,
    is_secret_key,
)
from optlab.tracking.provenance import dvc_exp_name, dvc_stage
from optlab.tracking.sink import REQUIRED_TAGS, check_status
from optlab.tracking.spool import (
    SPOOL_REF,
    SpoolWriter,
    TrackingOutageWarning,
    default_spool_dir,
    is_spool_ref,
    resolve,
)
from optlab.tracking.store import (
    ARTIFACTS_DIR,
    default_artifact_location,
    default_tracking_uri,
    sqlite_path,
)
from optlab.tracking.transport import bounded_http, reachable

if TYPE_CHECKING:
    from mlflow import MlflowClient

T = TypeVar("T")

MAX_METRICS_PER_CALL = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH
MAX_PARAMS_PER_CALL = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
UNKNOWN = "unknown"
DIFF_TAG = "_diff"
PARENT_TAG = "mlflow.parentRunId"
ROLE_TAG = "optlab.role"
REDACTED_TAG = "optlab.redacted"
_MLFLOW_STATUS = {"completed": "FINISHED", "diverged": "FINISHED", "failed": "FAILED"}
_LOCK_MESSAGES = ("database is locked", "database table is locked")
DEFERRED_REASON = "upload deferred (tracking.upload: deferred)"
"""The spool reason of a deferred run: written to the spool by request, uploaded by
`python -m optlab.tracking sync` (the pipeline's `track` stage); no warning, no store contact."""


class _Deferred(Exception):
    """Not an error: a deferred parent takes the spool path."""


def _retry(
    fn: Callable[..., T],
    *args: Any,
    attempts: int = 6,
    base_delay: float = 0.1,
    max_delay: float = 2.0,
    **kwargs: Any,
) -> T:
    """Call `fn`, retrying with jittered exponential backoff while SQLite reports a lock."""
    jitter = random.Random()
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            text = str(exc).lower()
            if attempt == attempts - 1 or not any(m in text for m in _LOCK_MESSAGES):
                raise
            delay = min(max_delay, base_delay * 2**attempt)
            time.sleep(delay * (0.5 + jitter.random()))
    raise AssertionError("unreachable")


def _client(tracking_uri: str | None) -> tuple[MlflowClient, str]:
    """A client for `tracking_uri` (default: `default_tracking_uri()`) whose store is ready."""
    from mlflow import MlflowClient

    uri = tracking_uri or default_tracking_uri()
    with _store_init_lock(uri):
        client = MlflowClient(tracking_uri=uri)
        _retry(client.search_experiments, max_results=1)  # creates/migrates the schema
    return client, uri


@contextlib.contextmanager
def _store_init_lock(tracking_uri: str) -> Iterator[None]:
    """Serialize store initialization across processes on this machine for a sqlite store:
    MLflow's schema creation races when several processes open a new database at once
    (`dvc exp run --queue -j N`). The lock file lives in the (git-ignored) artifact folder
    beside the database, never in the database file itself (closing another descriptor of it
    would drop SQLite's own POSIX locks)."""
    db = sqlite_path(tracking_uri)
    try:
        import fcntl
    except ImportError:  # not POSIX
        fcntl = None  # type: ignore[assignment]
    if db is None or fcntl is None:
        yield
        return
    lock_dir = db.parent / ARTIFACTS_DIR
    lock_dir.mkdir(parents=True, exist_ok=True)
    lock_path = lock_dir / f".{db.name}.init.lock"
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""MLflow 3's UI opens an experiment by its kind: this one shows the training runs, not the
GenAI overview (traces) that an experiment without the tag may open on."""


def ensure_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """Id of experiment `name`, created if missing with its artifacts beside a sqlite store,
    tagged as a model-training experiment (:data:`EXPERIMENT_KIND`)."""
    exp = _retry(client.get_experiment_by_name, name)
    if exp is not None:
        if (exp.tags or {}).get(EXPERIMENT_KIND_TAG) is None:
            _retry(client.set_experiment_tag, exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return str(exp.experiment_id)
    try:
        return str(
            _retry(
                client.create_experiment,
                name,
                artifact_location=default_artifact_location(tracking_uri),
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
        )
    except Exception:
        exp = _retry(client.get_experiment_by_name, name)  # created concurrently
        if exp is None:
            raise
        return str(exp.experiment_id)


def _tag_text(value: Any) -> str:
    if value is None:
        return UNKNOWN
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def build_tags(tags: Mapping[str, Any] | None, role: str) -> tuple[dict[str, str], str | None]:
    """Run tags with every required key present (missing -> "unknown"; dvc_stage and
    torch_version filled from the process when absent), credential-like keys dropped, and
    the `_diff` text split off. Keys starting with `_` are never logged."""
    given = dict(tags or {})
    diff = given.pop(DIFF_TAG, None)
    out: dict[str, str] = {}
    redacted: list[str] = []
    for key, value in given.items():
        if key.startswith("_"):
            continue
        if is_secret_key(key):
            redacted.append(key)
            continue
        text = clean_value(_tag_text(value), MAX_TAG_VALUE_LENGTH)
        if text is None:
            redacted.append(key)
            continue
        out[clean_key(key)] = text
    process = {"dvc_stage": dvc_stage(), "torch_version": _torch_version()}
    for key in REQUIRED_TAGS:
        if out.get(key) in (None, "", "None", UNKNOWN) and process.get(key):
            out[key] = str(process[key])
        out.setdefault(key, UNKNOWN)
    exp_name = dvc_exp_name()
    if exp_name and "dvc_exp_name" not in out:
        out["dvc_exp_name"] = exp_name
    if out["git_commit"] != UNKNOWN:
        out.setdefault("mlflow.source.git.commit", out["git_commit"])
    out[ROLE_TAG] = role
    if redacted:
        out[REDACTED_TAG] = ",".join(sorted(redacted))[:MAX_TAG_VALUE_LENGTH]
    return out, (str(diff) if diff else None)


def _torch_version() -> str | None:
    torch = sys.modules.get("torch")  # never import torch just for a tag
    return getattr(torch, "__version__", None) if torch is not None else None


def _is_true(text: str) -> bool:
    return text.strip().lower() in ("true", "1", "yes")


def _log_text_artifact(
    client: MlflowClient, run_id: str, text: str, name: str, folder: str
) -> None:
    with tempfile.TemporaryDirectory(prefix="optlab-") as tmp:
        path = Path(tmp) / name
        path.write_text(text, encoding="utf-8")
        _retry(client.log_artifact, run_id, str(path), folder)


class MlflowSink:
    """One MLflow run per training run; metrics are buffered and sent with `log_batch`.

    `summary` values given to `finish` are logged as metrics named `summary_prefix + key`
    (default `final.`), so they never add points to the training curves of the same name.

    Tracking never stops training: when a call to the store fails (after a short bounded retry,
    see `transport.bounded_http`), the sink warns once and spools everything that is left of
    the run (including the failed batch) to a file under `spool_dir` (default
    `<repo root>/.optlab/spool/`, see `optlab.tracking.spool`); `python -m optlab.tracking sync`
    or the next run's `try_sync()` uploads it. Only misuse raises: `log_*` before `start`, an
    unknown status, a missing artifact path."""

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "optlab",
        run_name: str | None = None,
        parent_run_id: str | None = None,
        flush_every: int = 1000,
        summary_prefix: str = "final.",
        spool_dir: str | Path | None = None,
        deferred: bool = False,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.deferred = deferred
        self.experiment = experiment
        self.run_name = run_name
        self.parent_run_id = parent_run_id
        self.flush_every = max(1, int(flush_every))
        self.summary_prefix = summary_prefix
        self.spool_dir = spool_dir
        self.run_id: str | None = None  # None while the run exists only in the spool
        self.spool_path: Path | None = None  # set once the run is being spooled
        self._client: MlflowClient | None = None
        self._buffer: list[tuple[str, float, int, int]] = []  # key, value, timestamp, step
        self._keys: dict[str, str] = {}
        self._last_step = 0
        self._started = False
        self._finished = False
        self._record: dict[str, Any] = {}
        self._diff: str | None = None
        self._writer: SpoolWriter | None = None
        self._lost = False  # neither the store nor the spool works: tracking of this run is dropped

    @property
    def spooling(self) -> bool:
        """True once the run is being written to the spool instead of the store."""
        return self._writer is not None or self.spool_path is not None

    # -- Sink -------------------------------------------------------------------------------
    def start(self, params: dict[str, Any], tags: dict[str, str]) -> None:
        if self._started:
            raise RuntimeError(f"MlflowSink already started run {self.run_id}")
        self._started = True
        uri = self.tracking_uri or default_tracking_uri()
        self.tracking_uri = uri
        run_tags, diff = build_tags(tags, role="run")
        parent = str(self.parent_run_id) if self.parent_run_id else None
        if parent and is_spool_ref(parent):
            parent = resolve(parent, self.spool_dir) or parent
        if parent:
            run_tags[PARENT_TAG] = parent
        dropped: list[str] = []
        flat = flatten_params(params, ".", dropped=dropped)
        if dropped:
            old = run_tags.get(REDACTED_TAG, "")
            run_tags[REDACTED_TAG] = ",".join(filter(None, [old, *sorted(dropped)]))[
                :MAX_TAG_VALUE_LENGTH
            ]
        start_time = int(time.time() * 1000)
        self._diff = diff if diff and _is_true(run_tags.get("git_dirty", "")) else None
        self._record = {
            "op": "run",
            "run_id": None,
            "complete": False,
            "run_name": self.run_name,
            "tags": run_tags,
            "params": flat,
            "start_time": start_time,
        }
        if self.deferred:  # by request, not an outage: straight to the spool, no store contact
            self._spool(DEFERRED_REASON)
            return
        if parent and is_spool_ref(parent):
            self._spool(f"its parent run {parent} is spooled")
            return
        if not reachable(uri):
            self._spool(f"no answer from {uri}/health")
            return
        try:
            from mlflow.entities import Param

            with bounded_http():
                client, uri = _client(uri)
                self._client = client
                experiment_id = ensure_experiment(client, self.experiment, uri)
                run = _retry(
                    client.create_run,
                    experiment_id,
                    start_time=start_time,
                    tags=run_tags,
                    run_name=self.run_name,
                )
                self.run_id = run.info.run_id
                if self._diff:
                    _log_text_artifact(client, self.run_id, self._diff, "git.diff", "provenance")
                items = [Param(k, v) for k, v in flat.items()]
                for i in range(0, len(items), MAX_PARAMS_PER_CALL):
                    _retry(
                        client.log_batch,
                        self.run_id,
                        params=items[i : i + MAX_PARAMS_PER_CALL],
                        synchronous=True,
                    )
        except Exception as exc:  # noqa: BLE001 (spooled, never raised into training)
            self._spool(exc)
            return
        self._record["complete"] = True

    def log_metrics(self, batch: list[tuple[str, float, int]]) -> None:
        self._require_started()
        now = int(time.time() * 1000)
        for key, value, step in batch:
            if value is None:
                continue
            name = self._keys.get(key)
            if name is None:
                name = self._keys[key] = clean_key(key)
            step = int(step)
            self._last_step = max(self._last_step, step)
            self._buffer.append((name, float(value), now, step))
        # spooled during an outage, every batch goes to the file at once (little is lost if the
        # process dies); deferred, batches of flush_every points like a live run
        if len(self._buffer) >= self.flush_every or (self._writer is not None and not self.deferred):
            self.flush()

    def log_artifact(self, path: str | Path) -> None:
        self._require_started()
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"artifact not found: {path}")
        if self._online():
            try:
                with bounded_http():
                    if path.is_dir():
                        _retry(self._client.log_artifacts, self.run_id, str(path), path.name)
                    else:
                        _retry(self._client.log_artifact, self.run_id, str(path))
                return
            except Exception as exc:  # noqa: BLE001
                self._spool(exc)
        if self._writer is not None:
            self._append(
                lambda w: {
                    "op": "artifact",
                    "file": w.add_file(path),
                    "dir": path.is_dir(),
                    "artifact_path": path.name if path.is_dir() else None,
                }
            )

    def finish(self, status: str, summary: dict[str, float | None]) -> None:
        check_status(status)
        if not self._started or self._finished:
            return
        self._finished = True
        mlflow_status = _MLFLOW_STATUS[status]
        now = int(time.time() * 1000)
        try:
            for key, value in summary.items():
                if value is None:
                    continue
                value = float(value)
                if math.isnan(value):
                    continue
                name = clean_key(f"{self.summary_prefix}{key}")
                self._buffer.append((name, value, now, self._last_step))
            self.flush()
            if self._online():
                try:
                    with bounded_http():
                        client = self._client
                        _retry(client.set_tag, self.run_id, "status", status, synchronous=True)
                        _retry(client.set_terminated, self.run_id, mlflow_status)
                except Exception as exc:  # noqa: BLE001
                    self._spool(exc)
            if self._writer is not None:
                end = int(time.time() * 1000)
                self._append(
                    lambda w: {
                        "op": "finish",
                        "status": status,
                        "mlflow_status": mlflow_status,
                        "end_time": end,
                    }
                )
        except BaseException:  # KeyboardInterrupt, SystemExit: end the run FAILED, then go on
            if self._online():
                with contextlib.suppress(Exception), bounded_http(retries=0, timeout_s=2):
                    self._client.set_terminated(self.run_id, "FAILED")
            raise
        finally:
            self._close_spool()

    # -- extras -----------------------------------------------------------------------------
    def flush(self) -> None:
        """Send buffered metrics, at most MAX_METRICS_PER_CALL per `log_batch` call (to the
        spool once the store has failed)."""
        if not self._buffer:
            return
        self._require_started()
        pending, self._buffer = self._buffer, []
        if self._lost:
            return
        chunks = [pending[i : i + MAX_METRICS_PER_CALL] for i in range(0, len(pending), MAX_METRICS_PER_CALL)]
        for chunk in chunks:
            if self._online():
                try:
                    from mlflow.entities import Metric

                    with bounded_http():
                        _retry(
                            self._client.log_batch,
                            self.run_id,
                            metrics=[Metric(*m) for m in chunk],
                            synchronous=True,
                        )
                    continue
                except Exception as exc:  # noqa: BLE001
                    self._spool(exc)
            if self._writer is not None:
                self._append(lambda w, c=chunk: {"op": "metrics", "metrics": [list(m) for m in c]})

    def __enter__(self) -> MlflowSink:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """Ends a run left open: `failed` when leaving on an exception, else `completed`."""
        if self._started and not self._finished:
            self.finish("failed" if exc_type is not None else "completed", {})

    def _require_started(self) -> None:
        if not self._started:
            raise RuntimeError("MlflowSink.start() must be called first")

    def _online(self) -> bool:
        return (
            self._writer is None
            and not self._lost
            and self.spool_path is None
            and self._client is not None
            and self.run_id is not None
        )

    def _spool(self, reason: BaseException | str) -> None:
        """Switch to the spool for the rest of the run (once)."""
        if self._writer is not None or self._lost or self.spool_path is not None:
            return
        why = f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else reason
        why = why.splitlines()[0][:300] if why else "unknown error"
        name = self.run_name or "(unnamed)"
        try:
            writer = SpoolWriter.create(
                self.spool_dir,
                kind="run",
                tracking_uri=str(self.tracking_uri),
                experiment=self.experiment,
                run_name=self.run_name,
            )
            record = {**self._record, "run_id": self.run_id}
            if self._diff and not record["complete"]:
                record["diff_file"] = writer.add_text("git.diff", self._diff)
            writer.append(record)
        except Exception as exc:  # noqa: BLE001
            self._lost = True
            warnings.warn(
                f"optlab: tracking store {self.tracking_uri} failed ({why}) and the spool in "
                f"{self.spool_dir or default_spool_dir()} is not writable ({exc}); MLflow "
                f"tracking of run {name} is dropped (the DVC outs are still written)",
                TrackingOutageWarning,
                stacklevel=3,
            )
            return
        self._writer = writer
        self.spool_path = writer.path
        if reason is DEFERRED_REASON:
            return
        where = f"run {self.run_id}" if self.run_id else "a run to be created on upload"
        warnings.warn(
            f"optlab: tracking store {self.tracking_uri} failed ({why}); the rest of run {name} "
            f"({where}) is spooled to {writer.path}; upload it with "
            "`python -m optlab.tracking sync` (the next run also tries)",
            TrackingOutageWarning,
            stacklevel=3,
        )

    def _append(self, make_op: Callable[[SpoolWriter], dict[str, Any]]) -> None:
        writer = self._writer
        if writer is None:
            return
        try:
            writer.append(make_op(writer))
        except Exception as exc:  # noqa: BLE001
            self._lost = True
            self._close_spool()
            warnings.warn(
                f"optlab: cannot write the tracking spool {writer.path} ({exc}); the rest of run "
                f"{self.run_name or '(unnamed)'} is not tracked (the DVC outs are still written)",
                TrackingOutageWarning,
                stacklevel=3,
            )

    def _close_spool(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()


# -- parent runs -----------------------------------------------------------------------------
REUSE_KEYS = ("study", "phase", "git_commit", "scale", "dvc_exp_name")


def _quote(value: str) -> str:
    return f'"{value}"' if "'" in value else f"'{value}'"


def find_reusable_parent(
    client: MlflowClient, experiment_id: str, run_tags: Mapping[str, str]
) -> str | None:
    """Oldest parent run of the experiment whose study, phase, git_commit, scale and
    dvc_exp_name tags match `run_tags`, or None."""
    clauses = [f"tags.`{ROLE_TAG}` = 'parent'"]
    clauses += [f"tags.`{k}` = {_quote(run_tags[k])}" for k in REUSE_KEYS if k in run_tags]
    found = _retry(
        client.search_runs,
        [experiment_id],
        filter_string=" and ".join(clauses),
        max_results=1,
        order_by=["attributes.start_time ASC"],
    )
    return found[0].info.run_id if found else None


class ParentRun(str):
    """The run_id of a parent run (a plain `str`), usable as a context manager: leaving the
    `with` block ends the run `completed`, or `failed` when the block raises. While the
    tracking store is down it is `spool:<id>`, a run that exists only in the spool (children
    accept it as `parent_run_id`); an empty string when neither store nor spool works."""

    tracking_uri: str
    spool_dir: str | Path | None

    def __new__(
        cls, run_id: str, tracking_uri: str, spool_dir: str | Path | None = None
    ) -> ParentRun:
        obj = super().__new__(cls, run_id)
        obj.tracking_uri = tracking_uri
        obj.spool_dir = spool_dir
        return obj

    def __enter__(self) -> str:
        return str(self)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        status = "failed" if exc_type is not None else "completed"
        end_run(str(self), status, tracking_uri=self.tracking_uri, spool_dir=self.spool_dir)


def parent_run(
    study: str,
    *,
    tracking_uri: str | None = None,
    experiment: str = "optlab",
    tags: Mapping[str, Any] | None = None,
    run_name: str | None = None,
    reuse: bool = False,
    spool_dir: str | Path | None = None,
    deferred: bool = False,
) -> ParentRun:
    """Create a parent run for a sweep or study; children pass its id as
    `MlflowSink(parent_run_id=...)`. The result is the run_id (a `str`): used plainly, the run
    stays open until `end_run`; used as `with parent_run(...) as run_id:`, it is ended on exit.

    With `reuse=True` an existing parent of the same experiment whose study, phase, git_commit,
    scale and dvc_exp_name tags all match is returned instead (oldest first), so sweep members
    that run as separate processes share one parent. Not safe against two processes creating
    the first parent at the same instant.

    When the store fails, the parent is spooled (see `MlflowSink`) and the result is
    `spool:<id>`; never raises for store errors. `deferred=True` spools it by request (no store
    contact, no warning, `reuse` does not apply): its children are spooled too, and
    `python -m optlab.tracking sync` uploads them together."""
    uri = tracking_uri or default_tracking_uri()
    run_tags, diff = build_tags({**(tags or {}), "study": study}, role="parent")
    name = run_name or study
    run_id: str | None = None
    try:
        if deferred:
            raise _Deferred(DEFERRED_REASON)
        if not reachable(uri):
            raise ConnectionError(f"no answer from {uri}/health")
        with bounded_http():
            client, uri = _client(uri)
            experiment_id = ensure_experiment(client, experiment, uri)
            if reuse:
                found = find_reusable_parent(client, experiment_id, run_tags)
                if found:
                    return ParentRun(found, uri, spool_dir)
            run = _retry(client.create_run, experiment_id, tags=run_tags, run_name=name)
            run_id = run.info.run_id
            if diff and _is_true(run_tags.get("git_dirty", "")):
                _log_text_artifact(client, run_id, diff, "git.diff", "provenance")
        return ParentRun(run_id, uri, spool_dir)
    except Exception as exc:  # noqa: BLE001 (spooled)
        reason = exc
    try:
        writer = SpoolWriter.create(
            spool_dir, kind="parent", tracking_uri=uri, experiment=experiment, run_name=name
        )
        try:
            record: dict[str, Any] = {
                "op": "run",
                "run_id": run_id,
                "complete": False,
                "run_name": name,
                "tags": run_tags,
                "params": {},
                "start_time": int(time.time() * 1000),
                "reuse": bool(reuse),
            }
            if diff and _is_true(run_tags.get("git_dirty", "")):
                record["diff_file"] = writer.add_text("git.diff", diff)
            writer.append(record)
        finally:
            writer.close()
    except Exception as exc:  # noqa: BLE001
        warnings.warn(
            f"optlab: tracking store {uri} failed ({type(reason).__name__}: {reason}) and the "
            f"spool is not writable ({exc}); the sweep runs without a parent run",
            TrackingOutageWarning,
            stacklevel=2,
        )
        return ParentRun(run_id or "", uri, spool_dir)
    if not isinstance(reason, _Deferred):
        warnings.warn(
            f"optlab: tracking store {uri} failed ({type(reason).__name__}: {reason}); parent run "
            f"{name} is spooled to {writer.path}; upload it with `python -m optlab.tracking sync`",
            TrackingOutageWarning,
            stacklevel=2,
        )
    return ParentRun(run_id or writer.ref, uri, spool_dir)


def end_run(
    run_id: str,
    status: str = "completed",
    *,
    tracking_uri: str | None = None,
    spool_dir: str | Path | None = None,
) -> None:
    """Set tag `status` and terminate the run: FINISHED for completed/diverged, else FAILED.
    A spooled parent (`spool:<id>`) is ended in the spool, or in the store once uploaded; when
    the store fails the ending is spooled. Never raises for store errors."""
    check_status(status)
    if not run_id:
        return
    run_id = str(run_id)
    uri = tracking_uri or default_tracking_uri()
    finish = {
        "op": "finish",
        "status": status,
        "mlflow_status": _MLFLOW_STATUS[status],
        "end_time": int(time.time() * 1000),
    }
    if is_spool_ref(run_id):
        real = resolve(run_id, spool_dir)
        if real is None:
            writer = SpoolWriter.reopen(spool_dir, run_id[len(SPOOL_REF) :])
            if writer is not None:
                try:
                    writer.append(finish)
                finally:
                    writer.close()
                return
            real = resolve(run_id, spool_dir)  # uploaded while we looked
            if real is None:
                warnings.warn(
                    f"optlab: spooled run {run_id} is neither in the spool nor uploaded; "
                    "cannot end it",
                    TrackingOutageWarning,
                    stacklevel=2,
                )
                return
        run_id = real
    try:
        if not reachable(uri):
            raise ConnectionError(f"no answer from {uri}/health")
        with bounded_http():
            client, _ = _client(uri)
            _retry(client.set_tag, run_id, "status", status, synchronous=True)
            _retry(client.set_terminated, run_id, _MLFLOW_STATUS[status])
        return
    except Exception as exc:  # noqa: BLE001 (spooled)
        reason = exc
    try:
        writer = SpoolWriter.create(
            spool_dir, kind="parent", tracking_uri=uri, experiment="optlab", run_name=None
        )
        try:
            writer.append({"op": "run", "run_id": run_id, "complete": True, "tags": {}, "params": {}})
            writer.append(finish)
        finally:
            writer.close()
    except Exception as exc:  # noqa: BLE001
        warnings.warn(
            f"optlab: could not end run {run_id} ({reason}) nor spool its ending ({exc})",
            TrackingOutageWarning,
            stacklevel=2,
        )
        return
    warnings.warn(
        f"optlab: tracking store {uri} failed ({type(reason).__name__}: {reason}); the end of "
        f"run {run_id} is spooled to {writer.path}",
        TrackingOutageWarning,
        stacklevel=2,
    )
