"""Credit methods in the engine (issue #13): DFA's alignment with backprop grows over training,
the costate probe's records, and checkpoint/resume of the bridge methods."""

from __future__ import annotations

import pytest

from conftest import KillAt, comparable, make_splits, one_thread_fixture
from optlab import engine
from optlab.config import RunConfig
from optlab.data import Splits
from optlab.data.lq import make_lq
from optlab.probes.costate import METRICS

one_thread = pytest.fixture(autouse=True)(one_thread_fixture)


def _mlp_cfg(method: str, **kw) -> RunConfig:
    base = dict(arch="mlp", dataset="digits", optimizer="sgd", lr=0.01, step_method=method, depth=1, width=32,
                epochs=40, batch_size=32, device="cpu", probes={"costate": {"every": 80, "perturbations": 8}}, run_id="r")
    base.update(kw)
    return RunConfig(**base)


def _lq_cfg(method: str, **kw) -> RunConfig:
    base = dict(arch="lq", dataset="lq", optimizer="sgd", lr=0.002, step_method=method, depth=4, epochs=6,
                batch_size=32, device="cpu", log_every=3, checkpoint_every=0, run_id="r",
                probes={"costate": {"every": 8, "perturbations": 6}})
    base.update(kw)
    return RunConfig(**base)


def test_dfa_alignment_with_backprop_grows_over_training():
    """A one-hidden-layer tanh network on a Gaussian mixture: the classic setting where the forward
    weights come to align with the feedback (Nokland 2016; Lillicrap et al. 2016)."""
    data = make_splits(n_train=512, dim=16, n_classes=4)
    res = engine.train(_mlp_cfg("dfa"), data=data, progress=False)
    assert res.status == "completed"
    curve = [v for (_, _, k, v) in res.curves if k == "update_cos_mean"]
    assert len(curve) >= 5
    assert curve[0] < 0.1 and curve[-1] > curve[0] + 0.15, curve
    first = {r[2]: r[5] for r in res.layers if r[4] == "update_cos" and r[0] == 80}
    assert first[len(first) - 1] == pytest.approx(1.0, abs=1e-5)  # the head sees the true error
    assert res.final["feedback_seed"] == 0


def test_costate_probe_records_and_bp_reference():
    data = Splits(**make_lq(dim=6, n_train=128, n_val=32, n_test=32))
    res = engine.train(_lq_cfg("credit_bp", epochs=2), data=data, progress=False)
    for m in METRICS:
        assert f"{m}_mean" in {k for (_, _, k, _) in res.curves}
        rows = [r for r in res.layers if r[4] == m]
        assert {r[2] for r in rows} == set(range(4))
    assert res.final["costate_cos"] == pytest.approx(1.0, abs=1e-6)
    assert res.final["update_cos"] == pytest.approx(1.0, abs=1e-5)
    assert res.final["perturb_rho"] > 0.95 and res.final["nudge"] < 0


def test_credit_method_rejects_a_model_without_states():
    with pytest.raises(ValueError, match="layer states"):
        engine.train(RunConfig(arch="mlp", norm="layer", dataset="digits", step_method="dfa", optimizer="sgd", depth=1,
                               width=8, epochs=1, device="cpu", probes={}), data=make_splits(), progress=False)


@pytest.mark.parametrize("method,opts", [("state_bridge", {"flow_matching": True}), ("credit_bridge", {"warmup_frac": 0.1, "flow_matching": True})])
def test_bridge_resume_matches_uninterrupted(tmp_path, method, opts):
    data = Splits(**make_lq(dim=6, n_train=128, n_val=32, n_test=32))
    ref = engine.train(_lq_cfg(method, method_options=opts), data=data, progress=False)
    assert ref.status == "completed"
    assert any(k == "bridge_loss" for (_, _, k, _) in ref.curves)
    cfg = _lq_cfg(method, method_options=opts, checkpoint_every=5)
    with pytest.raises(KeyboardInterrupt):
        engine.train(cfg, data=data, sinks=[KillAt(13)], checkpoint_dir=tmp_path, progress=False)
    assert list(tmp_path.glob("r-*/step-*.pt"))
    resumed = engine.train(cfg, data=data, checkpoint_dir=tmp_path, progress=False)
    assert comparable(resumed) == comparable(ref)
    # the bridge's state is part of the checkpoint and of the memory count
    assert resumed.final["state_mem_mb"] > 0
