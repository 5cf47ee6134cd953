"""Manifold constraints: post-step projections and manifold (tangent-space) optimizers.

Each object says what it is.

**Post-step projections** (``project()`` / ``state_dict()`` / ``load_state_dict()``, like
:class:`optlab.optim.spectral.SpectralProjection`; they plug into
:class:`optlab.optim.projected.Projected`). Whatever optimizer took the step, the weights are
then mapped back onto (or, for the Newton-Schulz variant, near) a manifold:

- :class:`HypersphereProjection`: each row ``w_i`` (the last dimension: an embedding's token
  vector, a linear layer's fan-in row) to norm ``radius``.
- :class:`StiefelProjection` ``mode="exact"``: each matrix to its polar factor ``U V^T``
  (``W = U S V^T``; the nearest semi-orthogonal matrix in Frobenius and spectral norm), from a
  batched SVD (``solver="svd"``) or from the eigendecomposition of the smaller Gram matrix
  (``solver="eigh"``: ``W (W^T W)^{-1/2}``, cheaper, accurate for well-conditioned weights).
- :class:`StiefelProjection` ``mode="ns"``: ``steps`` Newton-Schulz steps
  (:func:`optlab.optim.muon.newton_schulz`) instead: an approximation. With the default Muon
  quintic the singular values end roughly in [0.7, 1.2], not at 1; ``diagnostics()`` shows by
  how much. ``ns="cubic", normalize="none"`` (the classical iteration, no Frobenius
  normalization) converges quadratically for weights already near the manifold (a projection
  after a small step): 2 steps reach float32 accuracy there.

Each projection keeps ``last_sigma`` (the row norms, or the singular values for the exact SVD
projection, *before* projecting; ``mode = "normalize"``), which ``Projected`` reads to count the
steps at which the constraint changed a weight. ``diagnostics()`` returns, per same-shape
group, device tensors (no host sync): for the Stiefel projections the orthogonality error
``||W^T W - I||_F`` (on the smaller side) and the singular-value range of each matrix now; for
the sphere the range of the row norms.

**Manifold optimizers** (``torch.optim.Optimizer`` subclasses: the step itself is taken in the
tangent space and retracted; labeled *tangent-space methods*):

- :class:`HypersphericalDescent`: per row, project the (momentum) direction onto the tangent
  space ``{d : <w, d> = 0}``, step, retract by renormalizing to ``radius``.
- :class:`ManifoldMuon`: manifold Muon on the Stiefel manifold, in the dual-ascent formulation
  of J. Bernstein, "Modular Manifolds" (Thinking Machines Lab, *Connectionism*, 2025). For a
  tall ``W`` (``W^T W = I``; wide matrices are handled transposed) and the momentum direction
  ``G``, the step solves ``min_A <G, A>`` subject to ``||A||_spectral <= 1`` and
  ``W^T A + A^T W = 0`` (A tangent). The Lagrangian with a symmetric multiplier gives
  ``A(L) = -msign(G + 2 W L)`` and the dual (concave in ``L``) is maximized by (super)gradient
  ascent with the tangency residual as the gradient. Written here with the sign absorbed
  (``A`` is the direction that is subtracted): ``A = msign(G + 2 W L)``, ``H = W^T A + A^T W``,
  ``L <- L - alpha_t H``, ``alpha_t = dual_lr (1 - t / dual_steps)``, starting from
  ``L = -(W^T G + G^T W) / 4`` (so the first ``A`` is ``msign`` of the tangent projection of
  ``G``: the "simpler tangent-projected Muon step"), with ``G`` normalized to unit RMS singular
  value (``||G||_F = sqrt(n)``) so ``dual_lr`` has fixed units. A fixed number of dual steps
  (no early exit: no host sync). Plain dual (sub)gradient ascent converges slowly (the dual is
  nonsmooth): measured on 64x32 float64 matrices, the residual ``||W^T A + A^T W||_F`` goes from
  1.9 (the tangent-projected start) to about 0.14 after 20 steps at ``dual_lr`` 0.1 and 0.05
  after 100. It is not monotone either: where ``G + 2 W L`` is nearly singular the dual is steep
  and a fixed step can move away from a good point (measured: a square ``W``, where the
  tangent-projected start is already exact, residual 1e-14, went to 0.13 in 10 steps). So the
  iterate with the smallest residual is kept, per matrix (``torch.where``, no host sync): the
  result is never less tangent than the tangent-projected Muon step. Then (``tangent_fix=True``)
  the remaining residual is removed by projecting ``A`` onto the tangent space, so the update is
  tangent to float precision (its spectral norm may then exceed 1 by about the residual's size:
  measured 1.02-1.03), and the iterate is retracted with the exact polar factor:
  ``W <- polar(W - lr A)``. ``msign`` is the exact ``U V^T`` (``msign="svd"``) or Newton-Schulz
  (``msign="ns"``).

All of it is batched over matrices of the same shape: a ``(depth, w, w)`` stack or several
same-shape parameters cost one batched SVD / eigensolve / NS. 4-D conv kernels are treated as
``out x (in*kh*kw)`` matrices (as in :mod:`optlab.optim.muon`). Computations run in float32 (or in
the parameter's dtype if that is float64). In float32 the polar factor's ``W^T W - I`` has
entries of about 1e-6 whatever the size; its Frobenius norm grows with the size (measured: 5e-6
at 24 x 24, 3e-5 at 256 x 256).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from .muon import Coefficients, matrix_shape, newton_schulz

MODES = ("exact", "ns")
SOLVERS = ("svd", "eigh")


# ---------------------------------------------------------------------------------------------
# batched helpers
# ---------------------------------------------------------------------------------------------

def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def gram_small(w: Tensor) -> Tensor:
    """The smaller Gram matrix of each matrix in ``w`` ``(..., m, n)``: ``W^T W`` if m >= n else ``W W^T``."""
    return w.transpose(-2, -1) @ w if w.shape[-2] >= w.shape[-1] else w @ w.transpose(-2, -1)


def orthogonality_error(w: Tensor) -> Tensor:
    """``||W^T W - I||_F`` on the smaller side, for each matrix in ``w`` ``(..., m, n)`` (fp32 or fp64)."""
    g = gram_small(w.detach().to(_work_dtype(w)))
    eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
    return (g - eye).norm(dim=(-2, -1))


def singular_value_range(w: Tensor) -> tuple[Tensor, Tensor]:
    """(smallest, largest) singular value of each matrix in ``w`` ``(..., m, n)`` (batched svdvals)."""
    s = torch.linalg.svdvals(w.detach().to(_work_dtype(w)))
    return s[..., -1], s[..., 0]


def polar(w: Tensor, solver: str = "svd", eps: float = 1e-12) -> Tensor:
    """The polar factor ``U V^T`` of each matrix in ``w`` ``(..., m, n)``, in the work dtype.

    ``svd``: from a batched thin SVD. ``eigh``: ``W V diag(lambda^-1/2) V^T`` from the
    eigendecomposition of the smaller Gram matrix (``V diag(lambda^-1/2) V^T W`` for wide
    matrices); squares the condition number, so for well-conditioned ``W`` (weights near the
    manifold) only; eigenvalues are clamped at ``eps``."""
    x = w.to(_work_dtype(w))
    if solver == "svd":
        u, _, vh = torch.linalg.svd(x, full_matrices=False)
        return u @ vh
    if solver != "eigh":
        raise ValueError(f"solver: unknown {solver!r}; allowed: {', '.join(SOLVERS)}")
    lam, v = torch.linalg.eigh(gram_small(x))
    inv_sqrt = (v * lam.clamp_min(eps).rsqrt().unsqueeze(-2)) @ v.transpose(-2, -1)
    return x @ inv_sqrt if x.shape[-2] >= x.shape[-1] else inv_sqrt @ x


def msign(g: Tensor, how: str = "svd", ns_steps: int = 10, ns: str | Coefficients = "polar_express") -> Tensor:
    """``U V^T`` of each matrix (``how="svd"``, exact) or its Newton-Schulz approximation
    (``how="ns"``, in the work dtype)."""
    if how == "svd":
        return polar(g, "svd")
    if how == "ns":
        return newton_schulz(g, ns_steps, ns, dtype=_work_dtype(g))
    raise ValueError(f"msign: unknown {how!r}; allowed: svd, ns")


def _group_matrices(params: Iterable[Tensor]) -> list[list[Tensor]]:
    groups: dict[tuple, list[Tensor]] = defaultdict(list)
    for p in params:
        _, r, c = matrix_shape(p)
        groups[(r, c, p.device, p.dtype)].append(p)
    return list(groups.values())


def _stack(group: list[Tensor]) -> Tensor:
    """The group's matrices as one ``(K, r, c)`` tensor (a view for a single parameter)."""
    mats = [p.detach().reshape(matrix_shape(p)) for p in group]
    return mats[0] if len(mats) == 1 else torch.cat(mats)


