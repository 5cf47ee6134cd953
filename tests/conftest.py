"""Shared fixtures: tiny prepared datasets made in memory (never the mirror)."""

from __future__ import annotations

import torch
import pytest

from optlab.data import Splits


def make_splits(n_train: int = 256, n_val: int = 64, n_test: int = 64, dim: int = 12, n_classes: int = 4, seed: int = 0) -> Splits:
    """A linearly separable-ish Gaussian mixture with the Splits layout of a prepared dataset."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_classes, dim, generator=g) * 2.0

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, n_classes, (n,), generator=g)
        x = centers[y] + torch.randn(n, dim, generator=g)
        return x, y

    tx, ty = draw(n_train)
    vx, vy = draw(n_val)
    sx, sy = draw(n_test)
    meta = {"name": "toy", "n_classes": n_classes, "input_dim": dim, "n_train": n_train, "n_val": n_val, "n_test": n_test}
    return Splits(train_x=tx, train_y=ty, val_x=vx, val_y=vy, test_x=sx, test_y=sy, meta=meta)


SPLIT_KEYS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")


def save_prepared(s: Splits, path) -> None:
    """Write splits as a prepared dataset file (``data/prepared/<name>.pt``)."""
    torch.save({k: getattr(s, k) for k in SPLIT_KEYS} | {"meta": s.meta}, path)


def study_workspace(tmp_path, monkeypatch, studies: dict, **top) -> "Path":
    """A project directory for study-slice tests: the repository's params.yaml with ``studies``
    (and top-level keys ``top``; ``methods`` entries are merged), a tiny prepared ``digits``,
    cwd there, tracking off, checkpoints under ``ck/``."""
    from pathlib import Path

    from optlab import paramfiles

    params = paramfiles.read(Path(__file__).resolve().parents[1] / "params.yaml")
    params["methods"].update(top.pop("methods", {}))
    params["studies"] = studies
    params.update(top)
    paramfiles.write(params, tmp_path / "params.yaml")
    prep = tmp_path / "data" / "prepared"
    prep.mkdir(parents=True)
    save_prepared(make_splits(dim=64, n_classes=10), prep / "digits.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPTLAB_TRACKING", "0")
    monkeypatch.setenv("OPTLAB_CHECKPOINT_DIR", str(tmp_path / "ck"))
    return tmp_path


class KillAt:
    """A sink that raises KeyboardInterrupt (which gets past the engine's sink guard) once a metric
    batch reaches ``step``: a crash inside the process, for the resume tests."""

    def __init__(self, step: int) -> None:
        self.step = step

    def start(self, params, tags):
        pass

    def log_metrics(self, batch):
        if any(s >= self.step for _, _, s in batch):
            raise KeyboardInterrupt("simulated kill")

    def log_artifact(self, path):
        pass

    def finish(self, status, summary):
        pass


def comparable(res) -> tuple:
    """What a resumed run must reproduce exactly: status, final metrics, curves and layer rows,
    without the timing keys."""
    from optlab.engine import TIMING_KEYS

    final = {k: v for k, v in res.final.items() if k not in TIMING_KEYS}
    return res.status, final, [c for c in res.curves if c[2] not in TIMING_KEYS], res.layers


@pytest.fixture
def toy_splits() -> Splits:
    return make_splits()


def every(k: int) -> dict:
    """The default probes (gradient norms, exact sigma_max) every ``k`` steps."""
    return {"grad_norm": {"every": k}, "sigma_max": {"every": k}}


def one_thread_fixture():
    """Tiny models: one intra-op thread avoids OpenMP spin-waits on a shared CPU (use as an
    autouse fixture in a test module: ``one_thread = pytest.fixture(autouse=True)(one_thread_fixture)``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _one_worker(monkeypatch):
    """Study slices run in this process unless a test asks for worker processes (params.yaml's
    ``workers: auto`` would spawn a pool per slice: seconds of start-up per test)."""
    if "OPTLAB_WORKERS" not in __import__("os").environ:
        monkeypatch.setenv("OPTLAB_WORKERS", "1")
