"""The training-step method interface: what one step does."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn


class NoOptions(BaseModel):
    """A method without options (``method_options`` must be empty)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class StepContext:
    """What the engine hands a method for one step.

    ``forward`` is the (maybe compiled) model call; ``amp`` the autocast context;
    ``after_backward()`` runs the probes declared for that point (a method calls it once its
    gradients, or its own parameter updates in ``.grad``, are in place and before the optimizer
    steps; a method that never calls it gets no after-backward probes).
    """

    forward: Callable[[torch.Tensor], torch.Tensor]
    amp: Any
    after_backward: Callable[[], None]
    step: int  # steps completed before this one
    epoch: int


@dataclass
class StepOutput:
    """A step's loss (scalar, on the device), the model outputs for the task's per-step sums,
    and device-side per-step statistics the engine buffers and flushes with the losses."""

    loss: torch.Tensor
    outputs: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class Method:
    """Base class of training-step methods (registered in :data:`optlab.methods.METHODS`).

    A method owns its optimizer(s) and any extra modules (feedback matrices, bridge networks);
    they are checkpointed through :meth:`state_dict` and counted in memory through
    :meth:`optimizers` and :meth:`modules`. ``optimizer`` is the optimizer of the model's own
    parameters (probes read projection state from it).
    """

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions
    replaces_backprop: ClassVar[bool] = False
    # can train data-parallel under torchrun (optlab.distributed): the step's gradients come from
    # one backward through ``ctx.forward`` (DistributedDataParallel averages them over the ranks)
    # and whatever else the step computes agrees across ranks
    distributed: ClassVar[bool] = False

    def __init__(self, model: nn.Module, task: Any, cfg: Any, device: torch.device, options: BaseModel) -> None:
        self.model, self.task, self.cfg, self.device, self.options = model, task, cfg, device, options

    optimizer: Any = None
    _base_lrs: list[Any] | None = None  # the groups' LRs as built (set_lr_scale scales these)

    def step(self, xb: torch.Tensor, yb: torch.Tensor, ctx: StepContext) -> StepOutput:  # pragma: no cover
        raise NotImplementedError

    def forward_backward(self, xb: torch.Tensor, yb: torch.Tensor, ctx: StepContext, optimizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward (under the run's autocast), the task's loss, ``optimizer.zero_grad``, backward,
        then the after-backward probes: (outputs, loss), gradients in ``.grad``."""
        with ctx.amp:
            outputs = ctx.forward(xb)
        loss = self.task.loss(outputs, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ctx.after_backward()
        return outputs, loss

    def optimizers(self) -> list[Any]:
        return [self.optimizer] if self.optimizer is not None else []

    # -- learning-rate schedules (optlab.schedule)
    def lr_groups(self) -> list[dict[str, Any]]:
        """The param groups a learning-rate schedule scales: every group of every optimizer the
        method owns (a ``Projected`` or rho-controller wrapper exposes its base optimizer's groups)."""
        return [g for opt in self.optimizers() for g in opt.param_groups]

    def _record_base_lrs(self) -> list[Any]:
        if self._base_lrs is None:
            self._base_lrs = [g["lr"].detach().clone() if isinstance(g["lr"], torch.Tensor) else g["lr"]
                              for g in self.lr_groups()]
        return self._base_lrs

    def set_lr_scale(self, scale: float) -> None:
        """Set every group's ``lr`` to its base LR times ``scale`` (the engine calls this before each
        step when the run has a schedule, and never otherwise). The base LRs are the groups' LRs the
        first time this (or :meth:`load_state_dict`) runs, i.e. the LRs the method built its
        optimizers with; a checkpoint written mid-schedule, whose groups hold scaled LRs, does not
        change them. A method with its own LR logic can override it."""
        groups = self.lr_groups()
        base = self._record_base_lrs()
        if len(base) != len(groups):
            raise ValueError(f"method {self.name}: the optimizers' param groups changed ({len(base)} -> {len(groups)})")
        for g, b in zip(groups, base):
            if isinstance(g["lr"], torch.Tensor):
                g["lr"].fill_(b * scale)
            else:
                g["lr"] = b * scale

    def modules(self) -> list[nn.Module]:
        """Modules the method owns beyond the model (trained or fixed)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers()],
                "modules": [m.state_dict() for m in self.modules()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._record_base_lrs()  # before the checkpoint's (maybe scaled) LRs replace the built ones
        opts, mods = self.optimizers(), self.modules()
        if len(state["optimizers"]) != len(opts) or len(state["modules"]) != len(mods):
            raise ValueError(f"method {self.name}: checkpoint state does not match this method's optimizers/modules")
        for o, st in zip(opts, state["optimizers"]):
            o.load_state_dict(st)
        for m, st in zip(mods, state["modules"]):
            m.load_state_dict(st)

    def summary(self) -> dict[str, Any]:
        """Final metrics the method contributes (host syncs allowed: called once at run end)."""
        return {}
