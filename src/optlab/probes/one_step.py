"""``one_step``: the one-step phase transition at run end (issue #11 item 5).

From the run's final (trained) model, on the task's fixed probe batch and in eval mode (batch
norm on its running statistics, nothing written), a single step of normalized size ``r`` along a
unit direction ``d``: ``theta' = theta + r * rho(d) * d`` with ``rho(d) = pi / Delta_a(d)`` the
softmax convergence radius along ``d`` (:mod:`optlab.optim.rho`: ``Delta_a`` is the largest
per-sample spread of the logits' directional derivative, one JVP). Directions: the negative
gradient of the probe-batch loss (direction 0, role ``grad``) and ``random`` unit directions
(Gaussian over every parameter, normalized over the whole model, seeded by ``seed``; roles
``random``). ``r`` runs over a log grid (``r_min`` to ``r_max``, ``per_decade`` points a decade).

Rows (layers.csv, one per direction as ``layer``, role ``grad``/``random``): ``one_step_rho``
(rho along the direction), ``one_step_r_rise`` (the smallest grid ``r`` at which the loss after
the step exceeds ``(1 + rise) *`` the loss before; ``inf`` if none does) and, per grid point,
``one_step_ratio@r=<r>`` (loss after / loss before; a non-finite loss is recorded as ``inf``).
Summary: ``one_step_loss``, ``one_step_r_rise_grad``, the minimum and median of the random
directions' ``one_step_r_rise``, and ``one_step_collapse_below_1``: how many directions' loss
rose by more than ``rise`` at a grid ``r < 1`` (the claim under test: none).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch
from pydantic import Field
from torch.func import functional_call

from ..models.functional import jvp_outputs
from . import PROBES
from .base import Probe, ProbeEnv, ProbeOptions


class OneStepOptions(ProbeOptions):
    every: int = Field(1, ge=1)  # unused: run end only
    directions: int = Field(20, ge=0)  # random unit directions
    r_min: float = Field(0.01, gt=0, allow_inf_nan=False)
    r_max: float = Field(100.0, gt=0, allow_inf_nan=False)
    per_decade: int = Field(4, ge=1)
    rise: float = Field(0.1, gt=0, allow_inf_nan=False)  # "the loss rises by more than 10%"
    seed: int = Field(0, ge=0)


def r_grid(r_min: float, r_max: float, per_decade: int) -> list[float]:
    """``r_min`` to ``r_max`` with ``per_decade`` points per decade, both ends included."""
    if r_max < r_min:
        raise ValueError(f"probes.one_step: r_max ({r_max}) must be >= r_min ({r_min})")
    n = max(1, round(math.log10(r_max / r_min) * per_decade))
    return [float(r_min * (r_max / r_min) ** (i / n)) for i in range(n + 1)]


def first_rise(ratios: list[float], grid: list[float], rise: float) -> float:
    """The smallest grid ``r`` whose loss ratio exceeds ``1 + rise`` (non-finite counts), else inf."""
    for r, q in zip(grid, ratios):
        if not (q <= 1 + rise):  # NaN counts as a rise
            return r
    return math.inf


@PROBES.register("one_step")
class OneStep(Probe):
    name = "one_step"
    point = "run_end"
    Options = OneStepOptions

    def __init__(self, options: ProbeOptions, env: ProbeEnv) -> None:
        super().__init__(options, env)
        o = options
        assert isinstance(o, OneStepOptions)
        self.grid = r_grid(o.r_min, o.r_max, o.per_decade)
        self.rows: dict[str, list[float]] | None = None
        self.roles: list[str] = []
        self.loss0 = math.nan

    def _loss(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.env.task.loss(functional_call(self.env.model, params, (x,)).float(), y)

    def measure(self) -> None:
        o = self.options
        assert isinstance(o, OneStepOptions)
        model, task = self.env.model, self.env.task
        x, y = task.probe_batch()
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        names = list(named)
        flags = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            theta = {n: p.detach() for n, p in named.items()}
            loss0 = self._loss(dict(named), x, y)
            grads = torch.autograd.grad(loss0, [named[n] for n in names], allow_unused=True)
            g = [torch.zeros_like(theta[n]) if gi is None else gi.detach() for n, gi in zip(names, grads)]
            gen = torch.Generator().manual_seed(o.seed)
            dirs: list[list[torch.Tensor]] = [[-t for t in g]]
            for _ in range(o.directions):
                dirs.append([torch.randn(theta[n].shape, generator=gen, dtype=theta[n].dtype).to(theta[n].device)
                             for n in names])
            self.roles = ["grad"] + ["random"] * o.directions
            rows: dict[str, list[float]] = {"one_step_rho": [], "one_step_r_rise": []}
            for r in self.grid:
                rows[f"one_step_ratio@r={r:g}"] = []
            with torch.no_grad():
                l0 = float(loss0)
                self.loss0 = l0
                for d in dirs:
                    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in d]))
                    if not float(norm) > 0:
                        unit = d
                        rho = math.inf
                    else:
                        unit = [t / norm for t in d]
                        slopes = jvp_outputs(model, x, dict(zip(names, unit)))[1]
                        lo, hi = torch.aminmax(slopes.reshape(-1, slopes.shape[-1]).float(), dim=-1)
                        spread = float((hi - lo).max())
                        rho = math.pi / spread if spread > 0 else math.inf
                    ratios = []
                    for r in self.grid:
                        if not math.isfinite(rho):
                            ratios.append(1.0)
                            continue
                        tau = r * rho
                        moved = {n: theta[n] + tau * u for n, u in zip(names, unit)}
                        lv = float(self._loss(moved, x, y))
                        ratios.append(lv / l0 if math.isfinite(lv) and l0 > 0 else math.inf)
                    rows["one_step_rho"].append(rho)
                    rows["one_step_r_rise"].append(first_rise(ratios, self.grid, o.rise))
                    for r, q in zip(self.grid, ratios):
                        rows[f"one_step_ratio@r={r:g}"].append(q)
            self.rows = rows
        finally:
            for m, was in flags:
                m.training = was

    def emit(self, step: int, epoch: int, rec: Any) -> None:
        if self.rows is None:
            return
        for metric, values in self.rows.items():
            rec.layer_rows(step, epoch, metric, self.roles, values)

    def summary(self, steps: int) -> dict[str, Any]:
        if self.rows is None:
            return {}
        o = self.options
        assert isinstance(o, OneStepOptions)
        rises = self.rows["one_step_r_rise"]
        rand = sorted(rises[1:])
        below = sum(1 for v in rises if v < 1)
        return {"one_step_loss": self.loss0, "one_step_r_rise_grad": rises[0],
                "one_step_r_rise_random_min": rand[0] if rand else math.nan,
                "one_step_r_rise_random_median": float(statistics.median(rand)) if rand else math.nan,
                "one_step_collapse_below_1": float(below)}
