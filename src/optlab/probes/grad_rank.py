"""``grad_rank``: the effective rank of each weight layer's gradient, after backward.

Effective rank (:func:`optlab.metrics.spectra.effective_rank`): ``exp`` of the Shannon entropy of
``sigma_i / sum_j sigma_j`` (fp32 SVD), ``n`` for ``I_n``, ``k`` for a rank-``k`` projector. One
batched ``svdvals`` per distinct layer shape.

Rows (layers.csv): ``grad_erank`` per layer; for the layers the run's optimizer says Muon updates
(its ``muon_params()``), ``ns_grad_erank``: the effective rank of ``NS(G)``, the Newton-Schulz
orthogonalization of the raw gradient ``G`` with the Muon group's own ``ns_steps`` and
coefficients (bfloat16, as Muon computes it). Our own definition, stated: Muon orthogonalizes the
Nesterov momentum ``U``, not ``G``; ``NS(G)`` isolates what the orthogonalization does to the
gradient's spectrum. Curves: ``grad_erank_mean`` (mean over layers at each measurement) and,
with Muon layers, ``ns_grad_erank_mean``.

Summary: ``grad_erank_mean`` (mean over layers and measurements), ``grad_erank_final`` (the last
measurement's mean over layers), ``ns_grad_erank_mean`` (None when the optimizer has no Muon
layers) and ``grad_rank_muon_layers`` (how many layers Muon updates; 0 says that the NS rows were
not written because the optimizer has none).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..metrics.spectra import effective_rank
from ..optim.muon import newton_schulz
from . import PROBES
from .base import Probe, ProbeEnv, ProbeOptions
from .batching import as_stack, layer_items, layer_offsets, muon_parameters, ns_settings, per_layer


def muon_layer_params(env: ProbeEnv) -> list[Any]:
    """The index's parameters that the run's optimizer updates with Muon (empty when none)."""
    pairs = muon_parameters(getattr(env.method, "optimizer", None)) or []
    ids = {id(p) for _, p in pairs}
    return [p for p in env.index.params if id(p) in ids]


@PROBES.register("grad_rank")
class GradRank(Probe):
    name = "grad_rank"
    point = "after_backward"

    def __init__(self, options: ProbeOptions, env: ProbeEnv) -> None:
        super().__init__(options, env)
        self.muon = muon_layer_params(env)
        self.muon_ids = {id(p) for p in self.muon}
        self.n_muon_layers = sum(layer_offsets(env.index)[id(p)][1] for p in self.muon)
        opt = getattr(env.method, "optimizer", None)
        self.ns = {id(p): ns_settings(opt, p) for p in self.muon}
        self.pending: Any = None
        self.sum = self.ns_sum = 0.0
        self.count = self.ns_count = 0
        self.final = math.nan

    @torch.no_grad()
    def measure(self) -> None:
        ids, vals = per_layer(layer_items(self.env.index, grads=True), lambda g: {"r": effective_rank(g)})
        ns_ids, ns_vals = [], {}
        if self.muon:
            items = []
            for p in self.muon:
                if p.grad is None:
                    continue
                first = layer_offsets(self.env.index)[id(p)][0]
                steps, coef = self.ns[id(p)]
                items.append((first, (steps, coef), p.grad.detach()))
            ns_ids, ns_vals = _ns_ranks(items)
        self.pending = (ids, vals.get("r"), ns_ids, ns_vals.get("r"))

    def emit(self, step: int, epoch: int, rec: Any) -> None:
        if self.pending is None:
            return
        ids, r, ns_ids, ns_r = self.pending
        self.pending = None
        roles = self.env.index.roles
        if ids:
            vals = r.tolist()
            rec.layer_rows(step, epoch, "grad_erank", [roles[i] for i in ids], vals, layers=ids)
            mean = sum(vals) / len(vals)
            rec.metric(step, epoch, "grad_erank_mean", mean)
            self.sum += sum(vals)
            self.count += len(vals)
            self.final = mean
        if ns_ids:
            vals = ns_r.tolist()
            rec.layer_rows(step, epoch, "ns_grad_erank", [roles[i] for i in ns_ids], vals, layers=ns_ids)
            rec.metric(step, epoch, "ns_grad_erank_mean", sum(vals) / len(vals))
            self.ns_sum += sum(vals)
            self.ns_count += len(vals)

    def summary(self, steps: int) -> dict[str, Any]:
        return {"grad_erank_mean": self.sum / self.count if self.count else math.nan,
                "grad_erank_final": self.final,
                "ns_grad_erank_mean": self.ns_sum / self.ns_count if self.ns_count else None,
                "grad_rank_muon_layers": self.n_muon_layers}

    def state_dict(self) -> dict[str, Any]:
        return {"sum": self.sum, "count": self.count, "ns_sum": self.ns_sum, "ns_count": self.ns_count,
                "final": self.final}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sum, self.count = float(state["sum"]), int(state["count"])
        self.ns_sum, self.ns_count = float(state["ns_sum"]), int(state["ns_count"])
        self.final = float(state["final"])


def _ns_ranks(items: list[tuple[int, tuple[int, Any], torch.Tensor]]) -> tuple[list[int], dict[str, torch.Tensor]]:
    """Effective rank of NS(G) per layer, batched over same-shape matrices with the same NS settings."""
    by_setting: dict[Any, list[tuple[int, torch.Tensor, tuple[int, Any]]]] = {}
    for first, setting, g in items:
        key = (setting[0], setting[1] if isinstance(setting[1], str) else id(setting[1]))
        by_setting.setdefault(key, []).append((first, as_stack(g), setting))
    all_ids: list[int] = []
    parts: list[torch.Tensor] = []
    for members in by_setting.values():
        steps, coef = members[0][2]
        ids, vals = per_layer([(f, t) for f, t, _ in members],
                              lambda g, s=steps, c=coef: {"r": effective_rank(newton_schulz(g, s, c))})
        all_ids.extend(ids)
        parts.append(vals["r"])
    if not all_ids:
        return [], {}
    v = torch.cat(parts)
    order = sorted(range(len(all_ids)), key=all_ids.__getitem__)
    return [all_ids[i] for i in order], {"r": v[torch.tensor(order, device=v.device)]}
