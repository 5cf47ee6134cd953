"""Library use in a user's own loop: the README example runs as written, every optimizer from
``optim.build`` is a ``torch.optim.Optimizer`` that schedulers, ``state_dict`` and ``torch.save``
accept, ``optim.build`` takes any ``nn.Module``, and models build with sensible defaults."""

from __future__ import annotations

import copy
import io
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from optlab import models, optim
from optlab.optim.projected import Projected
from optlab.optim.rho import RhoController
from optlab.optim.spectral import SpectralProjection

ROOT = Path(__file__).resolve().parents[1]
SECTION = "### Use it in your own loop"


def _readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    assert SECTION in text, "README has no 'Use it in your own loop' section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_own_loop_example_runs(tmp_path, monkeypatch, capsys):
    blocks = _readme_blocks()
    assert blocks, "the section has no python code block"
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match=r"Sequential has no param_roles\(\).*0\.weight, 2\.weight"):
        for code in blocks:
            exec(compile(code, "README.md:own-loop", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "rho " in out and "torch.Size([2, 10])" in out
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert set(saved["opt"]) == {"inner", "projections", "active_steps"}


def _mlp(scale: float = 4.0) -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(scale)  # spectral norms well above 1, so the projection binds
    return m


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    x, y = _batch()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _build_quiet(name: str, model: nn.Module, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return optim.build(name, model, **kw)


@pytest.mark.parametrize("name", ["sgd", "sgd_momentum", "adam", "adamw", "sgd_sn"])
def test_every_built_optimizer_is_a_torch_optimizer(name):
    model = _mlp()
    opt = _build_quiet(name, model, lr=0.1)
    assert isinstance(opt, torch.optim.Optimizer)
    rho = _build_quiet(name, model, lr=0.1, rho={"mode": "capped"})
    assert isinstance(rho, torch.optim.Optimizer) and isinstance(rho, RhoController)
    rho.close()


def test_sequential_with_sgd_sn_warns_once_and_ends_at_spectral_norm_one():
    model = _mlp()
    assert all(torch.linalg.matrix_norm(m.weight.detach(), ord=2) > 1.5 for m in (model[0], model[2]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = optim.build("sgd_sn", model, lr=0.1)
    notes = [w for w in caught if "param_roles" in str(w.message)]
    assert len(notes) == 1 and len(str(notes[0].message).splitlines()) == 1
    assert "0.weight, 2.weight" in str(notes[0].message) and "bias_norm" in str(notes[0].message)
    _train(model, opt, 1)
    for m in (model[0], model[2]):
        assert torch.linalg.matrix_norm(m.weight.detach(), ord=2).item() <= 1 + 1e-5
    assert opt.active_steps >= 1


def test_plain_optimizers_on_a_sequential_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for name in ("sgd", "adam"):
            optim.build(name, _mlp(), lr=0.1)


def test_inferred_roles_rule():
    model = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Linear(5, 5), nn.Linear(5, 2))
    assert models.infer_roles(model) == {
        "0.weight": "input", "0.bias": "bias_norm", "1.weight": "bias_norm", "1.bias": "bias_norm",
        "2.weight": "hidden", "2.bias": "bias_norm", "3.weight": "output", "3.bias": "bias_norm"}
    # sn_roles selects by the inferred roles: only the hidden matrix is projected
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt = optim.build("sgd_sn", model, lr=0.1, sn_roles=("hidden",))
    assert [p for g in opt.projections[0].groups for p in g] == [model[2].weight]
    # the models' own roles are used unchanged where they exist
    mlp = models.build("mlp", input_dim=5, n_classes=3, depth=2, width=4)
    assert models.roles_of(mlp) == mlp.param_roles()


def test_sequential_conv_needs_matrix_form_and_works_with_it():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ValueError, match=r"conv_specs\(\).*sn_conv='matrix'"):
            optim.build("sgd_sn", model, lr=0.1)
        opt = optim.build("sgd_sn", model, lr=0.1, sn_conv="matrix")
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert torch.linalg.matrix_norm(model[0].weight.detach().reshape(4, -1), ord=2) <= 1 + 1e-5
    assert torch.linalg.matrix_norm(model[2].weight.detach(), ord=2) <= 1 + 1e-5


def test_projected_shares_the_inner_optimizers_groups_state_and_grads():
    model = _mlp()
    opt = _build_quiet("sgd_sn", model, lr=0.1)
    assert isinstance(opt, Projected)
    assert opt.param_groups is opt.inner.param_groups and opt.state is opt.inner.state
    assert opt.defaults is opt.inner.defaults
    _train(model, opt, 1)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    opt.param_groups[0]["lr"] = 0.03
    assert opt.inner.param_groups[0]["lr"] == 0.03


def test_step_lr_reaches_the_inner_optimizer():
    model = _mlp()
    opt = _build_quiet("sgd_sn", model, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 10)
    lrs = []
    for _ in range(25):
        _train(model, opt, 1)
        sched.step()
        lrs.append(opt.inner.param_groups[0]["lr"])
    assert lrs[8] == pytest.approx(0.1) and lrs[9] == pytest.approx(0.01) and lrs[19] == pytest.approx(0.001)


def test_step_hooks_run_around_the_whole_step():
    model = _mlp()
    opt = _build_quiet("sgd_sn", model, lr=5.0)  # a large step leaves the ball; the projection brings it back
    seen = []
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(
        torch.linalg.matrix_norm(model[0].weight.detach(), ord=2).item()))
    pre = []
    opt.register_step_pre_hook(lambda o, args, kwargs: pre.append(o is opt))
    _train(model, opt, 3)
    assert pre == [True] * 3 and len(seen) == 3 and max(seen) <= 1 + 1e-5


def test_projected_state_dict_round_trip_through_torch_save():
    a_model = _mlp()
    a = _build_quiet("sgd_sn", a_model, lr=0.1, sn_mode="scale", sn_sigma="power", sn_power_iters=2)
    _train(a_model, a, 3)
    buf = io.BytesIO()
    torch.save({"model": a_model.state_dict(), "opt": a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert set(saved["opt"]) == {"inner", "projections", "active_steps"}  # the format engine checkpoints hold
    b_model = _mlp(scale=1.0)
    b = _build_quiet("sgd_sn", b_model, lr=0.1, sn_mode="scale", sn_sigma="power", sn_power_iters=2)  # projects at construction
    b_model.load_state_dict(saved["model"])  # then the checkpoint, as a resume does
    b.load_state_dict(saved["opt"])
    assert b.active_steps == a.active_steps
    _train(a_model, a, 2)
    _train(b_model, b, 2)
    for pa, pb in zip(a_model.parameters(), b_model.parameters()):
        assert torch.equal(pa, pb)


def test_projected_deepcopy_keeps_its_inner_optimizer():
    w = nn.Parameter(torch.randn(5, 4) * 3)
    opt = Projected(torch.optim.SGD([w], lr=0.1), [SpectralProjection([w], mode="scale", sigma="exact")])
    twin = copy.deepcopy(opt)
    assert isinstance(twin.inner, torch.optim.SGD) and len(twin.projections) == 1
    assert twin.param_groups is twin.inner.param_groups and twin.param_groups is not opt.param_groups


def test_rho_controller_with_a_scheduler_and_a_checkpoint():
    model = _mlp(scale=1.0)
    opt = optim.build("sgd", model, lr=0.5, rho={"mode": "capped", "r_target": 1.0})
    assert opt.param_groups is opt.base.param_groups and opt.state is opt.base.state
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5)
    etas = []
    x, y = _batch()
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        stats = opt.step()
        sched.step()
        etas.append(float(stats["eta_eff"]))
    assert opt.base.param_groups[0]["lr"] == pytest.approx(0.125)
    assert all(e <= lr + 1e-7 for e, lr in zip(etas, [0.5, 0.5, 0.25, 0.25]))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert set(state) == {"base", "rho"}
    again = optim.build("sgd", model, lr=0.5, rho={"mode": "capped", "r_target": 1.0})
    again.load_state_dict(state)
    assert again.base.param_groups[0]["lr"] == pytest.approx(0.125)
    assert torch.equal(again.totals(), opt.totals())
    opt.close()
    again.close()


# ---------------------------------------------------------------- model defaults


def test_resnet18_defaults_to_cifar10():
    m = models.build("resnet18")
    assert m.input_shape == (3, 32, 32) and m.width == 64 and m.conv1.out_channels == 64
    m.eval()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_mlp_defaults_match_explicit_arguments():
    torch.manual_seed(0)
    m = models.build("mlp")
    torch.manual_seed(0)
    explicit = models.build("mlp", **models.MLP_DEFAULTS)
    assert m.depth == 16 and m.width == 64 and m(torch.randn(2, 784)).shape == (2, 10)
    for (n, p), (n2, p2) in zip(m.named_parameters(), explicit.named_parameters()):
        assert n == n2 and torch.equal(p, p2)


@pytest.mark.parametrize("arch", ["cnn", "vit"])
def test_image_models_default_to_cifar10(arch):
    m = models.build(arch).eval()
    assert m(torch.randn(2, 3 * 32 * 32)).shape == (2, 10)


def test_explicit_shapes_still_win_and_gpt_still_needs_its_sizes():
    assert models.build("resnet18", input_shape=(1, 8, 8), n_classes=4, width=8).input_shape == (1, 8, 8)
    assert models.build("cnn", input_dim=64, in_channels=1, n_classes=3, width=4).input_shape == (1, 8, 8)
    with pytest.raises(ValueError, match="needs input_shape"):
        models.build("resnet18", input_dim=64)  # half a shape is still an error, not a silent default
    with pytest.raises(ValueError, match="missing required argument"):
        models.build("gpt")
