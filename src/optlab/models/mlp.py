"""Deep MLP without residual connections.

The hidden layers are stored as one ``(depth, width, width)`` weight stack and one
``(depth, width)`` bias stack, so per-layer work (spectral norms, projections, gradient
norms) runs as one batched operation over all layers. The forward pass walks the stack with
``unbind`` (whose backward is a single ``stack``), which keeps a 10,000-layer backward linear
in depth.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

_ACTIVATIONS = {"tanh": torch.tanh, "relu": F.relu, "gelu": F.gelu}
_GAINS = {"tanh": 5.0 / 3.0, "relu": math.sqrt(2.0), "gelu": math.sqrt(2.0)}


def orthogonal_(w: torch.Tensor, gain: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill ``w`` (``(m, n)`` or a batch ``(b, m, n)``) with (semi-)orthogonal matrices, batched."""
    shape = w.shape
    m, n = shape[-2], shape[-1]
    batch = w.reshape(-1, m, n).shape[0]
    big, small = max(m, n), min(m, n)
    a = torch.randn(batch, big, small, generator=generator, dtype=torch.float32, device=w.device)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    if m < n:
        q = q.transpose(-2, -1)
    with torch.no_grad():
        w.copy_((gain * q).reshape(shape))
    return w


def kaiming_(w: torch.Tensor, gain: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian init with std = gain / sqrt(fan_in), batched over leading dims."""
    fan_in = w.shape[-1]
    with torch.no_grad():
        w.copy_(torch.randn(w.shape, generator=generator, device=w.device) * (gain / math.sqrt(fan_in)))
    return w


class HiddenStack(nn.Module):
    """``depth`` square layers stored as one ``(depth, width, width)`` weight and ``(depth, width)`` bias."""

    def __init__(self, depth: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(depth, width, width))
        self.bias = nn.Parameter(torch.zeros(depth, width))


class DeepMLP(nn.Module):
    """input projection -> ``depth`` hidden layers (width x width) -> output head."""

    def __init__(
        self,
        input_dim: int,
        n_classes: int,
        depth: int,
        width: int,
        activation: str = "tanh",
        init: str = "orthogonal",
        checkpoint_segments: int = 0,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation: unknown {activation!r}; allowed: {', '.join(_ACTIVATIONS)}")
        if init not in ("orthogonal", "kaiming"):
            raise ValueError(f"init: unknown {init!r}; allowed: orthogonal, kaiming")
        if depth < 1:
            raise ValueError(f"depth: must be >= 1, got {depth}")
        self.depth, self.width, self.activation, self.init = depth, width, activation, init
        self.checkpoint_segments = checkpoint_segments  # activation checkpointing: 0 = off
        self.act = _ACTIVATIONS[activation]
        self.input = nn.Linear(input_dim, width)
        self.hidden = HiddenStack(depth, width)
        self.head = nn.Linear(width, n_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Orthogonal (gain 1: every matrix starts with all singular values 1) or Kaiming."""
        for w in (self.input.weight, self.hidden.weight, self.head.weight):
            if self.init == "orthogonal":
                orthogonal_(w, gain=1.0)
            else:
                kaiming_(w, gain=_GAINS[self.activation])
        for b in (self.input.bias, self.hidden.bias, self.head.bias):
            nn.init.zeros_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.input(x))
        ws, bs = self.hidden.weight.unbind(0), self.hidden.bias.unbind(0)
        k = self.checkpoint_segments
        if k > 0 and self.training and torch.is_grad_enabled():
            # keep only segment boundaries; recompute each segment's activations in backward
            step = -(-self.depth // k)
            for a in range(0, self.depth, step):
                n = min(step, self.depth - a)
                h = checkpoint(self._segment, h, *ws[a : a + n], *bs[a : a + n], use_reentrant=False)
            return self.head(h)
        for w, b in zip(ws, bs):
            h = self.act(F.linear(h, w, b))
        return self.head(h)

    def _segment(self, h: torch.Tensor, *wb: torch.Tensor) -> torch.Tensor:
        n = len(wb) // 2
        for w, b in zip(wb[:n], wb[n:]):
            h = self.act(F.linear(h, w, b))
        return h

    def param_roles(self) -> dict[str, str]:
        return {
            "input.weight": "input",
            "input.bias": "bias_norm",
            "hidden.weight": "hidden",
            "hidden.bias": "bias_norm",
            "head.weight": "output",
            "head.bias": "bias_norm",
        }
