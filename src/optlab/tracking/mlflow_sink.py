"""MLflow implementation of the Sink, and parent runs for sweeps and studies.

Uses `MlflowClient` only (no fluent global state), so several sinks can coexist in one
process. mlflow is imported when a client is first needed."""

from __future__ import annotations

import contextlib
import math
import random
import sys
import tempfile
import time
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
from optlab.tracking.store import (
    ARTIFACTS_DIR,
    default_artifact_location,
    default_tracking_uri,
    sqlite_path,
)

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


def ensure_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """Id of experiment `name`, created if missing with its artifacts beside a sqlite store."""
    exp = _retry(client.get_experiment_by_name, name)
    if exp is not None:
        return str(exp.experiment_id)
    try:
        return str(
            _retry(
                client.create_experiment,
                name,
                artifact_location=default_artifact_location(tracking_uri),
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


def _create_run(
    client: MlflowClient,
    experiment_id: str,
    tags: dict[str, str],
    diff: str | None,
    run_name: str | None,
) -> str:
    run = _retry(client.create_run, experiment_id, tags=tags, run_name=run_name)
    run_id = run.info.run_id
    if diff and _is_true(tags.get("git_dirty", "")):
        _log_text_artifact(client, run_id, diff, "git.diff", "provenance")
    return run_id


class MlflowSink:
    """One MLflow run per training run; metrics are buffered and sent with `log_batch`.

    `summary` values given to `finish` are logged as metrics named `summary_prefix + key`
    (default `final.`), so they never add points to the training curves of the same name."""

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "optlab",
        run_name: str | None = None,
        parent_run_id: str | None = None,
        flush_every: int = 1000,
        summary_prefix: str = "final.",
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.parent_run_id = parent_run_id
        self.flush_every = max(1, int(flush_every))
        self.summary_prefix = summary_prefix
        self.run_id: str | None = None
        self._client: MlflowClient | None = None
        self._buffer: list[Any] = []  # mlflow.entities.Metric
        self._keys: dict[str, str] = {}
        self._last_step = 0
        self._finished = False

    # -- Sink -------------------------------------------------------------------------------
    def start(self, params: dict[str, Any], tags: dict[str, str]) -> None:
        if self.run_id is not None:
            raise RuntimeError(f"MlflowSink already started run {self.run_id}")
        from mlflow.entities import Param

        client, uri = _client(self.tracking_uri)
        self._client, self.tracking_uri = client, uri
        experiment_id = ensure_experiment(client, self.experiment, uri)
        run_tags, diff = build_tags(tags, role="run")
        if self.parent_run_id:
            run_tags[PARENT_TAG] = str(self.parent_run_id)
        dropped: list[str] = []
        flat = flatten_params(params, ".", dropped=dropped)
        if dropped:
            old = run_tags.get(REDACTED_TAG, "")
            run_tags[REDACTED_TAG] = ",".join(filter(None, [old, *sorted(dropped)]))[
                :MAX_TAG_VALUE_LENGTH
            ]
        self.run_id = _create_run(client, experiment_id, run_tags, diff, self.run_name)
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_CALL):
            _retry(
                client.log_batch,
                self.run_id,
                params=items[i : i + MAX_PARAMS_PER_CALL],
                synchronous=True,
            )

    def log_metrics(self, batch: list[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

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
            self._buffer.append(Metric(name, float(value), now, step))
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def log_artifact(self, path: str | Path) -> None:
        client = self._require_started()
        path = Path(path)
        if path.is_dir():
            _retry(client.log_artifacts, self.run_id, str(path), path.name)
        elif path.is_file():
            _retry(client.log_artifact, self.run_id, str(path))
        else:
            raise FileNotFoundError(f"artifact not found: {path}")

    def finish(self, status: str, summary: dict[str, float | None]) -> None:
        check_status(status)
        if self.run_id is None or self._finished:
            return
        from mlflow.entities import Metric

        client = self._require_started()
        self._finished = True
        mlflow_status = _MLFLOW_STATUS[status]
        try:
            now = int(time.time() * 1000)
            for key, value in summary.items():
                if value is None:
                    continue
                value = float(value)
                if math.isnan(value):
                    continue
                name = clean_key(f"{self.summary_prefix}{key}")
                self._buffer.append(Metric(name, value, now, self._last_step))
            self.flush()
            _retry(client.set_tag, self.run_id, "status", status, synchronous=True)
        except BaseException:
            mlflow_status = "FAILED"
            raise
        finally:
            _retry(client.set_terminated, self.run_id, mlflow_status)

    # -- extras -----------------------------------------------------------------------------
    def flush(self) -> None:
        """Send buffered metrics, at most MAX_METRICS_PER_CALL per `log_batch` call."""
        if not self._buffer:
            return
        client = self._require_started()
        pending, self._buffer = self._buffer, []
        for i in range(0, len(pending), MAX_METRICS_PER_CALL):
            _retry(
                client.log_batch,
                self.run_id,
                metrics=pending[i : i + MAX_METRICS_PER_CALL],
                synchronous=True,
            )

    def __enter__(self) -> MlflowSink:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """Ends a run left open: `failed` when leaving on an exception, else `completed`."""
        if self.run_id is not None and not self._finished:
            self.finish("failed" if exc_type is not None else "completed", {})

    def _require_started(self) -> MlflowClient:
        if self._client is None or self.run_id is None:
            raise RuntimeError("MlflowSink.start() must be called first")
        return self._client


# -- parent runs -----------------------------------------------------------------------------
REUSE_KEYS = ("study", "phase", "git_commit", "scale", "dvc_exp_name")


def _quote(value: str) -> str:
    return f'"{value}"' if "'" in value else f"'{value}'"


class ParentRun(str):
    """The run_id of a parent run (a plain `str`), usable as a context manager: leaving the
    `with` block ends the run `completed`, or `failed` when the block raises."""

    tracking_uri: str

    def __new__(cls, run_id: str, tracking_uri: str) -> ParentRun:
        obj = super().__new__(cls, run_id)
        obj.tracking_uri = tracking_uri
        return obj

    def __enter__(self) -> str:
        return str(self)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        status = "failed" if exc_type is not None else "completed"
        end_run(str(self), status, tracking_uri=self.tracking_uri)


def parent_run(
    study: str,
    *,
    tracking_uri: str | None = None,
    experiment: str = "optlab",
    tags: Mapping[str, Any] | None = None,
    run_name: str | None = None,
    reuse: bool = False,
) -> ParentRun:
    """Create a parent run for a sweep or study; children pass its id as
    `MlflowSink(parent_run_id=...)`. The result is the run_id (a `str`): used plainly, the run
    stays open until `end_run`; used as `with parent_run(...) as run_id:`, it is ended on exit.

    With `reuse=True` an existing parent of the same experiment whose study, phase, git_commit,
    scale and dvc_exp_name tags all match is returned instead (oldest first), so sweep members
    that run as separate processes share one parent. Not safe against two processes creating
    the first parent at the same instant."""
    client, uri = _client(tracking_uri)
    experiment_id = ensure_experiment(client, experiment, uri)
    run_tags, diff = build_tags({**(tags or {}), "study": study}, role="parent")
    if reuse:
        clauses = [f"tags.`{ROLE_TAG}` = 'parent'"]
        clauses += [f"tags.`{k}` = {_quote(run_tags[k])}" for k in REUSE_KEYS if k in run_tags]
        found = _retry(
            client.search_runs,
            [experiment_id],
            filter_string=" and ".join(clauses),
            max_results=1,
            order_by=["attributes.start_time ASC"],
        )
        if found:
            return ParentRun(found[0].info.run_id, uri)
    return ParentRun(_create_run(client, experiment_id, run_tags, diff, run_name or study), uri)


def end_run(run_id: str, status: str = "completed", *, tracking_uri: str | None = None) -> None:
    """Set tag `status` and terminate the run: FINISHED for completed/diverged, else FAILED."""
    check_status(status)
    client, _ = _client(tracking_uri)
    _retry(client.set_tag, run_id, "status", status, synchronous=True)
    _retry(client.set_terminated, run_id, _MLFLOW_STATUS[status])
