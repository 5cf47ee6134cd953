"""A synthetic language with a known entropy rate, for the offline quick profile.

``markov``: a token stream drawn from an order-2 Markov chain over a small alphabet, with
each next-token distribution drawn from a Dirichlet. Its entropy rate (bits per token) has a
closed form, H = sum over states s of pi(s) * H(P(.|s)), with pi the stationary distribution
of the chain on token pairs, so a language model's bits per character can be compared with
the best achievable value. Nothing is downloaded; the stream is a function of the seed.

Prepared files share the layout of the text datasets: ``train``, ``val``, ``test`` (1-D
int64 token tensors, contiguous slices of one stream) and ``meta`` with ``kind: lm``,
``vocab_size``, ``n_tokens`` and ``n_bytes`` per split (one byte per token here).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_save

ALPHABET = "abcdefghijklmnopqrstuvwxyz ,.;!?"


@dataclass
class TokenSplits:
    """Token streams of the three splits on one device, plus meta."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    meta: dict[str, Any]


def markov_chain(vocab: int, concentration: float, seed: int) -> torch.Tensor:
    """Transition table ``P[a, b, c] = p(next=c | prev2=a, prev1=b)`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    gamma = torch.distributions.Gamma(torch.full((vocab * vocab, vocab), concentration, dtype=torch.float64), 1.0)
    # Gamma sampling has no generator argument: draw through a seeded fork of the global RNG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        w = gamma.sample()
    return (w / w.sum(-1, keepdim=True)).view(vocab, vocab, vocab)


def entropy_rate_bits(P: torch.Tensor, iters: int = 10_000, tol: float = 1e-13) -> float:
    """Exact entropy rate of the order-2 chain: stationary distribution on pairs by power iteration."""
    V = P.shape[0]
    T = torch.zeros(V * V, V * V, dtype=torch.float64)  # pair (a,b) -> pair (b,c)
    for a in range(V):
        for b in range(V):
            T[a * V + b, b * V : (b + 1) * V] = P[a, b]
    pi = torch.full((V * V,), 1.0 / (V * V), dtype=torch.float64)
    for _ in range(iters):
        nxt = pi @ T
        if (nxt - pi).abs().sum() < tol:
            pi = nxt
            break
        pi = nxt
    rows = P.reshape(V * V, V)
    h = -(rows * torch.log2(rows.clamp_min(1e-300))).sum(-1)
    return float((pi * h).sum())


def sample_stream(P: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` tokens from the chain (vectorized over chunks of uniforms; exact sampling)."""
    V = P.shape[0]
    g = torch.Generator().manual_seed(seed + 1)
    cdf = P.cumsum(-1).reshape(V * V, V)
    cdf[:, -1] = 1.0
    u = torch.rand(n, generator=g, dtype=torch.float64)
    out: list[int] = []
    a, b = 0, 1
    cdf_list = cdf.tolist()
    for ui in u.tolist():
        c = min(bisect.bisect_right(cdf_list[a * V + b], ui), V - 1)
        out.append(c)
        a, b = b, c
    return torch.tensor(out, dtype=torch.int64)


def prepare_markov(
    out_path: str | Path,
    *,
    n_tokens: int = 200_000,
    vocab: int = 16,
    concentration: float = 0.2,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> dict[str, Any]:
    """Sample the stream, split it contiguously (train, val, test) and save it atomically."""
    if vocab > len(ALPHABET):
        raise ValueError(f"vocab: at most {len(ALPHABET)} symbols, got {vocab}")
    P = markov_chain(vocab, concentration, seed)
    stream = sample_stream(P, n_tokens, seed)
    n_test = int(round(test_fraction * n_tokens))
    n_val = int(round(val_fraction * n_tokens))
    n_train = n_tokens - n_val - n_test
    splits = {"train": stream[:n_train], "val": stream[n_train : n_train + n_val], "test": stream[n_train + n_val :]}
    meta = {
        "name": "markov",
        "kind": "lm",
        "tokenizer": "char",
        "vocab": ALPHABET[:vocab],
        "vocab_size": vocab,
        "order": 2,
        "concentration": concentration,
        "seed": seed,
        "entropy_rate_bits": entropy_rate_bits(P),
        "n_tokens": {k: int(v.numel()) for k, v in splits.items()},
        "n_bytes": {k: int(v.numel()) for k, v in splits.items()},
    }
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(out, {**splits, "meta": meta})
    return meta


def bits_per_token_floor(meta: dict[str, Any]) -> float:
    return float(meta.get("entropy_rate_bits", math.nan))
