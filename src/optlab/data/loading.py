"""Load prepared datasets onto a device and batch them by index."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import DatasetMissingError

_TENSOR_KEYS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")


@dataclass
class Splits:
    """The six split tensors (x float32 [N, D], y int64 [N]) on one device, plus meta."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    meta: dict[str, Any]

    @property
    def n_classes(self) -> int:
        return int(self.meta["n_classes"])

    @property
    def input_dim(self) -> int:
        return int(self.meta["input_dim"])

    def split(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of ``train``, ``val`` or ``test``."""
        if which not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {which!r}")
        return getattr(self, f"{which}_x"), getattr(self, f"{which}_y")


def load(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Splits:
    """Load a file written by ``prepare`` (weights-only unpickling) onto ``device``."""
    p = Path(path)
    if not p.is_file():
        raise DatasetMissingError(
            f"prepared dataset not found: {p}; run `dvc repro prepare` "
            "(or optlab.data.prepare) to build it"
        )
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{p} is not a prepared optlab dataset (weights-only load refused it: {first})"
        ) from e
    if not isinstance(obj, dict):
        raise ValueError(f"{p} is not a prepared optlab dataset (top level is not a dict)")
    missing = [k for k in (*_TENSOR_KEYS, "meta") if k not in obj]
    if missing:
        raise ValueError(f"{p} is not a prepared optlab dataset (missing {', '.join(missing)})")
    for k in _TENSOR_KEYS:
        if not isinstance(obj[k], torch.Tensor):
            raise ValueError(f"{p}: {k} is not a tensor")
    if not isinstance(obj["meta"], dict):
        raise ValueError(f"{p}: meta is not a dict")
    dev = torch.device(device)
    return Splits(**{k: obj[k].to(dev) for k in _TENSOR_KEYS}, meta=obj["meta"])


def batch_indices(
    n: int,
    batch_size: int,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
) -> Iterator[torch.Tensor]:
    """One epoch of shuffled index batches (int64 on ``device``); the last partial batch is kept.

    The permutation is drawn on the generator's device and moved to ``device``, so a CPU
    generator gives the same order whatever the data device.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    perm = torch.randperm(n, generator=generator, device=generator.device).to(device)
    for start in range(0, n, batch_size):
        yield perm[start : start + batch_size]
