"""The issue #12 probes (grad_rank, weight_spectrum, ns_diag, constraint) against closed forms and
torch's own SVD, batched = per matrix, and their rows in a tiny engine run."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from optlab import engine, probes
from optlab.config import RunConfig
from optlab.metrics.layers import LayerIndex
from optlab.metrics.spectra import effective_rank
from optlab.optim.manifold import orthogonality_error
from optlab.optim.muon import newton_schulz
from optlab.probes.batching import as_stack, layer_items, layer_offsets, per_layer
from optlab.probes.weight_spectrum import layer_spectra
from conftest import one_thread_fixture

one_thread = pytest.fixture(autouse=True)(one_thread_fixture)


class Rec:
    """A recorder with the engine's layer_rows / metric surface."""

    def __init__(self):
        self.layers, self.curves = [], []

    def layer_rows(self, step, epoch, metric, roles, values, layers=None):
        ids = range(len(values)) if layers is None else layers
        self.layers += [(step, epoch, int(i), r, metric, float(v)) for i, r, v in zip(ids, roles, values)]

    def metric(self, step, epoch, key, value):
        self.curves.append((step, epoch, key, value))

    def rows(self, metric):
        return {r[2]: r[5] for r in self.layers if r[4] == metric}


class Net(nn.Module):
    """Layers of several shapes: a 2-D input (8x5), a 3-D stack of three 8x8, a second 8x8, a
    conv kernel (4, 2, 3, 3) and a 2-D output (3x8)."""

    def __init__(self, weights):
        super().__init__()
        self.inp, self.stack, self.extra, self.conv, self.out = (nn.Parameter(w.clone()) for w in weights)

    def param_roles(self):
        return {"inp": "input", "stack": "hidden", "extra": "hidden", "conv": "hidden", "out": "output"}


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 5, generator=g), torch.randn(3, 8, 8, generator=g), torch.randn(8, 8, generator=g),
            torch.randn(4, 2, 3, 3, generator=g), torch.randn(3, 8, generator=g)]


def _env(model, optimizer=None):
    return probes.ProbeEnv(model=model, index=LayerIndex.of(model), method=SimpleNamespace(optimizer=optimizer),
                           task=SimpleNamespace(steps_per_epoch=10), cfg=SimpleNamespace(epochs=1, max_steps=0),
                           device=torch.device("cpu"))


def _per_matrix(model):
    """The layer matrices one by one, in layer order."""
    return [m for p in LayerIndex.of(model).params for m in as_stack(p.detach())]


# ------------------------------------------------------------------ closed forms


def test_effective_rank_closed_forms():
    n = 7
    assert float(effective_rank(torch.eye(n))) == pytest.approx(n, rel=1e-5)
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    for k in (1, 3, 6):
        proj = (q[:, :k] @ q[:, :k].T).float()  # a rank-k orthogonal projector
        assert float(effective_rank(proj)) == pytest.approx(k, rel=1e-4)
    # batched: the stack gives each matrix's own value
    stack = torch.stack([torch.eye(5), torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0]))])
    assert effective_rank(stack).tolist() == pytest.approx([5.0, 2.0], rel=1e-5)


def test_grad_rank_probe_is_per_matrix_effective_rank():
    model = Net(_weights())
    g = torch.Generator().manual_seed(3)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    model.stack.grad[1] = torch.eye(8)  # one stack member with a closed-form value
    probe = probes.build({"grad_rank": {"every": 1}}, _env(model))[0]
    probe.measure()
    rec = Rec()
    probe.emit(1, 0, rec)
    got = rec.rows("grad_erank")
    mats = [m for p in LayerIndex.of(model).params for m in as_stack(p.grad)]
    assert sorted(got) == list(range(len(mats))) == list(range(7))
    for i, m in enumerate(mats):  # against numpy's SVD, one matrix at a time
        s = np.linalg.svd(m.double().numpy(), compute_uv=False)
        p_ = s / s.sum()
        assert got[i] == pytest.approx(math.exp(-(p_ * np.log(p_)).sum()), rel=1e-4)
    assert got[2] == pytest.approx(8.0, rel=1e-5)
    s = probe.summary(1)
    assert s["grad_erank_mean"] == pytest.approx(np.mean(list(got.values())), rel=1e-6)
    assert s["grad_rank_muon_layers"] == 0 and s["ns_grad_erank_mean"] is None  # no Muon: says so
    assert not rec.rows("ns_grad_erank")


