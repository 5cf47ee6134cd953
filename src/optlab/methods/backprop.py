"""``backprop``: forward, loss, backward, optimizer step. The default method.

Options (``method_options``):

| key | default | meaning |
| --- | --- | --- |
| ``clip_norm`` | ``None`` | gradient clipping: after backward (and the after-backward probes, which see the unclipped gradients), ``torch.nn.utils.clip_grad_norm_`` of the model's parameters to total norm ``clip_norm`` (> 0) before the optimizer steps |

With ``clip_norm`` set, the per-step statistics (device scalars, flushed with the losses) are
``grad_norm_total`` (the total gradient norm before clipping) and ``clipped`` (1.0 where it was
above ``clip_norm``). Clipping reads nothing back to the host (the foreach implementation on
CUDA). Without ``clip_norm`` the step is exactly the plain one and has no statistics.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from .. import optim
from . import METHODS
from .base import Method, StepContext, StepOutput


def build_optimizer(model: nn.Module, cfg: Any) -> Any:
    """The run's optimizer for the model's parameters, from ``cfg.optimizer`` and its options."""
    return optim.build(cfg.optimizer, model, lr=cfg.lr, **optim.run_options(cfg, model))


class BackpropOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    clip_norm: float | None = Field(None, gt=0, allow_inf_nan=False)

    @field_validator("clip_norm", mode="before")
    @classmethod
    def _number(cls, v: Any) -> Any:
        if isinstance(v, bool) or not (v is None or isinstance(v, (int, float))):
            raise ValueError("expected a number > 0 or null")
        return v


@METHODS.register("backprop")
class Backprop(Method):
    name = "backprop"
    Options = BackpropOptions
    distributed = True

    def __init__(self, model: nn.Module, task: Any, cfg: Any, device: torch.device, options: Any) -> None:
        super().__init__(model, task, cfg, device, options)
        self.optimizer = build_optimizer(model, cfg)
        self.clip_norm = getattr(options, "clip_norm", None)
        self._clip_params = [p for p in model.parameters() if p.requires_grad]

    def step(self, xb: torch.Tensor, yb: torch.Tensor, ctx: StepContext) -> StepOutput:
        logits, loss = self.forward_backward(xb, yb, ctx, self.optimizer)
        if self.clip_norm is None:
            self.optimizer.step()
            return StepOutput(loss=loss, outputs=logits)
        # foreach=None: the foreach kernels wherever torch has them (CUDA), the per-tensor loop on
        # CPU (where foreach=True raises); no host sync either way
        total = torch.nn.utils.clip_grad_norm_(self._clip_params, self.clip_norm, foreach=None)
        self.optimizer.step()
        return StepOutput(loss=loss, outputs=logits,
                          stats={"grad_norm_total": total, "clipped": (total > self.clip_norm).float()})
