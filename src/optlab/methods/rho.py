"""``rho``: forward, backward, then the base optimizer's step measured and sized by the rho
controller (:mod:`optlab.optim.rho`).

The base optimizer is the run's (``optimizer``, ``optimizer_options``, ``lr``; ``sgd_sn`` keeps its
projection). Options (``method_options``):

| key | default | meaning |
| --- | --- | --- |
| ``mode`` | ``capped`` | ``fixed`` (base LR, rho and r measured), ``capped`` (``min(lr, r_target rho / ||u||)``), ``set`` (``r_target rho / ||u||``, no base LR) |
| ``r_target`` | 1.0 | target normalized step size |
| ``samples`` | ``batch`` | ``batch``, ``subset:N`` (seeded, N of the batch), ``probe`` (the task's probe batch), ``full`` (the training inputs) |
| ``derivative`` | ``auto`` | ``jvp``, ``fd`` (central difference, ``fd_eps``), ``fd1`` (one-sided difference against the training forward's outputs: one eval forward; models without batch norm or dropout, no amp or compile; samples ``batch`` or ``subset:N``), ``auto`` (JVP, else the central difference) |
| ``fd_eps`` | 1e-4 | finite-difference step along the unit direction |
| ``seed`` | 0 | seed of the ``subset`` draws |
| ``chunk`` | 4096 | rows per JVP call over a pool |
| ``apply`` | ``device`` | ``device`` (no host sync) or ``torch`` (the base optimizer's own ``step()`` at ``eta_eff``) |

Per-step statistics (one curve row per step and key, flushed by the engine with the losses):
``tau``, ``rho``, ``r``, ``eta_eff``, ``capped``, ``delta_a``. Final metrics: ``peak_r``, ``mean_r``,
``capped_frac`` (whole run), ``final_r_mean``, ``final_eta_eff``, ``final_capped_frac`` (last
epoch). Per-epoch rows come from the ``rho`` probe (:mod:`optlab.probes.rho`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from ..optim.rho import FD_EPS, RhoController, parse_samples
from . import METHODS
from .backprop import build_optimizer
from .base import Method, StepContext, StepOutput


class RhoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["fixed", "capped", "set"] = "capped"
    r_target: float = Field(1.0, gt=0, allow_inf_nan=False)
    samples: str = "batch"
    derivative: Literal["auto", "jvp", "fd", "fd1"] = "auto"
    fd_eps: float = Field(FD_EPS, gt=0, allow_inf_nan=False)
    seed: int = Field(0, ge=0)
    chunk: int = Field(4096, ge=1)
    apply: Literal["device", "torch"] = "device"

    @field_validator("samples")
    @classmethod
    def _samples(cls, v: str) -> str:
        try:
            parse_samples(v)
        except ValueError:
            raise ValueError("expected one of batch, subset:N (N an integer >= 1), probe, full") from None
        return v


def sample_pool(task: Any, samples: str) -> torch.Tensor | None:
    """The fixed inputs of ``probe`` (the task's probe batch) and ``full`` (its training inputs)."""
    kind, _ = parse_samples(samples)
    if kind == "probe":
        return task.probe_batch()[0]
    if kind == "full":
        x = getattr(task, "x", None)
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"method_options.samples: 'full' needs a task with its training inputs in memory; "
                             f"{type(task).__name__} has none (use batch, subset:N or probe)")
        return x
    return None


@METHODS.register("rho")
class Rho(Method):
    name = "rho"
    Options = RhoOptions
    distributed = True  # Delta_a is the maximum over the ranks' slices (optlab.optim.rho)

    def __init__(self, model: nn.Module, task: Any, cfg: Any, device: torch.device, options: Any) -> None:
        super().__init__(model, task, cfg, device, options)
        o = options
        if o.derivative == "fd1" and (getattr(cfg, "amp", "none") != "none" or getattr(cfg, "compile", False)):
            raise ValueError("method_options.derivative: fd1 reuses the training forward's outputs, which under amp or "
                             "compile differ from the eval forward's; use jvp or fd")
        self.controller = RhoController(
            model, build_optimizer(model, cfg), mode=o.mode, r_target=o.r_target, samples=o.samples,
            derivative=o.derivative, fd_eps=o.fd_eps, pool=sample_pool(task, o.samples), seed=o.seed, chunk=o.chunk,
            apply=o.apply, capture_inputs=False,
        )
        self.optimizer = self.controller

    def step(self, xb: torch.Tensor, yb: torch.Tensor, ctx: StepContext) -> StepOutput:
        self.controller.mark_epoch(ctx.epoch)
        logits, loss = self.forward_backward(xb, yb, ctx, self.controller)
        stats = self.controller.step(xb, logits if self.controller.derivative_used == "fd1" else None)
        return StepOutput(loss=loss, outputs=logits, stats=dict(stats))

    def summary(self) -> dict[str, Any]:
        return self.controller.summary()
