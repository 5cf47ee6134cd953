"""``costate``: a credit method's estimated costates scored against the exact ones (issue #13).

On the task's fixed probe batch, every ``every`` steps after the step, for a credit method
(:mod:`optlab.credit`: ``credit_bp``, ``dfa``, ``state_bridge``, ``credit_bridge``), per layer
``k = 1..L`` (rows ``layer`` 0..L-1 of layers.csv) with ``lambda_hat_k`` the method's credit and
``lambda_k = dL/ds_k`` the exact costate (autograd), each over the flattened batch:

| metric | definition (ours) |
| --- | --- |
| ``costate_cos`` | cosine between ``lambda_hat_k`` and ``lambda_k`` |
| ``costate_rel_l2`` | ``||lambda_hat_k - lambda_k|| / ||lambda_k||`` |
| ``costate_norm_ratio`` | ``||lambda_hat_k|| / ||lambda_k||`` |
| ``perturb_rho`` | Spearman correlation, over ``perturbations`` random unit directions ``xi`` of ``s_k`` (the whole batch tensor), between ``lambda_hat_k . xi`` and ``(L(s_k + eps xi) - L(s_k - eps xi)) / 2 eps``, ``eps = perturb_eps * ||s_k||`` |
| ``nudge`` | ``(L(s_k - delta u_k) - L) / L`` with ``u_k = lambda_hat_k / ||lambda_hat_k||`` and the same step length for every method, ``delta = nudge_step * L / ||lambda_k||`` (so that to first order the exact costate gives ``-nudge_step`` and any credit ``-nudge_step * costate_cos``); each layer nudged alone (negative: the credit points downhill) |
| ``update_cos`` | cosine between layer ``k``'s update (the gradient of the local surrogate with the method's credits) and its backprop gradient |

Curves (curves.csv): each metric's mean over the hidden layers ``1..L-1`` (the output layer's
credit is the true error for every method, so it is left out of the means), named ``<metric>_mean``.
Summary: the same means at the last measurement, named ``<metric>``. The directions are drawn from
a generator seeded by ``seed`` and the step, so a resumed run measures what an uninterrupted one
does. Everything is computed on the device; the one host sync is in ``emit``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field

from ..credit.core import backprop_grads, check_credit_model, credit_update, exact_costates, per_layer_cosine
from . import PROBES
from .base import Probe, ProbeEnv, ProbeOptions

METRICS = ("costate_cos", "costate_rel_l2", "costate_norm_ratio", "perturb_rho", "nudge", "update_cos")


class CostateOptions(ProbeOptions):
    every: int = Field(100, ge=1)
    perturbations: int = Field(16, ge=3)
    perturb_eps: float = Field(1e-3, gt=0, allow_inf_nan=False)
    nudge_step: float = Field(0.25, gt=0, allow_inf_nan=False)
    seed: int = Field(0, ge=0)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation along the last axis (ranks by double argsort; no ties expected)."""
    ra = a.argsort(-1).argsort(-1).double()
    rb = b.argsort(-1).argsort(-1).double()
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.square().sum(-1).sqrt() * rb.square().sum(-1).sqrt()).clamp_min(1e-30)


def costate_scores(lam_hat: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """(cos, rel_l2, norm_ratio) of one layer's credit against its exact costate, over the flattened batch."""
    a, b = lam_hat.double().reshape(-1), lam.double().reshape(-1)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b).clamp_min(1e-30)
    return torch.stack([(a @ b) / (na * nb).clamp_min(1e-30), torch.linalg.vector_norm(a - b) / nb, na / nb])


