"""Deep MLP without residual connections.

The hidden layers are stored as one ``(depth, width, width)`` weight stack and one
``(depth, width)`` bias stack, so per-layer work (spectral norms, projections, gradient
norms) runs as one batched operation over all layers.

Training walks the stack in one autograd function (:class:`_HiddenStackFn`) whose backward
writes each layer's weight and bias gradient straight into the stack's gradient. Autograd
through ``unbind`` would instead hold every layer's gradient and then ``stack`` them: a second,
transient copy of the whole weight gradient (2.4 GiB at 10,000 x 256 x 256), the largest term in
the step's peak memory. The function also does the activation checkpointing (only segment
boundaries are kept; each segment is recomputed in backward). Its gradients are checked
against autograd through ``unbind`` (:meth:`DeepMLP.forward_autograd`, the reference path, also
used under autocast, torch.compile, forward-mode AD and ``torch.func`` transforms, which the
function does not support) in ``tests/test_models.py``.

Normalization (``norm``, the run key of the same name; arch ``mlp`` only): ``none`` (default:
the plain network above, exactly as without the option) or ``layer``: a LayerNorm (eps 1e-5,
affine, init 1/0) after every linear layer that feeds an activation, before that activation,
i.e. after the input projection and after each of the ``depth`` hidden layers (``depth + 1``
LayerNorms; none after the output head): ``h <- act(LN(h W^T + b))``. The hidden layers'
LayerNorm parameters are stored as ``(depth, width)`` stacks (``hidden_norm.weight``,
``hidden_norm.bias``) beside the weight stack; every LayerNorm parameter has role ``bias_norm``.
With ``norm="layer"`` the forward always takes the reference path (autograd through ``unbind``,
``torch.utils.checkpoint`` for ``checkpoint_segments``): the fused stack function has no
LayerNorm, and these models are small.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .functional import forward_ad_active, functorch_active

_ACTIVATIONS = {"tanh": torch.tanh, "relu": F.relu, "gelu": F.gelu}
_GAINS = {"tanh": 5.0 / 3.0, "relu": math.sqrt(2.0), "gelu": math.sqrt(2.0)}
NORMS = ("none", "layer")


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


def _segments(depth: int, k: int) -> list[tuple[int, int]]:
    """(start, stop) of the checkpoint segments: ``k`` of them (0: one segment, nothing recomputed)."""
    if k <= 0:
        return [(0, depth)]
    step = -(-depth // k)
    return [(a, min(a + step, depth)) for a in range(0, depth, step)]


def _walk(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, a: int, z: int, act: str, keep: bool) -> list[torch.Tensor]:
    """Layers a..z-1 from input ``h``: [h_a, ..., h_z] when ``keep``, else [h_z]."""
    fn = _ACTIVATIONS[act]
    out = [h] if keep else []
    for i in range(a, z):
        h = fn(torch.addmm(b[i], h, w[i].t()))
        if keep:
            out.append(h)
    return out if keep else [h]


class _HiddenStackFn(torch.autograd.Function):
    """h -> act(h W_i^T + b_i) for i = 0..depth-1, with the weight/bias gradients written in place
    into one ``(depth, width, width)`` / ``(depth, width)`` buffer. ``segments`` > 0 keeps only
    the segment boundaries and recomputes each segment's activations in backward."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, act: str, segments: int) -> torch.Tensor:
        depth = w.shape[0]
        segs = _segments(depth, segments)
        keep_all = len(segs) == 1
        with torch.no_grad():
            saved: list[torch.Tensor] = []
            for a, z in segs:
                if keep_all:
                    saved = _walk(h, w, b, a, z, act, keep=True)
                    h = saved[-1]
                else:
                    saved.append(h)  # the segment's input
                    h = _walk(h, w, b, a, z, act, keep=False)[0]
        ctx.act, ctx.segs, ctx.keep_all = act, segs, keep_all
        ctx.save_for_backward(w, b, *saved)
        return h

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        w, b, *saved = ctx.saved_tensors
        act = ctx.act
        gw = torch.empty_like(w) if ctx.needs_input_grad[1] else None
        gb = torch.empty_like(b) if ctx.needs_input_grad[2] else None
        g = g.contiguous()
        for si in range(len(ctx.segs) - 1, -1, -1):
            a, z = ctx.segs[si]
            if ctx.keep_all:
                hs = saved
            else:
                with torch.no_grad():
                    hs = _walk(saved[si], w, b, a, z, act, keep=True)
            for i in range(z - 1, a - 1, -1):
                h_in, h_out = hs[i - a], hs[i - a + 1]
                if act == "tanh":
                    gz = torch.ops.aten.tanh_backward(g, h_out)
                elif act == "relu":
                    gz = torch.ops.aten.threshold_backward(g, h_out, 0)
                else:  # gelu: the derivative needs the pre-activation, recomputed
                    gz = torch.ops.aten.gelu_backward(g, torch.addmm(b[i], h_in, w[i].t()))
                if gw is not None:
                    torch.mm(gz.t(), h_in, out=gw[i])
                if gb is not None:
                    torch.sum(gz, 0, out=gb[i])
                g = gz @ w[i]
            hs = None
        return g, gw, gb, None, None


