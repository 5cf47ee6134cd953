"""Engine behaviour: determinism, divergence as a result, records, autograd-exact steps."""

import json
import math

import pytest
import torch

from optlab import engine
from optlab.config import RunConfig, SNConfig
from tests.conftest import make_splits
from conftest import every


def _cfg(**kw) -> RunConfig:
    base = dict(optimizer="sgd", lr=0.1, depth=3, width=16, epochs=2, batch_size=32, log_every=3, device="cpu")
    base.update(kw)
    return RunConfig(probes=every(4), **base)


def _metrics(res: engine.RunResult) -> list[tuple]:
    return [(s, e, k, v) for (s, e, k, v) in res.curves if k not in engine.TIMING_KEYS]


def test_same_seed_same_metrics_different_seed_differs(toy_splits):
    a = engine.train(_cfg(seed=3), data=toy_splits, progress=False)
    b = engine.train(_cfg(seed=3), data=toy_splits, progress=False)
    c = engine.train(_cfg(seed=4), data=toy_splits, progress=False)
    assert _metrics(a) == _metrics(b)
    assert a.layers == b.layers
    assert _metrics(a) != _metrics(c)


def test_completed_run_writes_outputs(tmp_path, toy_splits):
    res = engine.train(_cfg(optimizer="sgd_sn", lr=0.2, epochs=3), data=toy_splits, run_dir=tmp_path / "r", progress=False)
    assert res.status == "completed"
    doc = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert doc["status"] == "completed" and doc["config"]["optimizer"] == "sgd_sn"
    steps_per_epoch = math.ceil(256 / 32)
    assert doc["final"]["steps"] == 3 * steps_per_epoch
    assert doc["final"]["sn_violations"] == 0 and doc["final"]["sigma_max_max"] <= 1 + 1e-4
    assert 0.0 <= doc["final"]["test_acc"] <= 1.0
    header = (tmp_path / "r" / "layers.csv").read_text().splitlines()[0]
    assert header == "step,epoch,layer,role,metric,value"
    epochs = (tmp_path / "r" / "epochs.csv").read_text().splitlines()
    assert len(epochs) == 1 + 3


def test_layer_sigma_records_are_exact(toy_splits, monkeypatch):
    """Every recorded sigma_max row equals an SVD of that layer's weights at the moment of the check
    (computed independently here), the run's curve is the max over layers, and the summary's
    sigma_max_max is the largest over every check of the run (not the last check's)."""
    import optlab.probes.spectral as spectral_probe

    refs: list[list[float]] = []
    real = spectral_probe.layer_sigma_max

    def spy(index, **kw):
        refs.append([float(torch.linalg.svdvals(m.double())[0]) for p in index.params
                     for m in p.detach().reshape(-1, *p.shape[-2:])])
        return real(index, **kw)

    monkeypatch.setattr(spectral_probe, "layer_sigma_max", spy)
    torch.manual_seed(0)
    res = engine.train(_cfg(optimizer="sgd", lr=0.3, epochs=3, batch_size=64), data=toy_splits, progress=False)
    rows = [r for r in res.layers if r[4] == "sigma_max"]
    steps = sorted({r[0] for r in rows})
    assert len(steps) == len(refs) >= 3
    for step, ref in zip(steps, refs):
        at = sorted((r for r in rows if r[0] == step), key=lambda r: r[2])
        assert [r[2] for r in at] == [0, 1, 2, 3, 4]
        assert [r[3] for r in at] == ["input", "hidden", "hidden", "hidden", "output"]
        assert [r[5] for r in at] == pytest.approx(ref, rel=1e-5)
    curve = {s: v for s, _, k, v in res.curves if k == "sigma_max"}
    assert [curve[s] for s in steps] == pytest.approx([max(r) for r in refs], rel=1e-5)
    assert res.final["sigma_max_max"] == pytest.approx(max(max(r) for r in refs), rel=1e-5)
    assert res.final["sigma_max_last"] == pytest.approx(max(refs[-1]), rel=1e-5)
    assert res.final["sn_violations"] is None and res.final["sn_strict"] is None  # nothing projected


