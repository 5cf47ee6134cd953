"""An optimizer wrapper that applies post-step projections after every ``step()``."""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch


class Projection(Protocol):
    def project(self) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Projected:
    """``inner.step()`` then each projection, in order.

    Behaves like a ``torch.optim.Optimizer`` for training loops: ``step``, ``zero_grad``,
    ``param_groups`` (shared with the inner optimizer, so LR schedulers can edit them),
    ``state``, ``state_dict`` and ``load_state_dict`` (inner state and projection state
    together).
    """

    def __init__(self, inner: torch.optim.Optimizer, projections: list[Projection]) -> None:
        self.inner = inner
        self.projections = list(projections)
        # steps at which some projection changed a weight (clip: a sigma above 1), counted on
        # the device without a host sync; a constraint that never binds is worth knowing
        self._active: torch.Tensor | None = None
        self._active_base = 0

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @property
    def state(self) -> Any:
        return self.inner.state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.inner.defaults

    def project(self) -> None:
        for proj in self.projections:
            proj.project()

    def _count_active(self) -> None:
        flags = [f for proj in self.projections for f in _acted(proj)]
        if flags:
            hit = torch.stack([f.any() for f in flags]).any()
            self._active = hit.long() if self._active is None else self._active + hit

    @property
    def active_steps(self) -> int:
        """Optimizer steps (carried through state_dict) at which a projection changed some weight:
        for clip, some sigma above 1; for normalize, some sigma not 1. Host sync."""
        return self._active_base + (0 if self._active is None else int(self._active.item()))

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        loss = self.inner.step(closure)
        self.project()
        self._count_active()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "projections": [p.state_dict() for p in self.projections],
                "active_steps": self.active_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self._active, self._active_base = None, int(state.get("active_steps", 0))
        if len(state["projections"]) != len(self.projections):
            raise ValueError("projection count in state does not match this optimizer")
        for proj, st in zip(self.projections, state["projections"]):
            proj.load_state_dict(st)

    def __repr__(self) -> str:
        names = ", ".join(type(p).__name__ for p in self.projections)
        return f"Projected({self.inner!r}, [{names}])"


ACT_TOL = 1e-6
"""normalize acts where |sigma - 1| > ACT_TOL (a matrix already at norm 1 is left as it was)."""


def _acted(proj: Any) -> list[torch.Tensor]:
    """Per group, which matrices the last ``project()`` rescaled (from the sigmas it used)."""
    mode = getattr(proj, "mode", None)
    out = []
    for sigma in getattr(proj, "last_sigma", []) or []:
        if sigma is None or sigma.numel() == 0:
            continue
        out.append(sigma > 1.0 if mode == "clip" else (sigma - 1.0).abs() > ACT_TOL)
    return out
