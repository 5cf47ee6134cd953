"""``credit_bp``: exact costates by autograd, applied through the local surrogate (the study's reference).

Our definition (issue #13): the costates ``lambda_k = dL/ds_k`` of every layer state come from one
backward pass through the model's layer states; each layer is then updated with the same
normalized local surrogate as every other credit method (:mod:`optlab.credit.core`), so the
comparison isolates the credit. Per layer the update is the backprop gradient times a positive
number (``1 / (B (RMS(lambda_k) + 1e-6))``). No options.
"""

from __future__ import annotations

from typing import Any

import torch

from ..credit.core import exact_costates
from .credit_base import CreditMethod
from . import METHODS


@METHODS.register("credit_bp")
class CreditBP(CreditMethod):
    name = "credit_bp"
    needs_graph = True

    def hidden_credits(self, states: list[torch.Tensor], y: torch.Tensor, e: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        # detached states carry no graph: recompute the exact costates from the input
        _, _, lams = exact_costates(self.model, self.task, states[0], y)
        return torch.stack(lams[:-1]), {}
