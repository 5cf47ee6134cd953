"""Next-token prediction on a 1-D token stream (Tiny Shakespeare, TinyStories, the synthetic
Markov language) with random windows of ``block_size``. Evaluation reports loss in nats/token,
perplexity and bits per byte (bits per character for character-level data)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..data.synthetic import bits_per_token_floor
from ..distributed import all_sum, span
from ..metrics.ngram import ngram_baseline
from . import TASKS
from .base import Task


@TASKS.register("lm")
class LMTask(Task):
    kind = "lm"
    unit = "tokens"
    primary = ("test_loss", "down")
    select = "val_loss"
    select_direction = "down"
    milestone = None

    def __init__(self, data: Any, cfg: Any, device: torch.device) -> None:
        self.data, self.batch_size, self.block_size, self.device = data, cfg.batch_size, cfg.block_size, device
        self.tokens = data.train.to(device).long()
        n = self.tokens.numel()
        if n < self.block_size + 2:
            raise ValueError(f"block_size: {self.block_size} is too long for a training split of {n} tokens")
        full = max(1, n // (self.batch_size * self.block_size))
        self.steps_per_epoch = min(full, cfg.steps_per_epoch) if cfg.steps_per_epoch > 0 else full
        self.eval_tokens = cfg.eval_tokens
        self.items_per_batch = self.batch_size * self.block_size
        self._arange = torch.arange(self.block_size + 1, device=device)

    NGRAM_ORDER = 2

    def summary(self) -> dict[str, Any]:
        """The floor and a baseline for the test loss: the data's entropy rate where it is known
        (``entropy_floor_bits``, nan otherwise) and an order-2 count model of the training split
        scored on the test tokens that ``evaluate`` scores."""
        test = self.data.test
        n = self.eval_windows(test.numel()) * self.block_size + 1
        return {"entropy_floor_bits": bits_per_token_floor(self.data.meta),
                **ngram_baseline(self.data.train, test[:n], int(self.data.meta["vocab_size"]), self.NGRAM_ORDER)}

    def eval_windows(self, n_tokens: int) -> int:
        """How many non-overlapping ``block_size`` windows ``evaluate`` scores in a split of
        ``n_tokens`` tokens (its first ``eval_tokens`` when set)."""
        n_avail = n_tokens - 1
        if self.eval_tokens > 0:
            n_avail = min(n_avail, self.eval_tokens)
        return max(1, n_avail // self.block_size)

    def model_kwargs(self) -> dict[str, Any]:
        return {"vocab_size": int(self.data.meta["vocab_size"]), "block_size": self.block_size}

    def epoch_batches(self, gen: torch.Generator) -> list[torch.Tensor]:
        hi = self.tokens.numel() - self.block_size - 1
        offsets = torch.randint(0, hi + 1, (self.steps_per_epoch, self.batch_size), generator=gen)
        return list(offsets.to(self.device).unbind(0))

    def batch(self, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        win = self.tokens[offsets[:, None] + self._arange]  # one gather, (B, T+1)
        return win[:, :-1], win[:, 1:]

    @staticmethod
    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

    def probe_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.PROBE_SEED)
        hi = self.tokens.numel() - self.block_size - 1
        n = max(1, self.PROBE_SIZE // self.block_size)
        return self.batch(torch.randint(0, hi + 1, (n,), generator=gen).to(self.device))

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, split: str) -> dict[str, float]:
        """Loss over non-overlapping windows covering the split (or its first ``eval_tokens``)."""
        toks = getattr(self.data, split).to(self.device).long()
        T = self.block_size
        n_win = self.eval_windows(toks.numel())
        starts = torch.arange(n_win, device=self.device) * T
        was = model.training
        model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        ar = torch.arange(T + 1, device=self.device)
        lo, hi = span(n_win, self.world)  # every window with one process
        for i in range(lo, hi, self.batch_size):
            win = toks[starts[i : min(i + self.batch_size, hi), None] + ar]
            logits = model(win[:, :-1]).float()
            loss_sum += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), win[:, 1:].reshape(-1), reduction="sum")
            correct += (logits.argmax(-1) == win[:, 1:]).sum()
        model.train(was)
        n_tok = n_win * T
        loss, acc = (all_sum(torch.stack([loss_sum, correct.float()]), self.world) / n_tok).tolist()
        meta = self.data.meta
        # bits per byte of the text these tokens cover (bits per character for ASCII char-level data)
        bytes_per_token = float(meta["n_bytes"][split]) / float(meta["n_tokens"][split])
        return {
            "loss": float(loss),
            "acc": float(acc),
            "ppl": math.exp(min(float(loss), 700.0)),
            "bpb": float(loss) / (math.log(2) * bytes_per_token),
        }
