"""Tasks: how a dataset is batched, scored and evaluated. A registry keyed by the dataset's kind.

``build(cfg, data, device)`` picks the task for ``cfg.dataset`` (``task_kind``). Each task
declares its primary metric and direction, the validation metric an LR search selects on, its
per-step sums, evaluation and a fixed seeded probe batch (:class:`optlab.tasks.base.Task`).
Adding a task (regression, control) is a new module here that registers itself and names the
datasets it serves in ``DATASET_KINDS``-style: ``register_datasets(kind, names)``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..registry import Registry

TASKS: Registry[Any] = Registry("task")

# dataset name -> task kind. Classification datasets come from the data registry; token streams
# are the text corpora plus the synthetic Markov language.
_DATASET_KIND: dict[str, str] = {}


def register_datasets(kind: str, names: list[str] | tuple[str, ...]) -> None:
    for n in names:
        _DATASET_KIND[n] = kind


def _init_datasets() -> None:
    from ..data.registry import DATASETS

    for name, spec in DATASETS.items():
        _DATASET_KIND.setdefault(name, "lm" if spec.kind == "text" else "classification")
    _DATASET_KIND.setdefault("markov", "lm")


_init_datasets()


def dataset_names(kind: str | None = None) -> tuple[str, ...]:
    return tuple(n for n, k in _DATASET_KIND.items() if kind is None or k == kind)


def task_kind(dataset: str) -> str:
    from ..registry import UnknownName, unknown_message

    if dataset not in _DATASET_KIND:
        raise UnknownName(unknown_message("dataset", dataset, dataset_names()))
    return _DATASET_KIND[dataset]


def task_class(dataset: str) -> Any:
    return TASKS.get(task_kind(dataset), key="task")


def build(cfg: Any, data: Any, device: torch.device) -> Any:
    """The task for ``cfg.dataset`` over the loaded ``data``."""
    return task_class(cfg.dataset)(data, cfg, device)


build_task = build  # the engine's older name

from . import classification, lm, lq  # noqa: E402,F401  (register the built-in tasks)
from .classification import ClassificationTask  # noqa: E402
from .lm import LMTask  # noqa: E402

__all__ = ["TASKS", "ClassificationTask", "LMTask", "build", "build_task", "dataset_names", "task_kind", "task_class"]
