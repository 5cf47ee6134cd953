"""The sink interface the engine logs to, plus sinks that need nothing but the stdlib."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

STATUSES = ("completed", "diverged", "failed")
REQUIRED_TAGS = (
    "phase",
    "git_commit",
    "git_dirty",
    "study",
    "dvc_stage",
    "seed",
    "torch_version",
    "device",
    "scale",
)


@runtime_checkable
class Sink(Protocol):
    """Receives one training run: params and tags, metric batches, artifacts, the outcome."""

    def start(self, params: dict[str, Any], tags: dict[str, str]) -> None: ...

    def log_metrics(self, batch: list[tuple[str, float, int]]) -> None:
        """`batch` holds (key, value, step) triples."""
        ...

    def log_artifact(self, path: str | Path) -> None: ...

    def finish(self, status: str, summary: dict[str, float | None]) -> None:
        """`status` is one of completed, diverged, failed."""
        ...


def check_status(status: str) -> str:
    """Return `status` if it is a valid run outcome, else raise ValueError."""
    if status not in STATUSES:
        raise ValueError(f"status: {status!r} is not one of {', '.join(STATUSES)}")
    return status


class NullSink:
    """Discards everything."""

    def start(self, params: dict[str, Any], tags: dict[str, str]) -> None:
        pass

    def log_metrics(self, batch: list[tuple[str, float, int]]) -> None:
        pass

    def log_artifact(self, path: str | Path) -> None:
        pass

    def finish(self, status: str, summary: dict[str, float | None]) -> None:
        check_status(status)


@dataclass
class MemorySink:
    """Records every call; for tests and notebooks."""

    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: list[tuple[str, float, int]] = field(default_factory=list)
    artifacts: list[Path] = field(default_factory=list)
    status: str | None = None
    summary: dict[str, float | None] = field(default_factory=dict)
    started: bool = False

    def start(self, params: dict[str, Any], tags: dict[str, str]) -> None:
        self.params = dict(params)
        self.tags = dict(tags)
        self.started = True

    def log_metrics(self, batch: list[tuple[str, float, int]]) -> None:
        self.metrics.extend((str(k), float(v), int(s)) for k, v, s in batch)

    def log_artifact(self, path: str | Path) -> None:
        self.artifacts.append(Path(path))

    def finish(self, status: str, summary: dict[str, float | None]) -> None:
        self.status = check_status(status)
        self.summary = dict(summary)

    def history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) pairs logged under `key`, in logging order."""
        return [(s, v) for k, v, s in self.metrics if k == key]
