"""Per-matrix LR scaling of Muon and the modular optimizer (issue #12 item 6g): each mode against
its definition, on a stack of hidden matrices (one multiplier per matrix) and on 2-D parameters."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import one_thread_fixture
from optlab import models, optim
from optlab.config import ConfigError, make_run
from optlab.optim.muon import Muon

one_thread = pytest.fixture(autouse=True)(one_thread_fixture)


def _mlp(depth: int = 4, width: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.build("mlp", input_dim=12, n_classes=5, depth=depth, width=width)


def _step(model: nn.Module, opt: torch.optim.Optimizer, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 12, generator=g), torch.randint(0, 5, (32,), generator=g)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _pair(scaling: str, lr: float = 0.02, depth: int = 4):
    """(global model, scaled model, their optimizers, the hidden stack before the step, its grad)."""
    a = _mlp(depth)
    b = copy.deepcopy(a)
    oa = optim.build("muon", a, lr=lr, adamw_lr=0.01)
    ob = optim.build("muon", b, lr=lr, adamw_lr=0.01, lr_scaling=scaling)
    return a, b, oa, ob


def _deltas(model: nn.Module, w0: torch.Tensor) -> torch.Tensor:
    return (model.hidden.weight.detach() - w0).reshape(w0.shape[0], -1)


def test_global_is_the_default_and_bitwise_unchanged():
    a, b, oa, ob = _pair("global")
    for t in range(3):
        _step(a, oa, t)
        _step(b, ob, t)
    assert torch.equal(a.hidden.weight, b.hidden.weight) and torch.equal(a.head.weight, b.head.weight)
    assert oa.defaults["lr_scaling"] == "global"


def test_depth_divides_every_muon_matrix_lr_by_their_count():
    a = _mlp(4)
    b = copy.deepcopy(a)
    ob = optim.build("muon", b, lr=0.02, adamw_lr=0.01, lr_scaling="depth")
    n = a.hidden.weight.shape[0]  # the hidden stack's matrices are the only Muon matrices of "muon"
    assert ob.muon_matrices == n and n >= 2
    oa = optim.build("muon", a, lr=0.02 / n, adamw_lr=0.01)
    for t in range(3):
        _step(a, oa, t)
        _step(b, ob, t)
    assert torch.allclose(a.hidden.weight, b.hidden.weight, atol=1e-7, rtol=0)
    assert torch.equal(a.head.weight, b.head.weight)  # AdamW groups untouched


def test_grad_norm_scales_each_matrix_by_its_gradient_norm_over_the_mean():
    a, b, oa, ob = _pair("grad_norm")
    w0 = a.hidden.weight.detach().clone()
    _step(a, oa)
    _step(b, ob)
    g = b.hidden.weight.grad.reshape(w0.shape[0], -1).norm(dim=1)
    m = g / g.mean()
    assert not torch.allclose(m, torch.ones_like(m), atol=1e-2)  # the test can tell the modes apart
    da, db = _deltas(a, w0), _deltas(b, w0)
    assert torch.allclose(db, m[:, None] * da, atol=1e-7, rtol=1e-5)


def test_adaptive_moves_each_matrix_by_lr_times_its_norm():
    lr = 0.01
    a, b, oa, ob = _pair("adaptive", lr=lr)
    w0 = a.hidden.weight.detach().clone()
    _step(a, oa)
    _step(b, ob)
    da, db = _deltas(a, w0), _deltas(b, w0)
    wn = w0.reshape(w0.shape[0], -1).norm(dim=1)
    assert torch.allclose(db.norm(dim=1), lr * wn, rtol=1e-3)  # ||dW_l|| = lr ||W_l||
    cos = F.cosine_similarity(da, db, dim=1)
    assert torch.all(cos > 1 - 1e-5)  # the same direction as the global step
    assert not torch.allclose(da.norm(dim=1), db.norm(dim=1), rtol=1e-2)


def test_weight_decay_takes_the_scaled_lr():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(2, 6, 4))
    v = nn.Parameter(w.detach().clone())
    w.grad = torch.randn_like(w)
    v.grad = w.grad.clone()
    m = (w.grad.reshape(2, -1).norm(dim=1) / w.grad.reshape(2, -1).norm(dim=1).mean())
    Muon([w], lr=0.1, weight_decay=0.5, lr_scaling="grad_norm").step()
    # the same step matrix by matrix at lr 0.1 * m_l, global
    for j in range(2):
        u = nn.Parameter(v.detach()[j].clone())
        u.grad = v.grad[j].clone()
        Muon([u], lr=float(0.1 * m[j]), weight_decay=0.5).step()
        assert torch.allclose(w.detach()[j], u.detach(), atol=1e-6)


def test_2d_parameters_get_one_multiplier_each():
    torch.manual_seed(1)
    ps = [nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8, 8))]
    ref = [nn.Parameter(p.detach().clone()) for p in ps]
    for p, q, s in zip(ps, ref, (1.0, 3.0)):
        p.grad = s * torch.randn(8, 8)
        q.grad = p.grad.clone()
    Muon(ps, lr=0.05, weight_decay=0.0, lr_scaling="grad_norm").step()
    n = torch.stack([q.grad.norm() for q in ref])
    for q, mult in zip(ref, n / n.mean()):
        Muon([q], lr=float(0.05 * mult), weight_decay=0.0).step()
    for p, q in zip(ps, ref):
        assert torch.allclose(p, q, atol=1e-6)


def test_lr_scaling_is_validated_in_one_line():
    with pytest.raises(ConfigError) as e:
        make_run({"optimizer": "muon", "optimizer_options": {"lr_scaling": "layerwise"}, "lr": 0.02})
    msg = str(e.value)
    assert "\n" not in msg and "lr_scaling" in msg and "allowed" in msg and "adaptive" in msg
    with pytest.raises(ValueError, match="lr_scaling"):
        Muon([nn.Parameter(torch.randn(3, 3))], lr_scaling="depth")  # depth lives in the modular optimizer


def test_the_rho_controller_refuses_modes_it_cannot_predict():
    model = _mlp()
    opt = optim.build("muon", model, lr=0.02, lr_scaling="adaptive")
    with pytest.raises(ValueError, match="rho controller"):
        opt.proposed_step()
