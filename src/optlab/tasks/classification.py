"""Classification of prepared image/vector datasets (digits, MNIST, FashionMNIST, CIFAR-10),
batched by index on the device."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..data.loading import batch_indices
from ..distributed import all_sum, span
from . import TASKS
from .base import Task


@TASKS.register("classification")
class ClassificationTask(Task):
    kind = "classification"
    unit = "examples"
    primary = ("test_acc", "up")
    select = "val_acc"
    select_direction = "up"
    milestone = ("acc", 0.9)

    def __init__(self, data: Any, cfg: Any, device: torch.device) -> None:
        self.data, self.batch_size, self.device = data, cfg.batch_size, device
        self.augment = getattr(cfg, "augment", "none")
        self.image_shape: tuple[int, ...] | None = None
        if self.augment != "none":
            shape = data.meta.get("input_shape")
            if shape is None or len(shape) != 3:
                raise ValueError(f"augment: {self.augment!r} needs an image dataset (C, H, W); {data.meta.get('name')!r} "
                                 "has no input_shape; allowed here: none")
            self.image_shape = tuple(int(v) for v in shape)
        self.x, self.y = data.train_x.to(device), data.train_y.to(device)
        self.n = self.x.shape[0]
        full = math.ceil(self.n / self.batch_size)
        per = int(getattr(cfg, "steps_per_epoch", 0) or 0)
        self.steps_per_epoch = min(full, per) if per > 0 else full  # a capped epoch: its permutation's first batches
        self.items_per_batch = self.batch_size

    def model_kwargs(self) -> dict[str, Any]:
        meta = self.data.meta
        kw: dict[str, Any] = {"input_dim": int(meta["input_dim"]), "n_classes": int(meta["n_classes"])}
        if meta.get("input_shape") is not None:
            kw["input_shape"] = tuple(int(v) for v in meta["input_shape"])
        return kw

    def epoch_batches(self, gen: torch.Generator) -> list[torch.Tensor]:
        return list(batch_indices(self.n, self.batch_size, gen, self.device))[: self.steps_per_epoch]

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.image_shape is None:
            return self.x[idx], self.y[idx]
        return crop_flip(self.x[idx], self.image_shape), self.y[idx]

    @staticmethod
    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y)

    def n_items(self, y: torch.Tensor) -> int:
        return int(y.shape[0])

    def probe_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.PROBE_SEED)
        idx = torch.randperm(self.n, generator=gen)[: min(self.PROBE_SIZE, self.n)].to(self.device)
        return self.x[idx], self.y[idx]

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, split: str, chunk: int = 4096) -> dict[str, float]:
        x = getattr(self.data, f"{split}_x").to(self.device)
        y = getattr(self.data, f"{split}_y").to(self.device)
        was = model.training
        model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        lo, hi = span(x.shape[0], self.world)  # the whole split with one process
        for i in range(lo, hi, chunk):
            j = min(i + chunk, hi)
            logits = model(x[i:j]).float()
            loss_sum += F.cross_entropy(logits, y[i:j], reduction="sum")
            correct += (logits.argmax(-1) == y[i:j]).sum()
        model.train(was)
        n = max(1, x.shape[0])
        loss, acc = (all_sum(torch.stack([loss_sum, correct.float()]), self.world) / n).tolist()
        return {"loss": float(loss), "acc": float(acc)}


def crop_flip(x: torch.Tensor, shape: tuple[int, ...], pad: int = 4) -> torch.Tensor:
    """The standard CIFAR augmentation of a batch of flattened images, on the device: each image
    zero-padded by ``pad`` pixels (zero is the training mean: features are standardized), cropped
    back to its size at a uniformly random offset, and flipped left-right with probability 1/2.
    Draws from torch's global generator of the batch's device (checkpointed with the run)."""
    c, h, w = shape
    n = x.shape[0]
    img = F.pad(x.reshape(n, c, h, w), (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device)
    flip = torch.rand(n, device=x.device) < 0.5
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (n, h)
    cols = dx[:, None] + torch.arange(w, device=x.device)  # (n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    b = torch.arange(n, device=x.device)[:, None, None]
    out = img.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2).reshape(n, c * h * w)
