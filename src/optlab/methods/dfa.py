"""``dfa``: direct feedback alignment (Nokland 2016) through the local surrogate.

Our definition (issue #13): with ``e = dL/ds_L`` the error at the output, the credit of hidden
state ``k`` is ``lambda_hat_k = e B_k`` with fixed random ``B_k`` (entries N(0, 1/n_out), drawn from
``feedback_seed``, default the run's seed; buffers of the method's module, checkpointed, never
trained; the seed is the final metric ``feedback_seed``). The output layer gets ``e`` itself.
No gradient flows through any hidden layer: the only autograd call is ``dL/ds_L`` and each
layer's own local surrogate.

Options: ``feedback_seed`` (int >= 0 or null).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .credit_base import CreditMethod
from ..credit.nets import FeedbackMatrices
from . import METHODS


class DFAOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    feedback_seed: int | None = Field(None, ge=0)


def feedback_for(model: nn.Module, cfg: Any, seed: int | None, device: torch.device) -> FeedbackMatrices:
    d, d_out = model.credit_widths()
    s = int(cfg.seed if seed is None else seed)
    return FeedbackMatrices(int(model.credit_layers()) - 1, d_out, d, s).to(device)


@METHODS.register("dfa")
class DFA(CreditMethod):
    name = "dfa"
    Options = DFAOptions

    def __init__(self, model: nn.Module, task: Any, cfg: Any, device: torch.device, options: Any) -> None:
        super().__init__(model, task, cfg, device, options)
        self.feedback = feedback_for(model, cfg, options.feedback_seed, device)

    def hidden_credits(self, states: list[torch.Tensor], y: torch.Tensor, e: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.feedback(e), {}

    def modules(self) -> list[nn.Module]:
        return [self.feedback]

    def summary(self) -> dict[str, Any]:
        return {"feedback_seed": int(self.feedback.seed)}
