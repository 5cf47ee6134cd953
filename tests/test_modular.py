"""Muon with the standard routing and the modular presets (optlab.optim.modular), checked against
torch.optim.Muon, the SVD, their documented routing (from param_roles), and a resume; the gpt_modern
structure (tie, no biases, RMSNorm against torch's rms_norm, SwiGLU)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from conftest import one_thread_fixture
from optlab import paramfiles
from optlab import models, optim
from optlab.config import ConfigError, make_run, resolve_run
from optlab.optim.modular import PRESETS, Modular

one_thread = pytest.fixture(autouse=True)(one_thread_fixture)


def _mlp(depth: int = 3, width: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.build("mlp", input_dim=12, n_classes=5, depth=depth, width=width)


def _gpt(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.build("gpt_modern", vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 12, generator=g), torch.randint(0, 5, (32,), generator=g)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1, check=None) -> list[float]:
    losses = []
    for t in range(steps):
        x, y = _batch(seed + t)
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if check is not None:
            check()
    return losses


# ----------------------------------------------------------------------------- Muon vs torch


def test_muon_on_2d_params_agrees_with_torch_muon():
    """All roles on Muon (bias-free Linear stack): the same trajectory as torch.optim.Muon, within bf16."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 24, bias=False), nn.Tanh(), nn.Linear(24, 24, bias=False), nn.Tanh(),
                        nn.Linear(24, 40, bias=False), nn.Tanh(), nn.Linear(40, 5, bias=False))
    ref = copy.deepcopy(net)
    every = {r: {"optimizer": "muon"} for r in ("input", "hidden", "output")}
    with pytest.warns(UserWarning, match="no param_roles"):
        ours = optim.build("muon", net, lr=0.02, roles=every, weight_decay=0.1)
    assert {id(p) for _, p in ours.muon_params()} == {id(p) for p in net.parameters()}
    init = [p.detach().clone() for p in ref.parameters()]
    theirs = torch.optim.Muon(ref.parameters(), lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, ns_steps=5)
    for t in range(4):
        x, y = _batch(t)
        for m, o in ((net, ours), (ref, theirs)):
            o.zero_grad()
            _loss(m, x, y).backward()
            o.step()
    for p, q, q0 in zip(net.parameters(), ref.parameters(), init):
        moved = (q - q0).norm()  # 4 steps of size ~ lr * sqrt(min(shape)) in Frobenius norm
        assert moved > 0.01 and (p - q).norm() < 2e-2 * moved, ((p - q).norm(), moved)


# ----------------------------------------------------------------------------- routing


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("make", [_mlp, _gpt], ids=["mlp", "gpt_modern"])
def test_routing_follows_the_documented_table(preset, make):
    model = make()
    opt = optim.build(preset, model, lr=0.02)
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, Modular)
    roles = model.param_roles()
    table = PRESETS[preset]
    named = dict(model.named_parameters())
    want_muon = {n for n, p in named.items() if table[roles[n]].optimizer == "muon" and p.dim() >= 2}
    assert {n for n, _ in opt.muon_params()} == want_muon
    muon_ids = {id(p) for g in (opt.muon.param_groups if opt.muon else []) for p in g["params"]}
    adamw_ids = {id(p) for g in (opt.adamw.param_groups if opt.adamw else []) for p in g["params"]}
    assert muon_ids == {id(named[n]) for n in want_muon}
    assert adamw_ids == {id(p) for n, p in named.items() if n not in want_muon}
    assert not muon_ids & adamw_ids
    for g in opt.param_groups:  # every group names its role; bias_norm never decays
        assert all(roles[n] == g["role"] for n, p in named.items() if any(p is q for q in g["params"]))
    x, y = (_batch() if make is _mlp else (torch.randint(0, 11, (4, 8)), torch.randint(0, 11, (4, 8))))
    opt.zero_grad()
    _loss(model, x, y).backward()
    opt.step()
    for n, p in named.items():
        st = opt.state[p]
        assert ("momentum_buffer" in st) == (n in want_muon) and ("exp_avg" in st) == (n not in want_muon)
    cons = {(d["name"], d["constraint"]) for d in opt.constraint_diagnostics()}
    want = set()
    for n, p in named.items():
        c = table[roles[n]].constraint
        if c != "none":
            want |= {(f"{n}[{j}]", c) for j in range(p.shape[0])} if p.dim() == 3 else {(n, c)}
    assert cons == want