def test_violations_count_projected_layers_at_each_check(toy_splits, monkeypatch):
    """sn_violations counts (layer, check) pairs above 1 + SN_TOL among projected layers only;
    sn_violating_checks the checks with any. Forced here by a projection that does nothing."""
    from optlab.optim.spectral import SpectralProjection

    monkeypatch.setattr(SpectralProjection, "project", lambda self: None)
    torch.manual_seed(0)
    cfg = _cfg(optimizer="sgd_sn", lr=0.3, epochs=2, batch_size=64, init="kaiming", sn={"roles": ["hidden"]})
    res = engine.train(cfg, data=toy_splits, progress=False)
    rows = [r for r in res.layers if r[4] == "sigma_max"]
    hidden_bad = sum(1 for r in rows if r[3] == "hidden" and r[5] > 1 + engine.SN_TOL)
    other_bad = sum(1 for r in rows if r[3] != "hidden" and r[5] > 1 + engine.SN_TOL)
    assert hidden_bad > 0 and other_bad > 0
    assert res.final["sn_violations"] == hidden_bad  # input/output layers are not projected: not counted
    checks = {r[0] for r in rows if r[3] == "hidden" and r[5] > 1 + engine.SN_TOL}
    assert res.final["sn_violating_checks"] == len(checks)
    assert res.final["sn_strict"] is True  # what the projection claims; the count shows it did not hold


def test_divergence_is_recorded_with_its_step(tmp_path, toy_splits):
    res = engine.train(_cfg(optimizer="sgd", lr=1e4, epochs=3), data=toy_splits, run_dir=tmp_path / "d", progress=False)
    assert res.status == "diverged"
    assert res.diverge_reason in ("nonfinite", "exploding")
    assert res.diverged_step is not None and 1 <= res.diverged_step <= res.final["steps"]
    doc = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert doc["status"] == "diverged" and doc["diverged_step"] == res.diverged_step
    assert doc["final"]["test_acc"] is None  # no number invented for a diverged run


def test_divergence_step_is_the_first_bad_step(toy_splits):
    """The recorded step is the first whose loss was bad, even inside a log interval."""
    cfg = _cfg(optimizer="sgd", lr=1e4, epochs=3, log_every=1)
    fine = engine.train(cfg, data=toy_splits, progress=False)
    coarse = engine.train(_cfg(optimizer="sgd", lr=1e4, epochs=3, log_every=7), data=toy_splits, progress=False)
    assert fine.diverged_step == coarse.diverged_step


def test_divergence_step_matches_a_hand_written_loop(toy_splits):
    """Full-batch SGD written by hand gives each step's training loss; with the divergence threshold
    set between two of them, the engine's recorded step is the first step (1-based) above it, at
    any log interval: a record one step early or late fails here."""
    from optlab import models

    lr, n_steps = 30.0, 12
    torch.manual_seed(7)
    m = models.build("mlp", input_dim=12, n_classes=4, depth=3, width=16, activation="tanh", init="orthogonal")
    x, y = toy_splits.train_x, toy_splits.train_y
    losses = []
    for _ in range(n_steps):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        losses.append(loss.item())
        grads = torch.autograd.grad(loss, list(m.parameters()))
        with torch.no_grad():
            for p, g in zip(m.parameters(), grads):
                p -= lr * g
    # the first step k >= 3 whose loss clearly exceeds every earlier one: the threshold sits halfway
    k = next(i for i in range(2, n_steps) if losses[i] > 1.2 * max(losses[:i]))
    threshold = (max(losses[:k]) + losses[k]) / 2
    for log_every in (1, 5):
        res = engine.train(_cfg(optimizer="sgd", lr=lr, epochs=n_steps, batch_size=256, seed=7, log_every=log_every,
                                diverge_loss=threshold), data=toy_splits, progress=False)
        assert res.status == "diverged" and res.diverge_reason == "exploding"
        assert res.diverged_step == k + 1, (log_every, losses)


def test_engine_step_equals_manual_autograd_sgd(toy_splits):
    """One engine epoch with full-batch SGD equals the closed loop written by hand."""
    from optlab import models

    cfg = _cfg(optimizer="sgd", lr=0.05, epochs=1, batch_size=256, seed=7)
    res = engine.train(cfg, data=toy_splits, progress=False)
    torch.manual_seed(7)
    m = models.build("mlp", input_dim=12, n_classes=4, depth=3, width=16, activation="tanh", init="orthogonal")
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(7))
    x, y = toy_splits.train_x[perm], toy_splits.train_y[perm]
    loss = torch.nn.functional.cross_entropy(m(x), y)
    grads = torch.autograd.grad(loss, list(m.parameters()))
    with torch.no_grad():
        for p, g in zip(m.parameters(), grads):
            p -= 0.05 * g
        vl = torch.nn.functional.cross_entropy(m(toy_splits.val_x), toy_splits.val_y).item()
    got = [v for (_, _, k, v) in res.curves if k == "val_loss"][0]
    assert got == pytest.approx(vl, rel=1e-5)
    first = [v for (_, _, k, v) in res.curves if k == "train_loss"][0]
    assert first == pytest.approx(loss.item(), rel=1e-5)


