"""``lq``: a toy discrete-time linear system, ``s_k = W_k s_{k-1}``, ``k = 1..depth`` (issue #13).

The ``depth`` square ``(d, d)`` matrices (no biases) are one ``(depth, d, d)`` stack (role
``hidden``), initialised orthogonal (gain 1). With the ``lq`` task's quadratic cost it is the
linear-quadratic toy whose exact costates follow the adjoint recursion
``lambda_L = Q (s_L - y) / B``, ``lambda_k = W_{k+1}^T lambda_{k+1}`` (:mod:`optlab.credit.lq`).
It exposes its layer states for the credit methods (:mod:`optlab.credit.core`).
"""

from __future__ import annotations

import torch
from torch import nn

from .mlp import orthogonal_


class LinearSystem(nn.Module):
    def __init__(self, input_dim: int, depth: int = 8, **_: object) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth: must be >= 1, got {depth}")
        self.depth, self.dim = depth, input_dim
        self.weight = nn.Parameter(torch.empty(depth, input_dim, input_dim))
        orthogonal_(self.weight, gain=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for w in self.weight.unbind(0):
            h = h @ w.t()
        return h

    def jacobians(self) -> list[torch.Tensor]:
        """``ds_k / ds_{k-1} = W_k`` for k = 1..L."""
        return list(self.weight.unbind(0))

    # -- layer states (optlab.credit.core)
    def credit_layers(self) -> int:
        return self.depth

    def credit_widths(self) -> tuple[int, int]:
        return self.dim, self.dim

    def layer_states(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = [x]
        for w in self.weight.unbind(0):
            out.append(out[-1] @ w.t())
        return out

    def layer_forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(torch.bmm(torch.stack(list(inputs)), self.weight.transpose(1, 2)).unbind(0))

    def forward_from(self, k: int, h: torch.Tensor) -> torch.Tensor:
        for i in range(k, self.depth):
            h = h @ self.weight[i].t()
        return h

    def layer_param_groups(self) -> list[list[tuple[str, int | None]]]:
        return [[("weight", i)] for i in range(self.depth)]

    def param_roles(self) -> dict[str, str]:
        return {"weight": "hidden"}
