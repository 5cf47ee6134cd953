"""Training-step methods: what one step does. ``build(cfg, model, task, device)``.

| name | what it is |
| --- | --- |
| ``backprop`` | forward, backward, ``optimizer.step()`` (the default); ``clip_norm``: gradient clipping before the step |
| ``rho`` | forward, backward, the optimizer's step measured and sized by the rho controller |
| ``credit_bp``, ``dfa``, ``state_bridge``, ``credit_bridge`` | credit assignment (issue #13): exact costates, DFA feedback, a state bridge, a value bridge, each through the local surrogate (:mod:`optlab.credit`) |

A method is a :class:`optlab.methods.base.Method` subclass in its own module, registered with
``@METHODS.register(name)``; its options are a pydantic model (``Options``) validated from the
run's ``method_options``. The engine loop calls ``method.step(x, y, ctx)`` and has no branch for
any method or optimizer; with an LR schedule (:mod:`optlab.schedule`) it also calls
``method.set_lr_scale(scale)`` before each step (:meth:`Method.set_lr_scale` scales every param
group of :meth:`Method.optimizers` from its base LR).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..registry import Registry

METHODS: Registry[Any] = Registry("method")


def method_names() -> tuple[str, ...]:
    return METHODS.names()


def validate_options(name: str, options: dict[str, Any], key: str = "method_options") -> Any:
    """The method's validated options model (ConfigError-style ValueError, one line)."""
    from ..config import pydantic_options

    cls = METHODS.get(name, key="step_method")
    return pydantic_options(cls.Options, options, key)


def build(cfg: Any, model: nn.Module, task: Any, device: torch.device) -> Any:
    cls = METHODS.get(cfg.step_method, key="step_method")
    return cls(model, task, cfg, device, validate_options(cfg.step_method, dict(cfg.method_options)))


from . import backprop, rho  # noqa: E402,F401  (register the built-in methods)
from . import credit_bp, dfa, state_bridge, credit_bridge  # noqa: E402,F401  (issue #13: credit assignment, optlab.credit)
from .base import Method, NoOptions, StepContext, StepOutput  # noqa: E402

__all__ = ["METHODS", "Method", "NoOptions", "StepContext", "StepOutput", "build", "method_names", "validate_options"]