def _write(group: list[Tensor], new: Tensor) -> None:
    offset = 0
    for p in group:
        k = matrix_shape(p)[0]
        p.detach().copy_(new[offset : offset + k].reshape(p.shape).to(p.dtype))
        offset += k


# ---------------------------------------------------------------------------------------------
# post-step projections
# ---------------------------------------------------------------------------------------------

class HypersphereProjection:
    """Post-step projection: every row (last dimension) of each parameter to norm ``radius``."""

    mode = "normalize"

    def __init__(self, params: Iterable[Tensor], radius: float = 1.0, eps: float = 1e-12) -> None:
        self.params = list(params)
        if any(p.dim() < 2 for p in self.params):
            raise ValueError("hypersphere projection: needs matrices (rows to normalize)")
        if not radius > 0:
            raise ValueError(f"hypersphere projection: radius must be > 0, got {radius}")
        self.radius, self.eps = float(radius), eps
        self.last_sigma: list[Tensor | None] = [None] * len(self.params)

    @torch.no_grad()
    def project(self) -> None:
        for i, p in enumerate(self.params):
            rows = p.view(-1, p.shape[-1])
            norms = rows.norm(dim=-1, keepdim=True)
            self.last_sigma[i] = norms.squeeze(-1) / self.radius  # 1 where the row was already on the sphere
            rows.mul_(self.radius / norms.clamp_min(self.eps))

    def diagnostics(self) -> list[dict[str, Tensor]]:
        """Per parameter: ``row_norm_min`` / ``row_norm_max`` now (device scalars)."""
        out = []
        for p in self.params:
            n = p.detach().reshape(-1, p.shape[-1]).norm(dim=-1)
            out.append({"row_norm_min": n.min(), "row_norm_max": n.max()})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"radius": self.radius}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.radius = float(state.get("radius", self.radius))


