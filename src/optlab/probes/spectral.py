"""``sigma_max``: the exact largest singular value of every weight layer, after the step.

For an optimizer with a spectral projection (``sgd_sn``) it is the strictness check: a layer
above ``1 + SN_TOL`` at a check counts as a violation (``sn_violations``), and the fraction of
steps at which the projection changed some weight is reported (``sn_active_frac``; 0 means the
constraint never bound and the run was plain SGD). Conv kernels are measured as the operator
norm the projection bounds (``sn.conv: operator``), else as the reshaped-kernel matrix norm.
"""

from __future__ import annotations

import math
from typing import Any

from ..metrics.layers import layer_sigma_max
from ..optim.conv_spectral import ConvSpectralProjection
from ..optim.spectral import SpectralProjection
from . import PROBES
from .base import Probe, ProbeEnv, ProbeOptions

SN_TOL = 1e-4  # a projected layer above 1 + SN_TOL counts as a violation


def spectral_projections(opt: Any) -> list[Any]:
    return [p for p in getattr(opt, "projections", []) or [] if isinstance(p, (SpectralProjection, ConvSpectralProjection))]


@PROBES.register("sigma_max")
class SigmaMax(Probe):
    name = "sigma_max"
    point = "after_step"

    def __init__(self, options: ProbeOptions, env: ProbeEnv) -> None:
        super().__init__(options, env)
        projs = spectral_projections(env.method.optimizer)
        self.projected = bool(projs)
        self.operator = any(isinstance(p, ConvSpectralProjection) and p.form == "operator" for p in projs)
        self.violations = 0
        self.sigma_max_max = math.nan
        self.pending: Any = None

    def measure(self) -> None:
        self.pending = layer_sigma_max(self.env.index, operator=self.operator)

    def emit(self, step: int, epoch: int, rec: Any) -> None:
        if self.pending is None:
            return
        s_list = self.pending.tolist()
        self.pending = None
        rec.layer_rows(step, epoch, "sigma_max", self.env.index.roles, s_list)
        self.sigma_max_max = max(s_list)
        rec.metric(step, epoch, "sigma_max", self.sigma_max_max)
        if self.projected and not self.sigma_max_max <= 1.0 + SN_TOL:
            self.violations += 1

    def summary(self, steps: int) -> dict[str, Any]:
        out: dict[str, Any] = {"sigma_max_max": self.sigma_max_max, "sn_violations": None, "sn_active_frac": None}
        if self.projected:
            out["sn_violations"] = self.violations
            # fraction of steps at which the projection changed some weight (0: it never bound)
            out["sn_active_frac"] = self.env.method.optimizer.active_steps / steps if steps else math.nan
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"violations": self.violations, "sigma_max_max": self.sigma_max_max, "index": self.env.index.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.violations, self.sigma_max_max = int(state["violations"]), float(state["sigma_max_max"])
        if state.get("index") is not None:
            self.env.index.load_state_dict(state["index"])
