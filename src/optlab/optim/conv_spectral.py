"""Spectral norms of convolutions and the post-step projection of conv kernels.

A conv kernel ``W`` of shape ``(out, in/groups, kh, kw)`` has two spectral norms worth naming:

``matrix``
    sigma of the reshaped kernel ``W.reshape(out, in/groups*kh*kw)`` (what torch's
    ``spectral_norm`` and Miyato et al. normalize). Cheap and exact (batched eigensolver), but
    it is not the norm of the layer as a map.
``operator`` (the default, strict)
    the operator norm of the convolution as a linear map ``R^{in x H x W} -> R^{out x H' x W'}``
    at the layer's input size, with its zero padding, stride, dilation and groups. This is
    what bounds how much the layer can stretch an activation. The projection divides by the
    exact norm when the input is small (:data:`DENSE_MAX` entries: a dense matrix) and otherwise
    by an exact upper bound on it (:func:`conv_operator_bound`): the zero-padded convolution is a
    restriction (input supported on H x W, a subset of the outputs, stride subsampling) of the
    circular convolution on an ``(H + kh' - 1) x (W + kw' - 1)`` torus (``k'`` the dilated
    kernel size), whose norm is the largest singular value of the kernel's 2-D DFT over all
    frequencies (one small ``out x in`` matrix per frequency; the largest over groups). So
    after the projection every layer's exact operator norm is <= 1 by construction; the bound
    sits above the exact norm by a few percent at 8x8 and larger inputs (tests: dense operators),
    so a layer that the bound sets to 1 ends slightly below 1.
``operator_power``
    the same operator norm, estimated by power iteration on ``x -> conv_transpose2d(conv2d(x,
    W), W)`` (conv_transpose2d with the same geometry and the ``output_padding`` that makes
    shapes round-trip is exactly the adjoint) with a persistent vector per convolution. A
    lower bound: NOT strict (see below).

The matrix and operator norms differ. With groups=1, when some output position sees a receptive field wholly inside the
input, ``matrix <= operator`` (apply the adjoint to a unit impulse at that output). And
``operator <= sqrt(ceil(kh/sh) * ceil(kw/sw)) * matrix`` (each input pixel lies in at most that
many receptive fields): at stride 1 a 3x3 conv clipped to matrix norm 1 can have operator
norm up to 3. A 1x1 convolution has ``operator == matrix``.

Each power-iteration step returns ``sqrt(||A^T A x||)`` for a unit ``x``: a lower bound on the
operator norm that converges to it, but slowly: a convolution's spectrum is clustered at the
top (its singular values sample a smooth symbol), so power iteration from a random start is
still 1e-3..3e-2 low after 30-100 iterations. The cold start of ``operator_power`` therefore
uses Lanczos with full reorthogonalization (:func:`conv_operator_lanczos`; 100 steps reach
~1e-7 in the tests), and each projection after it runs ``power_iters`` power iterations from
the carried vector, which tracks the top direction while the kernel changes little per step.
When a step changes the kernel a lot (measured: batch-norm networks, whose conv weights are
scale-invariant and, once clipped, move by ~100% per step at lr 0.1), the carried vector
cannot follow and the layer ends above 1 (on the quick ResNet at lr 0.3: 16-20 of 20 convs,
worst 1.72). That is why ``operator_power`` is labelled not strict and the probe measures
(``layer_sigma_max(..., operator=True)``: Lanczos, a converged lower bound) instead of assuming.

Modes (``mode``): ``scale`` W / max(1, sigma); ``normalize`` W / sigma; ``clip_sv`` has no
cheap exact counterpart for a convolution (clipping each frequency's singular values gives a
kernel with full H x W support, not k x k), so for conv kernels ``clip_sv`` is ``scale`` with
the same sigma, and says so in :attr:`ConvSpectralProjection.conv_clip_sv`.

:func:`conv_dense_matrix` builds the matrix of a small convolution explicitly (the exact
reference in tests and in checks on small inputs).
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from .spectral import check_mode, power_iteration, seeded_unit_vectors, spectral_norm_exact

FORMS = ("operator", "operator_power", "matrix")
MODES = ("scale", "normalize", "clip_sv")
STRICT_FORMS = ("operator",)  # forms whose projection bounds the operator norm by construction


def _pair(v: Any, name: str) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    t = tuple(int(a) for a in v)
    if len(t) != 2:
        raise ValueError(f"conv spec {name}: expected an int or a pair, got {v!r}")
    return t  # type: ignore[return-value]


@dataclass(frozen=True)
class ConvSpec:
    """Geometry of one 2-D convolution with zero padding, and the spatial size of its input."""

    input_hw: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @classmethod
    def of(cls, spec: "ConvSpec | Mapping[str, Any]") -> "ConvSpec":
        """A ConvSpec from itself or a mapping with ``input_hw`` and optional stride/padding/dilation/groups."""
        if isinstance(spec, ConvSpec):
            return spec
        unknown = set(spec) - {"input_hw", "stride", "padding", "dilation", "groups"}
        if unknown:
            raise ValueError(f"conv spec: unknown keys {sorted(unknown)}")
        if "input_hw" not in spec:
            raise ValueError("conv spec: input_hw is required")
        out = cls(
            input_hw=_pair(spec["input_hw"], "input_hw"),
            stride=_pair(spec.get("stride", 1), "stride"),
            padding=_pair(spec.get("padding", 0), "padding"),
            dilation=_pair(spec.get("dilation", 1), "dilation"),
            groups=int(spec.get("groups", 1)),
        )
        if min(out.input_hw) < 1 or min(out.stride) < 1 or min(out.dilation) < 1 or min(out.padding) < 0 or out.groups < 1:
            raise ValueError(f"conv spec: invalid geometry {out}")
        return out

    def output_hw(self, kernel_hw: Sequence[int]) -> tuple[int, int]:
        return tuple(  # type: ignore[return-value]
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip(self.input_hw, self.padding, self.dilation, kernel_hw, self.stride)
        )

    def output_padding(self, kernel_hw: Sequence[int]) -> tuple[int, int]:
        """``output_padding`` making ``conv_transpose2d`` map the output size back to ``input_hw``."""
        out_hw = self.output_hw(kernel_hw)
        return tuple(  # type: ignore[return-value]
            n - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
            for n, o, s, p, d, k in zip(self.input_hw, out_hw, self.stride, self.padding, self.dilation, kernel_hw)
        )

    def check(self, w_shape: Sequence[int]) -> None:
        """Raise ValueError unless a kernel of ``w_shape`` fits this geometry."""
        if len(w_shape) != 4:
            raise ValueError(f"conv kernel must be 4-D (out, in/groups, kh, kw), got shape {tuple(w_shape)}")
        if w_shape[0] % self.groups:
            raise ValueError(f"conv kernel {tuple(w_shape)}: out channels not divisible by groups={self.groups}")
        if min(self.output_hw(w_shape[-2:])) < 1:
            raise ValueError(f"conv kernel {tuple(w_shape)} does not fit input {self.input_hw} with {self}")


@contextlib.contextmanager
def _ieee_fp32(device: torch.device) -> Iterator[None]:
    """Full-precision fp32 convolutions (no TF32) inside the block on CUDA; a no-op elsewhere.

    TF32 would put ~1e-3 relative noise into sigma, the size of the tolerance being enforced.
    """
    if device.type != "cuda":
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        prev = conv.fp32_precision
        conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = prev
    else:  # older torch
        prev_flag = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = prev_flag


def _apply(w: torch.Tensor, x: torch.Tensor, spec: ConvSpec, groups: int) -> torch.Tensor:
    """A^T A x for the (possibly group-stacked) convolution ``w``."""
    y = F.conv2d(x, w, None, spec.stride, spec.padding, spec.dilation, groups)
    return F.conv_transpose2d(
        y, w, None, spec.stride, spec.padding, spec.output_padding(w.shape[-2:]), groups, spec.dilation
    )


def conv_operator_power(
    w: torch.Tensor, spec: ConvSpec | Mapping[str, Any], x: torch.Tensor | None = None, iters: int = 100,
    eps: float = 1e-12, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Power iteration for the operator norm of convolutions.

    ``w`` is one kernel ``(out, in/g, kh, kw)`` or a stack ``(b, out, in/g, kh, kw)`` of kernels
    sharing ``spec`` (run as one grouped convolution). ``x`` is the input-space vector
    ``(b, in, H, W)`` (None: a seeded random start). Returns ``(sigma (b,), x)``; sigma is a lower
    bound on each operator norm that converges to it. No host sync.
    """
    spec = ConvSpec.of(spec)
    single = w.dim() == 4
    ws = w.unsqueeze(0) if single else w
    b, out, in_g, kh, kw = ws.shape
    spec.check(ws.shape[1:])
    c_in = in_g * spec.groups
    if x is None:
        g = torch.Generator(device=w.device).manual_seed(seed)
        x = torch.randn(b, c_in, *spec.input_hw, generator=g, device=w.device, dtype=torch.float32)
    if tuple(x.shape) != (b, c_in, *spec.input_hw):
        raise ValueError(f"power vector has shape {tuple(x.shape)}, expected {(b, c_in, *spec.input_hw)}")
    wcat = ws.detach().float().reshape(b * out, in_g, kh, kw)
    xf = x.reshape(b, -1).float()
    xin = (xf / xf.norm(dim=1, keepdim=True).clamp_min(eps)).reshape(1, b * c_in, *spec.input_hw)
    sigma = torch.zeros(b, device=w.device)
    with _ieee_fp32(w.device):
        for _ in range(iters):
            z = _apply(wcat, xin, spec, b * spec.groups).view(b, -1)
            zn = z.norm(dim=1)  # ||A^T A x|| <= sigma^2 for unit x
            sigma = zn.sqrt()
            # a zero result (zero kernel) keeps the old direction instead of collapsing to 0
            xin = torch.where((zn > eps).unsqueeze(1), z / zn.clamp_min(eps).unsqueeze(1), xin.view(b, -1)).view_as(xin)
    return sigma, xin.view(b, c_in, *spec.input_hw)


