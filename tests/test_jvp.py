"""Forward-mode derivatives: every model under torch.func.jvp (``models.jvp_outputs``), checked
against central finite differences in float64; buffers, parameters and train flags untouched;
the primal equals the plain eval forward; ordinary training never takes the JVP paths."""

from __future__ import annotations

from typing import Callable

import pytest

from conftest import one_thread_fixture
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad
from torch.func import functional_call

from optlab import models
from optlab.models import gpt as gpt_module
from optlab.models import mlp as mlp_module
from optlab.models.gpt import causal_attention


def _mlp(**kw) -> tuple[nn.Module, torch.Tensor]:
    cfg = dict(input_dim=6, n_classes=4, depth=3, width=8, activation="tanh") | kw
    return models.build("mlp", **cfg), torch.randn(5, 6)


def _resnet(**kw) -> tuple[nn.Module, torch.Tensor]:
    m = models.build("resnet18", **(dict(input_dim=64, n_classes=3, input_shape=(1, 8, 8), width=4) | kw))
    x = torch.randn(4, 64)
    if kw.get("batch_norm", True):
        with torch.no_grad():  # running statistics away from their 0/1 start
            m.train()
            for _ in range(2):
                m(torch.randn(4, 64) * 2 + 0.5)
    return m, x


def _gpt(**kw) -> tuple[nn.Module, torch.Tensor]:
    cfg = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, dropout=0.1) | kw
    return models.build("gpt", **cfg), torch.randint(0, 11, (2, 8))


one_thread = pytest.fixture(autouse=True)(one_thread_fixture)


CASES: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    "mlp-depth1": lambda: _mlp(depth=1),
    "mlp-gelu": lambda: _mlp(activation="gelu"),
    "mlp-ckpt2": lambda: _mlp(depth=4, checkpoint_segments=2),
    "resnet-bn": lambda: _resnet(),
    "resnet-nobn": lambda: _resnet(batch_norm=False),
    "resnet-plain-bn": lambda: _resnet(residual=False),
    "gpt": lambda: _gpt(),
    "gpt-bias": lambda: _gpt(bias=True),
    "gpt_modern": lambda: (models.build("gpt_modern", vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8),
                           torch.randint(0, 11, (2, 8))),
}


