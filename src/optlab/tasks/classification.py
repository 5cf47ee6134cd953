"""Classification of prepared image/vector datasets (digits, MNIST, FashionMNIST, CIFAR-10),
batched by index on the device."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..data.loading import batch_indices
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
        self.x, self.y = data.train_x.to(device), data.train_y.to(device)
        self.n = self.x.shape[0]
        self.steps_per_epoch = math.ceil(self.n / self.batch_size)
        self.items_per_batch = self.batch_size

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
        for i in range(0, x.shape[0], chunk):
            logits = model(x[i : i + chunk]).float()
            loss_sum += F.cross_entropy(logits, y[i : i + chunk], reduction="sum")
            correct += (logits.argmax(-1) == y[i : i + chunk]).sum()
        model.train(was)
        n = max(1, x.shape[0])
        loss, acc = torch.stack([loss_sum / n, correct / n]).tolist()
        return {"loss": float(loss), "acc": float(acc)}
