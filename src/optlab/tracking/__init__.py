"""Tracking: provenance, phase policy, the Sink interface, its MLflow implementation and the
spool that keeps what the store could not take (`python -m optlab.tracking sync|status`).

Importing this package does not import mlflow; the MLflow names below load on first use."""

from __future__ import annotations

from typing import Any

from optlab.tracking.flatten import flatten_params
from optlab.tracking.policy import PHASES, WATCHED, PhaseError, check_phase
from optlab.tracking.provenance import (
    dvc_exp_name,
    dvc_stage,
    find_repo_root,
    find_work_tree,
    git_info,
)
from optlab.tracking.sink import REQUIRED_TAGS, MemorySink, NullSink, Sink
from optlab.tracking.spool import (
    SyncSummary,
    TrackingOutageWarning,
    default_spool_dir,
    pending,
    sync,
    try_sync,
)
from optlab.tracking.store import default_artifact_location, default_tracking_uri

_LAZY = {"MlflowSink", "ParentRun", "parent_run", "end_run"}
# spooling while the tracking store is down: see optlab.tracking.spool

__all__ = [
    "PHASES",
    "REQUIRED_TAGS",
    "WATCHED",
    "MemorySink",
    "NullSink",
    "PhaseError",
    "Sink",
    "SyncSummary",
    "TrackingOutageWarning",
    "check_phase",
    "default_artifact_location",
    "default_spool_dir",
    "default_tracking_uri",
    "dvc_exp_name",
    "dvc_stage",
    "find_repo_root",
    "find_work_tree",
    "flatten_params",
    "git_info",
    "pending",
    "sync",
    "try_sync",
    *sorted(_LAZY),
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from optlab.tracking import mlflow_sink

        return getattr(mlflow_sink, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
