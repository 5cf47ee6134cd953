"""sgd_sn's certified-bound projection (sn.sigma: bound), checked against float64 SVD.

W / max(1, b + ||D||_F) with b the bound after the previous projection and D the step's update:
strict by the triangle inequality, exact sigma every ``refresh`` projections. These tests check
that the bound really is an upper bound at every step (for plain SGD, with weight decay, and for
the generic path that copies the weights), that a bound without the update term fails the same
check, that refresh 1 is the exact-sigma scale projection, and that a checkpoint resumes it.
"""

import pytest
import torch

from conftest import every, one_thread_fixture
from optlab import models, optim
from optlab.optim.projected import Projected
from optlab.optim.spectral import BOUND_MARGIN, SpectralProjection

one_thread = pytest.fixture(autouse=True)(one_thread_fixture)


def _svd_max(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(w.double().reshape(-1, *w.shape[-2:]))[..., 0]


def _model(depth=6, width=24, seed=0):
    torch.manual_seed(seed)
    return models.build("mlp", input_dim=10, n_classes=4, depth=depth, width=width, activation="tanh", init="kaiming")


def _group_sigmas(proj: SpectralProjection) -> list[torch.Tensor]:
    return [_svd_max(SpectralProjection._batch(g)[0]) for g in proj.groups]


def _steps(model, opt, n, seed=1, after=None):
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        x = torch.randn(32, 10, generator=g)
        y = torch.randint(0, 4, (32,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if after is not None:
            after(i)


def _check_certified(proj: SpectralProjection, tol: float = 1e-5) -> float:
    """Every matrix at sigma <= 1 + tol, and the stored bound above its true sigma. Returns the max sigma."""
    top = 0.0
    for bound, true in zip(proj.bound, _group_sigmas(proj)):
        assert true.max() <= 1 + tol, f"a layer ended at sigma {true.max().item()}"
        assert torch.all(bound.double() >= true * (1 - 1e-6)), "the stored bound is below the true sigma"
        top = max(top, float(true.max()))
    return top


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_bound_is_strict_and_certified_after_every_sgd_step(wd):
    model = _model()
    opt = optim.build("sgd_sn", model, lr=0.5, sn_mode="scale", sn_sigma="bound", sn_refresh=7,
                      weight_decay=wd or None)
    proj = opt.projections[0]
    assert opt.strict and proj.strict
    assert max(float(s.max()) for s in _group_sigmas(proj)) <= 1 + 1e-5  # projected at construction (exact)
    tops = []
    _steps(model, opt, 30, after=lambda i: tops.append(_check_certified(proj)))
    assert max(tops) > 0.95  # the constraint binds: layers sit near 1, not shrunk away
    assert opt.active_steps > 0


@pytest.mark.parametrize("inner", ["adam", "sgd_momentum", "sgd_nesterov"])
def test_bound_through_the_weight_copy_for_any_other_optimizer(inner):
    """Optimizers whose update is not -lr G: ||D||_F from a copy taken before the step."""
    model = _model(seed=3)
    mats = [p for _, _, p in models.weight_layers(model)]
    base = {"adam": lambda ps: torch.optim.Adam(ps, lr=0.05),
            "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9),
            "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9, nesterov=True)}[inner]
    proj = SpectralProjection(mats, mode="scale", sigma="bound", refresh=5)
    opt = Projected(base(list(model.parameters())), [proj])
    opt.project()
    _steps(model, opt, 20, after=lambda i: _check_certified(proj))
    assert proj._before == [None] * len(proj.groups)  # the copies are dropped after each step


def test_a_bound_without_the_update_term_is_caught_by_the_same_check():
    """The check above can fail: keep b but drop ||D||_F, and layers end above 1."""

    class Forgetful(SpectralProjection):
        def _bound_sigma(self, gi, w):
            s = super()._bound_sigma(gi, w)
            b = self.bound[gi]
            return s if b is None or self.projections % self.refresh == 0 else b

    model = _model()
    mats = [p for _, _, p in models.weight_layers(model)]
    proj = Forgetful(mats, mode="scale", sigma="bound", refresh=50)
    opt = Projected(torch.optim.SGD(model.parameters(), lr=0.5), [proj])
    opt.project()
    with pytest.raises(AssertionError, match="sigma|bound"):
        _steps(model, opt, 10, after=lambda i: _check_certified(proj))


def _bound_and_exact(seed: int, lr: float, refresh: int, n: int):
    """Two copies of one model trained n steps by sgd_sn scale, with the bound and with exact sigma."""
    a, b = _model(seed=seed), _model(seed=seed)
    oa = optim.build("sgd_sn", a, lr=lr, sn_mode="scale", sn_sigma="bound", sn_refresh=refresh)
    ob = optim.build("sgd_sn", b, lr=lr, sn_mode="scale", sn_sigma="exact")
    _steps(a, oa, n)
    _steps(b, ob, n)
    return a, oa, b, ob


def test_refresh_one_is_the_exact_scale_projection():
    """Exact sigma at every projection: the same weights as sgd_sn scale with exact sigma (up to the margin)."""
    a, _, b, _ = _bound_and_exact(seed=5, lr=0.3, refresh=1, n=10)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=20 * BOUND_MARGIN, atol=1e-6)


def test_between_refreshes_the_bound_shrinks_little_more_than_exact_scale():
    """The price of the bound: layers a little below where exact-sigma scale leaves them."""
    _, oa, _, ob = _bound_and_exact(seed=7, lr=0.1, refresh=10, n=25)
    sa = torch.cat(_group_sigmas(oa.projections[0]))
    sb = torch.cat(_group_sigmas(ob.projections[0]))
    assert sa.max() <= 1 + 1e-5
    assert sa.mean() > 0.9 * sb.mean()


def test_a_checkpoint_resumes_the_bound_bit_for_bit():
    a = _model(seed=2)
    oa = optim.build("sgd_sn", a, lr=0.3, sn_mode="scale", sn_sigma="bound", sn_refresh=4)
    _steps(a, oa, 6)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    sd = oa.state_dict()
    assert sd["projections"][0]["projections"] == 7  # construction + 6 steps
    b = _model(seed=9)
    b.load_state_dict(state)
    ob = optim.build("sgd_sn", b, lr=0.3, sn_mode="scale", sn_sigma="bound", sn_refresh=4)
    b.load_state_dict(state)  # build projected b: restore the checkpoint's weights
    ob.load_state_dict(sd)
    _steps(a, oa, 6, seed=4)
    _steps(b, ob, 6, seed=4)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_bound_options_and_their_errors():
    from optlab.config import ConfigError, SNConfig

    mats = [torch.nn.Parameter(torch.randn(3, 3))]
    with pytest.raises(ValueError, match="allowed with clip_sv: exact"):
        SpectralProjection(mats, mode="clip_sv", sigma="bound")
    with pytest.raises(ValueError, match="allowed with normalize: exact, power"):
        SpectralProjection(mats, mode="normalize", sigma="bound")
    with pytest.raises(ValueError, match="sn.refresh"):
        SpectralProjection(mats, mode="scale", sigma="bound", refresh=0)
    with pytest.raises(ValueError, match="allowed: exact, power, bound"):
        SpectralProjection(mats, mode="scale", sigma="lanczos")
    assert SNConfig(mode="scale", sigma="bound", refresh=3).refresh == 3
    with pytest.raises(ConfigError, match="sn.sigma"):
        SNConfig(mode="normalize", sigma="bound")
    with pytest.raises(ConfigError, match="sn.refresh"):
        SNConfig(mode="scale", sigma="bound", refresh=0)
    torch.manual_seed(0)
    resnet = models.build("resnet18", input_shape=(1, 8, 8), n_classes=4, width=4)
    with pytest.raises(ValueError, match="sn.conv matrix"):
        optim.build("sgd_sn", resnet, lr=0.1, sn_mode="scale", sn_sigma="bound", sn_conv="matrix")
    opt = optim.build("sgd_sn", resnet, lr=0.1, sn_mode="scale", sn_sigma="bound")  # conv kernels: their operator norm
    assert opt.strict


def test_engine_run_with_the_bound_reports_strict_and_no_violation(toy_splits):
    from optlab.config import RunConfig, SNConfig
    from optlab.engine import train

    cfg = RunConfig(optimizer="sgd_sn", lr=1.0, arch="mlp", dataset="digits", depth=3, width=16, epochs=2,
                    batch_size=32, device="cpu", checkpoint_every=0, probes=every(1), init="kaiming",
                    sn=SNConfig(mode="scale", sigma="bound", refresh=5))
    res = train(cfg, data=toy_splits, progress=False)
    assert res.status == "completed"
    assert res.final["sn_strict"] is True
    assert res.final["sn_violations"] == 0
    assert res.final["sn_active_frac"] > 0