def _make(case: str, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    m, x = CASES[case]()
    m = m.to(dtype)
    with torch.no_grad():  # move LayerNorm/BN/bias parameters away from their 1/0 init
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.train(), (x.to(dtype) if x.is_floating_point() else x)


def _direction(m: nn.Module, names: list[str] | None = None, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(p.shape, generator=g, dtype=p.dtype)
        for n, p in m.named_parameters()
        if names is None or n in names
    }


def _central_difference(m: nn.Module, x: torch.Tensor, t: dict[str, torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
    """(f(theta + eps t) - f(theta - eps t)) / (2 eps), eval mode, parameters not modified."""
    was = m.training
    m.eval()
    own = dict(m.named_parameters())
    with torch.no_grad():
        f = [
            functional_call(m, {n: p + s * eps * t[n] if n in t else p for n, p in own.items()}, (x,))
            for s in (1.0, -1.0)
        ]
    m.train(was)
    return (f[0] - f[1]) / (2 * eps)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in [*m.named_parameters(), *m.named_buffers()]}


@pytest.mark.parametrize("case", list(CASES))
def test_jvp_matches_central_difference(case: str) -> None:
    m, x = _make(case)
    t = _direction(m)
    out, dout = models.jvp_outputs(m, x, t)
    fd = _central_difference(m, x, t)
    assert dout.shape == out.shape and dout.norm() > 0
    assert _rel(dout, fd) < 1e-6
    # the check can fail: another direction, or a scaled one, is far off
    assert _rel(dout, _central_difference(m, x, _direction(m, seed=2))) > 1e-2
    assert _rel(2 * dout, fd) > 0.5


@pytest.mark.parametrize("case", ["mlp-ckpt2", "resnet-bn", "gpt"])
def test_subset_of_tangents_and_evaluation_point(case: str) -> None:
    """Missing names are zero tangents; ``params`` moves the point of evaluation."""
    m, x = _make(case)
    names = [n for n, _ in m.named_parameters()]
    some = names[::3]
    t = _direction(m, some)
    _, dout = models.jvp_outputs(m, x, t)
    assert _rel(dout, _central_difference(m, x, t)) < 1e-6
    assert _rel(dout, _central_difference(m, x, _direction(m))) > 1e-2

    own = dict(m.named_parameters())
    moved = {n: own[n].detach() + 0.1 * d for n, d in _direction(m, names[1::2], seed=3).items()}
    out, dout = models.jvp_outputs(m, x, t, params=moved)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(out, functional_call(m, {**own, **moved}, (x,)), rtol=1e-12, atol=1e-12)
        plus = functional_call(m, {**own, **moved, **{n: (moved.get(n, own[n]) + 1e-6 * d) for n, d in t.items()}}, (x,))
        minus = functional_call(m, {**own, **moved, **{n: (moved.get(n, own[n]) - 1e-6 * d) for n, d in t.items()}}, (x,))
    assert _rel(dout, (plus - minus) / 2e-6) < 1e-6


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("train", [True, False])
def test_state_untouched_and_primal_is_the_eval_forward(case: str, train: bool) -> None:
    m, x = _make(case)
    m.train(train)
    before = _state(m)
    out, _ = models.jvp_outputs(m, x, _direction(m))
    assert m.training == train and all(mod.training == train for mod in m.modules())
    after = _state(m)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not out.requires_grad
    m.eval()
    with torch.no_grad():
        ref = m(x)
        if case.startswith("gpt"):  # explicit attention under jvp, SDPA in the plain forward
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
            for blk in m.blocks:
                blk.attn.explicit_attention = True
            ref = m(x)
    assert torch.equal(out, ref)


def test_mixed_train_flags_are_restored_per_module() -> None:
    m, x = _make("resnet-bn")
    m.layer2.eval()
    flags = [mod.training for mod in m.modules()]
    models.jvp_outputs(m, x, _direction(m))
    assert [mod.training for mod in m.modules()] == flags


def test_float32_agrees_with_float64() -> None:
    for case in ("mlp-ckpt2", "resnet-bn", "gpt"):
        m64, x64 = _make(case)
        m32, x32 = _make(case, torch.float32)
        m32.load_state_dict(m64.state_dict())
        t64 = _direction(m64)
        _, d64 = models.jvp_outputs(m64, x64, t64)
        _, d32 = models.jvp_outputs(m32, x32, {n: v.float() for n, v in t64.items()})
        assert d32.dtype == torch.float32 and _rel(d32.double(), d64) < 1e-4, case


@pytest.mark.parametrize("case", ["mlp-ckpt2", "gpt"])
def test_forward_ad_dual_tensors_agree_with_torch_func(case: str) -> None:
    """torch.autograd.forward_ad (dual tensors) takes the same JVP paths as torch.func.jvp."""
    m, x = _make(case)
    t = _direction(m)
    _, dout = models.jvp_outputs(m, x, t)
    m.eval()
    with torch.no_grad(), forward_ad.dual_level():
        duals = {n: forward_ad.make_dual(p.detach(), t[n]) for n, p in m.named_parameters()}
        tangent = forward_ad.unpack_dual(functional_call(m, duals, (x,))).tangent
    torch.testing.assert_close(tangent, dout, rtol=1e-12, atol=1e-12)


def test_no_tangents_and_unknown_names() -> None:
    m, x = _make("mlp-depth1")
    out, dout = models.jvp_outputs(m, x, {})
    assert torch.equal(dout, torch.zeros_like(out))
    with pytest.raises(ValueError, match="unknown parameter name"):
        models.jvp_outputs(m, x, {"hidden.wieght": torch.zeros(1, 8, 8, dtype=torch.float64)})
    with pytest.raises(ValueError, match="unknown parameter name"):
        models.jvp_outputs(m, x, {}, params={"nope": torch.zeros(1)})


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-14)])
def test_explicit_attention_equals_sdpa(dtype: torch.dtype, tol: float) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 4, generator=g, dtype=dtype, requires_grad=True) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = causal_attention(q, k, v)
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    w = torch.randn(ref.shape, generator=g, dtype=dtype)
    for a, b in zip(torch.autograd.grad((got * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=10 * tol, atol=10 * tol)
    m, idx = _make("gpt")
    m.eval()
    with torch.no_grad():
        sdpa = m(idx)
        for blk in m.blocks:
            blk.attn.explicit_attention = True
        torch.testing.assert_close(m(idx), sdpa, rtol=1e-12, atol=1e-12)


def test_training_never_takes_the_jvp_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ordinary train/eval forwards and backward use the custom MLP function and SDPA."""

    def refuse(*_a, **_k):
        raise AssertionError("JVP path taken outside forward-mode AD")

    monkeypatch.setattr(mlp_module.DeepMLP, "forward_autograd", refuse)
    monkeypatch.setattr(gpt_module, "causal_attention", refuse)
    for case in ("mlp-ckpt2", "gpt"):
        m, x = _make(case, torch.float32)
        for train in (True, False):
            m.train(train)
            m(x).square().sum().backward()


def test_training_forward_evaluates_each_parametrization_once():
    """The forward-mode check must not evaluate a parametrized weight (spectral_norm's power
    iteration updates its vectors on every evaluation, so an extra one changes training)."""
    from torch.nn.utils import parametrize

    calls = {"n": 0}

    class Count(nn.Module):
        def forward(self, w):
            calls["n"] += 1
            return w

    m = models.build("mlp", input_dim=6, n_classes=3, depth=2, width=5)
    parametrize.register_parametrization(m.input, "weight", Count())
    m.train()
    calls["n"] = 0  # registration evaluates it once
    m(torch.randn(4, 6)).sum().backward()
    assert calls["n"] == 1
