"""``sigma_max``: the exact largest singular value of every weight layer, after the step.

For an optimizer with a spectral projection (``sgd_sn``) it is the strictness check: every
projected layer above ``1 + SN_TOL`` at a check counts as one violation (``sn_violations``:
layer-checks; ``sn_violating_checks``: checks with at least one), ``sigma_max_max`` is the
largest sigma of any layer at any check of the run (``sigma_max_last``: the last check's), and
``sn_strict`` says whether the projection bounds the norm by construction (exact sigma, the
conv operator bound) or only estimates it (power iteration). The fraction of steps at which
the projection changed some weight is ``sn_active_frac`` (0 means the constraint never bound and
the run was plain SGD). Conv kernels are measured as operator norms at their input size whenever
the model gives their geometry (whatever form the projection bounds, so a ``matrix``-form run's
violations are of the same quantity as an ``operator`` run's), else as reshaped-kernel matrix norms.
Only projected layers count (``sn.roles``); the curve and per-layer rows cover every layer.
"""

from __future__ import annotations

import math
from typing import Any

from ..metrics.layers import _n_layers, layer_sigma_max
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
        opt = env.method.optimizer
        projs = spectral_projections(opt)
        self.projected = bool(projs)
        self.strict = bool(projs) and all(bool(getattr(p, "strict", False)) for p in projs)
        index = env.index
        convs = [i for i, p in enumerate(index.params) if p.dim() == 4]
        self.operator = bool(convs) and all(index.conv_specs[i] is not None for i in convs)
        # which layers are projected (a violation counts only there)
        ids = {id(q) for pr in projs for grp in pr.groups for q in grp}
        self.mask = [id(p) in ids for p in index.params for _ in range(_n_layers(p))]
        self.violations = 0
        self.violating_checks = 0
        self.sigma_max_max = math.nan
        self.sigma_max_last = math.nan
        self.pending: Any = None

    def measure(self) -> None:
        self.pending = layer_sigma_max(self.env.index, operator=self.operator)

    def emit(self, step: int, epoch: int, rec: Any) -> None:
        if self.pending is None:
            return
        s_list = self.pending.tolist()
        self.pending = None
        rec.layer_rows(step, epoch, "sigma_max", self.env.index.roles, s_list)
        last = max((math.inf if math.isnan(v) else v) for v in s_list) if s_list else math.nan  # nan: diverged
        rec.metric(step, epoch, "sigma_max", last)
        self.sigma_max_last = last
        if math.isnan(self.sigma_max_max) or last > self.sigma_max_max:
            self.sigma_max_max = last
        if self.projected:
            bad = sum(1 for s, m in zip(s_list, self.mask) if m and not s <= 1.0 + SN_TOL)
            self.violations += bad
            self.violating_checks += bool(bad)

    def summary(self, steps: int) -> dict[str, Any]:
        out: dict[str, Any] = {"sigma_max_max": self.sigma_max_max, "sigma_max_last": self.sigma_max_last,
                               "sn_violations": None, "sn_violating_checks": None, "sn_active_frac": None,
                               "sn_strict": None}
        if self.projected:
            out["sn_violations"] = self.violations
            out["sn_violating_checks"] = self.violating_checks
            out["sn_strict"] = self.strict
            # fraction of steps at which the projection changed some weight (0: it never bound)
            out["sn_active_frac"] = self.env.method.optimizer.active_steps / steps if steps else math.nan
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"violations": self.violations, "violating_checks": self.violating_checks, "sigma_max_max": self.sigma_max_max,
                "sigma_max_last": self.sigma_max_last, "index": self.env.index.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.violations, self.sigma_max_max = int(state["violations"]), float(state["sigma_max_max"])
        self.violating_checks = int(state.get("violating_checks", 0))
        self.sigma_max_last = float(state.get("sigma_max_last", self.sigma_max_max))
        if state.get("index") is not None:
            self.env.index.load_state_dict(state["index"])
