"""An order-k count model of a token stream: the baseline a language model should beat.

The model predicts each token from the ``order`` tokens before it with add-one smoothed counts
from the training stream. Accuracy takes the most frequent next token of the context (ties: the
smallest token id; a context never seen in training: the most frequent token overall); bits per
token are the add-one probabilities' mean -log2. Counting is sparse (one ``torch.unique`` over
context-and-next keys), so vocabularies of tens of thousands of tokens are fine at order 2.
"""

from __future__ import annotations

import math

import torch

NGRAM_MAX_TRAIN_TOKENS = 20_000_000
"""Counts come from at most this many training tokens (the first ones)."""


def _context_ids(toks: torch.Tensor, order: int, vocab: int) -> torch.Tensor:
    """For positions order..n-1: the id of the ``order`` tokens before each (base-``vocab`` digits)."""
    n = toks.numel()
    ids = torch.zeros(n - order, dtype=torch.int64, device=toks.device)
    for j in range(order):
        ids = ids * vocab + toks[j : n - order + j]
    return ids


def ngram_baseline(train: torch.Tensor, test: torch.Tensor, vocab: int, order: int = 2) -> dict[str, float]:
    """Next-token accuracy and bits per token on ``test`` of an order-``order`` count model of ``train``.

    Every position of ``test`` from ``order`` on is predicted from the ``order`` tokens before it.
    """
    if order < 0:
        raise ValueError(f"order: must be >= 0, got {order}")
    if vocab ** (order + 1) >= 2**63:
        raise ValueError(f"order: {order} with a vocabulary of {vocab} overflows 64-bit context ids")
    train = train[:NGRAM_MAX_TRAIN_TOKENS].long()
    test = test.long()
    if train.numel() <= order or test.numel() <= order:
        return {"ngram_order": order, "ngram_test_acc": math.nan, "ngram_test_bits": math.nan}
    ctx = _context_ids(train, order, vocab)
    keys, counts = torch.unique(ctx * vocab + train[order:], return_counts=True)  # sorted by (context, next)
    kctx, knext = keys // vocab, keys % vocab
    uctx, inv = torch.unique_consecutive(kctx, return_inverse=True)
    n_ctx = uctx.numel()
    total = torch.zeros(n_ctx, dtype=torch.int64, device=keys.device).scatter_add_(0, inv, counts)
    top = torch.zeros(n_ctx, dtype=torch.int64, device=keys.device).scatter_reduce_(0, inv, counts, "amax")
    cand = torch.where(counts == top[inv], knext, torch.full_like(knext, vocab))
    best = torch.full((n_ctx,), vocab, dtype=torch.int64, device=keys.device).scatter_reduce_(0, inv, cand, "amin")
    fallback = int(torch.bincount(train, minlength=vocab).argmax())

    tctx, y = _context_ids(test, order, vocab), test[order:]
    i = torch.searchsorted(uctx, tctx).clamp_max(n_ctx - 1)
    seen = uctx[i] == tctx
    pred = torch.where(seen, best[i], torch.full_like(y, fallback))
    tk = tctx * vocab + y
    j = torch.searchsorted(keys, tk).clamp_max(keys.numel() - 1)
    c = torch.where(keys[j] == tk, counts[j], torch.zeros_like(y))
    tot = torch.where(seen, total[i], torch.zeros_like(y))
    bits = -torch.log2((c.double() + 1.0) / (tot.double() + vocab))
    acc, b = torch.stack([(pred == y).double().mean(), bits.mean()]).tolist()
    return {"ngram_order": order, "ngram_test_acc": float(acc), "ngram_test_bits": float(b)}