def test_weight_spectrum_matches_numpy_svd_and_batched_equals_per_matrix():
    model = Net(_weights(5))
    probe = probes.build({"weight_spectrum": {"every": 1}}, _env(model))[0]
    probe.measure()
    rec = Rec()
    probe.emit(3, 0, rec)
    for i, m in enumerate(_per_matrix(model)):
        s = np.linalg.svd(m.double().numpy(), compute_uv=False)
        e = np.cumsum(s**2) / np.sum(s**2)
        assert rec.rows("cond")[i] == pytest.approx(s[0] / s[-1], rel=1e-4)
        assert rec.rows("sv_max")[i] == pytest.approx(s[0], rel=1e-5)
        assert rec.rows("sv_min")[i] == pytest.approx(s[-1], rel=1e-4, abs=1e-5)
        for k in (1, 5, 10):
            assert rec.rows(f"top{k}_energy")[i] == pytest.approx(e[min(k, len(s)) - 1], rel=1e-5)
    # the batched pass (one svdvals per shape) equals one call per matrix
    ids, vals = layer_spectra(LayerIndex.of(model))
    for i, m in zip(ids, _per_matrix(model)):
        one = torch.linalg.svdvals(m.float())
        assert float(vals["sv_max"][i]) == pytest.approx(float(one[0]), rel=1e-6)
        assert float(vals["cond"][i]) == pytest.approx(float(one[0] / one[-1]), rel=1e-5)
    assert not rec.rows("sv@0")  # step 3 of 10: not the run end
    rec2 = Rec()
    probe.measure()
    probe.emit(10, 0, rec2)  # the configured last step: full spectra
    for i, m in enumerate(_per_matrix(model)):
        s = torch.linalg.svdvals(m.float()).tolist()
        assert [rec2.rows(f"sv@{j}")[i] for j in range(len(s))] == pytest.approx(s, rel=1e-6)


def test_per_layer_groups_shapes_and_keeps_layer_order():
    model = Net(_weights(2))
    items = layer_items(LayerIndex.of(model), grads=False)
    calls = []

    def fn(w):
        calls.append(tuple(w.shape))
        return {"fro": w.norm(dim=(-2, -1))}

    ids, vals = per_layer(items, fn)
    assert ids == list(range(7))
    assert (4, 8, 8) in calls and len(calls) == 4  # the stack and the extra 8x8 in one batch
    ref = torch.stack([m.norm() for m in _per_matrix(model)])
    torch.testing.assert_close(vals["fro"], ref)
    assert layer_offsets(LayerIndex.of(model))[id(model.conv)] == (5, 1)


# ------------------------------------------------------------------ Muon layers


class FakeMuonOpt:
    """An optimizer surface with muon_params() and a Muon param group (ns settings)."""

    def __init__(self, pairs, ns_steps=5, ns="quintic"):
        self.pairs = pairs
        self.param_groups = [{"params": [p for _, p in pairs], "ns_steps": ns_steps, "ns": ns}]

    def muon_params(self):
        return list(self.pairs)


def test_ns_of_an_orthogonal_matrix_is_itself():
    model = Net(_weights(4))
    g = torch.Generator().manual_seed(9)
    q = torch.linalg.qr(torch.randn(3, 8, 8, generator=g, dtype=torch.float64))[0].float()
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    model.stack.grad = q.clone()  # orthogonal gradients
    opt = FakeMuonOpt([("stack", model.stack), ("extra", model.extra)])
    env = _env(model, opt)
    diag = probes.build({"ns_diag": {"every": 1, "dtype": "float32", "steps": [1, 2, 3, 5, 10]}}, env)[0]
    diag.measure()
    rec = Rec()
    diag.emit(1, 0, rec)
    for k in (1, 2, 3, 5, 10):
        ang, rel = rec.rows(f"ns_angle@k={k}"), rec.rows(f"ns_rel_diff@k={k}")
        assert sorted(ang) == [1, 2, 3, 4]  # stack (1-3) and extra (4) only: the Muon layers
        # NS of an orthogonal Q, after the Frobenius normalization Q/sqrt(n), maps every singular
        # value 1/sqrt(8) through the same scalar polynomial: the result is c*Q, angle 0
        for i in (1, 2, 3):
            assert ang[i] == pytest.approx(0.0, abs=2e-3)
            o = newton_schulz(q[i - 1], k, "quintic", torch.float32)
            assert rel[i] == pytest.approx(float((q[i - 1] - o).norm() / q[i - 1].norm()), rel=1e-4, abs=1e-5)
            assert rec.rows(f"ns_orth_err@k={k}")[i] == pytest.approx(float(orthogonality_error(o)), rel=1e-4, abs=1e-5)
    # the quintic's fixed point band: after 5 steps the orthogonal matrix is itself up to ~the band
    assert rec.rows("ns_rel_diff@k=5")[1] < 0.35
    # a general gradient: angle equals the arccos of the Frobenius cosine with NS(G)
    o = newton_schulz(model.extra.grad, 3, "quintic", torch.float32)
    cos = float((model.extra.grad * o).sum() / (model.extra.grad.norm() * o.norm()))
    assert rec.rows("ns_angle@k=3")[4] == pytest.approx(math.acos(cos), rel=1e-4)
    assert diag.summary(1)["ns_diag_layers"] == 4
    # the probe's rows are the library's ns_diagnostics (bfloat16, as Muon), batched = per matrix
    from optlab.metrics.spectra import ns_diagnostics
    from optlab.probes.ns_diag import ns_rows

    g = torch.cat([model.stack.grad, model.extra.grad[None]]).float()
    rows = ns_rows(g, (1, 3, 5), "quintic", torch.bfloat16)
    for j in range(4):
        ref = ns_diagnostics(g[j], (1, 3, 5), "quintic", torch.bfloat16)
        for k in (1, 3, 5):
            assert float(rows[f"ns_angle@k={k}"][j]) == pytest.approx(float(ref[k]["angle"]), abs=1e-3)
            assert float(rows[f"ns_rel_diff@k={k}"][j]) == pytest.approx(float(ref[k]["rel_diff"]), rel=1e-3)
            assert float(rows[f"ns_orth_err@k={k}"][j]) == pytest.approx(float(ref[k]["ortho_error"]), rel=1e-3)

    rank = probes.build({"grad_rank": {"every": 1}}, env)[0]
    rank.measure()
    rec = Rec()
    rank.emit(1, 0, rec)
    ns_r = rec.rows("ns_grad_erank")
    assert sorted(ns_r) == [1, 2, 3, 4]
    for i in (1, 2, 3):  # NS(Q) = c Q: effective rank n, as Q's
        assert ns_r[i] == pytest.approx(8.0, rel=1e-2)
    ref = float(effective_rank(newton_schulz(model.extra.grad, 5, "quintic")))
    assert ns_r[4] == pytest.approx(ref, rel=1e-5)
    assert rank.summary(1)["grad_rank_muon_layers"] == 4