# ----------------------------------------------------------------------------- constraints


def test_sphere_rows_have_unit_norm_after_every_step():
    model = _mlp()
    opt = optim.build("modular_sphere", model, lr=0.02, adamw_lr=0.01)
    w = model.input.weight

    def check():
        assert torch.allclose(w.detach().norm(dim=1), torch.ones(w.shape[0]), atol=1e-6)
        (d,) = [d for d in opt.constraint_diagnostics() if d["constraint"] == "sphere"]
        assert float(d["orth_err"]) == pytest.approx(float((w.detach().norm(dim=1) ** 2 - 1).norm()), abs=1e-6)

    check()  # holds from construction
    _train(model, opt, 5, check=check)


def test_exact_stiefel_singular_values_are_one():
    model = _mlp(depth=3, width=16)
    opt = optim.build("full_modular", model, lr=0.02, stiefel="exact")

    def check():
        s = torch.linalg.svdvals(model.hidden.weight.detach().double())
        assert (s - 1).abs().max() < 1e-5

    check()
    _train(model, opt, 4, check=check)


def test_ns_stiefel_reports_its_orthogonality_error_honestly():
    """The diagnostics equal the SVD's: ||W^T W - I||_F = sqrt(sum (s_i^2 - 1)^2), and the extreme s_i."""
    model = _mlp(depth=3, width=16)
    opt = optim.build("modular_stiefel", model, lr=0.02, stiefel="ns", ns_steps=5)
    _train(model, opt, 3)
    diags = [d for d in opt.constraint_diagnostics() if d["constraint"] == "stiefel"]
    assert [d["name"] for d in diags] == [f"hidden.weight[{j}]" for j in range(3)]
    assert [d["layer"] for d in diags] == [1, 2, 3]  # LayerIndex numbering: 0 is the input layer
    s = torch.linalg.svdvals(model.hidden.weight.detach().double())
    errs = ((s**2 - 1) ** 2).sum(-1).sqrt()
    for j, d in enumerate(diags):
        assert float(d["orth_err"]) == pytest.approx(float(errs[j]), rel=1e-4, abs=1e-6)
        assert float(d["sv_min"]) == pytest.approx(float(s[j].min()), rel=1e-5)
        assert float(d["sv_max"]) == pytest.approx(float(s[j].max()), rel=1e-5)
    assert max(float(d["orth_err"]) for d in diags) > 1e-2  # the quintic does not reach the manifold


# ----------------------------------------------------------------------------- LRs


def test_lr_multipliers_scale_the_step():
    base = _mlp(seed=3)
    half = copy.deepcopy(base)
    o1 = optim.build("baseline_muon", base, lr=0.02, adamw_lr=0.01)
    o2 = optim.build("baseline_muon", half, lr=0.02, adamw_lr=0.01,
                     roles={"hidden": {"lr_mult": 0.5}, "output": {"lr_mult": 0.25}})
    assert {g["role"]: g["lr"] for g in o2.param_groups if g["role"] in ("hidden", "output")} == {"hidden": 0.01, "output": 0.0025}
    w0, h0 = base.hidden.weight.detach().clone(), base.head.weight.detach().clone()
    for m, o in ((base, o1), (half, o2)):
        x, y = _batch()
        o.zero_grad()
        _loss(m, x, y).backward()
        o.step()
    # Muon's step is linear in the LR (no weight decay); AdamW's first step is lr * sign-like, also linear
    assert torch.allclose(half.hidden.weight - w0, 0.5 * (base.hidden.weight - w0), atol=1e-7)
    assert torch.allclose(half.head.weight - h0, 0.25 * (base.head.weight - h0), atol=1e-7)
    assert torch.equal(half.input.weight, base.input.weight)