class StiefelProjection:
    """Post-step projection onto the Stiefel manifold (``W^T W = I`` on the smaller side).

    ``mode="exact"``: the polar factor (``solver`` svd | eigh). ``mode="ns"``: ``steps``
    Newton-Schulz steps with coefficients ``ns`` (default the Muon quintic: approximate, the
    singular values end roughly in [0.7, 1.2]), ``normalize`` as in
    :func:`optlab.optim.muon.newton_schulz`, in ``ns_dtype``."""

    mode = "normalize"

    def __init__(self, params: Iterable[Tensor], mode: str = "exact", steps: int = 5, ns: str | Coefficients = "quintic",
                 solver: str = "svd", ns_dtype: torch.dtype = torch.float32, normalize: str = "frobenius") -> None:
        if mode not in MODES:
            raise ValueError(f"stiefel.mode: unknown {mode!r}; allowed: {', '.join(MODES)}")
        if solver not in SOLVERS:
            raise ValueError(f"stiefel.solver: unknown {solver!r}; allowed: {', '.join(SOLVERS)}")
        self.stiefel_mode, self.steps, self.ns, self.solver = mode, steps, ns, solver
        self.ns_dtype, self.normalize = ns_dtype, normalize
        if mode == "ns":
            newton_schulz(torch.zeros(1, 1), steps, ns, torch.float32, normalize=normalize)  # validates the options
        self.groups = _group_matrices(params)
        self.last_sigma: list[Tensor | None] = [None] * len(self.groups)

    def target(self, w: Tensor) -> Tensor:
        """What ``project`` maps the matrices ``w`` ``(..., m, n)`` to."""
        if self.stiefel_mode == "exact":
            return polar(w, self.solver)
        return newton_schulz(w, self.steps, self.ns, self.ns_dtype, normalize=self.normalize)

    @torch.no_grad()
    def project(self) -> None:
        for gi, group in enumerate(self.groups):
            w = _stack(group)
            if self.stiefel_mode == "exact" and self.solver == "svd":
                u, s, vh = torch.linalg.svd(w.to(_work_dtype(w)), full_matrices=False)
                self.last_sigma[gi] = s.flatten()
                new = u @ vh
            else:
                new = self.target(w)
            _write(group, new)

    def diagnostics(self) -> list[dict[str, Tensor]]:
        """Per same-shape group, per matrix: ``ortho_error`` (||W^T W - I||_F), ``sigma_min``, ``sigma_max``."""
        out = []
        for group in self.groups:
            w = _stack(group)
            lo, hi = singular_value_range(w)
            out.append({"ortho_error": orthogonality_error(w), "sigma_min": lo, "sigma_max": hi})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {}  # stateless

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


