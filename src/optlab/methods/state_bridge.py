"""``state_bridge``: credit from a learned map of each hidden state to the terminal state.

Our definition (issue #13): per hidden layer ``k`` a bridge ``G_k`` (a linear path plus a
one-hidden-layer tanh correction, :class:`optlab.credit.nets.StateBridge`; all layers' bridges
stacked and run batched) predicts the terminal state ``s_L`` from ``s_k``. It is trained, after
each model step and with its own Adam optimizer (``bridge_lr``), on the step's detached states with
the normalized MSE ``||(G_k(s_k) - s_L) / max(||s_L||, 1)||^2`` (per example, averaged over examples
and layers). The credit is ``lambda_hat_k = d L(G_k(s_k), y) / d s_k``: the gradient of the task's
loss at the predicted terminal state, through the bridge. With ``flow_matching`` an auxiliary loss
(our definition) trains each bridge on states on the straight path between consecutive hidden
states, ``z = (1 - t) s_k + t s_{k+1}``, ``t ~ U(0, 1)``, toward the same target ``s_L``.

Options: ``hidden`` (bridge width, 64), ``bridge_lr`` (1e-3), ``bridge_seed`` (null: the run's
seed), ``flow_matching`` (false). Per-step statistic: ``bridge_loss``.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .credit_base import CreditMethod, stack_hidden
from ..credit.nets import StateBridge, normalized_mse
from . import METHODS


class StateBridgeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden: int = Field(64, ge=1)
    bridge_lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    bridge_seed: int | None = Field(None, ge=0)
    flow_matching: bool = False


def path_points(h: torch.Tensor) -> torch.Tensor:
    """``(1 - t) s_k + t s_{k+1}`` per example (``t ~ U(0, 1)``, torch's generator); the last hidden
    state has no successor of its width and stays itself."""
    nxt = torch.cat([h[1:], h[-1:]], 0)
    t = torch.rand(h.shape[0], h.shape[1], 1, device=h.device, dtype=h.dtype)
    return h + t * (nxt - h)


@METHODS.register("state_bridge")
class StateBridgeMethod(CreditMethod):
    name = "state_bridge"
    Options = StateBridgeOptions

    def __init__(self, model: nn.Module, task: Any, cfg: Any, device: torch.device, options: Any) -> None:
        super().__init__(model, task, cfg, device, options)
        d, d_out = model.credit_widths()
        seed = int(cfg.seed if options.bridge_seed is None else options.bridge_seed)
        self.bridge = StateBridge(self.n_layers - 1, d, d_out, options.hidden, seed).to(device)
        self.bridge_opt = torch.optim.Adam(self.bridge.parameters(), lr=options.bridge_lr)

    def hidden_credits(self, states: list[torch.Tensor], y: torch.Tensor, e: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        with torch.enable_grad():
            h = stack_hidden(states).requires_grad_(True)
            pred = self.bridge(h)  # (n, B, d_out)
            n = pred.shape[0]
            # the task's loss is a mean over rows: over n stacked copies it is the mean of the n losses
            loss = self.task.loss(pred.reshape(n * pred.shape[1], *pred.shape[2:]), y.repeat(n, *([1] * (y.dim() - 1)))) * n
            (lam,) = torch.autograd.grad(loss, h)
        return lam, {}

    def train_modules(self, states: list[torch.Tensor], y: torch.Tensor, e: torch.Tensor, loss: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        h, target = stack_hidden(states), states[-1].detach().float()
        with torch.enable_grad():
            bl = normalized_mse(self.bridge(h), target.expand(h.shape[0], *target.shape))
            total = bl
            if self.options.flow_matching:
                total = total + normalized_mse(self.bridge(path_points(h)), target.expand(h.shape[0], *target.shape))
            self.bridge_opt.zero_grad(set_to_none=True)
            total.backward()
        self.bridge_opt.step()
        return {"bridge_loss": bl.detach()}

    def modules(self) -> list[nn.Module]:
        return [self.bridge]

    def optimizers(self) -> list[Any]:
        return [self.optimizer, self.bridge_opt]
