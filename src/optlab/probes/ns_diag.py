"""``ns_diag``: Newton-Schulz diagnostics on the real gradients of the Muon-updated layers.

After backward, for each layer the run's optimizer updates with Muon (its ``muon_params()``) and
each step count ``k`` in ``steps`` (default 1, 2, 3, 5, 10), with ``O = NS_k(G)`` of the raw
gradient ``G`` (the Muon group's own coefficients, ``quintic`` or ``polar_express``; bfloat16 like
Muon unless ``dtype: float32``), from one NS pass (the schedules are nested) batched over
same-shape matrices (:func:`ns_rows`: the quantities of :func:`optlab.metrics.spectra.ns_diagnostics`
without its per-step SVD):

- ``ns_angle@k=<k>``: the angle between ``G`` and ``O`` (radians, from their Frobenius inner product);
- ``ns_rel_diff@k=<k>``: ``||G - O||_F / ||G||_F`` (scale-dependent: ``O`` has singular values
  near 1 whatever the scale of ``G``);
- ``ns_orth_err@k=<k>``: ``||O^T O - I||_F`` on the smaller side.

Muon itself orthogonalizes the Nesterov momentum, not ``G``; these rows describe the map NS applied
to the gradient (our definition, stated). An optimizer without Muon layers gets no rows;
``ns_diag_layers`` in the summary is then 0. Summary also: ``ns_angle_mean@k=<k>`` and
``ns_orth_err_mean@k=<k>`` (means over layers and measurements).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from ..metrics.spectra import NS_STEPS
from ..optim.manifold import orthogonality_error
from ..optim.muon import newton_schulz_iterates
from . import PROBES
from .base import Probe, ProbeEnv, ProbeOptions
from .batching import as_stack, layer_offsets, ns_settings, per_layer
from .grad_rank import muon_layer_params

ROWS = ("ns_angle", "ns_rel_diff", "ns_orth_err")


def ns_rows(g: torch.Tensor, steps: tuple[int, ...], ns: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``{"ns_angle@k=<k>", "ns_rel_diff@k=<k>", "ns_orth_err@k=<k>": (B,)}`` for a float32 batch
    ``g`` ``(B, m, n)``: the quantities of :func:`optlab.metrics.spectra.ns_diagnostics` without its
    per-step SVD (one NS pass for every ``k``)."""
    gnorm = g.norm(dim=(-2, -1))
    tiny = torch.finfo(g.dtype).tiny
    out = {}
    for k, o in newton_schulz_iterates(g, steps, ns, dtype).items():
        of = o.float()
        cos = (g * of).sum((-2, -1)) / (gnorm * of.norm(dim=(-2, -1))).clamp_min(tiny)
        out[f"ns_angle@k={k}"] = torch.arccos(cos.clamp(-1.0, 1.0))
        out[f"ns_rel_diff@k={k}"] = (g - of).norm(dim=(-2, -1)) / gnorm.clamp_min(tiny)
        out[f"ns_orth_err@k={k}"] = orthogonality_error(of)
    return out


class NsDiagOptions(ProbeOptions):
    steps: tuple[int, ...] = Field(NS_STEPS, min_length=1)
    dtype: Literal["bfloat16", "float32"] = "bfloat16"


@PROBES.register("ns_diag")
class NsDiag(Probe):
    name = "ns_diag"
    point = "after_backward"
    Options = NsDiagOptions

    def __init__(self, options: NsDiagOptions, env: ProbeEnv) -> None:
        super().__init__(options, env)
        if any(k < 1 for k in options.steps):
            raise ValueError(f"probes.ns_diag.steps: step counts must be >= 1, got {options.steps}")
        self.steps = tuple(sorted(set(options.steps)))
        self.dtype = getattr(torch, options.dtype)
        self.muon = muon_layer_params(env)
        opt = getattr(env.method, "optimizer", None)
        self.coef = {id(p): ns_settings(opt, p)[1] for p in self.muon}
        offsets = layer_offsets(env.index)
        self.n_layers = sum(offsets[id(p)][1] for p in self.muon)
        self.pending: Any = None
        self.sums: dict[str, float] = {}
        self.count = 0

    @torch.no_grad()
    def measure(self) -> None:
        if not self.muon:
            return
        offsets = layer_offsets(self.env.index)
        by_coef: dict[Any, list[tuple[int, torch.Tensor]]] = {}
        coefs: dict[Any, Any] = {}
        for p in self.muon:
            if p.grad is None:
                continue
            c = self.coef[id(p)]
            key = c if isinstance(c, str) else id(c)
            coefs[key] = c
            by_coef.setdefault(key, []).append((offsets[id(p)][0], as_stack(p.grad.detach())))
        ids: list[int] = []
        cols: dict[str, list[torch.Tensor]] = {}
        for key, items in by_coef.items():
            def fn(g: torch.Tensor, c: Any = coefs[key]) -> dict[str, torch.Tensor]:
                return ns_rows(g, self.steps, c, self.dtype)
            i, v = per_layer(items, fn)
            ids.extend(i)
            for name, t in v.items():
                cols.setdefault(name, []).append(t)
        if not ids:
            self.pending = None
            return
        order = sorted(range(len(ids)), key=ids.__getitem__)
        idx = None
        out = {}
        for name, ts in cols.items():
            t = torch.cat(ts)
            if idx is None:
                idx = torch.tensor(order, device=t.device)
            out[name] = t[idx]
        self.pending = ([ids[i] for i in order], out)

    def emit(self, step: int, epoch: int, rec: Any) -> None:
        if self.pending is None:
            return
        ids, vals = self.pending
        self.pending = None
        names = list(vals)
        table = torch.stack([vals[n] for n in names]).cpu().tolist()  # one transfer
        roles = [self.env.index.roles[i] for i in ids]
        for name, row in zip(names, table):
            rec.layer_rows(step, epoch, name, roles, row, layers=ids)
            self.sums[name] = self.sums.get(name, 0.0) + sum(row)
        self.count += len(ids)

    def summary(self, steps: int) -> dict[str, Any]:
        out: dict[str, Any] = {"ns_diag_layers": self.n_layers}
        for k in self.steps:
            for row in ("ns_angle", "ns_orth_err"):
                s = self.sums.get(f"{row}@k={k}")
                out[f"{row}_mean@k={k}"] = s / self.count if s is not None and self.count else None
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums, self.count = {k: float(v) for k, v in state["sums"].items()}, int(state["count"])
