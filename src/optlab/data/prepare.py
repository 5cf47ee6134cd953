"""Build train/val/test tensors from raw files and save them as one torch file."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ._io import atomic_save
from .fetch import fetch
from .idx import read_idx
from .registry import DatasetSpec, dataset_names, get_spec

FORMAT_VERSION = 1


@dataclass(frozen=True)
class _Source:
    """Raw examples before splitting: x is [N, D] (any numeric dtype), y is int64 [N]."""

    x: torch.Tensor
    y: torch.Tensor
    test_x: torch.Tensor | None  # official test split, if the dataset has one
    test_y: torch.Tensor | None
    md5: dict[str, str]
    per_feature: bool  # standardize each feature (True) or with one global mean/std
    per_channel: bool = False  # images: one mean/std per channel (overrides per_feature)


@dataclass(frozen=True)
class _FetchArgs:
    raw_dir: Path
    mirror: str | os.PathLike[str] | None
    download: bool
    base_url: str | None
    progress: bool


def _digits_source(spec: DatasetSpec, _: _FetchArgs) -> _Source:
    from sklearn.datasets import load_digits  # lazy: scikit-learn is a pipeline extra

    d = load_digits()
    data = np.ascontiguousarray(d.data, dtype="<f8")
    target = np.ascontiguousarray(d.target, dtype="<i8")
    h = hashlib.md5(data.tobytes(), usedforsecurity=False)
    h.update(target.tobytes())
    return _Source(
        x=torch.from_numpy(data.astype(np.float32)),
        y=torch.from_numpy(target.astype(np.int64)),
        test_x=None,
        test_y=None,
        md5={"sklearn.datasets.load_digits": h.hexdigest()},
        per_feature=True,
    )


def _fetch(spec: DatasetSpec, args: _FetchArgs) -> dict[str, Path]:
    return fetch(spec, args.raw_dir, args.mirror, download=args.download, base_url=args.base_url, progress=args.progress)


def _idx_source(spec: DatasetSpec, args: _FetchArgs) -> _Source:
    paths = _fetch(spec, args)

    def pair(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        img_file = spec.file(f"{split}_images").name
        lab_file = spec.file(f"{split}_labels").name
        images, labels = read_idx(paths[img_file]), read_idx(paths[lab_file])
        if images.dim() < 2 or tuple(images.shape[1:]) != tuple(spec.input_shape[-2:]):
            raise ValueError(
                f"{img_file}: image shape {tuple(images.shape[1:])}, "
                f"expected {tuple(spec.input_shape[-2:])}"
            )
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"{lab_file}: {tuple(labels.shape)} labels for {images.shape[0]} images"
            )
        labels = labels.to(torch.int64)
        if labels.numel() and (labels.min() < 0 or labels.max() >= spec.n_classes):
            raise ValueError(f"{lab_file}: labels outside [0, {spec.n_classes})")
        return images.reshape(images.shape[0], -1), labels

    x, y = pair("train")
    test_x, test_y = pair("test")
    return _Source(x, y, test_x, test_y, {f.name: f.md5 for f in spec.files}, per_feature=False)


def _cifar_source(spec: DatasetSpec, args: _FetchArgs) -> _Source:
    from .cifar import read_cifar10

    paths = _fetch(spec, args)
    f = spec.file("archive")
    x, y, test_x, test_y = read_cifar10(paths[f.name], f.md5, work_dir=args.raw_dir)
    return _Source(x, y, test_x, test_y, {f.name: f.md5}, per_feature=False, per_channel=True)


_SOURCES: dict[str, Callable[[DatasetSpec, _FetchArgs], _Source]] = {
    "sklearn_digits": _digits_source,
    "idx": _idx_source,
    "cifar10_python": _cifar_source,
}


def _count(fraction: float, n: int) -> int:
    """round(fraction * n), halves rounded up."""
    return int(math.floor(fraction * n + 0.5))


def _check_fraction(name: str, value: float, *, allow_zero: bool) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value < 1):
        bound = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"{name} must be in {bound}, got {value!r}")


def _channel_std_mean(x: torch.Tensor, channels: int, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Population std and mean per channel of channel-major rows ``[N, C*H*W]``, each expanded
    to ``[C*H*W]``; two float64 passes over row chunks (no float64 copy of the whole split)."""
    n, d = x.shape
    if d % channels:
        raise ValueError(f"{d} features are not {channels} channels")
    hw = d // channels
    count = n * hw
    total = torch.zeros(channels, dtype=torch.float64)
    for i in range(0, n, chunk):
        total += x[i : i + chunk].to(torch.float64).view(-1, channels, hw).sum(dim=(0, 2))
    mean = total / count
    sq = torch.zeros(channels, dtype=torch.float64)
    for i in range(0, n, chunk):
        dev = x[i : i + chunk].to(torch.float64).view(-1, channels, hw) - mean.view(1, channels, 1)
        sq += dev.square().sum(dim=(0, 2))
    std = (sq / count).sqrt()
    return std.repeat_interleave(hw), mean.repeat_interleave(hw)


