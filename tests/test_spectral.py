"""Spectral projection and power iteration, checked against exact SVD."""

import pytest
import torch

from conftest import every
from optlab import models, optim
from optlab.optim.spectral import SpectralProjection, power_iteration, spectral_norm_exact


def _svd_max(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(w.double().reshape(-1, *w.shape[-2:]))[..., 0]


def test_exact_norm_matches_svd_batched():
    w = torch.randn(5, 7, 3)
    assert torch.allclose(spectral_norm_exact(w).double(), _svd_max(w), rtol=1e-5)


def test_power_iteration_converges_to_svd():
    torch.manual_seed(0)
    w = torch.randn(4, 20, 12)
    u = torch.nn.functional.normalize(torch.randn(4, 20), dim=-1)
    sigma, _ = power_iteration(w, u, iters=200)
    assert torch.allclose(sigma.double(), _svd_max(w), rtol=1e-4)
    # a lower bound at every iteration count
    sigma1, _ = power_iteration(w, u, iters=1)
    assert torch.all(sigma1.double() <= _svd_max(w) * (1 + 1e-6))


def _deep_model(init="kaiming", depth=6, width=16, seed=0):
    torch.manual_seed(seed)
    return models.build("mlp", input_dim=10, n_classes=4, depth=depth, width=width, activation="tanh", init=init)


def _all_sigmas(model) -> torch.Tensor:
    mats = [p.detach() for _, _, p in models.weight_layers(model)]
    return torch.cat([_svd_max(m) for m in mats])


@pytest.mark.parametrize("sigma,width,lr", [("exact", 16, 0.5), ("exact", 64, 1.0), ("power", 16, 0.1)])
def test_clip_keeps_every_layer_at_or_below_one_after_each_step(sigma, width, lr):
    """Strict for exact sigma; power iteration (1 iteration) holds where the spectrum top is separated."""
    model = _deep_model(init="kaiming", width=width)  # Kaiming init starts well above sigma 1
    assert _all_sigmas(model).max() > 1.5
    opt = optim.build("sgd_sn", model, lr=lr, sn_mode="scale", sn_sigma=sigma, sn_power_iters=1)
    assert _all_sigmas(model).max() <= 1 + 1e-4  # projected at construction
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        x = torch.randn(32, 10, generator=g)
        y = torch.randint(0, 4, (32,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        s = _all_sigmas(model)
        assert s.max() <= 1 + 1e-4, f"a layer ended at sigma {s.max().item()}"
    # clip does not inflate: some layer sits at 1 (the step pushed it up) -> not trivially tiny
    assert s.max() > 0.9


def test_clip_leaves_small_matrices_alone():
    w = torch.nn.Parameter(torch.randn(3, 8, 8))
    with torch.no_grad():
        w.mul_(0.5 / spectral_norm_exact(w).view(3, 1, 1))  # all at sigma 0.5
    before = w.detach().clone()
    SpectralProjection([w], mode="scale", sigma="exact").project()
    assert torch.equal(w.detach(), before)


@pytest.mark.parametrize("sigma,tol", [("exact", 1e-5), ("power", 1e-3)])
def test_normalize_sets_every_layer_to_one(sigma, tol):
    model = _deep_model(init="kaiming")
    opt = optim.build("sgd_sn", model, lr=0.1, sn_mode="normalize", sn_sigma=sigma, sn_power_iters=2)
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        x = torch.randn(16, 10, generator=g)
        y = torch.randint(0, 4, (16,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        s = _all_sigmas(model)
        assert torch.allclose(s, torch.ones_like(s), atol=tol), s


def test_projection_batches_same_shape_params_and_rescales_each():
    a = torch.nn.Parameter(torch.randn(6, 5) * 3)
    b = torch.nn.Parameter(torch.randn(6, 5) * 0.1)
    c = torch.nn.Parameter(torch.randn(2, 4, 4) * 5)
    proj = SpectralProjection([a, b, c], mode="scale", sigma="exact")
    assert len(proj.groups) == 2  # (6,5) pair batched together, (4,4) stack alone
    b0 = b.detach().clone()
    proj.project()
    assert _svd_max(a.detach()).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(b.detach(), b0)
    assert torch.allclose(_svd_max(c.detach()), torch.ones(2, dtype=torch.float64), atol=1e-5)


def test_sgd_sn_is_vanilla_sgd_before_projection():
    """One sgd_sn step equals one plain SGD step followed by the exact rescale."""
    m1 = _deep_model(init="orthogonal")
    m2 = _deep_model(init="orthogonal")
    o1 = optim.build("sgd_sn", m1, lr=0.3, sn_mode="scale", sn_sigma="exact")
    o2 = optim.build("sgd", m2, lr=0.3)
    x, y = torch.randn(8, 10), torch.randint(0, 4, (8,))
    for m, o in ((m1, o1), (m2, o2)):
        o.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        o.step()
    for (n, _, p1), (_, _, p2) in zip(models.weight_layers(m1), models.weight_layers(m2)):
        mats = p2.detach().reshape(-1, *p2.shape[-2:])
        expect = mats / _svd_max(mats).clamp_min(1).float().view(-1, 1, 1)
        assert torch.allclose(p1.detach().reshape_as(expect), expect, atol=1e-6), n
    assert torch.allclose(m1.hidden.bias, m2.hidden.bias, atol=1e-6)


def test_state_dict_round_trip_carries_power_vectors():
    model = _deep_model()
    opt = optim.build("sgd_sn", model, lr=0.1, sn_mode="scale", sn_sigma="power")
    sd = opt.state_dict()
    assert sd["projections"][0]["u"][0] is not None
    model2 = _deep_model()
    opt2 = optim.build("sgd_sn", model2, lr=0.1, sn_mode="scale", sn_sigma="power")
    opt2.load_state_dict(sd)
    for u1, u2 in zip(opt.projections[0].u, opt2.projections[0].u):
        assert torch.equal(u1, u2)


def test_build_rejects_unknown_optimizer():
    with pytest.raises(ValueError, match="allowed: sgd, sgd_momentum, adam"):
        optim.build("sdg", _deep_model(), lr=0.1)


def test_optimizer_defaults():
    m = _deep_model()
    assert optim.build("sgd", m, lr=0.1).param_groups[0]["momentum"] == 0.0
    assert optim.build("sgd_momentum", m, lr=0.1).param_groups[0]["momentum"] == 0.9
    adam = optim.build("adam", m)
    assert adam.param_groups[0]["lr"] == 1e-3 and adam.param_groups[0]["betas"] == (0.9, 0.999)


def test_exact_sigma_in_chunks_matches_svd_and_bounds_temporaries():
    torch.manual_seed(3)
    w = torch.randn(2, 7, 12, 9)  # 14 matrices; Gram 9x9 = 324 bytes each
    whole = spectral_norm_exact(w)
    chunked = spectral_norm_exact(w, chunk_bytes=3 * 9 * 9 * 4)  # 3 matrices at a time, 5 chunks
    assert chunked.shape == (2, 7)
    assert torch.allclose(chunked, whole, rtol=1e-6)
    assert torch.allclose(chunked.double(), torch.linalg.matrix_norm(w.double(), ord=2), rtol=1e-5)
    from optlab.metrics.memory import allocation_window

    big = torch.randn(64, 32, 32)
    with allocation_window(torch.device("cpu")) as win:
        spectral_norm_exact(big, chunk_bytes=8 * 32 * 32 * 4)
    assert win.peak_bytes < 64 * 32 * 32 * 4  # never a full-size Gram copy of the stack


def test_projection_counts_the_steps_at_which_it_acted():
    """A constraint that never binds is reported as such: clip acts only when some sigma > 1."""
    from optlab.optim.projected import Projected

    w = torch.nn.Parameter(torch.diag(torch.tensor([0.5, 0.2])))
    opt = Projected(torch.optim.SGD([w], lr=0.1), [SpectralProjection([w], mode="scale", sigma="exact")])
    for _ in range(3):
        opt.zero_grad()
        (0.0 * w.sum()).backward()  # zero gradient: sigma stays 0.5
        opt.step()
    assert opt.active_steps == 0
    for target, acted in ((6.0, 1), (-2.0, 1), (3.0, 2)):  # w[0,0]: 1.1 -> 1, 0.8, 1.1 -> 1
        opt.zero_grad()
        (-target * w[0, 0]).backward()  # one SGD step pushes w[0,0] up by 0.1 * target
        opt.step()
        assert opt.active_steps == acted, target
    state = opt.state_dict()
    fresh = Projected(torch.optim.SGD([w], lr=0.1), [SpectralProjection([w], mode="scale", sigma="exact")])
    fresh.load_state_dict(state)
    assert fresh.active_steps == 2  # carried through a checkpoint
    norm = Projected(torch.optim.SGD([w], lr=0.1), [SpectralProjection([w], mode="normalize", sigma="exact")])
    w.data.mul_(0.5)
    norm.zero_grad()
    (0.0 * w.sum()).backward()
    norm.step()
    norm.zero_grad()
    (0.0 * w.sum()).backward()
    norm.step()
    assert norm.active_steps == 1  # rescaled to 1 once, then already at norm 1


def test_engine_records_how_often_the_projection_acted(toy_splits):
    from optlab.config import RunConfig, SNConfig
    from optlab.engine import train

    base = dict(arch="mlp", dataset="digits", depth=3, width=16, epochs=2, batch_size=32, device="cpu",
                checkpoint_every=0, probes=every(4))
    hot = train(RunConfig(optimizer="sgd_sn", lr=1.0, **base), data=toy_splits, progress=False)
    plain = train(RunConfig(optimizer="sgd", lr=1.0, **base), data=toy_splits, progress=False)
    assert 0.5 < hot.final["sn_active_frac"] <= 1.0  # orthogonal init at sigma 1: lr 1 pushes above it
    assert plain.final["sn_active_frac"] is None


def test_exact_sigma_of_a_diverged_matrix_is_inf_not_an_exception():
    w = torch.randn(4, 6, 5)
    w[1, 2, 3] = float("nan")
    w[2, 0, 0] = float("inf")
    w[3] *= 1e30  # finite, but its Gram overflows
    s = spectral_norm_exact(w)
    assert torch.isinf(s[1:]).all()
    assert torch.allclose(s[0].double(), torch.linalg.matrix_norm(w[0].double(), ord=2), rtol=1e-5)


def test_a_run_whose_weights_blow_up_ends_as_diverged_not_as_a_crash(toy_splits):
    """Plain SGD at a huge LR: the exact sigma check meets non-finite weights before the loss
    flush does; the run is recorded as diverged."""
    from optlab.config import RunConfig, SNConfig
    from optlab.engine import train

    for opt, act, lr in (("sgd", "relu", 1e3), ("sgd", "tanh", 1e20), ("sgd_sn", "relu", 1e20)):
        cfg = RunConfig(optimizer=opt, lr=lr, arch="mlp", dataset="digits", depth=3, width=16, epochs=2, batch_size=32,
                        activation=act, device="cpu", checkpoint_every=0, log_every=50, init="kaiming",
                        probes=every(1))
        res = train(cfg, data=toy_splits, progress=False)  # these raised LinAlgError in eigvalsh before
        assert res.status == "diverged", (opt, act, lr)


# ---------------------------------------------------------------- clip_sv: the Euclidean projection


def _reference_clip(w):
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u * s.clamp_max(1.0).unsqueeze(-2)) @ vh


def test_clip_sv_is_the_svd_clip_batched_over_same_shape_params():
    g = torch.Generator().manual_seed(3)
    a = torch.nn.Parameter(torch.randn(4, 12, 12, generator=g) * 0.4)  # a stack, several singular values above 1
    b = torch.nn.Parameter(torch.randn(12, 12, generator=g) * 0.4)  # same shape: one batch with the stack
    c = torch.nn.Parameter(torch.randn(7, 12, generator=g) * 0.05)  # all below 1: untouched bit for bit
    refs = [_reference_clip(a.detach()), _reference_clip(b.detach())]
    c0 = c.detach().clone()
    proj = SpectralProjection([a, b, c], mode="clip_sv")
    assert len(proj.groups) == 2 and proj.strict
    proj.project()
    assert torch.allclose(a.detach().double(), refs[0], atol=1e-5)
    assert torch.allclose(b.detach().double(), refs[1], atol=1e-5)
    assert torch.equal(c.detach(), c0)
    sv = torch.linalg.svdvals(a.detach().double())
    assert sv.max() <= 1 + 1e-4 and (sv > 1 - 1e-5).sum(-1).min() >= 2  # several clipped to 1
    s_before = torch.linalg.svdvals(refs[0])
    assert torch.allclose(sv[sv < 0.999], s_before[s_before < 0.999], atol=1e-5)  # the rest kept


def test_clip_sv_keeps_the_small_directions_that_scale_removes():
    """One direction far above 1: scale shrinks every singular value by it (stable rank collapses),
    clip_sv only that one."""
    g = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    s = torch.full((16,), 0.5)
    s[0] = 50.0
    w0 = (q1 * s) @ q2.T
    ranks = {}
    for mode in ("clip_sv", "scale"):
        w = torch.nn.Parameter(w0.clone())
        SpectralProjection([w], mode=mode).project()
        sv = torch.linalg.svdvals(w.detach())
        assert sv.max() <= 1 + 1e-4
        ranks[mode] = float((sv ** 2).sum() / sv.max() ** 2)
    assert ranks["clip_sv"] > 4.5 and ranks["scale"] < 1.01


def test_modes_and_their_errors():
    w = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="'clip' is now 'scale'"):
        SpectralProjection([w], mode="clip")
    with pytest.raises(ValueError, match="clip_sv computes an SVD"):
        SpectralProjection([w], mode="clip_sv", sigma="power")
    assert not SpectralProjection([w], mode="scale", sigma="power").strict
    from optlab.config import ConfigError, SNConfig

    with pytest.raises(ConfigError, match="allowed: clip_sv, scale, normalize"):
        SNConfig(mode="clip")
    with pytest.raises(ConfigError, match="clip_sv computes an SVD"):
        SNConfig(mode="clip_sv", sigma="power")


def test_clip_sv_of_a_diverged_matrix_leaves_it_for_the_loss_to_report():
    w = torch.nn.Parameter(torch.randn(2, 5, 5) * 3)
    with torch.no_grad():
        w[1, 0, 0] = float("nan")
    proj = SpectralProjection([w], mode="clip_sv")
    proj.project()
    assert torch.isinf(proj.last_sigma[0][1]) and torch.isnan(w[1]).any()
    assert torch.linalg.svdvals(w.detach()[0]).max() <= 1 + 1e-4


def test_sgd_sn_default_is_sgd_then_the_svd_clip():
    m1, m2 = _deep_model(init="kaiming"), _deep_model(init="kaiming")
    o1 = optim.build("sgd_sn", m1, lr=0.3)
    optim.build("sgd_sn", m2, lr=0.3)  # same start (projected at construction)
    o2 = optim.build("sgd", m2, lr=0.3)
    assert o1.projections[0].mode == "clip_sv" and o1.strict
    x, y = torch.randn(8, 10), torch.randint(0, 4, (8,))
    for m, o in ((m1, o1), (m2, o2)):
        o.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        o.step()
    for (n, _, p1), (_, _, p2) in zip(models.weight_layers(m1), models.weight_layers(m2)):
        expect = _reference_clip(p2.detach().reshape(-1, *p2.shape[-2:]))
        assert torch.allclose(p1.detach().reshape_as(expect).double(), expect, atol=1e-5), n


def test_clip_sv_on_clustered_singular_values_a_float32_svd_could_not_converge_on():
    """Two 128 x 128 layers of a depth-300 MNIST MLP after 30-odd projected steps (singular values
    in [0.9994, 1.0002], many equal): LAPACK's float32 SVD on CPU raised "failed to converge ...
    too many repeated singular values" on them, which failed every depth-300 sgd_sn run. The
    Gram-eigensolver clip gives the float64 SVD clip to 1e-6, with sigma_max at 1."""
    from pathlib import Path

    from optlab.optim.spectral import clip_singular_values

    x = torch.load(Path(__file__).with_name("data") / "clustered_sv_layers.pt")
    y = x.clone()
    before = clip_singular_values(y)
    u, s, vh = torch.linalg.svd(x.double())
    ref = (u * s.clamp(max=1.0).unsqueeze(-2)) @ vh
    assert (y.double() - ref).abs().max() < 1e-6
    assert torch.linalg.svdvals(y.double()).max() <= 1 + 1e-6
    assert torch.allclose(before.double(), s[:, 0], atol=1e-6)
    # wide and tall shapes, and an exactly repeated spectrum straddling the limit
    q = torch.linalg.qr(torch.randn(3, 40, 40, dtype=torch.float64)).Q
    sv = torch.cat([torch.full((20,), 1.0 + 1e-4), torch.ones(10), torch.full((10,), 0.5)]).to(q.dtype)
    for w in ((q * sv.unsqueeze(-2)) @ q.mT, torch.randn(2, 24, 56, dtype=torch.float64), torch.randn(2, 56, 24, dtype=torch.float64)):
        w32 = w.float().clone()
        clip_singular_values(w32)
        uu, ss, vv = torch.linalg.svd(w.float().double(), full_matrices=False)
        assert (w32.double() - (uu * ss.clamp(max=1.0).unsqueeze(-2)) @ vv).abs().max() < 1e-6 * max(1.0, float(ss.max()))
        # float rounding grows with how far above 1 a layer starts (the SVD clip's did too, faster)
        assert torch.linalg.svdvals(w32.double()).max() <= 1 + 2e-6 * max(1.0, float(ss.max()))
