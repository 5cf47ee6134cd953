"""``rho``: per-epoch statistics of the rho step-length controller, at epoch end.

Reads the controller's device-side accumulators (of the ``rho`` method, or of an optimizer built
with ``optim.build(..., rho={...})``) and writes, per epoch (curves.csv): ``epoch_r_mean``,
``epoch_r_max``, ``epoch_eta_eff_mean``, ``epoch_capped_frac``. One host sync per epoch. Its
summary is the controller's (``peak_r``, ``final_eta_eff``, ``final_capped_frac``, ...).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ..optim.rho import RhoController
from . import PROBES
from .base import Probe, ProbeEnv, ProbeOptions

EPOCH_KEYS = ("epoch_r_mean", "epoch_r_max", "epoch_eta_eff_mean", "epoch_capped_frac")


class RhoProbeOptions(ProbeOptions):
    every: int = Field(1, ge=1)  # epochs


def find_controller(method: Any) -> RhoController | None:
    for obj in (getattr(method, "controller", None), getattr(method, "optimizer", None)):
        if isinstance(obj, RhoController):
            return obj
    return None


@PROBES.register("rho")
class RhoProbe(Probe):
    name = "rho"
    point = "epoch_end"
    Options = RhoProbeOptions

    def __init__(self, options: ProbeOptions, env: ProbeEnv) -> None:
        super().__init__(options, env)
        ctl = find_controller(env.method)
        if ctl is None:
            raise ValueError("probes.rho: needs step_method rho, or an optimizer built with optimizer_options.rho")
        self.controller = ctl
        self.pending: Any = None

    def measure(self) -> None:
        self.pending = self.controller.window()

    def emit(self, step: int, epoch: int, rec: Any) -> None:
        if self.pending is None:
            return
        vals = self.pending.tolist()
        self.pending = None
        for key, v in zip(EPOCH_KEYS, vals):
            rec.metric(step, epoch, key, float(v))
        # the epoch is over: the next step opens a new window (a no-op for the rho method, which
        # marks each step's epoch itself)
        self.controller.mark_epoch(epoch)
        self.controller.mark_epoch(epoch + 1)

    def summary(self, steps: int) -> dict[str, Any]:
        return self.controller.summary()
