"""``lq``: the synthetic data of the linear-quadratic toy (issue #13). Nothing is downloaded.

Inputs ``x ~ N(0, I_d)``; targets ``y = M x`` with ``M = U diag(s) V^T`` (random orthogonal
``U``, ``V``, singular values evenly spaced in [0.5, 1.5]), a function of the seed alone. The
cost weights ``q`` (``meta["cost_weights"]``, evenly spaced in [0.5, 2]) define the task's
quadratic cost ``(1/2) sum_i q_i (s_L - y)_i^2``, averaged over examples. Prepared files have the
layout of the classification datasets (``train_x`` ... ``test_y``, float targets) and
``meta`` with ``kind: lq``, ``input_dim``, ``output_dim``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ._io import atomic_save


def make_lq(dim: int = 16, n_train: int = 2048, n_val: int = 512, n_test: int = 512, seed: int = 0) -> dict[str, Any]:
    """The tensors and meta of the dataset (in memory)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    v, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    m = u @ torch.diag(torch.linspace(0.5, 1.5, dim)) @ v.T
    out: dict[str, Any] = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        x = torch.randn(n, dim, generator=g)
        out[f"{split}_x"], out[f"{split}_y"] = x, x @ m.T
    out["meta"] = {"name": "lq", "kind": "lq", "input_dim": dim, "output_dim": dim, "seed": seed,
                   "n_train": n_train, "n_val": n_val, "n_test": n_test,
                   "cost_weights": torch.linspace(0.5, 2.0, dim).tolist()}
    return out


def prepare_lq(out_path: str | Path, seed: int = 0, **kw: Any) -> dict[str, Any]:
    obj = make_lq(seed=seed, **kw)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(out, obj)
    return obj["meta"]
