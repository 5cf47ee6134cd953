"""The shared training step of the credit-assignment methods (``credit_bp``, ``dfa``,
``state_bridge``, ``credit_bridge``; our definitions, issue #13).

One step: forward through the model's layer states ``s_0..s_L``; the loss and the output error
``e = dL/ds_L``; the method's credits ``lambda_hat_1..lambda_hat_L`` (``lambda_hat_L = e`` for every
method: the output layer always sees its true error); the local surrogate update
(:func:`optlab.credit.core.surrogate`) into ``.grad``; the after-backward probes; the run's
optimizer step; then the method's own modules are trained on the (detached) states of this step.
Nothing reads back to the host: per-step statistics stay on the device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .backprop import build_optimizer
from .base import Method, StepContext, StepOutput
from ..credit.core import check_credit_model, normalize, output_error, surrogate


class CreditMethod(Method):
    """Base of the credit methods: subclasses implement :meth:`hidden_credits`."""

    replaces_backprop = True
    needs_graph = False  # credit_bp: the states keep their autograd graph (exact costates)

    def __init__(self, model: nn.Module, task: Any, cfg: Any, device: torch.device, options: Any) -> None:
        super().__init__(model, task, cfg, device, options)
        check_credit_model(model)
        self.optimizer = build_optimizer(model, cfg)
        self.n_layers = int(model.credit_layers())
        steps = int(task.steps_per_epoch) * int(cfg.epochs)
        self.total_steps = min(steps, cfg.max_steps) if getattr(cfg, "max_steps", 0) > 0 else steps
        self.last_step = 0  # steps completed before the current one (host int, from the engine)

    def hidden_shape(self) -> tuple[int, int]:
        """(width of the hidden states s_1..s_{L-1}, width of the output s_L)."""
        return self.model.credit_widths()

    # -- credits
    def hidden_credits(self, states: list[torch.Tensor], y: torch.Tensor, e: torch.Tensor,
                       step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # pragma: no cover - interface
        """``(L-1, B, d)`` credits of the hidden states, and per-step statistics."""
        raise NotImplementedError

    def credits(self, states: list[torch.Tensor], y: torch.Tensor, e: torch.Tensor, step: int) -> list[torch.Tensor]:
        """``lambda_hat_1..lambda_hat_L`` for detached states (``lambda_hat_L = e``)."""
        hid, _ = self.hidden_credits(states, y, e, step)
        return [*hid.unbind(0), e]

    def estimate(self, x: torch.Tensor, y: torch.Tensor, step: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """(states, loss, credits) on a batch, with no side effect (probes)."""
        with torch.no_grad():
            states = self.model.layer_states(x)
        loss, e = output_error(self.task, states[-1], y)
        return states, loss, self.credits(states, y, e, self.last_step if step is None else step)

    def train_modules(self, states: list[torch.Tensor], y: torch.Tensor, e: torch.Tensor, loss: torch.Tensor,
                      step: int) -> dict[str, torch.Tensor]:
        """Train the method's own modules on this step's detached states; per-step statistics."""
        return {}

    # -- the step
    def step(self, xb: torch.Tensor, yb: torch.Tensor, ctx: StepContext) -> StepOutput:
        self.last_step = ctx.step
        with ctx.amp:
            if self.needs_graph:
                states = self.model.layer_states(xb)
            else:
                with torch.no_grad():
                    states = self.model.layer_states(xb)
        out = states[-1].float()
        if self.needs_graph:
            loss = self.task.loss(out, yb)
            lams = list(torch.autograd.grad(loss, states[1:]))
            states = [s.detach() for s in states]
            loss = loss.detach()
            e = lams[-1]
            stats: dict[str, torch.Tensor] = {}
        else:
            loss, e = output_error(self.task, out, yb)
            hid, stats = self.hidden_credits(states, yb, e, ctx.step)
            lams = [*hid.unbind(0), e]
        self.optimizer.zero_grad(set_to_none=True)
        surrogate(self.model, states[:-1], lams).backward()
        ctx.after_backward()
        self.optimizer.step()
        stats.update(self.train_modules(states, yb, e, loss, ctx.step))
        return StepOutput(loss=loss, outputs=out.detach(), stats=stats)


def stack_hidden(states: list[torch.Tensor]) -> torch.Tensor:
    """``s_1..s_{L-1}`` as one ``(L-1, B, d)`` tensor (detached)."""
    return torch.stack([s.detach() for s in states[1:-1]])


__all__ = ["CreditMethod", "normalize", "stack_hidden"]
