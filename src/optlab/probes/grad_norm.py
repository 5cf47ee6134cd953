"""``grad_norm``: the Frobenius norm of each weight layer's gradient, after backward."""

from __future__ import annotations

from typing import Any

from ..metrics.layers import layer_grad_norms
from . import PROBES
from .base import Probe


@PROBES.register("grad_norm")
class GradNorm(Probe):
    name = "grad_norm"
    point = "after_backward"

    pending: Any = None

    def measure(self) -> None:
        self.pending = layer_grad_norms(self.env.index)

    def emit(self, step: int, epoch: int, rec: Any) -> None:
        if self.pending is not None:
            rec.layer_rows(step, epoch, "grad_norm", self.env.index.roles, self.pending.tolist())
            self.pending = None