# ---------------------------------------------------------------------------------------------
# manifold optimizers (tangent-space methods)
# ---------------------------------------------------------------------------------------------

class HypersphericalDescent(torch.optim.Optimizer):
    """Tangent-space descent on the product of row spheres (radius ``radius``).

    Per row ``w``: ``g_T = g - <g, w> w / r^2`` (tangent projection); momentum buffer ``b <-
    mu P_T(b) + g_T`` (the old buffer transported by projection onto the new tangent space);
    direction ``d = g_T + mu b`` (nesterov) or ``b``, tangent at ``w``; ``w <- r (w - lr d) / ||w -
    lr d||`` (retraction by renormalizing). ``state["direction"]`` keeps the last ``d``.
    ``project_init`` puts the parameters on the sphere at construction."""

    def __init__(self, params: Any, lr: float = 1e-2, momentum: float = 0.0, nesterov: bool = False,
                 radius: float = 1.0, project_init: bool = True, eps: float = 1e-12) -> None:
        if not lr >= 0:
            raise ValueError(f"hyperspherical descent: lr must be >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"hyperspherical descent: momentum must be in [0, 1), got {momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, radius=float(radius), eps=eps))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 2:
                    raise ValueError("hyperspherical descent: needs matrices (rows on spheres)")
                if project_init:
                    with torch.no_grad():
                        rows = p.view(-1, p.shape[-1])
                        rows.mul_(group["radius"] / rows.norm(dim=-1, keepdim=True).clamp_min(eps))

    @staticmethod
    def tangent(w: Tensor, v: Tensor, radius: float = 1.0) -> Tensor:
        """Projection of ``v`` onto the tangent space of each row sphere at ``w`` (rows: last dim)."""
        return v - (v * w).sum(-1, keepdim=True) * w / (radius * radius)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, r = group["lr"], group["momentum"], group["radius"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                w = p.view(-1, p.shape[-1])
                gt = self.tangent(w, p.grad.reshape(w.shape), r)
                if mu > 0:
                    buf = st.get("momentum_buffer")
                    if buf is None:
                        buf = st["momentum_buffer"] = gt.clone().view(p.shape)
                    else:
                        b = buf.view(w.shape)
                        b.copy_(self.tangent(w, b, r)).mul_(mu).add_(gt)
                    b = buf.view(w.shape)
                    d = gt + mu * b if group["nesterov"] else b.clone()
                else:
                    d = gt
                st["direction"] = d.view(p.shape)
                w.sub_(d, alpha=lr)
                w.mul_(r / w.norm(dim=-1, keepdim=True).clamp_min(group["eps"]))
        return loss


class ManifoldMuon(torch.optim.Optimizer):
    """Manifold Muon on the Stiefel manifold: dual ascent for the tangent, spectral-norm-bounded
    steepest-descent direction, then the polar retraction (see the module docstring for the exact
    formulation).

    Momentum as Muon (``B <- mu B + (1 - mu) g``; nesterov ``U = (1 - mu) g + mu B``), Euclidean,
    applied to the raw gradients; the direction problem is solved at the current ``W`` for ``G =
    U``. ``W <- polar(W - lr A)``, ``||A||_2 <= 1`` (up to the tangent fix). No weight decay (it has
    no meaning on the manifold) and no shape scaling. ``state["direction"]`` keeps the last ``A``
    (in the parameter's layout); ``last_residual`` the per-matrix ``||W^T A + A^T W||_F`` before
    the tangent fix, per same-shape group, as device tensors. ``project_init`` retracts the
    parameters onto the manifold at construction."""

    def __init__(self, params: Any, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 dual_steps: int = 20, dual_lr: float = 0.1, msign: str = "svd", ns_steps: int = 10,
                 ns: str | Coefficients = "polar_express", tangent_fix: bool = True, retraction: str = "svd",
                 project_init: bool = True) -> None:
        if not lr >= 0:
            raise ValueError(f"manifold Muon: lr must be >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"manifold Muon: momentum must be in [0, 1), got {momentum}")
        if dual_steps < 0:
            raise ValueError(f"manifold Muon: dual_steps must be >= 0, got {dual_steps}")
        if msign not in ("svd", "ns"):
            raise ValueError(f"manifold Muon: msign must be svd or ns, got {msign!r}")
        if retraction not in SOLVERS:
            raise ValueError(f"manifold Muon: retraction must be one of {SOLVERS}, got {retraction!r}")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, dual_steps=dual_steps, dual_lr=dual_lr,
                                      msign=msign, ns_steps=ns_steps, ns=ns, tangent_fix=tangent_fix,
                                      retraction=retraction))
        self.last_residual: list[Tensor] = []
        if project_init:
            for group in self.param_groups:
                with torch.no_grad():
                    for ps in _group_matrices(group["params"]):
                        _write(ps, polar(_stack(ps), retraction))

    @staticmethod
    def direction(w: Tensor, g: Tensor, dual_steps: int = 20, dual_lr: float = 0.1, how: str = "svd",
                  ns_steps: int = 10, ns: str | Coefficients = "polar_express",
                  tangent_fix: bool = True) -> tuple[Tensor, Tensor]:
        """The descent direction ``A`` (subtract ``lr A``) for tall-or-wide ``w`` ``(..., m, n)`` on
        the Stiefel manifold and gradient ``g``; returns ``(A, residual)`` with ``residual`` the
        per-matrix ``||W^T A + A^T W||_F`` before the tangent fix."""
        wide = w.shape[-2] < w.shape[-1]
        if wide:
            w, g = w.transpose(-2, -1), g.transpose(-2, -1)
        dt = _work_dtype(w)
        w, g = w.to(dt), g.to(dt)
        # unit RMS singular value: the multiplier's scale (about G's singular values) and with it the
        # meaning of dual_lr do not depend on the gradient's scale or the matrix size
        g = g * (w.shape[-1] ** 0.5 / g.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-30))
        wt = w.transpose(-2, -1)
        wtg = wt @ g
        lam = -0.25 * (wtg + wtg.transpose(-2, -1))
        best_a = best_h = best_r = None
        for t in range(dual_steps + 1):
            a = msign(g + 2 * w @ lam, how, ns_steps, ns)
            wta = wt @ a
            h = wta + wta.transpose(-2, -1)
            r = h.norm(dim=(-2, -1))
            if best_r is None:
                best_a, best_h, best_r = a, h, r
            else:  # keep, per matrix, the iterate with the smallest residual (device-side, no sync)
                better = r < best_r
                best_a = torch.where(better[..., None, None], a, best_a)
                best_h = torch.where(better[..., None, None], h, best_h)
                best_r = torch.minimum(r, best_r)
            if t < dual_steps:
                lam = lam - (dual_lr * (1 - t / dual_steps)) * h
        a, residual = best_a, best_r
        if tangent_fix:
            a = a - 0.5 * (w @ best_h)  # the tangent projection A - W sym(W^T A)
        return (a.transpose(-2, -1) if wide else a), residual

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.last_residual = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            mu = group["momentum"]
            bufs = []
            for p in params:
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(st["momentum_buffer"])
            grads = [p.grad for p in params]
            torch._foreach_lerp_(bufs, grads, 1 - mu)
            updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
            upd_of = {id(p): u for p, u in zip(params, updates)}
            for ps in _group_matrices(params):
                w = _stack(ps)
                mats = [upd_of[id(p)].reshape(matrix_shape(p)) for p in ps]
                g = mats[0] if len(mats) == 1 else torch.cat(mats)
                a, res = self.direction(w, g, group["dual_steps"], group["dual_lr"], group["msign"], group["ns_steps"],
                                        group["ns"], group["tangent_fix"])
                self.last_residual.append(res)
                offset = 0
                for p in ps:
                    k = matrix_shape(p)[0]
                    self.state[p]["direction"] = a[offset : offset + k].reshape(p.shape).to(p.dtype)
                    offset += k
                _write(ps, polar(w.to(a.dtype) - group["lr"] * a, group["retraction"]))
        return loss
