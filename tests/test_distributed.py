"""Data-parallel training under torchrun (gloo on the CPU): two processes with a global batch
take the steps one process takes with that batch; divergence stops every rank; rank 0 alone
writes; methods that cannot run data-parallel are refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optlab import distributed

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
BASE = {"depth": 3, "width": 16, "epochs": 2, "batch_size": 32, "log_every": 3, "device": "cpu", "probes": {}}
JOBS = [
    {"name": "sgd", "cfg": {**BASE, "optimizer": "sgd", "lr": 0.1}},
    {"name": "adam", "cfg": {**BASE, "optimizer": "adam", "lr": 0.01}},
    {"name": "muon", "cfg": {**BASE, "optimizer": "muon", "lr": 0.02}},
    {"name": "rho", "cfg": {**BASE, "optimizer": "sgd", "lr": 5.0, "step_method": "rho",
                            "method_options": {"mode": "capped", "r_target": 1.0, "samples": "batch"}}},
    # example 100 is non-finite: the first global batch holding it diverges, on whichever rank's slice it lands
    {"name": "poison", "poison": 100, "cfg": {**BASE, "optimizer": "sgd", "lr": 0.1, "log_every": 1}},
    {"name": "dfa", "expect_error": True, "cfg": {**BASE, "optimizer": "sgd", "lr": 0.1, "step_method": "dfa"}},
]
RUNS = [j for j in JOBS if not j.get("expect_error")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([*args, str(WORKER), json.dumps(JOBS), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    _run([sys.executable], one)
    _run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
          "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}"], two)
    return one, two


def _load(d: Path, name: str, rank: int = 0):
    return (torch.load(d / f"{name}-params-rank{rank}.pt"), json.loads((d / f"{name}-result-rank{rank}.json").read_text()))


@pytest.mark.parametrize("name,atol", [("sgd", 1e-5), ("adam", 1e-4), ("muon", 2e-3), ("rho", 1e-5)])
def test_two_ranks_take_the_single_process_steps(runs, name, atol):
    one, two = runs
    p1, r1 = _load(one, name)
    p2, r2 = _load(two, name, 0)
    q2, s2 = _load(two, name, 1)
    assert r1["status"] == r2["status"] == s2["status"] == "completed"
    assert p1.keys() == p2.keys() and len(p1) > 0
    moved = 0.0
    for k in p1:
        assert torch.equal(p2[k], q2[k]), f"{name}: rank 0 and rank 1 disagree on {k}"
        torch.testing.assert_close(p2[k], p1[k], atol=atol, rtol=0, msg=f"{name}: {k} differs from one process")
        moved = max(moved, (p1[k] - _init(name)[k]).abs().max().item())
    assert moved > 50 * atol, f"{name}: the parameters barely moved ({moved}); the comparison would be vacuous"
    for key in ("test_loss", "val_loss", "train_loss"):
        assert r2["final"][key] == pytest.approx(r1["final"][key], rel=1e-3, abs=1e-4), key
    assert r2["final"]["test_acc"] == s2["final"]["test_acc"]
    assert r2["final"]["steps"] == r1["final"]["steps"] == 16


_INITS: dict[str, dict[str, torch.Tensor]] = {}


def _init(name: str) -> dict[str, torch.Tensor]:
    """The model's parameters before training (same seed and arch as the job)."""
    if name not in _INITS:
        from optlab import models
        from optlab.config import RunConfig
        from optlab.engine import model_kwargs, seed_everything
        from optlab import tasks
        from tests.conftest import make_splits

        job = next(j for j in JOBS if j["name"] == name)
        cfg = RunConfig(run_id=name, **job["cfg"])
        seed_everything(cfg.seed)
        task = tasks.build(cfg, make_splits(), torch.device("cpu"))
        _INITS[name] = {k: v.detach().clone() for k, v in models.build(cfg.arch, **model_kwargs(cfg, task)).state_dict().items()}
    return _INITS[name]


def test_rho_spread_is_the_maximum_over_the_ranks(runs):
    one, two = runs
    _, r1 = _load(one, "rho")
    _, r2 = _load(two, "rho")
    d1 = [v for s, e, k, v in r1["curves"] if k == "delta_a"]
    d2 = [v for s, e, k, v in r2["curves"] if k == "delta_a"]
    assert len(d1) == len(d2) == 16
    assert d2 == pytest.approx(d1, rel=1e-4)
    capped = [v for s, e, k, v in r2["curves"] if k == "capped"]
    assert max(capped) == 1.0  # lr 5 is capped: the controller acted, on both ranks alike


def test_divergence_on_one_rank_stops_both(runs):
    one, two = runs
    _, r1 = _load(one, "poison")
    _, r2 = _load(two, "poison", 0)
    _, s2 = _load(two, "poison", 1)
    assert r1["status"] == r2["status"] == s2["status"] == "diverged"
    assert r1["diverged_step"] == r2["diverged_step"] == s2["diverged_step"]
    assert r2["diverge_reason"] == "nonfinite"


def test_rank_zero_alone_writes_the_run_directory(runs):
    _, two = runs
    for job in RUNS:
        assert (two / f"{job['name']}-run-rank0" / "metrics.json").is_file()
        assert not (two / f"{job['name']}-run-rank1").exists()


def test_shards_and_spans_cover_the_batch_once():
    idx = torch.arange(37)
    parts = [distributed.shard(idx, distributed.World(rank=r, size=3)) for r in range(3)]
    assert torch.equal(torch.cat(parts), idx)
    spans = [distributed.span(10, distributed.World(rank=r, size=4)) for r in range(4)]
    assert spans[0][0] == 0 and spans[-1][1] == 10 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert distributed.shard(idx, distributed.SINGLE) is idx


def test_a_method_that_cannot_run_data_parallel_is_refused(runs):
    one, two = runs
    assert not (one / "dfa-error-rank0.txt").exists()  # one process: DFA trains
    for rank in (0, 1):
        msg = (two / f"dfa-error-rank{rank}.txt").read_text()
        assert "step_method: 'dfa' cannot train data-parallel (WORLD_SIZE=2)" in msg
        assert "allowed under torchrun: backprop, rho" in msg and "\n" not in msg
