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

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        loss = self.inner.step(closure)
        self.project()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "projections": [p.state_dict() for p in self.projections]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        if len(state["projections"]) != len(self.projections):
            raise ValueError("projection count in state does not match this optimizer")
        for proj, st in zip(self.projections, state["projections"]):
            proj.load_state_dict(st)

    def __repr__(self) -> str:
        names = ", ".join(type(p).__name__ for p in self.projections)
        return f"Projected({self.inner!r}, [{names}])"
