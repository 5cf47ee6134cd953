"""The linear-quadratic toy task (dataset ``lq``, :mod:`optlab.data.lq`): regression of ``y`` from
``x`` with the quadratic cost ``L = (1/B) sum_b (1/2) sum_i q_i (s_L - y)_{b,i}^2``.

Its gradient at the output is ``Q (s_L - y) / B`` (``Q = diag(q)``), the start of the adjoint
recursion (:mod:`optlab.credit.lq`). Primary metric ``test_loss`` (down); evaluation reports
``loss``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..data.loading import batch_indices
from ..distributed import all_sum, span
from . import TASKS, register_datasets
from .base import Task
from .classification import ClassificationTask


@TASKS.register("lq")
class LQTask(Task):
    kind = "lq"
    unit = "examples"
    primary = ("test_loss", "down")
    select = "val_loss"
    select_direction = "down"
    milestone = None
    EPOCH_KEYS = {"loss": "epoch_train_loss"}

    def __init__(self, data: Any, cfg: Any, device: torch.device) -> None:
        self.data, self.batch_size, self.device = data, cfg.batch_size, device
        self.x, self.y = data.train_x.to(device), data.train_y.to(device)
        self.q = torch.tensor(data.meta["cost_weights"], dtype=torch.float32, device=device)
        self.n = self.x.shape[0]
        self.steps_per_epoch = math.ceil(self.n / self.batch_size)
        self.items_per_batch = self.batch_size

    def model_kwargs(self) -> dict[str, Any]:
        return {"input_dim": int(self.data.meta["input_dim"])}

    def epoch_batches(self, gen: torch.Generator) -> list[torch.Tensor]:
        return list(batch_indices(self.n, self.batch_size, gen, self.device))

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[idx], self.y[idx]

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((out.float() - y).square() * self.q).sum(-1).mean()

    def n_items(self, y: torch.Tensor) -> int:
        return int(y.shape[0])

    def step_sums(self, loss: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": loss * self.n_items(targets)}

    # the same seeded draw of training examples as classification (self.x, self.y, self.n)
    probe_batch = ClassificationTask.probe_batch

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, split: str, chunk: int = 4096) -> dict[str, float]:
        x = getattr(self.data, f"{split}_x").to(self.device)
        y = getattr(self.data, f"{split}_y").to(self.device)
        total = torch.zeros((), device=self.device)
        lo, hi = span(x.shape[0], self.world)  # the whole split with one process
        for i in range(lo, hi, chunk):
            j = min(i + chunk, hi)
            total += self.loss(model(x[i:j]), y[i:j]) * (j - i)
        return {"loss": float(all_sum(total, self.world) / max(1, x.shape[0]))}


register_datasets("lq", ["lq"])
