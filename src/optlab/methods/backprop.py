"""``backprop``: forward, loss, backward, optimizer step. The default method."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import optim
from . import METHODS
from .base import Method, StepContext, StepOutput


def build_optimizer(model: nn.Module, cfg: Any) -> Any:
    """The run's optimizer for the model's parameters, from ``cfg.optimizer`` and its options."""
    return optim.build(cfg.optimizer, model, lr=cfg.lr, **optim.run_options(cfg, model))


@METHODS.register("backprop")
class Backprop(Method):
    name = "backprop"

    def __init__(self, model: nn.Module, task: Any, cfg: Any, device: torch.device, options: Any) -> None:
        super().__init__(model, task, cfg, device, options)
        self.optimizer = build_optimizer(model, cfg)

    def step(self, xb: torch.Tensor, yb: torch.Tensor, ctx: StepContext) -> StepOutput:
        logits, loss = self.forward_backward(xb, yb, ctx, self.optimizer)
        self.optimizer.step()
        return StepOutput(loss=loss, outputs=logits)
