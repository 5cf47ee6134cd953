"""The rho step-length controller (optlab.optim.rho, method ``rho``, probe ``rho``), checked against
exact references: the closed-form radius of a binary logistic model, central finite differences,
the step torch's own optimizers take, and the engine's divergence record."""

from __future__ import annotations

import cmath
import copy
import io
import math

import pytest

from conftest import one_thread_fixture
import torch
import torch.nn.functional as F
from torch import nn

from optlab import engine, models, optim
from optlab.config import ConfigError, RunConfig
from optlab.optim.rho import STAT_KEYS, RhoController, logit_slopes, proposed_step
from tests.conftest import make_splits


one_thread = pytest.fixture(autouse=True)(one_thread_fixture)


def _mlp(dtype: torch.dtype = torch.float64, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    cfg = dict(input_dim=6, n_classes=4, depth=2, width=8, activation="gelu") | kw
    return models.build("mlp", **cfg).to(dtype)


def _batch(n: int = 16, dim: int = 6, k: int = 4, dtype: torch.dtype = torch.float64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=dtype), torch.randint(0, k, (n,), generator=g)


def _backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    for p in model.parameters():
        p.grad = None
    F.cross_entropy(model(x), y).backward()


def _copy(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A deep copy of (model, optimizer) with the gradients (``deepcopy`` drops ``.grad``)."""
    m2, o2 = copy.deepcopy((model, opt))
    for p, q in zip(model.parameters(), m2.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    return m2, o2


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ---------------------------------------------------------------- the radius


def test_rho_matches_the_binary_logistic_closed_form():
    torch.manual_seed(0)
    model = nn.Linear(5, 2).double()
    x = torch.randn(16, 5, dtype=torch.float64) * 2
    y = torch.randint(0, 2, (16,))
    _backward(model, x, y)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    gw, gb = model.weight.grad.clone(), model.bias.grad.clone()
    ctl = RhoController(model, torch.optim.SGD(model.parameters(), lr=0.1), mode="fixed", derivative="jvp",
                        capture_inputs=False)
    st = ctl.step(x)

    norm = torch.sqrt((gw**2).sum() + (gb**2).sum())
    vw, vb = -gw / norm, -gb / norm
    a = x @ vw.T + vb  # the logits are linear in the parameters: z(t) = z + a t exactly
    slope = a[:, 1] - a[:, 0]
    delta_a = slope.abs().max().item()
    assert st["delta_a"].item() == pytest.approx(delta_a, rel=1e-12)
    assert st["rho"].item() == pytest.approx(math.pi / delta_a, rel=1e-12)

    gap = (x @ w0.T + b0)
    gap = gap[:, 1] - gap[:, 0]
    radii = []
    for d, s in zip(gap.tolist(), slope.tolist()):
        t_star = complex(-d, math.pi) / s  # nearest zero of the partition function along t
        assert abs(1 + cmath.exp(d + s * t_star)) < 1e-9
        radii.append(math.sqrt(d * d + math.pi**2) / abs(s))
        assert abs(t_star) == pytest.approx(radii[-1], rel=1e-12)
    assert st["rho"].item() <= min(radii) * (1 + 1e-12)
    # r and tau are those of the step the SGD optimizer took
    assert st["tau"].item() == pytest.approx(0.1 * norm.item(), rel=1e-12)
    assert st["r"].item() == pytest.approx(st["tau"].item() / st["rho"].item(), rel=1e-12)


def test_jvp_slopes_match_a_central_difference():
    model = _mlp()
    x, _ = _batch()
    g = torch.Generator().manual_seed(3)
    tangents = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}
    got = logit_slopes(model, x, tangents, derivative="jvp")
    eps = 1e-6
    own = dict(model.named_parameters())
    with torch.no_grad():
        plus = torch.func.functional_call(model, {n: own[n] + eps * t for n, t in tangents.items()}, (x,))
        minus = torch.func.functional_call(model, {n: own[n] - eps * t for n, t in tangents.items()}, (x,))
    ref = (plus - minus) / (2 * eps)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-8)
    # the controller's own finite-difference fallback agrees with the JVP
    fd = logit_slopes(model, x, tangents, derivative="fd", fd_eps=1e-4)
    torch.testing.assert_close(fd, got, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("derivative", ["fd", "auto"])
def test_controller_finite_difference_and_auto_agree_with_the_jvp(derivative):
    model = _mlp(dtype=torch.float32)
    x, y = _batch(dtype=torch.float32)
    ref_model = copy.deepcopy(model)
    stats = []
    for m, how in ((model, "jvp"), (ref_model, derivative)):
        _backward(m, x, y)
        ctl = RhoController(m, torch.optim.SGD(m.parameters(), lr=0.1), mode="fixed", derivative=how, capture_inputs=False)
        stats.append(ctl.step(x)["delta_a"].item())
        assert ctl.derivative_used == ("fd" if how == "fd" else "jvp")
    assert stats[1] == pytest.approx(stats[0], rel=1e-2)


@pytest.mark.parametrize("case", ["mlp", "mlp-ckpt", "resnet-bn", "gpt"])
def test_forward_mode_slopes_are_those_of_torch_func_jvp(case):
    """The controller's JVP (forward_ad dual tensors in the parameters' slots) against
    ``models.jvp_outputs`` (torch.func.jvp over functional_call): bitwise on the MLP and ResNet,
    within float rounding on the GPT; parameters, buffers and train flags untouched."""
    torch.manual_seed(0)
    if case.startswith("mlp"):
        model = _mlp(depth=3, **({"checkpoint_segments": 2} if case == "mlp-ckpt" else {}))
        x, _ = _batch()
    elif case == "resnet-bn":
        model = models.build("resnet18", input_dim=64, n_classes=3, input_shape=(1, 8, 8), width=4).double()
        with torch.no_grad():
            model(torch.randn(8, 64, dtype=torch.float64) * 2 + 0.5)
        x = torch.randn(8, 64, dtype=torch.float64)
    else:
        model = models.build("gpt", vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, dropout=0.1).double()
        x = torch.randint(0, 11, (2, 8))
    model.train()
    g = torch.Generator().manual_seed(3)
    names = [n for n, _ in model.named_parameters()]
    for keep in (names, names[::2]):  # every parameter, and a subset (the rest zero tangents)
        tangents = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters() if n in keep}
        before = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
        ref = models.jvp_outputs(model, x, tangents)[1]
        got = logit_slopes(model, x, tangents, derivative="jvp")
        if case == "gpt":
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        else:
            assert torch.equal(got, ref)
        after = dict([*model.named_parameters(), *model.named_buffers()])
        assert all(torch.equal(before[n], after[n]) for n in before)
        assert all(m.training for m in model.modules())
        assert all(type(p) is nn.Parameter for p in model.parameters())  # the slots hold the parameters again


def test_forward_mode_slopes_follow_tied_and_replaced_parameters():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight  # one parameter in two slots

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    torch.manual_seed(0)
    model = Tied().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    tangents = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}
    assert "b.weight" not in tangents
    ctl = RhoController(model, torch.optim.SGD(model.parameters(), lr=0.1), capture_inputs=False)
    slots = ctl._slots
    assert logit_slopes(model, x, tangents, slots=slots).equal(models.jvp_outputs(model, x, tangents)[1])
    model.a.bias = nn.Parameter(model.a.bias.detach() + 1.0)  # a replaced parameter: the maps are rebuilt
    tangents = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}
    assert logit_slopes(model, x, tangents, slots=slots).equal(models.jvp_outputs(model, x, tangents)[1])
    assert model.b.weight is model.a.weight and slots.params["a.bias"] is model.a.bias


def _fd1_pair(dtype, fd_eps, mode="fixed", opt="sgd", steps=1, **kw):
    """delta_a (and the models) of the JVP controller and the fd1 controller on the same steps."""
    out = []
    base = _mlp(dtype=dtype)
    for how in ("jvp", "fd1"):
        model = copy.deepcopy(base)
        o = OPTIMIZERS[opt](model.parameters())
        ctl = RhoController(model, o, mode=mode, derivative=how, fd_eps=fd_eps, capture_inputs=False, **kw)
        vals = []
        for i in range(steps):
            x, y = _batch(dtype=dtype, seed=70 + i)
            for p in model.parameters():
                p.grad = None
            logits = model(x)
            F.cross_entropy(logits, y).backward()
            vals.append(ctl.step(x, logits)["delta_a"].item())
        assert ctl.derivative_used == how
        out.append((vals, model))
    return out


@pytest.mark.parametrize("dtype,fd_eps,rel", [(torch.float64, 1e-5, 1e-4), (torch.float32, 1e-4, 1e-2)])
def test_fd1_agrees_with_the_jvp(dtype, fd_eps, rel):
    (ref, _), (got, _) = _fd1_pair(dtype, fd_eps)
    assert got[0] == pytest.approx(ref[0], rel=rel)
    # and through capped steps with momentum: the same trajectory to that tolerance
    (ref, m1), (got, m2) = _fd1_pair(dtype, fd_eps, mode="capped", opt="momentum_dampening_wd", steps=4)
    assert got == pytest.approx(ref, rel=10 * rel)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=10 * rel, atol=10 * rel)


def test_fd1_with_subset_and_the_recorded_outputs():
    model = _mlp(dtype=torch.float64)
    x, y = _batch(n=64, dtype=torch.float64)
    _backward(model, x, y)
    vals = {}
    for how in ("jvp", "fd1"):
        m, _ = _copy(model, torch.optim.SGD(model.parameters(), lr=0.1))
        ctl = RhoController(m, torch.optim.SGD(m.parameters(), lr=0.1), mode="fixed", samples="subset:8", seed=5,
                            derivative=how, fd_eps=1e-5, chunk=3)
        m(x)  # a training forward: the hook records the inputs (and for fd1 the outputs)
        vals[how] = ctl.step()["delta_a"].item()
        ctl.close()
    assert vals["fd1"] == pytest.approx(vals["jvp"], rel=1e-4)
    # through optim.build without arguments to step()
    m, _ = _copy(model, torch.optim.SGD(model.parameters(), lr=0.1))
    opt = optim.build("sgd", m, lr=0.1, rho={"mode": "fixed", "derivative": "fd1", "fd_eps": 1e-5})
    opt.zero_grad()
    F.cross_entropy(m(x), y).backward()
    assert opt.step()["delta_a"].item() == pytest.approx(
        RhoController(model, torch.optim.SGD(model.parameters(), lr=0.1), mode="fixed",
                      capture_inputs=False).step(x)["delta_a"].item(), rel=1e-4)


def test_fd1_is_refused_where_it_cannot_be_right():
    torch.manual_seed(0)
    resnet = models.build("resnet18", input_dim=64, n_classes=3, input_shape=(1, 8, 8), width=4)
    with pytest.raises(ValueError, match="fd1.*differ"):
        RhoController(resnet, torch.optim.SGD(resnet.parameters(), lr=0.1), derivative="fd1")
    gpt = models.build("gpt", vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, dropout=0.1)
    with pytest.raises(ValueError, match="fd1.*differ"):
        RhoController(gpt, torch.optim.SGD(gpt.parameters(), lr=0.1), derivative="fd1")
    model = _mlp(dtype=torch.float32)
    pool, _ = _batch(dtype=torch.float32)
    with pytest.raises(ValueError, match="fd1.*batch or subset"):
        RhoController(model, torch.optim.SGD(model.parameters(), lr=0.1), derivative="fd1", samples="probe", pool=pool)
    ctl = RhoController(model, torch.optim.SGD(model.parameters(), lr=0.1), derivative="fd1", capture_inputs=False)
    x, y = _batch(dtype=torch.float32)
    _backward(model, x, y)
    with pytest.raises(ValueError, match="outputs"):
        ctl.step(x)  # no outputs given, none recorded
    with pytest.raises(ValueError, match="autocast"):
        ctl.step(x, model(x).to(torch.bfloat16))
    with pytest.raises(ConfigError, match="method_options.derivative"):
        RunConfig(step_method="rho", method_options={"derivative": "fd2"}, optimizer="sgd", device="cpu")


@pytest.mark.parametrize("derivative,samples", [("jvp", "batch"), ("jvp", "subset:8"), ("fd", "batch"), ("fd1", "subset:8")])
@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam"])
@pytest.mark.parametrize("mode", ["capped", "set"])
def test_no_host_reads_inside_the_step(monkeypatch, derivative, samples, opt_name, mode):
    """No Python-level read of a tensor's value (item, float, int, bool, tolist, numpy) anywhere
    in a capped/set step with apply="device" (Adam's step counts, CPU scalars by torch's design,
    excepted). The CUDA test above checks the C++ side too, where a GPU is present."""
    model = _mlp(dtype=torch.float32)
    opt = optim.build(opt_name, model, lr=0.1)
    ctl = RhoController(model, opt, mode=mode, samples=samples, derivative=derivative, capture_inputs=False)
    x, y = _batch(n=32, dtype=torch.float32)
    for i in range(3):
        for p in model.parameters():
            p.grad = None
        logits = model(x)
        F.cross_entropy(logits, y).backward()
        if i < 2:  # the first steps create the optimizer's state
            ctl.step(x, logits)
            continue
        allowed = {id(st["step"]) for st in opt.state.values() if "step" in st}
        for name in ("item", "tolist", "numpy", "__float__", "__int__", "__index__", "__bool__"):
            orig = getattr(torch.Tensor, name)

            def refuse(self, *a, _orig=orig, _name=name, **k):
                if id(self) in allowed:
                    return _orig(self, *a, **k)
                raise AssertionError(f"host read inside the step: Tensor.{_name}")

            monkeypatch.setattr(torch.Tensor, name, refuse)
        st = ctl.step(x, logits)
        monkeypatch.undo()
        assert math.isfinite(st["r"].item())


# ---------------------------------------------------------------- the step at LR 1

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.3),
    "sgd_wd": lambda ps: torch.optim.SGD(ps, lr=0.3, weight_decay=1e-2),
    "momentum_dampening_wd": lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9, dampening=0.3, weight_decay=1e-2),
    "nesterov_wd": lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "momentum_maximize": lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.5, maximize=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adam_l2_amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-2, amsgrad=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
}


def _warm(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for i in range(steps):
        x, y = _batch(seed=10 + i)
        _backward(model, x, y)
        opt.step()


def _state_snapshot(opt: torch.optim.Optimizer) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in opt.state[p].items()} for g in opt.param_groups for p in g["params"] if p in opt.state]


@pytest.mark.parametrize("warmup", [0, 3])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_direction_equals_the_step_torch_takes_next(name, warmup):
    model = _mlp()
    opt = OPTIMIZERS[name](model.parameters())
    _warm(model, opt, warmup)
    x, y = _batch(seed=99)
    _backward(model, x, y)
    before = _state_snapshot(opt)
    u = proposed_step(opt).u
    after = _state_snapshot(opt)
    assert len(before) == len(after)
    for a, b in zip(before, after):  # measuring leaves the optimizer's state alone
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    m2, o2 = _copy(model, opt)
    for g in o2.param_groups:
        g["lr"] = 1.0
    p0 = _params(m2)
    o2.step()
    taken = [a - b for a, b in zip(p0, _params(m2))]
    assert len(u) == len(taken)
    for ui, ti in zip(u, taken):
        torch.testing.assert_close(ui, ti, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("apply", ["device", "torch"])
@pytest.mark.parametrize("name", ["momentum_dampening_wd", "nesterov_wd", "adam_l2_amsgrad", "adamw"])
def test_controlled_step_is_the_torch_step_at_eta_eff(name, apply):
    model = _mlp()
    opt = OPTIMIZERS[name](model.parameters())
    _warm(model, opt, 2)
    x, y = _batch(seed=99)
    _backward(model, x, y)
    ref_model, ref_opt = _copy(model, opt)
    ctl = RhoController(model, opt, mode="capped", r_target=1e-3, apply=apply, capture_inputs=False)
    st = ctl.step(x)
    assert st["capped"].item() == 1.0  # the cap binds: eta_eff is not the base LR
    eta = st["eta_eff"].item()
    assert eta < opt.param_groups[0]["lr"]
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]  # restored
    for g in ref_opt.param_groups:
        g["lr"] = eta
    ref_opt.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        if apply == "torch":
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    # the optimizer's state evolved exactly as torch's own step at that LR leaves it
    for a, b in zip(_state_snapshot(opt), _state_snapshot(ref_opt)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fixed_mode_is_the_base_optimizer_unchanged():
    model = _mlp()
    ref = copy.deepcopy(model)
    opt, ref_opt = torch.optim.Adam(model.parameters(), lr=3e-2), torch.optim.Adam(ref.parameters(), lr=3e-2)
    ctl = RhoController(model, opt, mode="fixed", capture_inputs=False)
    for i in range(4):
        x, y = _batch(seed=20 + i)
        _backward(model, x, y)
        u = proposed_step(opt).u
        unorm = torch.sqrt(sum((t**2).sum() for t in u))
        st = ctl.step(x)
        _backward(ref, x, y)
        ref_opt.step()
        assert st["eta_eff"].item() == pytest.approx(3e-2)
        assert st["tau"].item() == pytest.approx(3e-2 * unorm.item(), rel=1e-6)
        assert st["r"].item() == pytest.approx(st["tau"].item() / st["rho"].item(), rel=1e-6)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


# ---------------------------------------------------------------- modes


def test_capped_never_exceeds_r_target():
    model = _mlp(dtype=torch.float32)
    ctl = RhoController(model, torch.optim.SGD(model.parameters(), lr=50.0, momentum=0.9), mode="capped", r_target=0.5,
                        capture_inputs=False)
    rs, capped = [], []
    for i in range(25):
        x, y = _batch(dtype=torch.float32, seed=30 + i)
        _backward(model, x, y)
        p0 = _params(model)
        st = ctl.step(x)
        moved = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(p0, _params(model))))
        assert moved.item() == pytest.approx(st["tau"].item(), rel=1e-4)  # tau is the step actually taken
        assert (moved * st["delta_a"] / math.pi).item() <= 0.5 * (1 + 1e-4)
        rs.append(st["r"].item())
        capped.append(st["capped"].item())
    assert max(rs) <= 0.5 * (1 + 1e-6)
    assert sum(capped) > 0
    summ = ctl.summary()
    assert summ["peak_r"] == pytest.approx(max(rs)) and summ["capped_frac"] == pytest.approx(sum(capped) / 25)


def test_set_mode_ignores_the_base_lr():
    runs = []
    for lr in (1e-3, 10.0):
        model = _mlp(dtype=torch.float32)
        ctl = RhoController(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), mode="set", r_target=0.7,
                            capture_inputs=False)
        rs = []
        for i in range(5):
            x, y = _batch(dtype=torch.float32, seed=40 + i)
            _backward(model, x, y)
            rs.append(ctl.step(x)["r"].item())
        assert rs == pytest.approx([0.7] * 5, rel=1e-5)
        runs.append(_params(model))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_batch_norm_running_statistics_are_unchanged_by_the_controller():
    torch.manual_seed(0)
    model = models.build("resnet18", input_dim=64, n_classes=3, input_shape=(1, 8, 8), width=4)
    x = torch.randn(8, 64)
    y = torch.randint(0, 3, (8,))
    with torch.no_grad():  # running statistics away from their 0/1 start
        for _ in range(2):
            model(torch.randn(8, 64) * 2 + 0.5)
    model.train()
    for derivative in ("jvp", "fd"):
        ctl = RhoController(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), mode="capped",
                            derivative=derivative, capture_inputs=False)
        _backward(model, x, y)  # the training forward updates them; the controller must not
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        st = ctl.step(x)
        assert math.isfinite(st["rho"].item())
        assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
        assert all(m.training for m in model.modules())


# ---------------------------------------------------------------- samples, API, checkpoints


def test_samples_subset_probe_and_full():
    model = _mlp(dtype=torch.float32)
    x, y = _batch(n=64, dtype=torch.float32)
    pool, _ = _batch(n=40, dtype=torch.float32, seed=7)
    _backward(model, x, y)
    out = {}
    for spec in ("batch", "subset:8", "probe", "full"):
        m, _ = _copy(model, torch.optim.SGD(model.parameters(), lr=0.1))
        ctl = RhoController(m, torch.optim.SGD(m.parameters(), lr=0.1), mode="fixed", samples=spec, seed=5,
                            pool=pool if spec in ("probe", "full") else None, chunk=16, capture_inputs=False)
        out[spec] = ctl.step(x)["delta_a"].item()
    assert out["subset:8"] <= out["batch"]
    assert out["probe"] == out["full"]  # the same pool, in chunks of 16
    u = {n: p.grad for n, p in model.named_parameters()}
    unorm = torch.sqrt(sum((g**2).sum() for g in u.values()))
    a = logit_slopes(model, pool, u) / unorm
    assert out["full"] == pytest.approx((a.amax(-1) - a.amin(-1)).max().item(), rel=1e-5)
    with pytest.raises(ValueError, match="samples"):
        RhoController(model, torch.optim.SGD(model.parameters(), lr=0.1), samples="subset:0")
    with pytest.raises(ValueError, match="pool"):
        RhoController(model, torch.optim.SGD(model.parameters(), lr=0.1), samples="probe")


def test_language_model_outputs_count_every_token_as_a_sample():
    torch.manual_seed(0)
    model = models.build("gpt", vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)
    x = torch.randint(0, 11, (2, 8))
    y = torch.randint(0, 11, (2, 8))
    logits = model(x)
    F.cross_entropy(logits.reshape(-1, 11), y.reshape(-1)).backward()
    u = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    unorm = torch.sqrt(sum((g**2).sum() for g in u.values()))
    a = logit_slopes(model, x, u) / unorm
    ctl = RhoController(model, torch.optim.SGD(model.parameters(), lr=0.1), mode="fixed", capture_inputs=False)
    st = ctl.step(x)
    assert st["delta_a"].item() == pytest.approx((a.amax(-1) - a.amin(-1)).max().item(), rel=1e-5)


def test_optim_build_wraps_any_optimizer_and_the_plain_loop_works():
    model = _mlp(dtype=torch.float32)
    assert type(optim.build("sgd", model, lr=0.1)) is torch.optim.SGD  # unchanged without rho
    assert type(optim.build("adam", model)) is torch.optim.Adam
    opt = optim.build("sgd_sn", model, lr=5.0, rho={"mode": "capped", "r_target": 1.0})
    assert isinstance(opt, RhoController) and opt.projections  # sgd_sn's projection kept
    for i in range(3):
        x, y = _batch(dtype=torch.float32, seed=50 + i)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        st = opt.step()  # inputs from the model's last training-mode forward
        assert set(st) == set(STAT_KEYS) and st["r"].item() <= 1 + 1e-6
    with torch.no_grad():  # the projection ran after the controlled step
        for w in (model.input.weight, model.hidden.weight, model.head.weight):
            assert torch.linalg.matrix_norm(w, ord=2).max() <= 1 + 1e-4
    with pytest.raises(ValueError, match="unexpected options"):
        optim.build("sgd", model, lr=0.1, rho={"mod": "capped"})


def test_state_dict_resumes_exactly():
    def fresh(model):
        return RhoController(model, torch.optim.Adam(model.parameters(), lr=5e-2), mode="capped", r_target=0.3,
                             samples="subset:6", seed=3, capture_inputs=False)

    model = _mlp(dtype=torch.float32)
    ctl = fresh(model)

    def run(ctl, model, steps):
        for i in steps:
            x, y = _batch(n=16, dtype=torch.float32, seed=60 + i)
            _backward(model, x, y)
            ctl.step(x)

    run(ctl, model, range(3))
    buf = io.BytesIO()
    torch.save(ctl.state_dict(), buf)  # as the engine's checkpoints do
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    model2 = copy.deepcopy(model)
    ctl2 = fresh(model2)
    ctl2.load_state_dict(state)
    run(ctl, model, range(3, 6))
    run(ctl2, model2, range(3, 6))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    assert ctl.summary() == ctl2.summary()


def test_method_options_are_validated_in_one_line():
    for bad, key in (({"samples": "subset:0"}, "method_options.samples"), ({"mode": "cap"}, "method_options.mode"),
                     ({"r_target": -1}, "method_options.r_target"), ({"r_targt": 1}, "method_options.r_targt")):
        with pytest.raises(ConfigError, match=key) as err:
            RunConfig(step_method="rho", method_options=bad, optimizer="sgd", device="cpu")
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------- through the engine


def _cfg(**kw) -> RunConfig:
    base = dict(optimizer="sgd", lr=0.05, depth=2, width=8, epochs=2, batch_size=32, log_every=3, device="cpu",
                step_method="rho", probes={"rho": {}})
    return RunConfig(**{**base, **kw})


@pytest.mark.parametrize("options", [{}, {"samples": "full", "derivative": "fd", "apply": "torch"}, {"samples": "probe"},
                                     {"derivative": "fd1", "samples": "subset:16"}])
def test_rho_method_through_the_engine(toy_splits, options):
    res = engine.train(_cfg(optimizer="sgd_momentum", lr=2.0, method_options={"mode": "capped", "r_target": 0.5, **options}),
                       data=toy_splits, progress=False)
    assert res.status == "completed"
    steps = res.final["steps"]
    for key in STAT_KEYS:  # one curve row per step and key
        assert [s for s, e, k, v in res.curves if k == key] == list(range(1, steps + 1))
    rs = [v for s, e, k, v in res.curves if k == "r"]
    assert max(rs) <= 0.5 * (1 + 1e-6)
    per_epoch = [v for s, e, k, v in res.curves if k == "epoch_r_max"]
    assert len(per_epoch) == 2 and max(per_epoch) == pytest.approx(max(rs))
    half = steps // 2
    etas = [v for s, e, k, v in res.curves if k == "eta_eff"]
    caps = [v for s, e, k, v in res.curves if k == "capped"]
    assert res.final["final_eta_eff"] == pytest.approx(sum(etas[half:]) / half, rel=1e-5)
    assert res.final["final_capped_frac"] == pytest.approx(sum(caps[half:]) / half)
    assert res.final["peak_r"] == pytest.approx(max(rs))


def test_backprop_with_a_rho_optimizer_through_the_engine(toy_splits):
    cfg = _cfg(step_method="backprop", lr=2.0, optimizer_options={"rho": {"mode": "set", "r_target": 0.5}})
    res = engine.train(cfg, data=toy_splits, progress=False)
    assert res.status == "completed"
    assert res.final["peak_r"] == pytest.approx(0.5, rel=1e-5)
    assert len([v for s, e, k, v in res.curves if k == "epoch_eta_eff_mean"]) == 2


def test_a_diverging_fixed_lr_run_is_recorded_as_diverged_and_the_next_run_goes_on():
    data = make_splits(n_train=256, dim=12, n_classes=4)
    bad = engine.train(_cfg(lr=300.0, epochs=3, method_options={"mode": "fixed"}), data=data, progress=False)
    assert bad.status == "diverged"
    assert bad.diverged_step is not None and bad.diverge_reason in ("nonfinite", "exploding")
    assert bad.failure in ("nonfinite", "exploding")
    finite_r = [v for s, e, k, v in bad.curves if k == "r" and math.isfinite(v)]
    assert max(finite_r) > 1  # it was measured on the way
    assert bad.final["peak_r"] == pytest.approx(max(finite_r))  # the diverging step's NaN does not erase it
    capped = engine.train(_cfg(lr=300.0, epochs=3, method_options={"mode": "capped"}), data=data, progress=False)
    assert capped.status == "completed"
    assert capped.final["peak_r"] <= 1 + 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronization is observable on CUDA only")
@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam"])
@pytest.mark.parametrize("mode", ["capped", "set"])
@pytest.mark.parametrize("samples", ["batch", "subset:8"])
def test_no_host_sync_inside_the_step_on_cuda(opt_name, mode, samples):
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = models.build("mlp", input_dim=6, n_classes=4, depth=2, width=8).to(dev)
    ctl = RhoController(model, optim.build(opt_name, model, lr=0.1), mode=mode, samples=samples, derivative="jvp",
                        capture_inputs=False)
    x, y = (t.to(dev) for t in _batch(dtype=torch.float32))
    for i in range(3):  # the first steps create state and warm up the kernels
        _backward(model, x, y)
        if i == 2:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            ctl.step(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