def test_param_groups_are_shared_with_the_inner_optimizers():
    model = _mlp()
    opt = optim.build("muon", model, lr=0.02)
    assert all(any(g is h for h in opt.muon.param_groups + opt.adamw.param_groups) for g in opt.param_groups)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(model, opt, 1)
    sched.step()
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.01)
    assert opt.adamw.param_groups[0]["lr"] == pytest.approx(0.0015)


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("preset", ["full_modular", "modular_sphere", "muon"])
def test_state_dict_round_trip_resumes_bitwise(preset):
    model = _mlp()
    opt = optim.build(preset, model, lr=0.02, weight_decay=0.01)
    _train(model, opt, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, 3, seed=10)
    other = _mlp(seed=5)
    other.load_state_dict(saved_model)
    opt2 = optim.build(preset, other, lr=0.02, weight_decay=0.01)  # construction projects; the loaded weights already are
    opt2.load_state_dict(saved_opt)
    other.load_state_dict(saved_model)
    _train(other, opt2, 3, seed=10)
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- rho controller


def test_proposed_step_is_the_step_taken_and_rho_wraps_it():
    model = _mlp()
    opt = optim.build("muon", model, lr=0.02, weight_decay=0.1)
    x, y = _batch()
    opt.zero_grad()
    _loss(model, x, y).backward()
    lr0 = opt.param_groups[0]["lr"]
    params, us = opt.proposed_step(commit=False, weights=[g["lr"] / lr0 for g in opt.param_groups])
    before = [p.detach().clone() for p in params]
    opt.step()
    for p, b, u in zip(params, before, us):
        assert torch.allclose(p - b, -lr0 * u, atol=1e-6, rtol=1e-4)


def test_rho_capped_around_a_modular_preset_keeps_the_constraint():
    model = _mlp()
    ctl = optim.build("modular_sphere", model, lr=0.02, rho={"mode": "capped", "r_target": 1.0})
    for t in range(3):
        x, y = _batch(t)
        ctl.zero_grad()
        _loss(model, x, y).backward()
        stats = ctl.step(x)
        assert torch.isfinite(stats["r"])
    assert torch.allclose(model.input.weight.detach().norm(dim=1), torch.ones(16), atol=1e-6)


# ----------------------------------------------------------------------------- own loop, config


@pytest.mark.parametrize("preset", ["full_modular", "modular_sphere", "baseline_muon"])
def test_a_preset_trains_a_tiny_model_in_a_users_loop(preset):
    model = _mlp()
    opt = optim.build(preset, model, lr=0.02, adamw_lr=0.003)
    x, y = _batch()
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("opts, key", [
    ({"ns_steps": 4}, "ns_steps"), ({"ns": "cubic"}, "ns"), ({"stiefel": "svd"}, "stiefel"),
    ({"roles": {"hidden": {"optimizer": "sgd"}}}, "roles.hidden.optimizer"),
    ({"roles": {"bias_norm": {"constraint": "sphere"}}}, "roles.bias_norm"),
    ({"roles": {"embedding": {}}}, "roles"), ({"momentum": 1.0}, "momentum"), ({"nesterovv": True}, "nesterovv"),
])
def test_optimizer_options_are_validated_in_one_line(opts, key):
    with pytest.raises(ConfigError) as e:
        make_run({"optimizer": "modular_sphere", "optimizer_options": opts, "lr": 0.02})
    msg = str(e.value)
    assert "\n" not in msg and key in msg and "allowed" in msg


def test_headline_accepts_every_preset_name():
    params = paramfiles.read("params.yaml")
    for name in PRESETS:
        cfg = resolve_run({**params, "optimizer": name})  # what `dvc exp run -S optimizer=<name>` resolves
        assert cfg.optimizer == name and cfg.lr == params["default_lr"][name]


# ----------------------------------------------------------------------------- gpt_modern


