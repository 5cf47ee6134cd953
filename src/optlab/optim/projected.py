"""Optimizer wrappers: :class:`Projected` applies post-step projections after every ``step()``.

Both wrappers here and :class:`optlab.optim.rho.RhoController` are ``torch.optim.Optimizer``
subclasses (:class:`OptimizerWrapper`) that *share* the wrapped optimizer's ``param_groups``,
``state`` and ``defaults``: the very same objects, not copies. So a learning-rate scheduler
(``torch.optim.lr_scheduler.StepLR(opt, 10)``) that edits ``opt.param_groups[i]["lr"]`` edits the
inner optimizer's groups, ``zero_grad`` clears the inner optimizer's gradients, and step hooks
registered on the wrapper (``opt.register_step_post_hook``) run around the wrapper's whole step
(for ``Projected``: after the projection). ``state_dict()`` keeps each wrapper's own format
(``{"inner", "projections", "active_steps"}`` here), so checkpoints written before these were
Optimizer subclasses load unchanged; ``torch.save(opt.state_dict())`` works.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from itertools import chain
from typing import Any, Callable, Protocol

import torch
from torch.optim import optimizer as _torch_optimizer


class Projection(Protocol):
    """What :class:`Projected` runs after each step. A projection may also define
    ``before_step(inner)``, called just before ``inner.step()`` (the certified-bound spectral
    projection records the coming update's size there)."""

    def project(self) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _hooked_step(func: Callable[..., Any]) -> Callable[..., Any]:
    """``step`` that runs the optimizer step hooks (global ones, then the instance's) like torch's
    ``Optimizer.profile_hook_step``, but goes straight to ``func`` when none is registered (torch's
    wrapper opens a profiler range on every call, about 10 us on a CPU: the engine's hot loop)."""

    @functools.wraps(func)
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        gpre = getattr(_torch_optimizer, "_global_optimizer_pre_hooks", {})
        gpost = getattr(_torch_optimizer, "_global_optimizer_post_hooks", {})
        pre, post = self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks
        if not (pre or post or gpre or gpost):
            return func(self, *args, **kwargs)
        for hook in chain(gpre.values(), pre.values()):
            result = hook(self, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(f"{func} must return None or a tuple of (new_args, new_kwargs), but got {result}.")
                args, kwargs = result
        out = func(self, *args, **kwargs)
        for hook in chain(post.values(), gpost.values()):
            hook(self, args, kwargs)
        return out

    step.hooked = True  # type: ignore[attr-defined]  # torch's _patch_step_function leaves it as it is
    return step


class OptimizerWrapper(torch.optim.Optimizer):
    """Base of the optimizer wrappers: a ``torch.optim.Optimizer`` whose ``param_groups``, ``state``
    and ``defaults`` are the wrapped optimizer's (``_wrapped()``), shared, not copied.

    ``torch.optim.Optimizer.__init__`` is not called (it would rebuild the groups from ``params``);
    ``__new__`` sets up what the base class's methods need instead (the hook registries and the
    profiled, hook-running ``step``), so a subclass's ``__init__`` needs no change. Subclasses
    implement ``_wrapped``, ``step``, ``zero_grad``, ``state_dict`` and ``load_state_dict``; each
    subclass's ``step`` runs the step hooks registered on the wrapper (and torch's global ones)
    around its whole step.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("step")
        if own is not None and not getattr(own, "hooked", False):
            cls.step = _hooked_step(own)  # type: ignore[method-assign]

    def __new__(cls, *args: Any, **kwargs: Any) -> "OptimizerWrapper":
        self = super().__new__(cls)
        self._init_optimizer_surface()
        return self

    def _init_optimizer_surface(self) -> None:
        for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                     "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                     "_optimizer_load_state_dict_post_hooks"):
            if name not in self.__dict__:
                setattr(self, name, OrderedDict())
        self._warned_capturable_if_run_uncaptured = True
        self._patch_step_function()  # the zero_grad profiler label; step is already hooked (__init_subclass__)

    def _wrapped(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self._wrapped().param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self._wrapped().param_groups = groups

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self._wrapped().state

    @state.setter
    def state(self, state: Any) -> None:
        self._wrapped().state = state

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self._wrapped().defaults

    @defaults.setter
    def defaults(self, defaults: dict[str, Any]) -> None:
        self._wrapped().defaults = defaults

    # pickling and deepcopy: the wrapper's own attributes (torch's Optimizer keeps only its groups and state)
    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_optimizer_surface()


class Projected(OptimizerWrapper):
    """``inner.step()`` then each projection, in order.

    A ``torch.optim.Optimizer`` (see the module docstring): ``step``, ``zero_grad``,
    ``param_groups``/``state``/``defaults`` (the inner optimizer's own objects, so LR schedulers
    edit them), step hooks, ``state_dict`` and ``load_state_dict`` (inner state and projection
    state together).
    """

    def __init__(self, inner: torch.optim.Optimizer, projections: list[Projection]) -> None:
        self.inner = inner
        self.projections = list(projections)
        # steps at which some projection changed a weight (clip: a sigma above 1), counted on
        # the device without a host sync; a constraint that never binds is worth knowing
        self._active: torch.Tensor | None = None
        self._active_base = 0

    def _wrapped(self) -> torch.optim.Optimizer:
        return self.inner

    @property
    def strict(self) -> bool:
        """Whether every projection bounds its layers' norms by construction (``strict`` on each)."""
        return all(bool(getattr(p, "strict", False)) for p in self.projections)

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
        for scale and clip_sv, some sigma above 1; for normalize, some sigma not 1. Host sync."""
        return self._active_base + (0 if self._active is None else int(self._active.item()))

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        for proj in self.projections:
            pre = getattr(proj, "before_step", None)
            if pre is not None:
                pre(self.inner)
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
        out.append((sigma - 1.0).abs() > ACT_TOL if mode == "normalize" else sigma > 1.0)
    return out
