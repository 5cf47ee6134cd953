"""``credit_bridge``: credit from a learned value function of each layer state.

Our definition (issue #13): a value network ``V(s_k, k)`` (:class:`optlab.credit.nets.ValueBridge`:
one stacked net for the hidden states, one for the terminal state; it also reads the example's
target, on which the realized loss depends) is trained, after each model
step and with its own Adam optimizer (``bridge_lr``), on the step's detached states with

- terminal value: ``(V(s_L, L) - l)^2`` with ``l`` the realized per-example loss, at the step's output
  states and at the successors ``F_L(s~_{L-1})``;
- consistency from layer to layer: ``(V(s~_k, k) - stopgrad V(F_{k+1}(s~_k), k+1))^2``, ``k = 1..L-1``, at
  perturbed states ``s~_k = s_k + consistency_noise * RMS(s_k) * xi`` (xi Gaussian; our addition: on the data
  alone a state and its target are tied to each other, which leaves the value's state gradient
  unidentified; off the data the model's own layer ``F_{k+1}`` gives the successor, one local forward
  without gradients; ``consistency_noise: 0`` is the plain on-data consistency);
- terminal gradient matching, weight ``term_grad_weight`` (1.0): ``||grad_s V(s_L, L) - grad_s l(s_L)||^2``,
  which uses only output-layer information (``0``: the ablation), at the same terminal states;
- with ``flow_matching`` (our definition): the consistency loss again at states on the straight path
  between consecutive hidden states, ``z = (1 - t) s_k + t s_{k+1}``, ``t ~ U(0, 1)``;

each a mean over examples (and layers). The bridge's credit is ``lambda_own_k = grad_s V(s_k, k) / B``
(per-example values, so ``1/B`` puts it on the scale of the batch-mean loss's costate). Warm-up
(our schedule): for the first ``warmup_frac`` (0.2) of the run's steps the credit is DFA's
(``e B_k``, fixed seeded feedback as in ``dfa``), then it blends linearly into the bridge's own
over as many steps again: ``lambda_hat = (1 - w) lambda_dfa + w lambda_own``, ``w`` from 0 to 1
(``warmup_frac: 0``: own credit from the start).

Options: ``hidden`` (64), ``bridge_lr`` (1e-3), ``term_grad_weight`` (1.0), ``warmup_frac`` (0.2),
``flow_matching`` (false), ``consistency_noise`` (0.1), ``feedback_seed``, ``bridge_seed`` (null: the run's seed). Per-step
statistics: ``bridge_loss`` (the sum of the losses above), ``credit_blend`` (``w``).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..credit.core import sample_losses
from .credit_base import CreditMethod, stack_hidden
from ..credit.nets import ValueBridge
from . import METHODS
from .dfa import feedback_for
from .state_bridge import path_points


class CreditBridgeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden: int = Field(64, ge=1)
    bridge_lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    term_grad_weight: float = Field(1.0, ge=0, allow_inf_nan=False)
    warmup_frac: float = Field(0.2, ge=0, lt=1, allow_inf_nan=False)
    flow_matching: bool = False
    consistency_noise: float = Field(0.1, ge=0, allow_inf_nan=False)
    feedback_seed: int | None = Field(None, ge=0)
    bridge_seed: int | None = Field(None, ge=0)


@METHODS.register("credit_bridge")
class CreditBridgeMethod(CreditMethod):
    name = "credit_bridge"
    Options = CreditBridgeOptions

    def __init__(self, model: nn.Module, task: Any, cfg: Any, device: torch.device, options: Any) -> None:
        super().__init__(model, task, cfg, device, options)
        d, d_out = model.credit_widths()
        seed = int(cfg.seed if options.bridge_seed is None else options.bridge_seed)
        self.feedback = feedback_for(model, cfg, options.feedback_seed, device)
        self.bridge = ValueBridge(self.n_layers - 1, d, d_out, options.hidden, seed).to(device)
        self.bridge_opt = torch.optim.Adam(self.bridge.parameters(), lr=options.bridge_lr)

    def blend(self, step: int) -> float:
        """``w``: 0 during the warm-up, then linear to 1 over as many steps (host arithmetic only)."""
        warm = self.options.warmup_frac * self.total_steps
        if warm <= 0:
            return 1.0
        return float(min(1.0, max(0.0, (step - warm) / warm)))

    def own_credits(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            h = h.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.bridge.values(h, y).sum(), h)
        return g / h.shape[1]

    def hidden_credits(self, states: list[torch.Tensor], y: torch.Tensor, e: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        w = self.blend(step)
        if w <= 0.0:
            lam = self.feedback(e)
        elif w >= 1.0:
            lam = self.own_credits(stack_hidden(states), y)
        else:
            lam = (1.0 - w) * self.feedback(e) + w * self.own_credits(stack_hidden(states), y)
        return lam, {"credit_blend": torch.full((), w, device=e.device)}

    def train_modules(self, states: list[torch.Tensor], y: torch.Tensor, e: torch.Tensor, loss: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        h = stack_hidden(states)
        sigma = self.options.consistency_noise
        if sigma > 0:  # perturbed states, each layer's successor by the model's own layer (one local forward)
            rms = h.square().mean(dim=(1, 2), keepdim=True).sqrt()
            h = h + sigma * rms * torch.randn_like(h)
            with torch.no_grad():
                outs = self.model.layer_forward([states[0].detach(), *h.unbind(0)])
            succ, out_next = outs[1:-1], outs[-1].detach().float()
        else:
            succ, out_next = [s.detach() for s in states[2:-1]], states[-1].detach().float()
        outs_all = torch.cat([states[-1].detach().float(), out_next])  # terminal states: clean and successors
        y2 = torch.cat([y, y])
        with torch.enable_grad():
            o = outs_all.requires_grad_(True)
            ell = sample_losses(self.task, o, y2)
            (gl,) = torch.autograd.grad(ell.sum(), o)
            vL = self.bridge.terminal_value(o, y2)
            total = (vL - ell.detach()).square().mean()
            v = self.bridge.values(h, y)  # (n, B)
            with torch.no_grad():
                tail = self.bridge.terminal_value(out_next, y).unsqueeze(0)
                # V(., k+1) of the successor of state k: net k+1 of the stack (slot 0 holds a placeholder)
                nxt = torch.cat([self.bridge.values(torch.stack([h[0], *succ]), y)[1:], tail], 0) if succ else tail
            total = total + (v - nxt).square().mean()
            if self.options.flow_matching:
                total = total + (self.bridge.values(path_points(h), y) - nxt).square().mean()
            if self.options.term_grad_weight > 0:
                (gv,) = torch.autograd.grad(vL.sum(), o, create_graph=True)
                total = total + self.options.term_grad_weight * (gv - gl).square().sum(-1).mean()
            self.bridge_opt.zero_grad(set_to_none=True)
            total.backward(inputs=list(self.bridge.parameters()))
        self.bridge_opt.step()
        return {"bridge_loss": total.detach()}

    def modules(self) -> list[nn.Module]:
        return [self.feedback, self.bridge]

    def optimizers(self) -> list[Any]:
        return [self.optimizer, self.bridge_opt]

    def summary(self) -> dict[str, Any]:
        return {"feedback_seed": int(self.feedback.seed)}
