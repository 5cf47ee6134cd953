"""Muon and Newton-Schulz (optlab.optim.muon): against torch.optim.Muon, against closed forms."""

from __future__ import annotations

import io
import math

import pytest
import torch

from conftest import one_thread_fixture
from optlab.optim.muon import (CUBIC, POLAR_EXPRESS, QUINTIC, Muon, minimax_quintic, newton_schulz,
                               newton_schulz_iterates, polar_express_coefficients, shape_ratio)

one_thread = pytest.fixture(autouse=True)(one_thread_fixture)


def _ortho_err(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    g = x.mT @ x if x.shape[-2] >= x.shape[-1] else x @ x.mT
    return (g - torch.eye(g.shape[-1], dtype=g.dtype)).norm(dim=(-2, -1))


def _orthogonal(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(*shape, generator=g, dtype=torch.float64))
    return q


def _scalar_iterate(s: float, coefs: list[tuple[float, float, float]]) -> float:
    for a, b, c in coefs:
        s = a * s + b * s**3 + c * s**5
    return s


def _run_pair(ours_params, theirs_params, ours: Muon, theirs: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p, q in zip(ours_params, theirs_params):
            grad = torch.randn(q.shape, generator=g)
            p.grad = grad.reshape(p.shape).clone()
            q.grad = grad.clone()
        ours.step()
        theirs.step()


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust", [None, "match_rms_adamw", "spectral_unclamped"])
def test_agrees_with_torch_muon_on_2d(nesterov, adjust):
    shapes = [(48, 16), (16, 48), (32, 32), (48, 16)]
    g = torch.Generator().manual_seed(1)
    init = [torch.randn(s, generator=g) for s in shapes]
    ours_p = [torch.nn.Parameter(t.clone()) for t in init]
    ref_p = [torch.nn.Parameter(t.clone()) for t in init]
    lr = 0.02
    ours = Muon(ours_p, lr=lr, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust)
    ref = torch.optim.Muon(ref_p, lr=lr, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust)
    _run_pair(ours_p, ref_p, ours, ref, steps=6)
    moved = max((p - t).abs().max().item() for p, t in zip(ref_p, init))
    assert moved > 10 * lr * 0.1  # the steps did something
    for p, q in zip(ours_p, ref_p):
        # bf16 NS: one bf16 ulp of an O(1) entry, times the (adjusted) lr; measured: bitwise equal here
        assert torch.allclose(p, q, rtol=0, atol=lr * 4 * 2**-8), (p - q).abs().max()
        assert torch.allclose(ours.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"], rtol=0, atol=1e-7)


def test_float32_ns_matches_a_float64_reference_of_torchs_algorithm():
    """torch.optim.Muon always runs NS in bf16; our float32 option is checked against the same
    algorithm written out here in float64 (momentum by lerp, Nesterov, decay, shape scaling)."""
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(40, 24, generator=g)
    p = torch.nn.Parameter(w0.clone())
    opt = Muon([p], lr=0.05, weight_decay=0.05, ns_dtype=torch.float32)
    w, buf = w0.double(), torch.zeros(40, 24, dtype=torch.float64)
    for _ in range(4):
        grad = torch.randn(40, 24, generator=g)
        p.grad = grad.clone()
        opt.step()
        gd = grad.double()
        buf = 0.95 * buf + 0.05 * gd
        u = 0.05 * gd + 0.95 * buf
        x = u.T / u.norm()
        for a, b, c in [QUINTIC] * 5:
            A = x @ x.T
            x = a * x + (b * A + c * A @ A) @ x
        w = w * (1 - 0.05 * 0.05) - 0.05 * math.sqrt(40 / 24) * x.T
    assert torch.allclose(p.double(), w, rtol=0, atol=2e-5), (p.double() - w).abs().max()


def test_batched_stack_equals_torch_per_matrix_loop():
    """A (d, m, n) stack is d matrices, orthogonalized separately: the same as torch.optim.Muon on
    d separate 2-D parameters (torch loops over them)."""
    d, m, n = 5, 24, 40
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(d, m, n, generator=g)
    stack = torch.nn.Parameter(w0.clone())
    mats = [torch.nn.Parameter(w0[i].clone()) for i in range(d)]
    ours = Muon([stack], lr=0.03, weight_decay=0.01)
    ref = torch.optim.Muon(mats, lr=0.03, weight_decay=0.01)
    for _ in range(4):
        grad = torch.randn(d, m, n, generator=g)
        stack.grad = grad.clone()
        for i, q in enumerate(mats):
            q.grad = grad[i].clone()
        ours.step()
        ref.step()
    assert torch.allclose(stack, torch.stack(list(mats)), rtol=0, atol=0.03 * 4 * 2**-8)


def test_ns_batched_equals_loop_float32():
    x = torch.randn(6, 50, 20, generator=torch.Generator().manual_seed(4))
    batched = newton_schulz(x, 5, dtype=torch.float32)
    loop = torch.stack([newton_schulz(x[i], 5, dtype=torch.float32) for i in range(6)])
    assert batched.shape == x.shape
    assert torch.allclose(batched, loop, rtol=0, atol=1e-5)


def test_conv_kernels_flattened_and_scaled_by_their_matrix_shape():
    """(out, in, kh, kw) = (64, 2, 2, 2) is one 64 x 8 matrix: scale sqrt(max(1, 64/8)) = sqrt(8),
    as torch.optim.Muon gives the same matrix as a 2-D parameter."""
    g = torch.Generator().manual_seed(5)
    w0 = torch.randn(64, 2, 2, 2, generator=g)
    k = torch.nn.Parameter(w0.clone())
    m = torch.nn.Parameter(w0.reshape(64, 8).clone())
    ours, ref = Muon([k], lr=0.01, weight_decay=0.0), torch.optim.Muon([m], lr=0.01, weight_decay=0.0)
    _run_pair([k], [m], ours, ref, steps=3)
    assert torch.allclose(k.reshape(64, 8), m, rtol=0, atol=0.01 * math.sqrt(8) * 4 * 2**-8)
    assert shape_ratio(64, 8) == pytest.approx(math.sqrt(8))
    assert shape_ratio(8, 64) == 1.0


def test_mixed_shapes_and_groups_batch_correctly():
    """Same-shape matrices from different parameters and param groups share one NS call; each
    still gets its own group's lr and decay (checked against torch, one optimizer per group)."""
    g = torch.Generator().manual_seed(11)
    inits = [torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g), torch.randn(8, 8, generator=g)]
    ours_p = [torch.nn.Parameter(t.clone()) for t in inits]
    ref_p = [torch.nn.Parameter(t.clone()) for t in inits]
    ours = Muon([{"params": ours_p[:1], "lr": 0.05, "weight_decay": 0.2}, {"params": ours_p[1:]}], lr=0.01)
    refs = [torch.optim.Muon(ref_p[:1], lr=0.05, weight_decay=0.2), torch.optim.Muon(ref_p[1:], lr=0.01)]
    for _ in range(3):
        for p, q in zip(ours_p, ref_p):
            gr = torch.randn(q.shape, generator=g)
            p.grad, q.grad = gr.clone(), gr.clone()
        ours.step()
        for r in refs:
            r.step()
    for p, q in zip(ours_p, ref_p):
        assert torch.allclose(p, q, rtol=0, atol=0.05 * 4 * 2**-8)


@pytest.mark.parametrize("chunk_bytes", [None, 1, 3 * 24 * 40 * 2, "auto"])
def test_chunking_does_not_change_the_result(chunk_bytes):
    """NS batches of at most ``chunk_bytes`` (1: one matrix per call; 3 matrices: chunks that cut
    through the stack and span parameters), a non-contiguous parameter among them: the same as
    torch.optim.Muon on the separate matrices."""
    g = torch.Generator().manual_seed(12)
    stack0, a0, b0 = torch.randn(5, 24, 40, generator=g), torch.randn(24, 40, generator=g), torch.randn(40, 24, generator=g)
    stack, a = torch.nn.Parameter(stack0.clone()), torch.nn.Parameter(a0.clone())
    b = torch.nn.Parameter(b0.clone().T)  # (24, 40), not contiguous
    assert not b.is_contiguous()
    ref_p = [torch.nn.Parameter(stack0[i].clone()) for i in range(5)] + [torch.nn.Parameter(a0.clone()),
                                                                          torch.nn.Parameter(b0.T.contiguous())]
    ours = Muon([stack, a, b], lr=0.02, weight_decay=0.1, chunk_bytes=chunk_bytes)
    ref = torch.optim.Muon(ref_p, lr=0.02, weight_decay=0.1)
    for _ in range(3):
        gs = torch.randn(7, 24, 40, generator=g)
        stack.grad, a.grad, b.grad = gs[:5].clone(), gs[5].clone(), gs[6].clone()
        for i, q in enumerate(ref_p):
            q.grad = gs[i].clone()
        ours.step()
        ref.step()
    got = torch.cat([stack.detach(), a.detach()[None], b.detach()[None]])
    assert torch.allclose(got, torch.stack([q.detach() for q in ref_p]), rtol=0, atol=0.02 * 4 * 2**-8)


def test_state_dict_round_trip():
    g = torch.Generator().manual_seed(6)
    a = [torch.nn.Parameter(torch.randn(3, 16, 16, generator=g)), torch.nn.Parameter(torch.randn(16, 8, generator=g))]
    opt = Muon(a, lr=0.02)
    grads = [[torch.randn(p.shape, generator=g) for p in a] for _ in range(6)]
    for gs in grads[:3]:
        for p, gr in zip(a, gs):
            p.grad = gr.clone()
        opt.step()
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt2 = Muon(b, lr=0.5)  # lr comes back from the state dict
    blob = io.BytesIO()
    torch.save(opt.state_dict(), blob)  # saved and loaded as the project's checkpoints are
    blob.seek(0)
    opt2.load_state_dict(torch.load(blob, weights_only=True))
    assert opt2.param_groups[0]["lr"] == 0.02
    for gs in grads[3:]:
        for p, q, gr in zip(a, b, gs):
            p.grad, q.grad = gr.clone(), gr.clone()
        opt.step()
        opt2.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_ns_of_an_orthogonal_matrix_is_a_known_multiple_of_itself():
    """Frobenius normalization puts every singular value of a semi-orthogonal Q (m x n) at
    1/sqrt(n); the iteration maps them all alike, so NS_k(Q) = s_k Q with s_k the scalar
    iterate of the polynomial from 1/sqrt(n). For the quintic s_k stays in its band, not at 1."""
    q = _orthogonal(64, 32)
    for k in (1, 2, 3, 5, 10):
        s = _scalar_iterate(1 / math.sqrt(32), [QUINTIC] * k)
        o32 = newton_schulz(q, k, dtype=torch.float32).double()
        assert torch.allclose(o32, s * q, rtol=0, atol=1e-5 * max(1.0, s)), k
        o16 = newton_schulz(q, k).double()  # bf16: the direction to 1e-3, the scale drifts a little
        assert (o16 * q).sum() / (o16.norm() * q.norm()) > 0.999, k  # measured >= 0.99983
        assert (o16 - s * q).norm() / (s * q).norm() < 5e-2, k  # measured 0.3 % (k=1) to 3.2 % (k=10)
    assert 0.68 < _scalar_iterate(1 / math.sqrt(32), [QUINTIC] * 5) < 1.2
    # Polar-Express-style, 10 steps: the orthogonal matrix itself
    assert torch.allclose(newton_schulz(q, 10, "polar_express", torch.float32).double(), q, rtol=0, atol=1e-5)
    # the classical cubic without normalization: Q is a fixed point
    assert torch.allclose(newton_schulz(q, 3, "cubic", torch.float32, normalize="none").double(), q, rtol=0, atol=1e-6)


def test_quintic_singular_values_band_and_no_convergence():
    """Measured on 128 x 64 Gaussian matrices (well conditioned): after 5 quintic steps the
    singular values lie in about [0.68, 1.14]; more steps keep them in the band and do not
    bring the orthogonality error down (the iteration oscillates, it does not converge)."""
    x = torch.randn(8, 128, 64, generator=torch.Generator().manual_seed(7))
    for dtype in (torch.float32, torch.bfloat16):
        it = newton_schulz_iterates(x, range(1, 11), dtype=dtype)
        s1 = torch.linalg.svdvals(it[1].double())
        assert s1.max() < 0.75  # one step is far from orthogonal
        for k in range(5, 11):
            s = torch.linalg.svdvals(it[k].double())
            assert s.min() > 0.65 and s.max() < 1.2, (k, s.min(), s.max())
        e5, e10 = _ortho_err(it[5]).max(), _ortho_err(it[10]).max()
        assert e5 > 1.0 and e10 > 0.7 * e5


def test_polar_express_coefficients_are_minimax_and_reduce_error():
    # equioscillation of a Remez solution, and no nearby quintic does better (a minimax check)
    for lo, hi in ((1e-3, 1.0), (0.1, 1.0), (0.44, 1.55)):
        (a, b, c), err = minimax_quintic(lo, hi)
        x = torch.linspace(lo, hi, 200001, dtype=torch.float64)
        e = 1 - (a * x + b * x**3 + c * x**5)
        assert e.abs().max().item() == pytest.approx(err, rel=1e-6)
        assert e[0].item() == pytest.approx(err, rel=1e-9) and e[-1].item() == pytest.approx(-err, rel=1e-9)
        g = torch.Generator().manual_seed(8)
        for _ in range(50):
            da, db, dc = (1e-3 * torch.randn(3, generator=g, dtype=torch.float64)).tolist()
            e2 = 1 - ((a + da) * x + (b + db) * x**3 + (c + dc) * x**5)
            assert e2.abs().max().item() >= err * (1 - 1e-9)
    # the schedule: safety factor on the minimax triple, then the Taylor quintic once converged
    (a, b, c), _ = minimax_quintic(1e-3, 1.0)
    assert POLAR_EXPRESS[0] == pytest.approx((a / 1.01, b / 1.01**3, c / 1.01**5), rel=1e-12)
    assert POLAR_EXPRESS[-1] == (15 / 8, -10 / 8, 3 / 8)
    assert polar_express_coefficients(5) == POLAR_EXPRESS[:5]
    # against the fixed quintic on random matrices (float32): better after 1, 5 and more steps;
    # worse after 2-4 (the greedy minimax composition optimizes the end result, not every
    # intermediate step: measured 15 / 9.5 / 6.4 vs 3.3 / 2.8 / 2.5 on 128 x 64)
    x = torch.randn(8, 128, 64, generator=torch.Generator().manual_seed(9))
    pe = newton_schulz_iterates(x, range(1, 11), "polar_express", torch.float32)
    qu = newton_schulz_iterates(x, range(1, 11), "quintic", torch.float32)
    for k in (1, 5, 6, 7, 8, 9, 10):
        assert _ortho_err(pe[k]).max() < _ortho_err(qu[k]).max(), k
    for k in (2, 3, 4):
        assert _ortho_err(pe[k]).max() > _ortho_err(qu[k]).max(), k
    assert _ortho_err(pe[5]).max() < 0.6 * _ortho_err(qu[5]).max()
    assert _ortho_err(pe[7]).max() < 1e-3 < 1.0 < _ortho_err(qu[7]).max()
    s = torch.linalg.svdvals(pe[10].double())
    assert s.min() > 0.9999 and s.max() < 1.0001


def test_explicit_coefficients_and_validation():
    x = torch.randn(20, 10, generator=torch.Generator().manual_seed(10))
    assert torch.equal(newton_schulz(x, 4, [QUINTIC], torch.float32), newton_schulz(x, 4, "quintic", torch.float32))
    assert torch.equal(newton_schulz(x, 2, CUBIC, torch.float32), newton_schulz(x, 2, "cubic", torch.float32))
    with pytest.raises(ValueError):
        newton_schulz(x, 0)
    with pytest.raises(ValueError):
        newton_schulz(x, 3, "septic")
    with pytest.raises(ValueError):
        Muon([torch.nn.Parameter(torch.zeros(5))])
    with pytest.raises(ValueError):
        Muon([torch.nn.Parameter(torch.zeros(2, 2))], adjust_lr_fn="bogus")
