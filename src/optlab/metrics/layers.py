"""Per-layer gradient norms and spectral norms.

Layers are numbered in module order over the weight parameters: for the deep MLP, 0 is the
input projection, 1..depth the hidden stack and depth+1 the output head. A 3-D parameter
(a stack of matrices) contributes one layer per slice; its norms are one batched call. A 4-D
conv kernel ``(out, in/groups, kh, kw)`` is one layer.

For a conv layer the gradient norm is the Frobenius norm of the whole kernel's gradient, and
sigma is, by default, the exact spectral norm of the reshaped kernel ``(out, in*kh*kw)``
(cheap, exact, what torch's ``spectral_norm`` bounds). The conv projection of ``sgd_sn``
bounds (by default) a different quantity, the convolution's operator norm at the layer's
input size; ``layer_sigma_max(index, operator=True)`` reports that instead, for models that
provide ``conv_specs()``: Lanczos from vectors carried in the index (the projection's own
operator, separate vectors; a lower bound that matches the dense exact norm to ~1e-6 in the
tests; see :mod:`optlab.optim.conv_spectral`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..models import weight_layers
from ..optim.spectral import spectral_norm_exact

OPERATOR_ITERS = 30  # Lanczos steps per operator-norm check, from the carried vector
OPERATOR_WARMUP = 100  # Lanczos steps on the first check


def _n_layers(p: torch.Tensor) -> int:
    if p.dim() == 4:
        return 1
    return p.reshape(-1, *p.shape[-2:]).shape[0]


@dataclass(frozen=True)
class LayerIndex:
    """Which layer numbers belong to which parameter, and their roles."""

    params: list[nn.Parameter]
    roles: list[str]  # one per layer
    conv_specs: list[dict[str, Any] | None] = field(default_factory=list)  # one per param; None unless a conv with geometry
    _state: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # operator-norm power vectors

    @classmethod
    def of(cls, model: nn.Module) -> "LayerIndex":
        fn = getattr(model, "conv_specs", None)
        all_specs = fn() if callable(fn) else {}
        params, roles, specs = [], [], []
        for name, role, p in weight_layers(model):
            params.append(p)
            roles.extend([role] * _n_layers(p))
            specs.append(all_specs.get(name) if p.dim() == 4 else None)
        return cls(params, roles, specs)

    def __len__(self) -> int:
        return len(self.roles)

    def state_dict(self) -> dict[str, Any]:
        """The operator-norm vectors carried between checks (for checkpoints: a resumed run then
        measures exactly what an uninterrupted one would)."""
        est = self._state.get("operator")
        return {"operator": None if est is None else est.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("operator") is None:
            self._state.pop("operator", None)
            return
        _operator_estimator(self, OPERATOR_WARMUP).load_state_dict(state["operator"])


def layer_grad_norms(index: LayerIndex) -> torch.Tensor:
    """Frobenius norm of each layer's gradient, ``(L,)`` on the parameters' device (no sync)."""
    out = []
    for p in index.params:
        g = p.grad
        n = _n_layers(p)
        if g is None:
            out.append(torch.full((n,), float("nan"), device=p.device))
        else:
            out.append(g.detach().float().reshape(n, -1).norm(dim=1))
    return torch.cat(out)


@torch.no_grad()
def layer_sigma_max(
    index: LayerIndex, *, operator: bool = False, iters: int = OPERATOR_ITERS, warmup_iters: int = OPERATOR_WARMUP
) -> torch.Tensor:
    """Largest singular value of each layer, ``(L,)``.

    Matrices and stacks: exact (batched eigensolver per parameter). Conv kernels: the exact
    reshaped-kernel norm, batched over kernels of the same shape; with ``operator=True`` the
    operator norm at the layer's input size instead (Lanczos: ``warmup_iters`` steps on the
    first call, ``iters`` after, vectors carried in ``index``; ValueError for a conv without
    geometry).
    """
    out: list[torch.Tensor | None] = [None] * len(index.params)
    kernels: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(index.params):
        if p.dim() == 4:
            kernels[(p.shape[0], p[0].numel(), p.device)].append(i)
        else:
            out[i] = spectral_norm_exact(p.detach().reshape(-1, *p.shape[-2:]))
    if operator:
        conv_ids = [i for i, p in enumerate(index.params) if p.dim() == 4]
        if conv_ids:
            sig = _operator_sigmas(index, conv_ids, iters, warmup_iters)
            for j, i in enumerate(conv_ids):
                out[i] = sig[j : j + 1]
    else:
        for ids in kernels.values():
            mats = torch.stack([index.params[i].detach().reshape(index.params[i].shape[0], -1) for i in ids])
            sig = spectral_norm_exact(mats)
            for j, i in enumerate(ids):
                out[i] = sig[j : j + 1]
    return torch.cat([o for o in out if o is not None]) if out else torch.zeros(0)


def _operator_estimator(index: LayerIndex, warmup_iters: int) -> Any:
    """The index's own operator-norm estimator over its conv kernels (created on first use)."""
    from ..optim.conv_spectral import ConvSpectralProjection  # the projection's own operator and vectors

    est = index._state.get("operator")
    if est is None:
        conv_ids = [i for i, p in enumerate(index.params) if p.dim() == 4]
        missing = [i for i in conv_ids if index.conv_specs[i] is None]
        if missing:
            shapes = [tuple(index.params[i].shape) for i in missing]
            raise ValueError(f"operator norms need conv_specs() from the model; none for kernels of shapes {shapes}")
        est = ConvSpectralProjection(
            [(index.params[i], index.conv_specs[i]) for i in conv_ids], form="operator_power", warmup_iters=warmup_iters, seed=12345
        )
        index._state["operator"] = est
    return est


def _operator_sigmas(index: LayerIndex, conv_ids: list[int], iters: int, warmup_iters: int) -> torch.Tensor:
    return _operator_estimator(index, warmup_iters).sigmas(iters, lanczos=True)
