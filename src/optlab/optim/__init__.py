"""Optimizers. ``build(name, model, **cfg)`` returns a torch optimizer or a ``Projected`` wrapper.

| name | what it is |
| --- | --- |
| ``sgd`` | plain SGD: momentum 0, weight decay 0, fixed LR |
| ``sgd_momentum`` | SGD with momentum 0.9 |
| ``adam`` | torch Adam with its defaults (lr 1e-3 unless given) |
| ``adamw`` | torch AdamW with its defaults |
| ``sgd_sn`` | vanilla SGD, then every weight matrix projected to spectral norm <= 1 after each step |

Every optimizer works in a user's own loop: ``opt.zero_grad(); loss.backward(); opt.step()``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..models import WEIGHT_ROLES, params_by_role
from .projected import Projected
from .spectral import SpectralProjection, power_iteration, spectral_norm_exact

__all__ = [
    "build",
    "optimizer_names",
    "Projected",
    "SpectralProjection",
    "power_iteration",
    "spectral_norm_exact",
]

_NAMES = ("sgd", "sgd_momentum", "adam", "adamw", "sgd_sn")


def optimizer_names() -> list[str]:
    return list(_NAMES)


def _params(model: nn.Module | Any) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def build(
    name: str,
    model: nn.Module,
    lr: float | None = None,
    *,
    sn_mode: str = "clip",
    sn_sigma: str = "exact",
    sn_power_iters: int = 1,
    sn_roles: tuple[str, ...] = WEIGHT_ROLES,
    seed: int = 0,
    **extra: Any,
) -> torch.optim.Optimizer | Projected:
    """Build optimizer ``name`` for ``model``.

    ``lr`` None takes the torch default for adam/adamw and raises for SGD variants (SGD has
    no sensible default). ``sn_*`` configure the spectral projection of ``sgd_sn``; it is
    applied to parameters whose role is in ``sn_roles`` (every weight matrix by default),
    once at construction (so the constraint holds from the first step) and after each step.
    """
    if name not in _NAMES:
        raise ValueError(f"optimizer: unknown {name!r}; allowed: {', '.join(_NAMES)}")
    if extra:
        raise ValueError(f"optimizer {name}: unexpected options {sorted(extra)}")
    params = _params(model)
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(params) if lr is None else cls(params, lr=lr)
    if lr is None:
        raise ValueError(f"optimizer {name}: lr is required")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=0.0)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=0.0)
    # sgd_sn
    inner = torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=0.0)
    matrices = [p for _, p in params_by_role(model, sn_roles) if p.dim() >= 2]
    proj = SpectralProjection(matrices, mode=sn_mode, sigma=sn_sigma, power_iters=sn_power_iters, seed=seed)
    opt = Projected(inner, [proj])
    opt.project()
    return opt
