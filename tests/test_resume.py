"""Checkpoint and resume: a run killed with SIGKILL mid-epoch resumes to identical metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from optlab import paramfiles
from optlab import engine
from optlab.config import RunConfig, SNConfig
from tests.conftest import make_splits, study_workspace, KillAt, comparable
from conftest import every

ROOT = Path(__file__).resolve().parents[1]
TIMING = engine.TIMING_KEYS


def _cfg(**kw) -> RunConfig:
    base = dict(optimizer="sgd_sn", lr=0.2, depth=3, width=16, epochs=4, batch_size=32, log_every=3,
                checkpoint_every=5, device="cpu", run_id="r")
    base.update(kw)
    return RunConfig(sn=SNConfig(mode="scale", sigma="power"), probes=every(4), **base)


def test_resume_in_process_matches_uninterrupted(tmp_path):
    data = make_splits()
    ref = engine.train(_cfg(checkpoint_every=0), data=data, progress=False)
    with pytest.raises(KeyboardInterrupt):
        engine.train(_cfg(), data=data, sinks=[KillAt(13)], checkpoint_dir=tmp_path, progress=False)
    ckpts = sorted((tmp_path).glob("r-*/step-*.pt"))
    assert ckpts, "a checkpoint was written before the kill"
    resumed = engine.train(_cfg(), data=data, checkpoint_dir=tmp_path, progress=False)
    assert comparable(resumed) == comparable(ref)
    assert not list(tmp_path.glob("r-*/step-*.pt")), "checkpoints are removed once the run completes"


def test_corrupt_checkpoint_falls_back_to_previous(tmp_path):
    data = make_splits()
    ref = engine.train(_cfg(checkpoint_every=0), data=data, progress=False)
    with pytest.raises(KeyboardInterrupt):
        engine.train(_cfg(), data=data, sinks=[KillAt(25)], checkpoint_dir=tmp_path, progress=False)
    ckpts = sorted(tmp_path.glob("r-*/step-*.pt"))
    assert len(ckpts) == 2
    newest = ckpts[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 3])  # truncated
    with pytest.warns(UserWarning, match=r"unreadable.*falling back to the previous one"):
        resumed = engine.train(_cfg(), data=data, checkpoint_dir=tmp_path, progress=False)
    assert comparable(resumed) == comparable(ref)


def test_changed_config_does_not_resume(tmp_path):
    data = make_splits()
    with pytest.raises(KeyboardInterrupt):
        engine.train(_cfg(), data=data, sinks=[KillAt(13)], checkpoint_dir=tmp_path, progress=False)
    other = engine.train(_cfg(lr=0.1), data=data, checkpoint_dir=tmp_path, progress=False)
    ref = engine.train(_cfg(lr=0.1, checkpoint_every=0), data=data, progress=False)
    assert comparable(other) == comparable(ref)


def test_checkpoint_loads_weights_only(tmp_path):
    """A file that needs arbitrary unpickling is refused, not executed."""
    ck = engine.Checkpointer(tmp_path, _cfg())
    ck.dir.mkdir(parents=True)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"format": 1, "x": Evil()}, ck.dir / "step-000000005.pt")
    with pytest.warns(UserWarning, match="unreadable"):
        assert ck.latest() is None


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_the_stage_resumes(tmp_path):
    """The real thing: `python -m optlab.pipeline train` killed with SIGKILL, then run again."""
    params = paramfiles.read(ROOT / "params.yaml")
    params["profiles"]["quick"].update(depth=4, width=32, epochs=12, batch_size=16)
    params.update(checkpoint_every=40, log_every=10, optimizer="sgd_sn")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OPTLAB_", "DVC_"))}
    env.update(OPTLAB_TRACKING="0", PYTHONPATH=str(ROOT / "src"))

    def workdir(name: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        paramfiles.write(params, d / "params.yaml")
        subprocess.run([sys.executable, "-m", "optlab.pipeline", "prepare"], cwd=d, env=env, check=True, capture_output=True)
        return d

    ref_dir, run_dir = workdir("ref"), workdir("killed")
    subprocess.run([sys.executable, "-m", "optlab.pipeline", "train"], cwd=ref_dir, env={**env, "OPTLAB_CHECKPOINT_DIR": str(ref_dir / "ck")}, check=True, capture_output=True)
    env_k = {**env, "OPTLAB_CHECKPOINT_DIR": str(run_dir / "ck")}
    proc = subprocess.Popen([sys.executable, "-m", "optlab.pipeline", "train"], cwd=run_dir, env=env_k, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((run_dir / "ck").glob("*/step-*.pt"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "runs/train/metrics.json").exists(), "killed before the end"
    subprocess.run([sys.executable, "-m", "optlab.pipeline", "train"], cwd=run_dir, env=env_k, check=True, capture_output=True)
    a = json.loads((ref_dir / "runs/train/metrics.json").read_text())
    b = json.loads((run_dir / "runs/train/metrics.json").read_text())
    for k in TIMING:
        a["final"].pop(k, None), b["final"].pop(k, None)
    assert a["final"] == b["final"] and a["status"] == b["status"] == "completed"
    def curves(d: Path) -> list[str]:
        return [ln for ln in (d / "runs/train/curves.csv").read_text().splitlines() if ln.split(",")[2] not in TIMING]

    assert curves(ref_dir) == curves(run_dir)


def test_interrupted_sweep_slice_redoes_only_unfinished_runs(tmp_path, monkeypatch):
    """A slice killed after two runs: the rerun reuses those two and trains the rest."""
    from optlab import pipeline

    study_workspace(tmp_path, monkeypatch, {"s": {"analysis": "sgd_sn", "arch": "mlp", "methods": ["sgd"], "quick": {
        "datasets": ["digits"], "grid": {"depth": [2]}, "lrs": [0.1, 0.01, 0.001], "lr_extend": 0,
        "search_seeds": [0], "seeds": [0, 1], "set": {"width": 8, "epochs": 1, "batch_size": 64}}}}, checkpoint_every=1000)
    real = engine._Loop.run
    calls = []

    def counting(self, resume):
        calls.append(self.cfg.run_id)
        if len(calls) == 3 and not hasattr(counting, "fired"):
            counting.fired = True
            raise KeyboardInterrupt("killed")
        return real(self, resume)

    monkeypatch.setattr(engine._Loop, "run", counting)
    with pytest.raises(KeyboardInterrupt):
        pipeline.sweep("s", "sgd")
    first = list(calls)
    calls.clear()
    results = pipeline.sweep("s", "sgd")
    assert len(results) == 4  # 3 LRs searched + the selected LR on seed 1
    assert calls[0] == first[2] and first[0] not in calls and first[1] not in calls
    assert not (tmp_path / "ck" / "sweep" / "s" / "sgd").exists(), "records cleared once the slice completed"