def test_without_muon_or_constraints_nothing_is_emitted():
    model = Net(_weights())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    env = _env(model, torch.optim.SGD(model.parameters(), lr=0.1))
    ps = probes.build({"ns_diag": {"every": 1}, "constraint": {"every": 1}}, env)
    rec = Rec()
    for p in ps:
        p.measure()
        p.emit(1, 0, rec)
    assert rec.layers == [] and rec.curves == []
    assert ps[0].summary(1)["ns_diag_layers"] == 0
    assert ps[1].summary(1) == {"orth_err_max": None, "constraint_layers": 0}
    with pytest.raises(ValueError):
        probes.build({"ns_diag": {"every": 1, "steps": [0]}}, env)


# ------------------------------------------------------------------ a tiny engine run


def test_probe_rows_in_a_tiny_full_modular_run(tmp_path, toy_splits):
    every = 3
    cfg = RunConfig(optimizer="full_modular", lr=0.02, depth=3, width=16, epochs=1, batch_size=32, log_every=4,
                    device="cpu", probes={"grad_rank": {"every": every}, "ns_diag": {"every": every},
                                          "weight_spectrum": {"every": every}, "constraint": {"every": every}})
    res = engine.train(cfg, data=toy_splits, run_dir=tmp_path / "r", progress=False)
    assert res.status == "completed"
    text = (tmp_path / "r" / "layers.csv").read_text()
    metrics = {line.split(",")[4] for line in text.splitlines()[1:]}
    need = {"grad_erank", "ns_grad_erank", "cond", "top1_energy", "top5_energy", "top10_energy", "sv_max", "sv_min",
            "orth_err", "sv@0"} | {f"ns_{r}@k={k}" for r in ("angle", "rel_diff", "orth_err") for k in (1, 2, 3, 5, 10)}
    assert need <= metrics
    layers = res.layers
    steps = res.final["steps"]
    model_roles = {r[2]: r[3] for r in layers if r[4] == "grad_erank"}
    assert model_roles == {0: "input", 1: "hidden", 2: "hidden", 3: "hidden", 4: "output"}
    # Muon updates the hidden stack under full_modular: NS rows there only; Stiefel on hidden,
    # sphere on the input: constraint rows on those layers
    assert {r[2] for r in layers if r[4] == "ns_angle@k=5"} == {1, 2, 3}
    assert {r[2] for r in layers if r[4] == "orth_err"} == {0, 1, 2, 3}
    # the exact Stiefel projection holds: tiny orthogonality error on the hidden layers
    assert max(r[5] for r in layers if r[4] == "orth_err" and r[2] in (1, 2, 3)) < 1e-4
    # the final full spectrum is the final weights' SVD
    sv = {(r[2], int(r[4][3:])): r[5] for r in layers if r[4].startswith("sv@") and r[0] == steps}
    assert sv[(1, 0)] == pytest.approx(1.0, abs=1e-4)  # a Stiefel matrix: all singular values 1
    f = res.final
    assert f["grad_rank_muon_layers"] == 3 and f["ns_diag_layers"] == 3 and f["constraint_layers"] == 4
    assert math.isfinite(f["grad_erank_mean"]) and 1.0 <= f["grad_erank_mean"] <= 16.0
    assert f["orth_err_max"] is not None and math.isfinite(f["orth_err_max"])
    curves = {k for (_, _, k, _) in res.curves}
    assert {"grad_erank_mean", "ns_grad_erank_mean", "orth_err_max"} <= curves
