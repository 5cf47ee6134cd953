"""``gpt_modern``: the GPT variant of the modular-manifolds study (RMSNorm, SwiGLU, no biases,
fused qkv, tied input/output embedding, rotary positions).

    tokens -> wte -> n_layer x Block -> RMSNorm -> x @ wte^T -> logits [B, T, vocab]
    Block:  x = x + attn(norm1(x));  x = x + ffn(norm2(x))          (pre-norm)

- **RMSNorm** (:class:`RMSNorm`): ``x / sqrt(mean(x^2) + eps) * g``, a learned gain, no bias,
  written out (so it runs under ``torch.func.jvp`` and forward-mode AD).
- **SwiGLU** feed-forward: ``down(silu(gate(x)) * up(x))``, hidden size ``ffn_hidden`` (default
  ``8/3 * n_embd`` rounded up to a multiple of 16, so the feed-forward has about the parameters of a
  4x GELU MLP). ``gate`` and ``up`` are separate matrices (same shape: one batched Muon/Stiefel call).
- **No biases** anywhere.
- **Fused qkv**: one ``(3*n_embd, n_embd)`` matrix, as in :mod:`optlab.models.gpt` (a per-matrix
  method treats q, k and v as one matrix).
- **Positions**: rotary embeddings on q and k (no parameters), so the token embedding is the only
  input matrix.
- **Tied embedding**: the logits are ``x @ wte.weight^T``; there is no separate head parameter. The
  shared matrix appears once in ``named_parameters()`` (``wte.weight``) and has **one role,
  ``input``** (our choice: the study's hypothesis is about embeddings, "hypersphere on embeddings").
  So in the modular presets it gets the input role's optimizer and constraint (AdamW + unit-row
  sphere in ``modular_sphere`` and ``full_modular``, Muon in ``baseline_muon`` and
  ``modular_stiefel``, AdamW in ``baseline_adamw`` and ``muon``); the ``output`` role is empty.
- Roles: ``wte.weight`` -> ``input``; every block's ``attn.qkv``, ``attn.proj``, ``ffn.gate``,
  ``ffn.up``, ``ffn.down`` -> ``hidden``; RMSNorm gains -> ``bias_norm``. By module type.
- Init: linear and embedding weights ~ N(0, 0.02); the residual projections (``attn.proj``,
  ``ffn.down``) ~ N(0, 0.02 / sqrt(2 n_layer)); gains 1.
- Attention: SDPA with ``is_causal=True``, or written out (:func:`optlab.models.gpt.causal_attention`)
  under forward-mode AD, as in :mod:`optlab.models.gpt`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .functional import forward_ad_active
from .gpt import causal_attention


@dataclass
class GPTModernConfig:
    vocab_size: int
    block_size: int
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    ffn_hidden: int = 0  # 0: 8/3 * n_embd rounded up to a multiple of 16
    rope_base: float = 10000.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"gpt_modern: {name} must be a positive int, got {v!r}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"gpt_modern: n_embd={self.n_embd} must be divisible by n_head={self.n_head} "
                             f"with an even head size (rotary pairs)")
        if isinstance(self.ffn_hidden, bool) or not isinstance(self.ffn_hidden, int) or self.ffn_hidden < 0:
            raise ValueError(f"gpt_modern: ffn_hidden must be an int >= 0, got {self.ffn_hidden!r}")
        if self.ffn_hidden == 0:
            self.ffn_hidden = 16 * math.ceil(8 * self.n_embd / 3 / 16)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2, -1) + eps) * weight`` (learned gain, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (first half, second half) of the last dimension of ``x`` [B, H, T, D] by the angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    explicit_attention: bool = False

    def __init__(self, cfg: GPTModernConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        if self.explicit_attention or (not torch.compiler.is_compiling() and forward_ad_active(q, k, v)):
            y = causal_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, cfg: GPTModernConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.up = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: GPTModernConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.ffn = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.ffn(self.norm2(x))


class GPTModern(nn.Module):
    """``forward(idx [B, T] int) -> logits [B, T, vocab_size]`` (see the module docstring)."""

    def __init__(self, cfg: GPTModernConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.n_embd, cfg.norm_eps)
        hd = cfg.n_embd // cfg.n_head
        inv = cfg.rope_base ** (-torch.arange(0, hd // 2, dtype=torch.float64) / (hd // 2))
        ang = torch.arange(cfg.block_size, dtype=torch.float64)[:, None] * inv[None, :]
        self.register_buffer("rope_cos", ang.cos().float(), persistent=False)
        self.register_buffer("rope_sin", ang.sin().float(), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = 0.02
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        for block in self.blocks:
            for w in (block.attn.proj.weight, block.ffn.down.weight):
                nn.init.normal_(w, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layer))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"gpt_modern: sequence length {T} exceeds block_size {self.cfg.block_size}")
        x = self.wte(idx)
        cos, sin = self.rope_cos[:T].to(x.dtype), self.rope_sin[:T].to(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        return F.linear(self.norm_f(x), self.wte.weight)  # tied head

    def param_roles(self) -> dict[str, str]:
        roles: dict[str, str] = {}
        for mname, m in self.named_modules():
            prefix = f"{mname}." if mname else ""
            if isinstance(m, nn.Embedding):
                roles[prefix + "weight"] = "input"  # also the output head (tied): one role, see the module docstring
            elif isinstance(m, RMSNorm):
                roles[prefix + "weight"] = "bias_norm"
            elif isinstance(m, nn.Linear):
                roles[prefix + "weight"] = "hidden"
        return roles

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if non_embedding else n


GPT_MODERN_KWARGS = tuple(f.name for f in fields(GPTModernConfig))


def build_gpt_modern(**kwargs: Any) -> GPTModern:
    """``models.build("gpt_modern", ...)``: GPTModernConfig's fields as keyword arguments."""
    extra = sorted(set(kwargs) - set(GPT_MODERN_KWARGS))
    if extra:
        raise ValueError(f"gpt_modern: unexpected argument(s) {', '.join(extra)}; allowed: {', '.join(GPT_MODERN_KWARGS)}")
    missing = [k for k in ("vocab_size", "block_size") if k not in kwargs]
    if missing:
        raise ValueError(f"gpt_modern: missing required argument(s) {', '.join(missing)}")
    return GPTModern(GPTModernConfig(**kwargs))