def perturb_and_nudge(model: Any, task: Any, k: int, h: torch.Tensor, lam_hat: torch.Tensor, y: torch.Tensor,
                      loss: torch.Tensor, n: int, eps_rel: float, nudge_step: float, gen: torch.Generator,
                      lam_norm: torch.Tensor) -> torch.Tensor:
    """(perturb_rho, nudge) of state ``k``: one batched forward of ``2n + 1`` copies of the batch.
    ``lam_norm``: the exact costate's norm (sets the nudge's step length)."""
    b = h.shape[0]
    xi = torch.randn((n, *h.shape), generator=gen, dtype=torch.float32).to(device=h.device, dtype=h.dtype)
    xi = xi / torch.linalg.vector_norm(xi.reshape(n, -1), dim=1).reshape(n, *([1] * h.dim()))
    eps = eps_rel * torch.linalg.vector_norm(h)
    delta = nudge_step * loss / lam_norm.clamp_min(1e-30)
    unit = lam_hat / torch.linalg.vector_norm(lam_hat).clamp_min(1e-30)
    copies = torch.cat([h + eps * xi, h - eps * xi, (h - delta * unit).unsqueeze(0)])
    out = model.forward_from(k, copies.reshape(-1, *h.shape[1:])).reshape(2 * n + 1, b, -1)
    per = torch.func.vmap(lambda o: task.loss(o, y))(out.reshape(2 * n + 1, b, *out.shape[2:]))
    fd = (per[:n] - per[n : 2 * n]).double() / (2 * eps.double())
    pred = (lam_hat.unsqueeze(0) * xi).reshape(n, -1).double().sum(-1)
    return torch.stack([spearman(pred, fd), ((per[-1] - loss) / loss).double()])


@PROBES.register("costate")
class CostateProbe(Probe):
    name = "costate"
    point = "after_step"
    Options = CostateOptions

    def __init__(self, options: ProbeOptions, env: ProbeEnv) -> None:
        super().__init__(options, env)
        check_credit_model(env.model, "probes.costate")
        if not callable(getattr(env.method, "estimate", None)):
            raise ValueError("probes.costate: needs a credit method (step_method credit_bp, dfa, state_bridge or credit_bridge)")
        self.pending: torch.Tensor | None = None
        self.last: dict[str, float] = {}
        self._steps = 0

    def due(self, steps_done: int) -> bool:
        ok = super().due(steps_done)
        if ok:
            self._steps = steps_done + 1
        return ok

    def measure(self) -> None:
        o = self.options
        assert isinstance(o, CostateOptions)
        model, task, method = self.env.model, self.env.task, self.env.method
        x, y = task.probe_batch()
        states, loss, lam_hat = method.estimate(x, y)
        _, loss_x, lam = exact_costates(model, task, x, y)
        gen = torch.Generator().manual_seed(o.seed * 1_000_003 + self._steps)
        rows = []
        with torch.no_grad():
            for k in range(1, len(states)):
                sc = costate_scores(lam_hat[k - 1], lam[k - 1])
                pn = perturb_and_nudge(model, task, k, states[k], lam_hat[k - 1], y, loss_x, o.perturbations,
                                       o.perturb_eps, o.nudge_step, gen, torch.linalg.vector_norm(lam[k - 1]))
                rows.append(torch.cat([sc, pn]))
        ucos = per_layer_cosine(model, credit_update(model, states, lam_hat), backprop_grads(model, task, x, y))
        table = torch.stack(rows).T  # (5, L)
        self.pending = torch.cat([table, ucos.double().unsqueeze(0)])

    def emit(self, step: int, epoch: int, rec: Any) -> None:
        if self.pending is None:
            return
        vals = self.pending.cpu().tolist()
        self.pending = None
        L = len(vals[0])
        roles = list(self.env.index.roles) if len(self.env.index.roles) == L else ["hidden"] * L
        hidden = max(1, L - 1)
        for m, row in zip(METRICS, vals):
            rec.layer_rows(step, epoch, m, roles, row)
            mean = sum(row[: L - 1]) / hidden if L > 1 else row[0]
            self.last[m] = float(mean)
            rec.metric(step, epoch, f"{m}_mean", float(mean))

    def summary(self, steps: int) -> dict[str, Any]:
        return {m: self.last.get(m, math.nan) for m in METRICS}

    def state_dict(self) -> dict[str, Any]:
        return {"last": dict(self.last)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last = {str(k): float(v) for k, v in (state.get("last") or {}).items()}
