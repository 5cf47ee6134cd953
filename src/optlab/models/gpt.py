"""A small GPT: decoder-only transformer language model, readable in one sitting.

    tokens -> wte + wpe -> n_layer x Block -> LayerNorm -> lm_head -> logits [B, T, vocab]
    Block:  x = x + attn(ln1(x));  x = x + mlp(ln2(x))          (pre-LN)

Design choices, each made so that every parameter has exactly one role:

- ``lm_head`` is **not** tied to ``wte``: the embedding is an ``input`` matrix and the head an
  ``output`` matrix, each with its own optimizer state, constraint and metrics.
- Roles: ``wte``, ``wpe`` -> ``input``; attention ``qkv``/``proj`` and MLP ``fc``/``proj``
  weights -> ``hidden``; ``lm_head`` -> ``output``; LayerNorm weights/biases and any Linear
  biases (``bias=True``) -> ``bias_norm``. Roles are assigned by module type, not by name.
- Queries, keys and values come from **one fused** ``qkv`` Linear with a ``(3*n_embd, n_embd)``
  weight. A per-matrix method (spectral normalization, Muon's orthogonalization, sigma_max
  metrics) therefore treats q, k and v as a single matrix: its largest singular value is at
  least that of each of W_q, W_k, W_v, and orthogonalizing it is not the same as orthogonalizing
  the three blocks separately. Heads are not separate matrices either.
- Init: every Linear and Embedding weight ~ N(0, 0.02); the two residual projections
  (``attn.proj``, ``mlp.proj``) ~ N(0, 0.02 / sqrt(2 * n_layer)); biases zero; LayerNorm 1/0.
- Attention is ``F.scaled_dot_product_attention(..., is_causal=True)``, which picks a fused
  kernel (flash / memory-efficient on CUDA) where one applies. Under forward-mode AD
  (``torch.func.jvp``, ``torch.autograd.forward_ad``), which the CPU flash kernel does not
  support, or when ``explicit_attention`` is set on a :class:`CausalSelfAttention`, attention is
  written out instead (:func:`causal_attention`: masked softmax of q k^T / sqrt(head_dim), times v),
  equal to SDPA within float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .functional import forward_ad_active


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int  # longest context (number of learned positions)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = False  # biases in Linear layers and LayerNorms

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"gpt: {name} must be a positive int, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"gpt: n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"gpt: dropout must be in [0, 1), got {self.dropout!r}")


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v, written out: what SDPA with ``is_causal=True`` computes."""
    T, S = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    att = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    if dropout_p > 0.0:
        att = F.dropout(att, p=dropout_p)
    return att @ v


class CausalSelfAttention(nn.Module):
    explicit_attention: bool = False  # True: always causal_attention, never SDPA

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # fused: one matrix
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, 3C) -> three (B, n_head, T, head_dim)
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        if self.explicit_attention or (not torch.compiler.is_compiling() and forward_ad_active(q, k, v)):
            y = causal_attention(q, k, v, dropout_p=p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, C)  # concatenate the heads
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer; ``forward(idx [B, T] int) -> logits [B, T, vocab_size]``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=cfg.bias)  # untied from wte
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = 0.02
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for block in self.blocks:  # residual projections: the residual stream's variance stays O(1)
            for w in (block.attn.proj.weight, block.mlp.proj.weight):
                nn.init.normal_(w, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layer))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"gpt: sequence length {T} exceeds block_size {self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def param_roles(self) -> dict[str, str]:
        roles: dict[str, str] = {}
        for mname, m in self.named_modules():
            prefix = f"{mname}." if mname else ""
            if isinstance(m, nn.Embedding):
                roles[prefix + "weight"] = "input"
            elif isinstance(m, nn.LayerNorm):
                for pname, _ in m.named_parameters(recurse=False):
                    roles[prefix + pname] = "bias_norm"
            elif isinstance(m, nn.Linear):
                roles[prefix + "weight"] = "output" if m is self.lm_head else "hidden"
                if m.bias is not None:
                    roles[prefix + "bias"] = "bias_norm"
        return roles

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; ``non_embedding`` leaves out the token and position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + self.wpe.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Approximate training FLOPs per token: 6 * non-embedding params + 12 * L * C * T (attention)."""
        c = self.cfg
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * c.block_size


GPT_KWARGS = tuple(f.name for f in fields(GPTConfig))


def build_gpt(**kwargs: Any) -> GPT:
    """``models.build("gpt", ...)``: GPTConfig's fields as keyword arguments, nothing else."""
    extra = sorted(set(kwargs) - set(GPT_KWARGS))
    if extra:
        raise ValueError(
            f"gpt: unexpected argument(s) {', '.join(extra)}; allowed: {', '.join(GPT_KWARGS)}"
        )
    missing = [k for k in ("vocab_size", "block_size") if k not in kwargs]
    if missing:
        raise ValueError(f"gpt: missing required argument(s) {', '.join(missing)}")
    return GPT(GPTConfig(**kwargs))
