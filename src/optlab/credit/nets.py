"""The credit methods' own modules: DFA feedback matrices and the bridge networks (our definitions).

Every module holds one network per hidden layer, stacked, so all layers run as one batched
matmul (``baddbmm`` over the layer axis). Initialisation draws from a seeded CPU generator, so a
method's modules are a function of their seed alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class FeedbackMatrices(nn.Module):
    """Fixed random DFA feedback ``B_k`` (``(n, n_out, d)``, entries N(0, 1/n_out)), one per hidden
    layer: ``lambda_hat_k = e B_k``. Buffers, never trained; the seed is a buffer too (checkpointed
    and logged)."""

    def __init__(self, n: int, n_out: int, d: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(int(seed))
        self.register_buffer("B", torch.randn(n, n_out, d, generator=g) / math.sqrt(n_out))
        self.register_buffer("seed", torch.tensor(int(seed), dtype=torch.int64))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        """``(B, n_out)`` output error -> ``(n, B, d)`` hidden credits, one matmul."""
        return torch.matmul(e.unsqueeze(0), self.B)


class StackedMLP(nn.Module):
    """``n`` independent maps ``d_in -> d_out``: ``x W_lin^T + W_2 tanh(W_1 x + b_1) + b_2`` (a
    linear path plus a one-hidden-layer tanh correction), run batched over the stack."""

    def __init__(self, n: int, d_in: int, hidden: int, d_out: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(int(seed))
        self.lin = nn.Parameter(torch.randn(n, d_out, d_in, generator=g) / math.sqrt(d_in))
        self.w1 = nn.Parameter(torch.randn(n, hidden, d_in, generator=g) / math.sqrt(d_in))
        self.b1 = nn.Parameter(torch.zeros(n, 1, hidden))
        self.w2 = nn.Parameter(torch.randn(n, d_out, hidden, generator=g) * (0.1 / math.sqrt(hidden)))
        self.b2 = nn.Parameter(torch.zeros(n, 1, d_out))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``(n, B, d_in)`` -> ``(n, B, d_out)``."""
        z = torch.tanh(torch.baddbmm(self.b1, h, self.w1.transpose(1, 2)))
        return torch.baddbmm(self.b2, z, self.w2.transpose(1, 2)) + torch.bmm(h, self.lin.transpose(1, 2))


class StateBridge(nn.Module):
    """State bridge: ``G_k(s_k)``, a prediction of the terminal state ``s_L`` from hidden state ``k``."""

    def __init__(self, n: int, d: int, d_out: int, hidden: int, seed: int) -> None:
        super().__init__()
        self.net = StackedMLP(n, d, hidden, d_out, seed)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class StackedValue(nn.Module):
    """``n`` independent scalar functions: ``||A z||^2 / 2`` plus a :class:`StackedMLP` with one output
    (a quadratic form, so that the exact value of a linear-quadratic system is representable)."""

    def __init__(self, n: int, d_in: int, hidden: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(int(seed) + 7919)
        self.quad = nn.Parameter(torch.randn(n, d_in, d_in, generator=g) * (0.1 / math.sqrt(d_in)))
        self.mlp = StackedMLP(n, d_in, hidden, 1, seed)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``(n, B, d_in)`` -> ``(n, B)``."""
        return 0.5 * torch.bmm(z, self.quad.transpose(1, 2)).square().sum(-1) + self.mlp(z).squeeze(-1)


def target_features(y: torch.Tensor, width: int) -> torch.Tensor:
    """The example's target as ``(B, width)`` features: one-hot class labels, or the regression target."""
    if not y.dtype.is_floating_point:
        return torch.nn.functional.one_hot(y.long(), width).float()
    return y.float().reshape(y.shape[0], -1)


class ValueBridge(nn.Module):
    """Credit bridge: values ``V(s_k, k; y)`` (:class:`StackedValue`) for the hidden states (one stacked net per layer) and
    ``V(s_L, L; y)`` for the terminal state (its own net, as ``s_L`` may have another width).

    The value also reads the example's target ``y`` (:func:`target_features`, width ``d_out``): the
    realized loss depends on it, so without it a value could not be that example's loss-to-go (our
    definition). Credits are gradients with respect to the state only."""

    def __init__(self, n: int, d: int, d_out: int, hidden: int, seed: int) -> None:
        super().__init__()
        self.d_out = d_out
        self.hidden = StackedValue(n, d + d_out, hidden, seed)
        self.terminal = StackedValue(1, 2 * d_out, hidden, seed + 1)

    def values(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(n, B, d)`` states and ``(B, ...)`` targets -> ``(n, B)``."""
        yf = target_features(y, self.d_out).to(h.dtype)
        return self.hidden(torch.cat([h, yf.expand(h.shape[0], *yf.shape)], -1))

    def terminal_value(self, h_out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(B, d_out)`` -> ``(B,)``."""
        yf = target_features(y, self.d_out).to(h_out.dtype)
        return self.terminal(torch.cat([h_out, yf], -1).unsqueeze(0)).reshape(-1)


def normalized_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``||(pred - target) / max(||target||, 1)||^2`` (norms per example)."""
    scale = torch.linalg.vector_norm(target, dim=-1, keepdim=True).clamp_min(1.0)
    return ((pred - target) / scale).square().sum(-1).mean()