def _standardize(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    return ((x.to(torch.float32) - mean) / std).contiguous()


def prepare(
    name: str | DatasetSpec,
    raw_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    mirror: str | os.PathLike[str] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    download: bool = True,
    base_url: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fetch, split, standardize and save a dataset; return its meta dict.

    The validation split is a seeded random subset of the training set; an official test
    set stays test-only. Datasets without one (digits) first lose ``test_fraction`` of their
    examples to a seeded test split. x is float32 [N, D] standardized with the train split's
    statistics (per feature for digits, one global mean/std for MNIST-like, per channel for
    CIFAR-10, whose archive is MD5-checked and read with a restricted unpickler); y is int64.
    The file (written atomically) holds the six tensors, ``*_idx`` (source indices of each
    split), ``x_mean``/``x_std`` and ``meta``.
    """
    spec = get_spec(name)
    source_fn = _SOURCES.get(spec.kind) if spec.preparable else None
    if source_fn is None:
        raise NotImplementedError(
            f"prepare is not implemented for dataset {spec.name!r}; "
            f"supported: {', '.join(dataset_names())}"
        )
    _check_fraction("val_fraction", val_fraction, allow_zero=True)
    _check_fraction("test_fraction", test_fraction, allow_zero=False)

    src = source_fn(spec, _FetchArgs(Path(raw_dir), mirror, download, base_url, progress))
    gen = torch.Generator().manual_seed(seed)
    n_all = src.x.shape[0]

    if src.test_x is None:
        perm = torch.randperm(n_all, generator=gen)
        n_test = _count(test_fraction, n_all)
        test_idx = perm[:n_test].sort().values
        pool = perm[n_test:].sort().values
        test_raw, test_y = src.x[test_idx], src.y[test_idx]
    else:
        assert src.test_y is not None
        test_idx = torch.arange(src.test_x.shape[0])
        pool = torch.arange(n_all)
        test_raw, test_y = src.test_x, src.test_y

    perm = torch.randperm(pool.numel(), generator=gen)
    n_val = _count(val_fraction, pool.numel())
    val_idx = pool[perm[:n_val]].sort().values
    train_idx = pool[perm[n_val:]].sort().values
    if train_idx.numel() < 2:
        raise ValueError(f"{spec.name}: only {train_idx.numel()} training examples after splitting")

    train_raw = src.x[train_idx]
    if src.per_channel:
        std64, mean64 = _channel_std_mean(train_raw, spec.input_shape[0])
    else:
        stats_in = train_raw.to(torch.float64)
        if src.per_feature:
            std64, mean64 = torch.std_mean(stats_in, dim=0, correction=0)
        else:
            std64, mean64 = torch.std_mean(stats_in, correction=0)
        del stats_in
    std64 = torch.where(std64 > 1e-12, std64, torch.ones_like(std64))
    mean, std = mean64.to(torch.float32), std64.to(torch.float32)

    carved = src.test_x is None
    meta: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "name": spec.name,
        "n_classes": spec.n_classes,
        "input_dim": int(src.x.shape[1]),
        "input_shape": list(spec.input_shape),
        "n_train": int(train_idx.numel()),
        "n_val": int(val_idx.numel()),
        "n_test": int(test_idx.numel()),
        "seed": int(seed),
        "val_fraction": float(val_fraction),
        "test_fraction": float(test_fraction) if carved else None,
        "test_split": "carved" if carved else "official",
        "standardize": "per_channel" if src.per_channel else "per_feature" if src.per_feature else "global",
        "md5": dict(src.md5),
    }
    obj = {
        "train_x": _standardize(train_raw, mean, std),
        "train_y": src.y[train_idx].contiguous(),
        "val_x": _standardize(src.x[val_idx], mean, std),
        "val_y": src.y[val_idx].contiguous(),
        "test_x": _standardize(test_raw, mean, std),
        "test_y": test_y.clone(),
        "train_idx": train_idx,
        "val_idx": val_idx,
        "test_idx": test_idx,
        "x_mean": mean.clone(),
        "x_std": std.clone(),
        "meta": meta,
    }
    atomic_save(Path(out_path), obj)
    return dict(meta)
