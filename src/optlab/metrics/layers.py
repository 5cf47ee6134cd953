"""Per-layer gradient norms and exact spectral norms.

Layers are numbered in module order over the weight matrices: for the deep MLP, 0 is the
input projection, 1..depth the hidden stack and depth+1 the output head. A 3-D parameter
(a stack of matrices) contributes one layer per slice; its norms are one batched call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models import weight_layers
from ..optim.spectral import spectral_norm_exact


@dataclass(frozen=True)
class LayerIndex:
    """Which layer numbers belong to which parameter, and their roles."""

    params: list[nn.Parameter]
    roles: list[str]  # one per layer

    @classmethod
    def of(cls, model: nn.Module) -> "LayerIndex":
        params, roles = [], []
        for _, role, p in weight_layers(model):
            params.append(p)
            n = p.reshape(-1, *p.shape[-2:]).shape[0]
            roles.extend([role] * n)
        return cls(params, roles)

    def __len__(self) -> int:
        return len(self.roles)


def layer_grad_norms(index: LayerIndex) -> torch.Tensor:
    """Frobenius norm of each layer's gradient, ``(L,)`` on the parameters' device (no sync)."""
    out = []
    for p in index.params:
        g = p.grad
        n = p.reshape(-1, *p.shape[-2:]).shape[0]
        if g is None:
            out.append(torch.full((n,), float("nan"), device=p.device))
        else:
            out.append(g.detach().float().reshape(n, -1).norm(dim=1))
    return torch.cat(out)


@torch.no_grad()
def layer_sigma_max(index: LayerIndex) -> torch.Tensor:
    """Exact largest singular value of each layer, ``(L,)`` (batched SVD per parameter)."""
    return torch.cat([spectral_norm_exact(p.detach().reshape(-1, *p.shape[-2:])) for p in index.params])