def test_gpt_modern_structure():
    m = _gpt()
    named = dict(m.named_parameters())
    assert m.param_roles()["wte.weight"] == "input" and "output" not in m.param_roles().values()
    assert not any(n.endswith("bias") for n in named)
    assert not any(isinstance(x, (nn.LayerNorm, nn.Embedding)) and x is not m.wte for x in m.modules())
    assert named["blocks.0.attn.qkv.weight"].shape == (48, 16)  # fused qkv
    idx = torch.randint(0, 11, (3, 8))
    # tied: the logits are the final features times wte^T, and the head's gradient lands on wte
    feats = {}
    h = m.norm_f.register_forward_hook(lambda mod, i, o: feats.setdefault("x", o))
    logits = m(idx)
    h.remove()
    assert torch.allclose(logits, feats["x"] @ m.wte.weight.T, atol=1e-6)
    # RMSNorm against torch's own implementation
    norm = m.blocks[0].norm1
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 16)
    assert torch.allclose(norm(x), F.rms_norm(x, (16,), norm.weight, eps=norm.eps), atol=1e-6)
    # SwiGLU: down(silu(gate x) * up x)
    ffn = m.blocks[1].ffn
    want = (F.silu(x @ ffn.gate.weight.T) * (x @ ffn.up.weight.T)) @ ffn.down.weight.T
    assert torch.allclose(ffn(x), want, atol=1e-6)
    # the tied matrix is one parameter with one role and one optimizer
    opt = optim.build("modular_sphere", m, lr=0.02)
    groups = [g for g in opt.param_groups if any(p is m.wte.weight for p in g["params"])]
    assert len(groups) == 1 and groups[0]["role"] == "input"
    assert torch.allclose(m.wte.weight.norm(dim=1), torch.ones(11), atol=1e-6)


@pytest.mark.parametrize("preset", ["full_modular", "muon"])
def test_engine_resume_with_a_preset_matches_uninterrupted(tmp_path, preset):
    """Through the engine's checkpoints: killed mid-run, resumed, the same metrics and curves."""
    from optlab import engine
    from optlab.config import RunConfig
    from tests.conftest import make_splits
    from conftest import KillAt, comparable

    def cfg(**kw):
        base = dict(optimizer=preset, lr=0.02, depth=3, width=16, epochs=4, batch_size=32, log_every=3,
                    checkpoint_every=5, device="cpu", run_id="r", probes={"grad_norm": {"every": 4}})
        return RunConfig(**{**base, **kw})

    data = make_splits()
    ref = engine.train(cfg(checkpoint_every=0), data=data, progress=False)
    with pytest.raises(KeyboardInterrupt):
        engine.train(cfg(), data=data, sinks=[KillAt(13)], checkpoint_dir=tmp_path, progress=False)
    assert sorted(tmp_path.glob("r-*/step-*.pt"))
    resumed = engine.train(cfg(), data=data, checkpoint_dir=tmp_path, progress=False)
    assert ref.status == "completed" and comparable(resumed) == comparable(ref)


def test_conv_kernels_are_out_by_fan_in_matrices():
    """Muon on a 4-D kernel: NS of the (out, in*kh*kw) matrix, scaled by sqrt(max(1, out / (in*kh*kw)));
    the sphere puts each filter (not each kernel row) on the unit sphere."""
    from optlab.optim.muon import newton_schulz

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 2, bias=False), nn.Tanh(), nn.Flatten(), nn.Linear(16 * 9, 3, bias=False))
    with pytest.warns(UserWarning):
        opt = optim.build("muon", net, lr=0.02, roles={"input": {"optimizer": "muon"}})
    w0 = net[0].weight.detach().clone()
    net(torch.randn(5, 1, 4, 4)).square().sum().backward()
    g = net[0].weight.grad.detach().clone()
    opt.step()
    u = g.lerp(torch.zeros_like(g).lerp_(g, 1 - 0.95), 0.95)  # Nesterov momentum at the first step
    want = -0.02 * 2.0 * newton_schulz(u.reshape(16, 4)).float().reshape(g.shape)  # sqrt(16 / 4) = 2
    assert torch.allclose(net[0].weight - w0, want, atol=1e-6)
    with pytest.warns(UserWarning):
        sph = optim.build("modular_sphere", net, lr=0.02)
    assert torch.allclose(net[0].weight.detach().reshape(16, -1).norm(dim=1), torch.ones(16), atol=1e-6)
    assert [d["name"] for d in sph.constraint_diagnostics()] == ["0.weight"]
