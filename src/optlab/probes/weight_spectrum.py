"""``weight_spectrum``: singular-value statistics of every weight layer, after the step.

Rows (layers.csv), per layer, from one batched fp32 ``svdvals`` per distinct layer shape
(:func:`optlab.metrics.spectra.spectrum_metrics`): ``cond`` (``sigma_max / sigma_min``, ``inf``
when ``sigma_min`` is 0), ``top1_energy``, ``top5_energy``, ``top10_energy`` (``sum_{i<=k}
sigma_i^2 / sum_i sigma_i^2``; 1 when ``k`` is at least the rank), ``sv_max``, ``sv_min``. The full
spectra are written once, at the run's last step (the step count the run was configured for;
a diverged run, which stops early, gets none), as rows ``sv@<i>`` (``i`` = 0 for the largest).

Summary: ``cond_max`` (the largest condition number at the last measurement) and
``top1_energy_mean`` (mean over layers at the last measurement).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..metrics.spectra import spectrum_metrics
from . import PROBES
from .base import Probe, ProbeEnv, ProbeOptions
from .batching import as_stack, layer_items, layer_offsets, per_layer

METRICS = {"cond": "condition_number", "top1_energy": "energy_top1", "top5_energy": "energy_top5",
           "top10_energy": "energy_top10", "sv_max": "sigma_max", "sv_min": "sigma_min"}


def planned_steps(env: ProbeEnv) -> int | None:
    """The run's configured step count (as the engine computes it), None when unknown."""
    spe = getattr(env.task, "steps_per_epoch", None)
    epochs = getattr(env.cfg, "epochs", None)
    if spe is None or epochs is None:
        return None
    total = int(spe) * int(epochs)
    max_steps = int(getattr(env.cfg, "max_steps", 0) or 0)
    return min(total, max_steps) if max_steps > 0 else total


def layer_spectra(index: Any) -> tuple[list[int], dict[str, torch.Tensor]]:
    """Layer numbers and ``{row metric: (L,) values, "sigma": list of spectra}`` (device-side)."""
    def fn(w: torch.Tensor) -> dict[str, torch.Tensor]:
        m = spectrum_metrics(w, ks=(1, 5, 10))
        return {k: m[v] for k, v in METRICS.items()}

    return per_layer(layer_items(index, grads=False), fn)


@PROBES.register("weight_spectrum")
class WeightSpectrum(Probe):
    name = "weight_spectrum"
    point = "after_step"

    def __init__(self, options: ProbeOptions, env: ProbeEnv) -> None:
        super().__init__(options, env)
        self.total = planned_steps(env)
        self.pending: Any = None
        self.last: dict[str, float] = {}

    @torch.no_grad()
    def measure(self) -> None:
        self.pending = layer_spectra(self.env.index)

    def emit(self, step: int, epoch: int, rec: Any) -> None:
        if self.pending is None:
            return
        ids, vals = self.pending
        self.pending = None
        if not ids:
            return
        roles = [self.env.index.roles[i] for i in ids]
        table = torch.stack([vals[k] for k in METRICS]).cpu().tolist()  # one transfer
        for k, row in zip(METRICS, table):
            rec.layer_rows(step, epoch, k, roles, row, layers=ids)
        cond = [v for v in table[0] if not math.isnan(v)]
        self.last = {"cond_max": max(cond) if cond else math.nan, "top1_energy_mean": sum(table[1]) / len(table[1])}
        if self.total is not None and step >= self.total:
            self._spectra(step, epoch, rec)

    def _spectra(self, step: int, epoch: int, rec: Any) -> None:
        offsets = layer_offsets(self.env.index)
        roles = self.env.index.roles
        for p in self.env.index.params:
            first, _ = offsets[id(p)]
            s = torch.linalg.svdvals(as_stack(p.detach()).float()).cpu()  # run end only: one sync per parameter
            for j, sv in enumerate(s.tolist()):
                layer = first + j
                for i, v in enumerate(sv):
                    rec.layer_rows(step, epoch, f"sv@{i}", [roles[layer]], [v], layers=[layer])

    def summary(self, steps: int) -> dict[str, Any]:
        return {"cond_max": self.last.get("cond_max", math.nan),
                "top1_energy_mean": self.last.get("top1_energy_mean", math.nan)}
