"""Spectral normalization as a forward reparametrization (the ablation's third form).

Instead of projecting the stored weights after each step, the forward pass uses W / sigma(W)
with sigma from one power iteration per training forward (Miyato et al., 2018). For 2-D
``nn.Linear`` and convolution weights this is torch's own
``torch.nn.utils.parametrizations.spectral_norm``. The deep MLP keeps its hidden layers in one
3-D stack, which torch's parametrization would treat as a single matrix; for it,
:class:`BatchedSpectralNorm` applies the same rule to every slice at once, with the same
semantics: power iteration only in training mode, persistent vectors in buffers.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm


class BatchedSpectralNorm(nn.Module):
    """Parametrization W -> W / sigma(W) for a ``(b, m, n)`` stack, one power iteration per call."""

    def __init__(self, weight: torch.Tensor, n_power_iterations: int = 1, eps: float = 1e-12) -> None:
        super().__init__()
        b, m, n = weight.shape
        g = torch.Generator().manual_seed(0)
        self.n_power_iterations, self.eps = n_power_iterations, eps
        u = nn.functional.normalize(torch.randn(b, m, generator=g), dim=-1).to(weight.device)
        v = nn.functional.normalize(torch.randn(b, n, generator=g), dim=-1).to(weight.device)
        self.register_buffer("_u", u)
        self.register_buffer("_v", v)
        with torch.no_grad():  # warm up like torch's spectral_norm does at registration
            self._power(weight.detach(), 15)

    @torch.no_grad()
    def _power(self, w: torch.Tensor, iters: int) -> None:
        u, v = self._u, self._v
        for _ in range(iters):
            v = nn.functional.normalize((w.transpose(-2, -1) @ u.unsqueeze(-1)).squeeze(-1), dim=-1, eps=self.eps)
            u = nn.functional.normalize((w @ v.unsqueeze(-1)).squeeze(-1), dim=-1, eps=self.eps)
        self._u.copy_(u)
        self._v.copy_(v)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._power(w.detach(), self.n_power_iterations)
        u, v = self._u.clone(), self._v.clone()
        sigma = (u.unsqueeze(-2) @ w @ v.unsqueeze(-1)).squeeze(-1).squeeze(-1)
        return w / sigma.view(-1, 1, 1)


def apply_spectral_norm_reparam(model: nn.Module, roles: tuple[str, ...] = ("input", "hidden", "output")) -> nn.Module:
    """Register the reparametrization on every weight whose role is in ``roles`` (in place)."""
    role_of = model.param_roles()  # type: ignore[operator]
    for name, role in list(role_of.items()):
        if role not in roles:
            continue
        mod_name, _, attr = name.rpartition(".")
        module = model.get_submodule(mod_name) if mod_name else model
        p = getattr(module, attr)
        if p.dim() == 3:
            parametrize.register_parametrization(module, attr, BatchedSpectralNorm(p.detach()))
        elif p.dim() in (2, 4):
            spectral_norm(module, name=attr)
    return model
