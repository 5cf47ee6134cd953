"""GPT: shapes, causality, roles, init, a hand-written attention reference, and overfitting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from optlab import models
from optlab.models.gpt import GPT, GPTConfig


def tiny(**kw) -> GPT:
    cfg = dict(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16) | kw
    return models.build("gpt", **cfg)


def test_output_shape_and_block_size_limit() -> None:
    torch.manual_seed(0)
    m = tiny()
    idx = torch.randint(0, 11, (3, 16))
    assert m(idx).shape == (3, 16, 11)
    assert m(idx[:, :5]).shape == (3, 5, 11)
    assert m(idx.int()).shape == (3, 16, 11)
    with pytest.raises(ValueError, match="exceeds block_size 16"):
        m(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("bias", [False, True])
def test_param_roles_cover_every_parameter(bias: bool) -> None:
    m = tiny(bias=bias, n_layer=3)
    roles = m.param_roles()
    assert set(roles) == {n for n, _ in m.named_parameters()}  # models.build also checks this
    assert roles["wte.weight"] == roles["wpe.weight"] == "input"
    assert roles["lm_head.weight"] == "output"
    for i in range(3):
        for w in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"):
            assert roles[f"blocks.{i}.{w}.weight"] == "hidden"
            if bias:
                assert roles[f"blocks.{i}.{w}.bias"] == "bias_norm"
        assert roles[f"blocks.{i}.ln1.weight"] == roles[f"blocks.{i}.ln2.weight"] == "bias_norm"
    assert roles["ln_f.weight"] == "bias_norm"
    # every parameter has exactly one role: lm_head is not tied to the embedding
    ptrs = [p.data_ptr() for p in m.parameters()]
    assert len(ptrs) == len(set(ptrs))
    n_bias_norm = sum(1 for r in roles.values() if r == "bias_norm")
    assert n_bias_norm == (2 * 3 + 1) * (2 if bias else 1) + (4 * 3 + 1 if bias else 0)
    # every hidden/input/output parameter is a matrix; the fused qkv is one (3C, C) matrix
    assert all(p.dim() == 2 for n, p in m.named_parameters() if roles[n] != "bias_norm")
    assert m.blocks[0].attn.qkv.weight.shape == (48, 16)


def test_build_rejects_unknown_and_bad_kwargs() -> None:
    with pytest.raises(ValueError, match=r"unexpected argument\(s\) input_dim, n_classes; allowed: vocab_size"):
        models.build("gpt", vocab_size=5, block_size=4, input_dim=3, n_classes=2)
    with pytest.raises(ValueError, match="missing required argument.*block_size"):
        models.build("gpt", vocab_size=5)
    with pytest.raises(ValueError, match="divisible by n_head"):
        models.build("gpt", vocab_size=5, block_size=4, n_embd=10, n_head=4)
    with pytest.raises(ValueError, match="n_layer must be a positive int"):
        models.build("gpt", vocab_size=5, block_size=4, n_layer=0)
    assert "gpt" in models.arch_names()


def test_init_statistics() -> None:
    torch.manual_seed(0)
    L = 6
    m = GPT(GPTConfig(vocab_size=512, block_size=256, n_layer=L, n_head=4, n_embd=128))
    assert m.wte.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert m.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.03)
    proj = torch.cat([torch.cat([b.attn.proj.weight.flatten(), b.mlp.proj.weight.flatten()]) for b in m.blocks])
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.03)
    assert torch.equal(m.ln_f.weight, torch.ones(128))


def test_causal_masking_is_exact() -> None:
    """Changing token t changes no logit at positions < t (bitwise)."""
    torch.manual_seed(0)
    m = tiny().eval()
    idx = torch.randint(0, 11, (2, 16))
    base = m(idx)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 11
        out = m(changed)
        assert torch.equal(out[:, :t], base[:, :t])
        assert not torch.equal(out[:, t], base[:, t])


def _reference_block(block: torch.nn.Module, x: torch.Tensor, n_head: int) -> torch.Tensor:
    """One pre-LN block written out: explicit masked softmax attention, heads as a loop."""
    B, T, C = x.shape
    hd = C // n_head
    attn = block.attn
    h = F.layer_norm(x, (C,), block.ln1.weight, block.ln1.bias)
    W = attn.qkv.weight  # rows: [q; k; v], each (C, C), heads contiguous inside each
    bq = attn.qkv.bias if attn.qkv.bias is not None else torch.zeros(3 * C, dtype=x.dtype)
    q = h @ W[:C].T + bq[:C]
    k = h @ W[C : 2 * C].T + bq[C : 2 * C]
    v = h @ W[2 * C :].T + bq[2 * C :]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    heads = []
    for i in range(n_head):
        sl = slice(i * hd, (i + 1) * hd)
        scores = q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(hd)
        scores = scores.masked_fill(~mask, float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v[..., sl])
    y = torch.cat(heads, dim=-1) @ attn.proj.weight.T
    if attn.proj.bias is not None:
        y = y + attn.proj.bias
    x = x + y
    h2 = F.layer_norm(x, (C,), block.ln2.weight, block.ln2.bias)
    mlp = block.mlp
    u = h2 @ mlp.fc.weight.T + (mlp.fc.bias if mlp.fc.bias is not None else 0)
    u = 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))  # exact GELU
    u = u @ mlp.proj.weight.T + (mlp.proj.bias if mlp.proj.bias is not None else 0)
    return x + u


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("bias", [False, True])
def test_block_matches_handwritten_attention(dtype: torch.dtype, tol: float, bias: bool) -> None:
    """Forward and every gradient (input and parameters) agree with the hand-written reference."""
    torch.manual_seed(0)
    m = tiny(n_embd=24, n_head=3, bias=bias).to(dtype)
    for p in m.parameters():  # move LayerNorm/bias parameters away from their 1/0 init
        with torch.no_grad():
            p.add_(0.1 * torch.randn_like(p))
    block = m.blocks[0]
    x = torch.randn(2, 9, 24, dtype=dtype)
    g = torch.randn(2, 9, 24, dtype=dtype)

    def run(fn):
        xx = x.clone().requires_grad_(True)
        out = fn(xx)
        params = list(block.parameters())
        grads = torch.autograd.grad((out * g).sum(), [xx, *params])
        return out.detach(), grads

    out, grads = run(block)
    ref, ref_grads = run(lambda xx: _reference_block(block, xx, 3))
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    m = tiny(dropout=0.5)
    idx = torch.randint(0, 11, (2, 16))
    m.eval()
    assert torch.equal(m(idx), m(idx))
    m.train()
    assert not torch.equal(m(idx), m(idx))


def test_overfits_a_repeated_string() -> None:
    """A tiny model memorizes a periodic character stream: loss < 0.1 nats/token."""
    torch.manual_seed(0)
    text = "the quick brown fox jumps over the lazy dog. " * 20
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    T = 32
    m = models.build("gpt", vocab_size=len(chars), block_size=T, n_layer=2, n_head=2, n_embd=32)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    ar = torch.arange(T + 1)
    for step in range(300):
        off = torch.randint(0, data.numel() - T, (16,), generator=g)
        win = data[off[:, None] + ar]
        loss = F.cross_entropy(m(win[:, :-1]).reshape(-1, len(chars)), win[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.1, loss.item()
