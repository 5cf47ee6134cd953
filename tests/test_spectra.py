"""Spectral metrics (optlab.metrics.spectra) against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import one_thread_fixture
from optlab.metrics.spectra import (condition_number, effective_rank, energy_concentration, ns_diagnostics,
                                    singular_values, spectrum_metrics)
from optlab.optim.muon import QUINTIC, newton_schulz

one_thread = pytest.fixture(autouse=True)(one_thread_fixture)


def _orthogonal(n: int, m: int | None = None, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(m or n, n, generator=torch.Generator().manual_seed(seed)))
    return q


def _projector(n: int, k: int, seed: int = 0) -> torch.Tensor:
    q = _orthogonal(n, seed=seed)[:, :k]
    return q @ q.T


def test_effective_rank_closed_forms_batched():
    n = 32
    stack = torch.stack([torch.eye(n), _projector(n, 5), _projector(n, 1, seed=1), 7.0 * _orthogonal(n, seed=2),
                         torch.zeros(n, n)])
    r = effective_rank(stack)
    assert r.shape == (5,)
    assert torch.allclose(r, torch.tensor([n, 5.0, 1.0, n, 0.0]), atol=1e-3), r
    # a known spectrum: sigma = (3, 1) -> p = (3/4, 1/4) -> exp(H)
    p = torch.tensor([0.75, 0.25])
    expected = math.exp(-(p * p.log()).sum().item())
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0]))).item() == pytest.approx(expected, rel=1e-6)
    assert effective_rank(sigma=torch.tensor([3.0, 1.0])).item() == pytest.approx(expected, rel=1e-6)


def test_condition_number_energy_and_spectra():
    d = torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]))
    q1, q2 = _orthogonal(5, seed=3), _orthogonal(5, seed=4)
    w = q1 @ d @ q2.T  # same spectrum, rotated
    assert torch.allclose(singular_values(w), torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]), atol=1e-5)
    assert condition_number(w).item() == pytest.approx(5.0, rel=1e-5)
    assert condition_number(torch.diag(torch.tensor([2.0, 1.0, 0.0]))).item() == math.inf
    assert condition_number(_projector(6, 2)).item() > 1e6  # rank 2 in float32: sigma_min is rounding
    e = energy_concentration(w, ks=(1, 2, 10))
    assert e[1].item() == pytest.approx(25 / 55, rel=1e-5)
    assert e[2].item() == pytest.approx(41 / 55, rel=1e-5)
    assert e[10].item() == pytest.approx(1.0, rel=1e-6)  # k above the rank
    m = spectrum_metrics(torch.stack([w, 2 * w]))
    assert m["sigma"].shape == (2, 5) and m["sigma_max"].tolist() == pytest.approx([5.0, 10.0], rel=1e-5)
    assert m["energy_top1"].tolist() == pytest.approx([25 / 55] * 2, rel=1e-5)
    assert m["energy_top5"].tolist() == pytest.approx([1.0, 1.0], rel=1e-5)
    assert m["condition_number"].tolist() == pytest.approx([5.0, 5.0], rel=1e-5)
    # a conv kernel is its out x (in*kh*kw) matrix
    k = torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(singular_values(k), torch.linalg.svdvals(k.reshape(8, 27)))


def test_ns_diagnostics_on_an_orthogonal_matrix():
    """NS_k(Q) = s_k Q (s_k: the scalar iterate from 1/sqrt(n)), so the angle is 0, ||Q - NS(Q)||/||Q||
    = |1 - s_k| and ||NS^T NS - I||_F = |s_k^2 - 1| sqrt(n); with the Polar-Express-style
    coefficients NS_10(Q) is Q itself."""
    n = 32
    q = _orthogonal(n, 64)
    diag = ns_diagnostics(q, dtype=torch.float32)
    assert sorted(diag) == [1, 2, 3, 5, 10]
    for k, d in diag.items():
        s = 1 / math.sqrt(n)
        for a, b, c in [QUINTIC] * k:
            s = a * s + b * s**3 + c * s**5
        assert d["angle"].item() < 1e-3, k
        assert d["rel_diff"].item() == pytest.approx(abs(1 - s), abs=1e-5), k
        assert d["ortho_error"].item() == pytest.approx(abs(s * s - 1) * math.sqrt(n), rel=1e-4, abs=1e-4), k
        assert d["effective_rank"].item() == pytest.approx(n, rel=1e-4)
    pe = ns_diagnostics(q, steps=(10,), ns="polar_express", dtype=torch.float32)[10]
    assert pe["rel_diff"].item() < 1e-5 and pe["ortho_error"].item() < 1e-4
    bf = ns_diagnostics(q, steps=(10,), ns="polar_express")[10]  # bf16, as Muon computes it
    assert bf["rel_diff"].item() < 2e-2 and bf["angle"].item() < 2e-2


def test_ns_diagnostics_batched_on_gradients():
    g = torch.randn(4, 48, 24, generator=torch.Generator().manual_seed(6))
    diag = ns_diagnostics(g, dtype=torch.float32)
    one = ns_diagnostics(g[2], dtype=torch.float32)
    for k in (1, 2, 3, 5, 10):
        d = diag[k]
        assert d["angle"].shape == (4,) and d["ortho_error"].shape == (4,)
        for key in ("angle", "rel_diff", "ortho_error"):
            assert d[key][2].item() == pytest.approx(one[k][key].item(), rel=1e-4, abs=1e-6)
        # an independent computation of the angle
        o = newton_schulz(g, k, dtype=torch.float32)
        cos = (g * o).sum((-2, -1)) / (g.norm(dim=(-2, -1)) * o.norm(dim=(-2, -1)))
        assert torch.allclose(d["angle"], torch.arccos(cos), atol=1e-4)
        assert (d["angle"] > 0.02).all()  # a Gaussian matrix is not orthogonal: NS turns it (measured 0.04-0.3 rad)
    assert (diag[5]["ortho_error"] < diag[1]["ortho_error"]).all()