def test_failed_run_is_recorded_then_raised(tmp_path):
    bad = make_splits()
    bad.meta["input_dim"] = 999  # wrong input size: a bug, not a divergence
    with pytest.raises(RuntimeError):
        engine.train(_cfg(), data=bad, run_dir=tmp_path / "f", progress=False)
    doc = json.loads((tmp_path / "f" / "metrics.json").read_text())
    assert doc["status"] == "failed" and "RuntimeError" in doc["error"]


def test_sinks_receive_batches_and_status(toy_splits):
    class Rec:
        def __init__(self):
            self.batches, self.started, self.status = [], None, None

        def start(self, params, tags):
            self.started = (params, tags)

        def log_metrics(self, batch):
            self.batches.append(list(batch))

        def log_artifact(self, path):
            pass

        def finish(self, status, summary):
            self.status, self.summary = status, summary

    sink = Rec()
    res = engine.train(_cfg(log_every=4), data=toy_splits, sinks=[sink], progress=False)
    assert sink.status == "completed" and sink.started[1]["seed"] == "0"
    n_points = sum(len(b) for b in sink.batches)
    assert n_points == sum(1 for c in res.curves if math.isfinite(c[3]))
    assert all(len(b) > 1 for b in sink.batches)  # batched, not one call per metric
    assert sink.summary["test_acc"] == res.final["test_acc"]


def test_failure_kinds_are_named():
    from optlab.engine import RunResult, classify_failure

    class D:
        meta = {"n_classes": 10}

    def rows(g_first: float) -> list[tuple]:  # long layer rows: (step, epoch, layer, role, metric, value)
        return [(5, 0, 0, "input", "grad_norm", g_first), (5, 0, 1, "output", "grad_norm", 1.0),
                (5, 0, 0, "input", "sigma_max", 1e-12), (5, 0, 1, "output", "sigma_max", 1.0)]

    ok = RunResult("r", "completed", {}, {"test_acc": 0.9}, layers=rows(1e-3))
    assert classify_failure(ok, D()) is None
    van = RunResult("r", "completed", {}, {"test_acc": 0.9}, layers=rows(1e-12))
    assert classify_failure(van, D()) == "vanishing"
    # the threshold is 1e-8 of the last layer's norm: a factor of 2 either side decides
    assert classify_failure(RunResult("r", "completed", {}, {"test_acc": 0.9}, layers=rows(0.5e-8)), D()) == "vanishing"
    assert classify_failure(RunResult("r", "completed", {}, {"test_acc": 0.9}, layers=rows(2e-8)), D()) is None
    ch = RunResult("r", "completed", {}, {"test_acc": 0.11})
    assert classify_failure(ch, D()) == "chance"
    div = RunResult("r", "diverged", {}, {}, diverge_reason="nonfinite")
    assert classify_failure(div, D()) == "nonfinite"


def _first_to_last_grad_ratio(res: engine.RunResult) -> float:
    grads = [r for r in res.layers if r[4] == "grad_norm"]
    last = max(r[0] for r in grads)
    rows = sorted((r for r in grads if r[0] == last), key=lambda r: r[2])
    return rows[0][5] / rows[-1][5]


def test_vanishing_is_recorded_by_train(toy_splits, monkeypatch):
    """A deep tanh net whose hidden weights start at 8x the Kaiming scale saturates: the first
    layer's gradient is far below 1e-8 of the last layer's, and the run is classified `vanishing`;
    the same net at the Kaiming scale is not (a threshold of 0, or of 1, fails one of the two)."""
    from optlab.models import mlp

    cfg = _cfg(optimizer="sgd", lr=1e-4, depth=40, width=8, init="kaiming", activation="tanh", epochs=1)
    healthy = engine.train(cfg, data=toy_splits, progress=False)
    assert _first_to_last_grad_ratio(healthy) > 1e-3 and healthy.failure != "vanishing"
    real = mlp.kaiming_
    monkeypatch.setattr(mlp, "kaiming_", lambda w, gain, generator=None: real(w, gain * 8.0, generator))
    res = engine.train(cfg, data=toy_splits, progress=False)
    assert _first_to_last_grad_ratio(res) < 1e-9
    assert res.failure == "vanishing"