def conv_operator_lanczos(
    w: torch.Tensor, spec: ConvSpec | Mapping[str, Any], x: torch.Tensor | None = None, steps: int = 100,
    eps: float = 1e-12, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lanczos (with full reorthogonalization) for the operator norm of convolutions.

    Same arguments and result as :func:`conv_operator_power`, with ``steps`` applications of
    ``A^T A`` building a Krylov space from ``x``, plus one more on the top Ritz vector ``y``:
    sigma = sqrt(||A^T A y||) for unit ``y`` (a lower bound whatever the rounding did to the
    basis) and the returned vector is ``A^T A y`` normalized. Far faster to converge than
    power iteration on the clustered spectra of convolutions (tests: 30 steps reach 1e-4
    where power iteration is at 1e-2). Memory: ``steps`` basis vectors of the input size.
    """
    spec = ConvSpec.of(spec)
    ws = w.unsqueeze(0) if w.dim() == 4 else w
    b, out, in_g, kh, kw = ws.shape
    spec.check(ws.shape[1:])
    c_in = in_g * spec.groups
    n = c_in * spec.input_hw[0] * spec.input_hw[1]
    if x is None:
        g = torch.Generator(device=w.device).manual_seed(seed)
        x = torch.randn(b, c_in, *spec.input_hw, generator=g, device=w.device, dtype=torch.float32)
    if tuple(x.shape) != (b, c_in, *spec.input_hw):
        raise ValueError(f"power vector has shape {tuple(x.shape)}, expected {(b, c_in, *spec.input_hw)}")
    k = max(1, min(steps, n))  # a Krylov space has at most n dimensions
    wcat = ws.detach().float().reshape(b * out, in_g, kh, kw)
    shape = (1, b * c_in, *spec.input_hw)
    groups = b * spec.groups

    def op(v: torch.Tensor) -> torch.Tensor:  # (b, n) -> (b, n)
        return _apply(wcat, v.reshape(shape), spec, groups).view(b, n)

    basis = torch.zeros(b, k, n, device=w.device)
    alpha = torch.zeros(b, k, device=w.device)
    beta = torch.zeros(b, max(k - 1, 0), device=w.device)
    q = x.reshape(b, n).float()
    q = q / q.norm(dim=1, keepdim=True).clamp_min(eps)
    top = torch.zeros(b, device=w.device)
    with _ieee_fp32(w.device):
        for j in range(k):
            basis[:, j] = q
            z = op(q)
            a = (q * z).sum(1)
            alpha[:, j] = a
            top = torch.maximum(top, a.abs())
            if j == k - 1:
                break
            qs = basis[:, : j + 1]
            for _ in range(2):  # full reorthogonalization, twice
                z = z - torch.einsum("bjn,bj->bn", qs, torch.einsum("bjn,bn->bj", qs, z))
            bj = z.norm(dim=1)
            ok = bj > 1e-6 * top  # else the Krylov space is invariant: stop growing it (zero vectors)
            beta[:, j] = torch.where(ok, bj, torch.zeros_like(bj))
            q = torch.where(ok.unsqueeze(1), z / bj.clamp_min(eps).unsqueeze(1), torch.zeros_like(z))
        tri = torch.diag_embed(alpha)
        if k > 1:
            tri = tri + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
        ritz = torch.linalg.eigh(tri.double()).eigenvectors[:, :, -1].float()  # (b, k), top Ritz pair
        y = torch.einsum("bjn,bj->bn", basis, ritz)
        yn = y.norm(dim=1, keepdim=True)
        y = torch.where(yn > eps, y / yn.clamp_min(eps), basis[:, 0])
        z = op(y)
        zn = z.norm(dim=1)
        sigma = zn.sqrt()
        y = torch.where((zn > eps).unsqueeze(1), z / zn.clamp_min(eps).unsqueeze(1), y)
    return sigma, y.view(b, c_in, *spec.input_hw)


def _polyphase_taps(k_eff: int, dil: int, stride: int, pad: int, k: int) -> tuple[torch.Tensor, int]:
    """For one axis: ``(stride, kq)`` indices into the (zero-padded) kernel axis of length ``k + 1``
    (``k`` marks a zero tap) giving phase ``a``'s taps ``q = 0..kq-1`` of the stride-1 polyphase kernel."""
    qmin, qmax = (-pad) // stride, (k_eff - 1 - pad) // stride
    kq = qmax - qmin + 1
    idx = torch.full((stride, kq), k, dtype=torch.long)
    for a in range(stride):
        for j, q in enumerate(range(qmin, qmax + 1)):
            t = stride * q + a + pad  # the tap of the dilated kernel that phase a, offset q uses
            if 0 <= t < k_eff and t % dil == 0:
                idx[a, j] = t // dil
    return idx, kq


def conv_operator_bound(w: torch.Tensor, spec: ConvSpec | Mapping[str, Any]) -> torch.Tensor:
    """An upper bound on the operator norm of convolutions, exact to compute (no iteration).

    ``w``: one kernel ``(out, in/g, kh, kw)`` or a stack ``(b, out, in/g, kh, kw)`` sharing
    ``spec`` -> ``(b,)``. A stride-``s`` convolution is first rewritten as a stride-1 one on the
    space-to-depth input (``in * sh * sw`` channels of size ``ceil(H/sh) x ceil(W/sw)``, the
    polyphase kernel of ``ceil``-size taps; at stride 1 it is the layer itself). That is a zero-padded
    stride-1 correlation, a restriction of the full linear one, which is a restriction of the
    circular one on an ``(H' + kq - 1) x (W' + kq - 1)`` torus. Its norm is the largest singular
    value of the ``out/g x in'/g`` matrices of the kernel's 2-D DFT over that torus's frequencies,
    the largest over groups. Taps that never meet the input are dropped first (exact: they
    contribute nothing), so a padded 3x3 kernel on a 1x1 input gives its centre tap's exact norm. Real kernels have conjugate-symmetric transforms, so half the
    frequencies suffice (rfft2). ``inf`` for a non-finite kernel. No host sync.
    """
    spec = ConvSpec.of(spec)
    ws = w.unsqueeze(0) if w.dim() == 4 else w
    b, out, in_g, kh, kw = ws.shape
    spec.check(ws.shape[1:])
    g = spec.groups
    (dh, dw), (sh, sw), (ph, pw), (h, wd) = spec.dilation, spec.stride, spec.padding, spec.input_hw
    ih, kqh = _polyphase_taps(dh * (kh - 1) + 1, dh, sh, ph, kh)
    iw, kqw = _polyphase_taps(dw * (kw - 1) + 1, dw, sw, pw, kw)
    wf = ws.detach().float()
    bad = ~torch.isfinite(wf).reshape(b, -1).all(dim=1)
    wf = torch.where(bad[:, None, None, None, None], torch.zeros((), device=wf.device), wf)
    # taps that never meet the input (e.g. the border taps of a padded 3x3 conv on a 1x1 input)
    # add nothing to the layer; dropping them keeps the bound tight on small inputs
    oh, ow = spec.output_hw((kh, kw))
    used_h = [any(0 <= sh * i + dh * u - ph < h for i in range(oh)) for u in range(kh)]
    used_w = [any(0 <= sw * i + dw * u - pw < wd for i in range(ow)) for u in range(kw)]
    if not (all(used_h) and all(used_w)):
        mask = torch.tensor(used_h, device=wf.device)[:, None] & torch.tensor(used_w, device=wf.device)[None, :]
        wf = wf * mask
    wp = F.pad(wf, (0, 1, 0, 1))  # index kh / kw: a zero tap
    ih, iw = ih.to(wf.device), iw.to(wf.device)
    poly = wp[:, :, :, ih[:, :, None, None], iw[None, None, :, :]]  # (b, out, in_g, sh, kqh, sw, kqw)
    poly = poly.permute(0, 1, 2, 3, 5, 4, 6).reshape(b, out, in_g * sh * sw, kqh, kqw)
    nh, nw = -(-h // sh) + kqh - 1, -(-wd // sw) + kqw - 1
    khat = torch.fft.rfft2(poly, s=(nh, nw))  # (b, out, in', nh, nw//2+1), complex
    khat = khat.reshape(b, g, out // g, in_g * sh * sw, -1).permute(0, 1, 4, 2, 3)  # (b, g, F, out/g, in'/g)
    if khat.shape[-2] <= khat.shape[-1]:
        gram = khat @ khat.conj().transpose(-2, -1)
    else:
        gram = khat.conj().transpose(-2, -1) @ khat
    top = torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0)  # (b, g, F)
    sigma = top.reshape(b, -1).amax(dim=1).sqrt()
    return torch.where(bad, torch.full((), math.inf, device=sigma.device), sigma)


DENSE_MAX = 256
"""The ``operator`` form computes a convolution's norm exactly (dense matrix, eigensolver) when its
input has at most this many entries (``in * H * W``), else the upper bound :func:`conv_operator_bound`
(whose slack grows on small inputs: measured on the quick ResNet, 1.04-1.07 at 8x8, 1.10-1.17 at 4x4,
1.54-1.57 at 2x2; dense there costs little)."""


def conv_operator_sigma(w: torch.Tensor, spec: ConvSpec | Mapping[str, Any], dense_max: int = DENSE_MAX) -> torch.Tensor:
    """What the strict ``operator`` form divides by: the exact operator norm (float32 dense matrix and
    eigensolver) for inputs of at most ``dense_max`` entries, else :func:`conv_operator_bound`. Both
    are >= the exact norm up to float32 rounding. ``(b,)`` for a stack; ``inf`` for a non-finite kernel."""
    spec = ConvSpec.of(spec)
    ws = w.unsqueeze(0) if w.dim() == 4 else w
    c_in = ws.shape[2] * spec.groups
    n = c_in * spec.input_hw[0] * spec.input_hw[1]
    if n > dense_max:
        return conv_operator_bound(ws, spec)
    wf = ws.detach().float()
    bad = ~torch.isfinite(wf).reshape(wf.shape[0], -1).all(dim=1)
    wf = torch.where(bad[:, None, None, None, None], torch.zeros((), device=wf.device), wf)
    basis = torch.eye(n, device=wf.device).view(n, c_in, *spec.input_hw)
    cols = torch.stack([F.conv2d(basis, k, None, spec.stride, spec.padding, spec.dilation, spec.groups).reshape(n, -1)
                        for k in wf])  # (b, n, m): the transposed dense matrices
    gram = cols @ cols.transpose(-2, -1) if cols.shape[-1] >= n else cols.transpose(-2, -1) @ cols
    sigma = torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0).sqrt()
    return torch.where(bad, torch.full((), math.inf, device=sigma.device), sigma)


def conv_matrix_norm(w: torch.Tensor) -> torch.Tensor:
    """Exact sigma of the reshaped kernel ``w.reshape(out, -1)``; ``w`` 4-D, or 5-D for a stack -> ``(b,)``."""
    ws = w.unsqueeze(0) if w.dim() == 4 else w
    return spectral_norm_exact(ws.reshape(ws.shape[0], ws.shape[1], -1))


def conv_dense_matrix(w: torch.Tensor, spec: ConvSpec | Mapping[str, Any], max_dim: int = 8192) -> torch.Tensor:
    """The matrix of the convolution ``w`` at ``spec`` (float64, ``(out*H'*W', in*H*W)``).

    Built by convolving the identity basis; meant for small inputs (``in*H*W <= max_dim``).
    """
    spec = ConvSpec.of(spec)
    spec.check(w.shape)
    c_in = w.shape[1] * spec.groups
    n = c_in * spec.input_hw[0] * spec.input_hw[1]
    if n > max_dim:
        raise ValueError(f"dense conv matrix would have {n} columns (> max_dim={max_dim})")
    basis = torch.eye(n, dtype=torch.float64, device=w.device).view(n, c_in, *spec.input_hw)
    cols = F.conv2d(basis, w.detach().double(), None, spec.stride, spec.padding, spec.dilation, spec.groups)
    return cols.reshape(n, -1).T


def conv_operator_norm_dense(w: torch.Tensor, spec: ConvSpec | Mapping[str, Any], max_dim: int = 8192) -> torch.Tensor:
    """Exact operator norm of a small convolution: ``matrix_norm(conv_dense_matrix(w, spec), ord=2)``."""
    return torch.linalg.matrix_norm(conv_dense_matrix(w, spec, max_dim), ord=2)


def operator_matrix_bound(kernel_hw: Sequence[int], stride: Sequence[int]) -> float:
    """``c`` with ``operator norm <= c * matrix norm``: sqrt(ceil(kh/sh) * ceil(kw/sw))."""
    return math.sqrt(math.ceil(kernel_hw[0] / stride[0]) * math.ceil(kernel_hw[1] / stride[1]))


class ConvSpectralProjection:
    """Post-step rescaling of conv kernels: ``scale`` W / max(1, sigma) (and ``clip_sv``, which
    for a kernel is the same: see the module docstring) or ``normalize`` W / sigma.

    ``convs``: ``(weight, spec)`` pairs (spec a :class:`ConvSpec` or a mapping as returned by a
    model's ``conv_specs()``); with ``form="matrix"`` plain weights or ``(weight, None)`` are
    accepted. ``form``: ``operator`` (strict: sigma is :func:`conv_operator_bound`, an exact upper
    bound on the convolution's norm at its input size), ``operator_power`` (not strict: power
    iteration on the convolution, ``power_iters`` per projection from a persistent vector,
    ``warmup_iters`` Lanczos steps on first use) or ``matrix`` (reshaped-kernel norm;
    ``sigma="exact"`` batched eigensolver or ``"power"`` persistent power iteration; strict for
    that norm only). Kernels of the same shape (and, for the operator forms, the same geometry)
    are one batch. ``project()`` makes no host sync.
    """

    def __init__(
        self,
        convs: Iterable[tuple[torch.Tensor, ConvSpec | Mapping[str, Any] | None] | torch.Tensor],
        mode: str = "scale",
        form: str = "operator",
        power_iters: int = 1,
        warmup_iters: int = 100,
        sigma: str = "exact",
        seed: int = 0,
    ) -> None:
        check_mode(mode)
        if form not in FORMS:
            raise ValueError(f"sn.conv: unknown {form!r}; allowed: {', '.join(FORMS)}")
        if sigma not in ("power", "exact"):
            raise ValueError(f"sn.sigma: unknown {sigma!r}; allowed: power, exact")
        if power_iters < 1:
            raise ValueError(f"sn.power_iters: must be >= 1, got {power_iters}")
        if warmup_iters < 0:
            raise ValueError(f"warmup_iters: must be >= 0, got {warmup_iters}")
        self.mode, self.form, self.sigma_source = mode, form, sigma
        self.power_iters, self.warmup_iters, self.seed = power_iters, warmup_iters, seed
        groups: dict[tuple, list[int]] = defaultdict(list)
        params: list[torch.Tensor] = []
        specs: list[ConvSpec | None] = []
        for item in convs:
            w, spec = (item, None) if isinstance(item, torch.Tensor) else item
            if w.dim() != 4:
                raise ValueError(f"conv spectral projection needs 4-D kernels, got shape {tuple(w.shape)}")
            if form != "matrix":
                if spec is None:
                    raise ValueError(
                        f"sn.conv={form} needs the conv geometry (input size, stride, padding) of the kernel "
                        f"{tuple(w.shape)}: give (weight, spec) pairs (a model's conv_specs()), or use form='matrix'"
                    )
                cs: ConvSpec | None = ConvSpec.of(spec)
                cs.check(w.shape)
                key: tuple = (tuple(w.shape), cs, w.device, w.dtype)
            else:
                cs = None if spec is None else ConvSpec.of(spec)
                key = ((w.shape[0], math.prod(w.shape[1:])), w.device, w.dtype)
            groups[key].append(len(params))
            params.append(w)
            specs.append(cs)
        self.params = params
        self.specs = specs
        self.members: list[list[int]] = list(groups.values())  # indices into params, per batch
        self.groups: list[list[torch.Tensor]] = [[params[i] for i in m] for m in self.members]
        self.u: list[torch.Tensor | None] = [None] * len(self.members)
        self.last_sigma: list[torch.Tensor | None] = [None] * len(self.members)

    @property
    def strict(self) -> bool:
        """Whether every projected kernel's operator norm is <= 1 after ``project()`` by construction."""
        return self.form in STRICT_FORMS

    @property
    def conv_clip_sv(self) -> str | None:
        """What ``clip_sv`` does for conv kernels (None for other modes)."""
        return "scale (W / max(1, sigma)): no cheap Euclidean projection keeps a k x k kernel" if self.mode == "clip_sv" else None

    def _stack(self, gi: int) -> torch.Tensor:
        ws = [p.detach() for p in self.groups[gi]]
        return ws[0].unsqueeze(0) if len(ws) == 1 else torch.stack(ws)

    def _group_sigma(self, gi: int, iters: int | None = None, lanczos: bool = False) -> torch.Tensor:
        w = self._stack(gi)
        if self.form == "matrix" and self.sigma_source == "exact":
            return conv_matrix_norm(w)
        if self.form == "operator":
            spec = self.specs[self.members[gi][0]]
            assert spec is not None
            with _ieee_fp32(w.device):
                return conv_operator_sigma(w, spec)
        u = self.u[gi]
        n = self.power_iters if iters is None else iters
        if self.form == "operator_power":
            spec = self.specs[self.members[gi][0]]
            assert spec is not None
            if u is None or lanczos:  # cold start (or a check): Krylov, far better than power iteration
                sigma, u = conv_operator_lanczos(w, spec, u, self.warmup_iters if u is None else n, seed=self.seed + gi)
            else:
                sigma, u = conv_operator_power(w, spec, u, n)
        else:
            mats = w.reshape(w.shape[0], w.shape[1], -1)
            if u is None:
                u = seeded_unit_vectors(mats.shape[0], mats.shape[1], self.seed + gi, w.device)
                n = max(n, self.warmup_iters)
            sigma, u = power_iteration(mats, u, n)
        self.u[gi] = u
        return sigma

    @torch.no_grad()
    def sigmas(self, iters: int | None = None, lanczos: bool = False) -> torch.Tensor:
        """Current sigma estimate of every kernel, in the order given (``(n,)``); advances the vectors.

        ``iters`` power iterations (default ``power_iters``), or with ``lanczos=True``
        (``operator_power``) that many Lanczos steps from the persistent vector: the accurate
        choice for a check. The ``operator`` form returns its bound (``iters`` does not apply).
        """
        out = torch.empty(len(self.params), device=self.params[0].device if self.params else "cpu")
        for gi, members in enumerate(self.members):
            out[torch.tensor(members, device=out.device)] = self._group_sigma(gi, iters, lanczos).to(out.device)
        return out

    @torch.no_grad()
    def project(self) -> None:
        """Rescale every kernel in place; no host sync."""
        for gi, group in enumerate(self.groups):
            sigma = self._group_sigma(gi)
            self.last_sigma[gi] = sigma
            scale = 1.0 / (sigma.clamp_min(1e-12) if self.mode == "normalize" else sigma.clamp_min(1.0))
            for i, p in enumerate(group):
                p.mul_(scale[i].to(p.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"form": self.form, "u": [None if u is None else u.clone() for u in self.u]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("form", self.form) != self.form:
            raise ValueError(f"conv spectral projection state is for form {state['form']!r}, this one is {self.form!r}")
        us = state["u"]
        if len(us) != len(self.groups):
            raise ValueError(f"conv spectral projection state has {len(us)} groups, expected {len(self.groups)}")
        for i, u in enumerate(us):
            if u is not None and self.groups[i] and u.shape[0] != len(self.groups[i]):
                raise ValueError(f"conv spectral projection state: group {i} has {u.shape[0]} vectors, expected {len(self.groups[i])}")
        self.u = [None if u is None else u.to(self.groups[i][0].device) for i, u in enumerate(us)]
