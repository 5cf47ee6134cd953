"""``constraint``: how far the constrained layers are from their manifold, after the step.

Reads the run's optimizer's ``constraint_diagnostics()`` (:meth:`optlab.optim.modular.Modular.
constraint_diagnostics`: one dict per constrained layer with its layer number, role, constraint
and device tensors ``orth_err``, ``sv_min``, ``sv_max``; batched over same-shape matrices there).
Rows (layers.csv): ``orth_err`` (Stiefel: ``||W^T W - I||_F`` on the smaller side; sphere: the
rows' squared norms against 1, as the optimizer defines it), ``sv_min``, ``sv_max``; curve
``orth_err_max``. An optimizer without ``constraint_diagnostics`` (or without constrained
layers) gets nothing: ``constraint_layers`` 0 and ``orth_err_max`` None in the summary.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import PROBES
from .base import Probe, ProbeEnv, ProbeOptions

ROWS = ("orth_err", "sv_min", "sv_max")


def diagnostics_fn(opt: Any) -> Any:
    """The optimizer's ``constraint_diagnostics`` (on it or on what it wraps), else None."""
    for _ in range(4):
        if opt is None:
            return None
        fn = getattr(opt, "constraint_diagnostics", None)
        if callable(fn):
            return fn
        opt = getattr(opt, "base", None) or getattr(opt, "optimizer", None) or getattr(opt, "inner", None)
    return None


@PROBES.register("constraint")
class Constraint(Probe):
    name = "constraint"
    point = "after_step"

    def __init__(self, options: ProbeOptions, env: ProbeEnv) -> None:
        super().__init__(options, env)
        self.fn = diagnostics_fn(getattr(env.method, "optimizer", None))
        self.pending: Any = None
        self.err_max = math.nan
        self.n_layers = 0

    @torch.no_grad()
    def measure(self) -> None:
        if self.fn is None:
            return
        diags = self.fn()
        if not diags:
            return
        layers = [int(d["layer"]) for d in diags]
        roles = [str(d["role"]) for d in diags]
        values = torch.stack([torch.stack([torch.as_tensor(d[k]).float().reshape(()) for d in diags]) for k in ROWS])
        self.pending = (layers, roles, values)

    def emit(self, step: int, epoch: int, rec: Any) -> None:
        if self.pending is None:
            return
        layers, roles, values = self.pending
        self.pending = None
        table = values.cpu().tolist()  # one transfer
        for k, row in zip(ROWS, table):
            rec.layer_rows(step, epoch, k, roles, row, layers=layers)
        m = max(table[0])
        rec.metric(step, epoch, "orth_err_max", m)
        self.err_max = m if math.isnan(self.err_max) else max(self.err_max, m)
        self.n_layers = len(layers)

    def summary(self, steps: int) -> dict[str, Any]:
        return {"orth_err_max": None if math.isnan(self.err_max) else self.err_max, "constraint_layers": self.n_layers}

    def state_dict(self) -> dict[str, Any]:
        return {"err_max": self.err_max}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.err_max = float(state["err_max"])