class HiddenStack(nn.Module):
    """``depth`` square layers stored as one ``(depth, width, width)`` weight and ``(depth, width)`` bias."""

    def __init__(self, depth: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(depth, width, width))
        self.bias = nn.Parameter(torch.zeros(depth, width))


class NormStack(nn.Module):
    """``depth`` LayerNorm affine parameters stored as one ``(depth, width)`` weight (ones) and bias (zeros)."""

    def __init__(self, depth: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(depth, width))
        self.bias = nn.Parameter(torch.zeros(depth, width))


class DeepMLP(nn.Module):
    """input projection -> ``depth`` hidden layers (width x width) -> output head
    (``norm="layer"``: a LayerNorm before every activation; see the module docstring)."""

    def __init__(
        self,
        input_dim: int,
        n_classes: int,
        depth: int,
        width: int,
        activation: str = "tanh",
        init: str = "orthogonal",
        checkpoint_segments: int = 0,
        norm: str = "none",
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm: unknown {norm!r}; allowed: {', '.join(NORMS)}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation: unknown {activation!r}; allowed: {', '.join(_ACTIVATIONS)}")
        if init not in ("orthogonal", "kaiming"):
            raise ValueError(f"init: unknown {init!r}; allowed: orthogonal, kaiming")
        if depth < 1:
            raise ValueError(f"depth: must be >= 1, got {depth}")
        self.depth, self.width, self.activation, self.init = depth, width, activation, init
        self.checkpoint_segments = checkpoint_segments  # activation checkpointing: 0 = off
        self.act = _ACTIVATIONS[activation]
        self.norm = norm
        self.input = nn.Linear(input_dim, width)
        if norm == "layer":
            self.input_norm = nn.LayerNorm(width)
        self.hidden = HiddenStack(depth, width)
        if norm == "layer":
            self.hidden_norm = NormStack(depth, width)
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
        if self.norm == "layer":
            for g in (self.input_norm.weight, self.hidden_norm.weight):
                nn.init.ones_(g)
            for b in (self.input_norm.bias, self.hidden_norm.bias):
                nn.init.zeros_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.hidden.weight, self.hidden.bias
        if (self.norm != "none"  # LayerNorm: the reference path (the stack function has none)
                or not torch.is_grad_enabled() or torch.is_autocast_enabled() or torch.compiler.is_compiling()
                or w.dtype != b.dtype or functorch_active()
                or forward_ad_active(x, w, b, *self.input.parameters())):  # raw tensors: no parametrization is evaluated
            return self.forward_autograd(x)
        h = self.act(self.input(x))
        k = self.checkpoint_segments if self.training else 0
        return self.head(_HiddenStackFn.apply(h, w, b, self.activation, k))

    def forward_autograd(self, x: torch.Tensor) -> torch.Tensor:
        """The reference forward: autograd through ``unbind`` (torch.utils.checkpoint for segments)."""
        if self.norm != "none":
            return self._forward_normed(x)
        h = self.act(self.input(x))
        ws, bs = self.hidden.weight.unbind(0), self.hidden.bias.unbind(0)
        k = self.checkpoint_segments
        if k > 0 and self.training and torch.is_grad_enabled():
            # keep only segment boundaries; recompute each segment's activations in backward
            for a, z in _segments(self.depth, k):
                h = checkpoint(self._segment, h, *ws[a:z], *bs[a:z], use_reentrant=False)
            return self.head(h)
        for w, b in zip(ws, bs):
            h = self.act(F.linear(h, w, b))
        return self.head(h)

    def _segment(self, h: torch.Tensor, *wb: torch.Tensor) -> torch.Tensor:
        n = len(wb) // 2
        for w, b in zip(wb[:n], wb[n:]):
            h = self.act(F.linear(h, w, b))
        return h

    def _forward_normed(self, x: torch.Tensor) -> torch.Tensor:
        """``norm="layer"``: act(LN(linear)) for the input projection and every hidden layer."""
        h = self.act(self.input_norm(self.input(x)))
        wb = (*self.hidden.weight.unbind(0), *self.hidden.bias.unbind(0),
              *self.hidden_norm.weight.unbind(0), *self.hidden_norm.bias.unbind(0))
        k = self.checkpoint_segments
        if k > 0 and self.training and torch.is_grad_enabled():
            d = self.depth
            for a, z in _segments(d, k):
                seg = [t for j in range(4) for t in wb[j * d + a : j * d + z]]
                h = checkpoint(self._normed_segment, h, *seg, use_reentrant=False)
            return self.head(h)
        return self.head(self._normed_segment(h, *wb))

    def _normed_segment(self, h: torch.Tensor, *p: torch.Tensor) -> torch.Tensor:
        n = len(p) // 4
        for w, b, g, beta in zip(p[:n], p[n : 2 * n], p[2 * n : 3 * n], p[3 * n :]):
            h = self.act(F.layer_norm(F.linear(h, w, b), (self.width,), g, beta))
        return h

    # -- layer states for credit assignment (optlab.credit.core); ``forward`` is unchanged.
    # States: s_0 = x, s_1 = act(input(x)), s_{i+2} = act(W_i s_{i+1} + b_i) (hidden layer i), s_L = head(s_{L-1})
    # with L = depth + 2 layers: 1 the input projection, 2..depth+1 the hidden stack, L the head.
    def credit_supported(self) -> str:
        """Why the layer states are unavailable ("" when they are): only the plain network has them."""
        return "" if self.norm == "none" else f"layer states need norm none (got {self.norm!r})"

    def credit_layers(self) -> int:
        return self.depth + 2

    def credit_widths(self) -> tuple[int, int]:
        return self.width, self.head.out_features

    def layer_states(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[s_0, ..., s_L]`` by the reference path (autograd through ``unbind``)."""
        h = self.act(self.input(x))
        out = [x, h]
        for w, b in zip(self.hidden.weight.unbind(0), self.hidden.bias.unbind(0)):
            h = self.act(F.linear(h, w, b))
            out.append(h)
        out.append(self.head(h))
        return out

    def layer_forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each layer on its own input (``inputs``: s_0..s_{L-1}); the hidden stack in one ``baddbmm``."""
        d = self.depth
        hin = torch.stack(list(inputs[1 : d + 1]))
        z = torch.baddbmm(self.hidden.bias.unsqueeze(1), hin, self.hidden.weight.transpose(1, 2))
        return [self.act(self.input(inputs[0])), *self.act(z).unbind(0), self.head(inputs[d + 1])]

    def forward_from(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """The output when state ``k`` (0..L) is ``h``."""
        L = self.depth + 2
        if k == L:
            return h
        if k == 0:
            h, k = self.act(self.input(h)), 1
        for i in range(k - 1, self.depth):
            h = self.act(F.linear(h, self.hidden.weight[i], self.hidden.bias[i]))
        return self.head(h)

    def layer_param_groups(self) -> list[list[tuple[str, int | None]]]:
        return [[("input.weight", None), ("input.bias", None)],
                *[[("hidden.weight", i), ("hidden.bias", i)] for i in range(self.depth)],
                [("head.weight", None), ("head.bias", None)]]

    def param_roles(self) -> dict[str, str]:
        roles = {
            "input.weight": "input",
            "input.bias": "bias_norm",
            "hidden.weight": "hidden",
            "hidden.bias": "bias_norm",
            "head.weight": "output",
            "head.bias": "bias_norm",
        }
        if self.norm == "layer":
            roles.update({f"{m}.{p}": "bias_norm" for m in ("input_norm", "hidden_norm") for p in ("weight", "bias")})
        return roles
