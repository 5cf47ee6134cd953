"""Credit assignment (issue #13): exact costates, the local surrogate, the methods' credits and the
costate probe's metrics, each against an exact reference (autograd, the adjoint recursion, the
Riccati solution, the definitions recomputed independently)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_splits, one_thread_fixture
from optlab import methods as methods_
from optlab.config import RunConfig
from optlab.credit.core import credit_update, exact_costates, normalize, per_layer_cosine, backprop_grads
from optlab.credit.lq import adjoint_costates, control_cost, riccati
from optlab.data import Splits
from optlab.data.lq import make_lq
from optlab.models import build
from optlab.probes.costate import costate_scores, perturb_and_nudge, spearman
from optlab.tasks import build as build_task

one_thread = pytest.fixture(autouse=True)(one_thread_fixture)


def lq_setup(depth: int = 4, method: str = "credit_bp", **opts):
    d = make_lq(dim=6, n_train=256, n_val=32, n_test=32)
    data = Splits(**d)
    cfg = RunConfig(arch="lq", dataset="lq", optimizer="sgd", lr=0.01, step_method=method, method_options=opts,
                    depth=depth, epochs=2, batch_size=32, device="cpu", probes={})
    task = build_task(cfg, data, torch.device("cpu"))
    torch.manual_seed(0)
    model = build("lq", input_dim=6, depth=depth)
    with torch.no_grad():  # away from orthogonal: a generic linear system
        model.weight.add_(0.3 * torch.randn_like(model.weight))
    return cfg, task, model


def mlp_setup(method: str = "credit_bp", depth: int = 3, **opts):
    data = make_splits(n_train=128, dim=10, n_classes=4)
    cfg = RunConfig(arch="mlp", dataset="digits", optimizer="sgd", lr=0.01, step_method=method, method_options=opts,
                    depth=depth, width=12, epochs=2, batch_size=32, device="cpu", probes={})
    task = build_task(cfg, data, torch.device("cpu"))
    torch.manual_seed(0)
    model = build("mlp", input_dim=10, n_classes=4, depth=depth, width=12)
    return cfg, task, model


def test_mlp_layer_states_match_forward_and_layer_forward():
    _, task, model = mlp_setup()
    x, _ = task.probe_batch()
    states = model.layer_states(x)
    assert len(states) == model.credit_layers() + 1
    torch.testing.assert_close(states[-1], model(x))
    outs = model.layer_forward(states[:-1])
    for k, o in enumerate(outs, start=1):
        torch.testing.assert_close(o, states[k])
        torch.testing.assert_close(model.forward_from(k - 1, states[k - 1]), states[-1])


def test_lq_costates_equal_autograd_and_adjoint_recursion():
    _, task, model = lq_setup(depth=5)
    x, y = task.probe_batch()
    states, loss, lams = exact_costates(model, task, x, y)
    # autograd of the whole loss w.r.t. each state, one state at a time (forward_from)
    for k in range(1, 6):
        h = states[k].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(task.loss(model.forward_from(k, h), y), h)
        torch.testing.assert_close(lams[k - 1], g)
    g_L = (states[-1] - y) * task.q / x.shape[0]
    adj = adjoint_costates([w.detach() for w in model.jacobians()], [None] * 4 + [g_L])
    for a, b in zip(adj, lams):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_control_form_costates_equal_riccati():
    torch.manual_seed(1)
    n, m, N = 4, 2, 6
    A = torch.randn(n, n, dtype=torch.float64) * 0.6
    B = torch.randn(n, m, dtype=torch.float64)
    Q, R, Qf = torch.eye(n, dtype=torch.float64), 0.5 * torch.eye(m, dtype=torch.float64), 2 * torch.eye(n, dtype=torch.float64)
    K, P = riccati(A, B, Q, R, Qf, N)
    x0 = torch.randn(5, n, dtype=torch.float64)
    cost, xs = control_cost(x0, A, B, Q, R, Qf, K)
    # the optimal cost is x0^T P_0 x0 / 2 (Riccati's closed form)
    torch.testing.assert_close(cost, 0.5 * ((x0 @ P[0]) * x0).sum())
    # costates of the cost-to-go along the closed loop: P_k x_k (autograd through the rollout from x_k)
    for k in range(1, N + 1):
        xk = xs[k].detach().clone().requires_grad_(True)
        c, _ = control_cost(xk, A, B, Q, R, Qf, K[k:])
        (g,) = torch.autograd.grad(c, xk)
        torch.testing.assert_close(g, xk.detach() @ P[k], rtol=1e-9, atol=1e-10)
    # and the adjoint recursion with stage costs gives the same
    J = [A + B @ Kk for Kk in K]
    stage = [(xs[k] @ (Q + K[k].T @ R @ K[k])) for k in range(1, N)] + [xs[N] @ Qf]
    adj = adjoint_costates(J, stage)
    for k in range(1, N + 1):
        torch.testing.assert_close(adj[k - 1], xs[k] @ P[k], rtol=1e-9, atol=1e-10)
    # optimality: perturbing a gain raises the cost
    K2 = [k.clone() for k in K]
    K2[0] = K2[0] + 0.05
    assert control_cost(x0, A, B, Q, R, Qf, K2)[0] > cost


@pytest.mark.parametrize("setup", [lq_setup, mlp_setup])
def test_bp_cosine_is_one_and_random_credit_is_near_zero(setup):
    cfg, task, model = setup()
    method = methods_.build(cfg, model, task, torch.device("cpu"))
    x, y = task.probe_batch()
    _, _, lam_hat = method.estimate(x, y)
    _, _, lam = exact_costates(model, task, x, y)
    for a, b in zip(lam_hat, lam):
        cos, rel, ratio = costate_scores(a, b).tolist()
        assert abs(cos - 1) < 1e-6 and rel < 1e-5 and abs(ratio - 1) < 1e-5
    g = torch.Generator().manual_seed(0)
    cosines = [costate_scores(torch.randn(b.shape, generator=g), b)[0].item() for b in lam]
    bound = 4 / math.sqrt(lam[0].numel())
    assert all(abs(c) < bound for c in cosines), cosines
    # BP's update is each layer's backprop gradient times a positive number
    ucos = per_layer_cosine(model, credit_update(model, [*(s for s in model.layer_states(x))], lam_hat),
                            backprop_grads(model, task, x, y))
    torch.testing.assert_close(ucos, torch.ones_like(ucos), rtol=0, atol=1e-5)


def test_surrogate_gradient_is_normalized_local_update():
    """The update of layer k is J_theta_k^T a_k / B, computed by hand for the lq layers."""
    cfg, task, model = lq_setup(depth=3, method="dfa")
    method = methods_.build(cfg, model, task, torch.device("cpu"))
    x, y = task.probe_batch()
    states, _, lam_hat = method.estimate(x, y)
    g = credit_update(model, states, lam_hat)[model.weight]
    for k in range(3):
        a = normalize(lam_hat[k])
        torch.testing.assert_close(g[k], a.T @ states[k] / x.shape[0])


def test_dfa_uses_its_feedback_matrices_and_never_backprops_through_hidden_layers():
    cfg, task, model = mlp_setup(method="dfa")
    dfa = methods_.build(cfg, model, task, torch.device("cpu"))
    x, y = task.probe_batch()
    states, _, lam_hat = dfa.estimate(x, y)
    out = states[-1].clone().requires_grad_(True)
    (e,) = torch.autograd.grad(task.loss(out, y), out)
    for k, lam in enumerate(lam_hat[:-1]):
        torch.testing.assert_close(lam, e @ dfa.feedback.B[k])
    torch.testing.assert_close(lam_hat[-1], e)
    bp = backprop_grads(model, task, x, y)
    upd = credit_update(model, states, lam_hat)
    ucos = per_layer_cosine(model, upd, bp)
    assert (ucos[:-2] < 0.99).all(), "the hidden layers' DFA update differs from backprop's"
    torch.testing.assert_close(ucos[-1], torch.tensor(1.0), atol=1e-5, rtol=0)  # the head sees the true error
    # changing B changes the update
    with torch.no_grad():
        dfa.feedback.B.mul_(-1.0)
    _, _, lam2 = dfa.estimate(x, y)
    upd2 = credit_update(model, states, lam2)
    assert not torch.allclose(upd2[model.hidden.weight], upd[model.hidden.weight])
    torch.testing.assert_close(upd2[model.hidden.weight], -upd[model.hidden.weight])
    # the DFA step never runs a backward through the hidden layers: the model's parameters only
    # ever get gradients from the local surrogate (a hook on the state graph would fire otherwise)
    fired = []
    orig = model.layer_states

    def watched(xx):
        st = orig(xx)
        for s in st[1:-1]:
            if s.requires_grad:
                s.register_hook(lambda g: fired.append(1))
        return st

    model.layer_states = watched
    ctx = methods_.StepContext(forward=model, amp=torch.autocast("cpu", enabled=False), after_backward=lambda: None, step=0, epoch=0)
    dfa.step(x, y, ctx)
    assert not fired


def test_state_bridge_credit_is_the_loss_gradient_through_the_bridge():
    cfg, task, model = mlp_setup(method="state_bridge", hidden=8)
    m = methods_.build(cfg, model, task, torch.device("cpu"))
    x, y = task.probe_batch()
    states, _, lam_hat = m.estimate(x, y)
    n = model.credit_layers() - 1
    for k in range(n):
        def f(h, k=k):
            hs = torch.stack([states[j + 1] if j != k else h for j in range(n)])
            return task.loss(m.bridge(hs)[k], y)
        h = states[k + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(h), h)
        torch.testing.assert_close(lam_hat[k], g)


@pytest.mark.parametrize("tgm", [1.0, 0.0])
def test_credit_bridge_credit_is_the_value_gradient_and_its_losses_are_the_definition(tgm):
    cfg, task, model = mlp_setup(method="credit_bridge", hidden=8, warmup_frac=0.0, term_grad_weight=tgm,
                                  consistency_noise=0.0)
    m = methods_.build(cfg, model, task, torch.device("cpu"))
    x, y = task.probe_batch()
    states, _, lam_hat = m.estimate(x, y)
    n, b = model.credit_layers() - 1, x.shape[0]
    H = torch.stack(states[1:-1])
    for k in range(n):
        h = states[k + 1].clone().requires_grad_(True)
        hs = torch.stack([h if j == k else H[j] for j in range(n)])
        (g,) = torch.autograd.grad(m.bridge.values(hs, y)[k].sum(), h)
        torch.testing.assert_close(lam_hat[k], g / b)
    # the bridge's training loss, recomputed from the definition (per-example losses by a loop)
    out = states[-1].clone().requires_grad_(True)
    ell = torch.stack([task.loss(out[i : i + 1], y[i : i + 1]) for i in range(b)])
    (gl,) = torch.autograd.grad(ell.sum(), out)
    o = states[-1].clone().requires_grad_(True)
    vL = m.bridge.terminal_value(o, y)
    (gv,) = torch.autograd.grad(vL.sum(), o)
    v = m.bridge.values(H, y)
    want = (vL - ell.detach()).square().mean() + (v - torch.cat([v[1:], vL[None]]).detach()).square().mean()
    want = want + tgm * (gv - gl).square().sum(-1).mean()
    e = gl / b
    got = m.train_modules(states, y, e, torch.zeros(()), 0)["bridge_loss"]
    torch.testing.assert_close(got, want.detach())


def test_credit_bridge_blend_schedule():
    cfg, task, model = lq_setup(method="credit_bridge", warmup_frac=0.25)
    m = methods_.build(cfg, model, task, torch.device("cpu"))
    T = m.total_steps
    assert m.blend(0) == 0.0 and m.blend(int(0.25 * T)) == 0.0 and m.blend(int(0.5 * T)) == 1.0
    assert 0 < m.blend(int(0.375 * T)) < 1
    x, y = task.probe_batch()
    _, _, early = m.estimate(x, y, step=0)
    dfa_credit = m.feedback(early[-1])
    torch.testing.assert_close(torch.stack(early[:-1]), dfa_credit)


def test_spearman_matches_a_direct_rank_formula():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20, generator=g), torch.randn(20, generator=g)
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    n = 20
    ref = 1 - 6 * ((ra - rb) ** 2).sum() / (n * (n * n - 1))
    torch.testing.assert_close(spearman(a, b), ref)
    torch.testing.assert_close(spearman(a, 3 * a + 1), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("setup", [lq_setup, mlp_setup])
def test_exact_costates_have_perturbation_rho_one_and_negative_nudge(setup):
    _, task, model = setup()
    x, y = task.probe_batch()
    states, loss, lam = exact_costates(model, task, x, y)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k in range(1, len(states) - 1):
            norm = torch.linalg.vector_norm(lam[k - 1])
            rho, nudge = perturb_and_nudge(model, task, k, states[k], lam[k - 1], y, loss, 16, 1e-3, 0.25, g, norm).tolist()
            assert rho > 0.97, (k, rho)
            assert nudge < 0, (k, nudge)
            # a small step: the first-order change, -nudge_step for the exact costate
            _, small = perturb_and_nudge(model, task, k, states[k], lam[k - 1], y, loss, 4, 1e-3, 1e-3, g, norm).tolist()
            assert small == pytest.approx(-1e-3, rel=0.05)
            # a credit pointing the other way nudges uphill
            _, up = perturb_and_nudge(model, task, k, states[k], -lam[k - 1], y, loss, 16, 1e-3, 0.25, g, norm).tolist()
            assert up > 0
