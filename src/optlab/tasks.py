"""Training tasks: how a dataset is batched, scored and evaluated.

The engine's loop is task-agnostic; a task supplies

- ``epoch_batches(gen)``: one epoch's batch handles, drawn from a CPU generator (so a
  checkpoint that stores the generator state at the start of an epoch can redraw them),
- ``batch(handle)``: the (inputs, targets) tensors on the device,
- ``loss`` / ``n_correct`` / ``n_items`` for one batch (device tensors, no host sync),
- ``evaluate(model, split)``: a dict of metrics for ``val`` or ``test`` (one host sync),
- ``model_kwargs()``: what the model needs from the data (input size, classes, vocabulary).

``classification``: prepared image/vector datasets (digits, MNIST, FashionMNIST, CIFAR-10),
batched by index. ``lm``: a token stream (Tiny Shakespeare, TinyStories), batched as random
windows; evaluation reports loss in nats/token, perplexity and bits per byte (bits per
character for character-level data).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .data.loading import batch_indices


class ClassificationTask:
    kind = "classification"
    unit = "examples"

    def __init__(self, data: Any, batch_size: int, device: torch.device) -> None:
        self.data, self.batch_size, self.device = data, batch_size, device
        self.x, self.y = data.train_x.to(device), data.train_y.to(device)
        self.n = self.x.shape[0]
        self.steps_per_epoch = math.ceil(self.n / batch_size)

    def model_kwargs(self) -> dict[str, Any]:
        meta = self.data.meta
        kw: dict[str, Any] = {"input_dim": int(meta["input_dim"]), "n_classes": int(meta["n_classes"])}
        if meta.get("input_shape") is not None:
            kw["input_shape"] = tuple(int(v) for v in meta["input_shape"])
        return kw

    def epoch_batches(self, gen: torch.Generator) -> list[torch.Tensor]:
        return list(batch_indices(self.n, self.batch_size, gen, self.device))

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[idx], self.y[idx]

    @staticmethod
    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y)

    @staticmethod
    def n_correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (logits.detach().argmax(-1) == y).sum()

    @staticmethod
    def n_items(y: torch.Tensor) -> int:
        return int(y.shape[0])

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, split: str, chunk: int = 4096) -> dict[str, float]:
        x = getattr(self.data, f"{split}_x").to(self.device)
        y = getattr(self.data, f"{split}_y").to(self.device)
        was = model.training
        model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        for i in range(0, x.shape[0], chunk):
            logits = model(x[i : i + chunk]).float()
            loss_sum += F.cross_entropy(logits, y[i : i + chunk], reduction="sum")
            correct += (logits.argmax(-1) == y[i : i + chunk]).sum()
        model.train(was)
        n = max(1, x.shape[0])
        loss, acc = torch.stack([loss_sum / n, correct / n]).tolist()
        return {"loss": float(loss), "acc": float(acc)}


class LMTask:
    """Next-token prediction on a 1-D token stream with random windows of ``block_size``."""

    kind = "lm"
    unit = "tokens"

    def __init__(
        self,
        data: Any,
        batch_size: int,
        block_size: int,
        device: torch.device,
        steps_per_epoch: int = 0,
        eval_tokens: int = 0,
    ) -> None:
        self.data, self.batch_size, self.block_size, self.device = data, batch_size, block_size, device
        self.tokens = data.train.to(device).long()
        n = self.tokens.numel()
        if n < block_size + 2:
            raise ValueError(f"block_size: {block_size} is too long for a training split of {n} tokens")
        full = max(1, n // (batch_size * block_size))
        self.steps_per_epoch = min(full, steps_per_epoch) if steps_per_epoch > 0 else full
        self.eval_tokens = eval_tokens
        self._arange = torch.arange(block_size + 1, device=device)

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

    @staticmethod
    def n_correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (logits.detach().argmax(-1) == y).sum()

    @staticmethod
    def n_items(y: torch.Tensor) -> int:
        return int(y.numel())

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, split: str) -> dict[str, float]:
        """Loss over non-overlapping windows covering the split (or its first ``eval_tokens``)."""
        toks = getattr(self.data, split).to(self.device).long()
        n_avail = toks.numel() - 1
        if self.eval_tokens > 0:
            n_avail = min(n_avail, self.eval_tokens)
        T = self.block_size
        n_win = max(1, n_avail // T)
        starts = torch.arange(n_win, device=self.device) * T
        was = model.training
        model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        ar = torch.arange(T + 1, device=self.device)
        for i in range(0, n_win, self.batch_size):
            win = toks[starts[i : i + self.batch_size, None] + ar]
            logits = model(win[:, :-1]).float()
            loss_sum += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), win[:, 1:].reshape(-1), reduction="sum")
            correct += (logits.argmax(-1) == win[:, 1:]).sum()
        model.train(was)
        n_tok = n_win * T
        loss, acc = torch.stack([loss_sum / n_tok, correct / n_tok]).tolist()
        meta = self.data.meta
        # bits per byte of the text these tokens cover (bits per character for ASCII char-level data)
        bytes_per_token = float(meta["n_bytes"][split]) / float(meta["n_tokens"][split])
        return {
            "loss": float(loss),
            "acc": float(acc),
            "ppl": math.exp(min(float(loss), 700.0)),
            "bpb": float(loss) / (math.log(2) * bytes_per_token),
        }


def build_task(cfg: Any, data: Any, device: torch.device) -> ClassificationTask | LMTask:
    if not hasattr(data, "train_x"):  # a token stream
        return LMTask(data, cfg.batch_size, cfg.block_size, device, cfg.steps_per_epoch, cfg.eval_tokens)
    return ClassificationTask(data, cfg.batch_size, device)
