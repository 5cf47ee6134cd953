"""Spectral norms and the post-step spectral projection.

``SpectralProjection`` acts on every chosen weight matrix after each step, in one of three modes:

``clip_sv``
    the Euclidean (Frobenius) projection onto the spectral-norm ball {sigma_max <= 1}: every
    singular value above 1 is set to 1, the others are untouched (W <- W - U (S - 1)_+ V^T from
    one batched SVD; a matrix with no singular value above 1 is left bit for bit).
``scale``
    W <- W / max(1, sigma_max): inside the ball too, but it shrinks every singular value by
    the same factor, so a layer with one large direction loses all its small ones (measured on
    the depth-8 digits MLP at lr 0.1: stable rank 64 -> 1.01, validation accuracy 16.7% against
    clip_sv's 87.5%). Not a projection in the Euclidean sense.
``normalize``
    W <- W / sigma_max: every layer at norm exactly 1.

Matrices of the same shape are handled as one batch: a ``(depth, w, w)`` stack of hidden
layers, or several same-shape parameters concatenated, costs one batched power iteration, one
batched eigensolve or one batched SVD (in chunks that bound the temporaries).

sigma comes from power iteration with persistent vectors (one per matrix, carried across
steps, warmed up to convergence on first use) or from an exact SVD. Power iteration gives a
lower bound on sigma (``scale`` and ``normalize`` only; ``clip_sv`` needs the SVD anyway). When the top of the spectrum is clustered (which clipping itself
produces: after many steps several singular values sit near 1), a persistent vector can lag
behind a direction that grew, and a layer can end slightly above 1 (measured here: up to
0.8% at width 64 with 1-3 iterations, tests/test_spectral.py). ``exact`` is therefore the strict
choice (:attr:`SpectralProjection.strict`); the engine
checks the exact sigma every K steps and counts violations, so the claim "every layer ends
at sigma <= 1" is measured, not assumed.

``bound`` (mode ``scale`` only) is strict at a fraction of ``exact``'s cost: after a projection
a matrix's sigma is at most b = min(1, what it was divided by); a step W <- W + D moves sigma by
at most ||D||_2 <= ||D||_F, so b + ||D||_F is a certified upper bound on the new sigma, formed in
O(size). Dividing by max(1, b + ||D||_F) leaves sigma <= 1 whatever the true sigma was. Every
``refresh`` projections the bound is replaced by the exact sigma (times 1 + ``BOUND_MARGIN`` for
its float32 rounding), so the slack the triangle inequality accumulates does not keep shrinking
the layers. ||D||_F comes from the gradient for optlab's own inner optimizer (plain SGD:
||D||_F <= lr (||G||_F + wd ||W||_F)) and from a copy of the weights taken before the step for any
other (exact ||W_new - W_old||_F). It shrinks a layer by up to b / sigma more than ``scale``
with exact sigma does; the engine's exact checks count any violation like for the other modes.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

import math

import torch


EXACT_CHUNK_BYTES = 64 * 2**20
"""Gram matrices formed at once by :func:`spectral_norm_exact`. It bounds the temporaries (the
Gram matrices and the eigensolver's copy of them): a stack of 256x256 weights is eigensolved
256 matrices at a time, so a 10,000-layer step does not hold two more copies of its 2.4 GiB of
weights (measured: benchmarks/results/memory_cpu_depth*.md)."""


def spectral_norm_exact(w: torch.Tensor, chunk_bytes: int = EXACT_CHUNK_BYTES) -> torch.Tensor:
    """Largest singular value of each matrix in ``w`` (``(m, n)`` or ``(..., m, n)``).

    Computed as sqrt(lambda_max) of the smaller Gram matrix with a batched symmetric
    eigensolver (about 2x faster than an SVD here, same answer to float32 precision), over
    batches of matrices whose Gram matrices take at most ``chunk_bytes``.
    """
    wf = w.float()
    k = min(wf.shape[-2], wf.shape[-1])
    if wf.dim() <= 2:
        return _sigma_gram(wf)
    flat = wf.reshape(-1, *wf.shape[-2:])
    per = max(1, chunk_bytes // (k * k * 4))
    if flat.shape[0] <= per:
        return _sigma_gram(wf)
    return torch.cat([_sigma_gram(c) for c in flat.split(per)]).reshape(wf.shape[:-2])


def _sigma_gram(wf: torch.Tensor) -> torch.Tensor:
    """sqrt(lambda_max) of each Gram matrix; ``inf`` for a matrix whose Gram is not finite (a
    diverged weight, or one so large its Gram overflows). The eigensolver would raise on those,
    turning a divergence into a crash; here it sees zeros instead and the run's loss reports
    the divergence. No host sync."""
    gram = wf @ wf.transpose(-2, -1) if wf.shape[-2] <= wf.shape[-1] else wf.transpose(-2, -1) @ wf
    bad = ~torch.isfinite(gram).all(dim=-1).all(dim=-1)
    gram = torch.where(bad[..., None, None], torch.zeros((), dtype=gram.dtype, device=gram.device), gram)
    sigma = torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0).sqrt()
    return torch.where(bad, torch.full((), math.inf, dtype=sigma.dtype, device=sigma.device), sigma)


def power_iteration(
    w: torch.Tensor, u: torch.Tensor, iters: int, eps: float = 1e-12
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched power iteration on ``w`` ``(b, m, n)`` from left vectors ``u`` ``(b, m)``.

    Returns (sigma ``(b,)``, updated u). sigma = ||W v|| with v = W^T u / ||W^T u||, a lower
    bound on the largest singular value that converges to it.
    """
    wf = w.float()
    wt = wf.transpose(-2, -1)
    for _ in range(iters):
        # row-vector products (u^T W, v^T W^T): a (b, 1, m) @ (b, m, n) batched product runs about 2x
        # faster on CPU than the column form (b, n, m) @ (b, m, 1) (64 x 256 x 256: 0.66 ms vs 1.3-1.6 ms)
        v = torch.nn.functional.normalize((u.unsqueeze(-2) @ wf).squeeze(-2), dim=-1, eps=eps)
        wv = (v.unsqueeze(-2) @ wt).squeeze(-2)
        sigma = wv.norm(dim=-1)
        u = wv / sigma.clamp_min(eps).unsqueeze(-1)
    return sigma, u


def seeded_unit_vectors(b: int, m: int, seed: int, device: torch.device) -> torch.Tensor:
    """``(b, m)`` random unit vectors from ``seed``: the cold start of a power iteration."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(b, m, generator=g, device=device, dtype=torch.float32), dim=-1)


MODES = ("clip_sv", "scale", "normalize")
SIGMAS = ("exact", "power", "bound")
BOUND_REFRESH = 10
"""``sigma="bound"``: projections between two exact sigmas (the first projection is exact)."""
BOUND_MARGIN = 1e-6
"""Relative margin on the exact sigma that restarts a certified bound: float32 eigvalsh of the
Gram matrix is accurate to a few float32 eps relative (measured against float64 SVD: < 2e-7 at
256 x 256); the margin keeps the bound above the true sigma with room to spare."""


def check_mode(mode: str) -> None:
    """ValueError naming the allowed modes (and what the old name ``clip`` became)."""
    if mode not in MODES:
        hint = " ('clip' is now 'scale': W / max(1, sigma))" if mode == "clip" else ""
        raise ValueError(f"sn.mode: unknown {mode!r}; allowed: {', '.join(MODES)}{hint}")


def clip_singular_values(w: torch.Tensor, limit: float = 1.0, chunk_bytes: int = EXACT_CHUNK_BYTES) -> torch.Tensor:
    """``w`` (``(m, n)`` or ``(b, m, n)``) with every singular value above ``limit`` set to ``limit``,
    in place, and the largest singular value of each matrix before (``(b,)``).

    From the symmetric eigendecomposition of the smaller Gram matrix, G = W^T W = V S^2 V^T (or
    W W^T = U S^2 U^T when W is wide): W <- W - W V diag(1 - min(1, limit / s)) V^T (or the same
    from the left with U). That is U min(S, limit) V^T, the Euclidean projection, as a matrix
    function of G: backward stable (the result is exact for G + E with ||E|| ~ float eps ||G||),
    so the clipped sigma_max is ``limit`` to float rounding (of order eps x the sigma it had: measured
    1e-6 above at sigma 2, 3e-5 at 18; the SVD clip's was 2 to 4 times that). The batched eigensolver converges on
    the clustered singular values a projection leaves behind (many at exactly ``limit``), where
    LAPACK's float32 SVD on CPU was seen to fail ("too many repeated singular values") on 2 of 300
    nearly orthogonal 128 x 128 layers of a depth-300 MLP; it is also about 3x faster here.
    Matrices with nothing above the limit are untouched bit for bit (the correction is an exact
    zero); a non-finite matrix is left as it is (its sigma is ``inf``; the run's loss reports it).
    Chunks whose Gram matrices take at most ``chunk_bytes``. No host sync.
    """
    flat = w.view(-1, *w.shape[-2:])
    m, n = flat.shape[-2:]
    k, tall = min(m, n), m >= n
    per = max(1, chunk_bytes // (3 * k * k * 4))
    sigmas = []
    for c in flat.split(per):
        cf = c.float()
        bad = ~torch.isfinite(cf).all(dim=-1).all(dim=-1)
        cf = torch.where(bad[:, None, None], torch.zeros((), device=cf.device), cf)  # its correction: exactly 0
        gram = cf.transpose(-2, -1) @ cf if tall else cf @ cf.transpose(-2, -1)
        lam, vec = torch.linalg.eigh(gram)
        sv = lam.clamp_min(0).sqrt()  # ascending
        shrink = torch.where(sv > limit, 1 - limit / sv.clamp_min(limit), torch.zeros((), device=sv.device))
        if k:
            proj = (vec * shrink.unsqueeze(-2)) @ vec.transpose(-2, -1)  # V diag(1 - limit/s)_+ V^T
            corr = cf @ proj if tall else proj @ cf
            c.sub_(corr.to(c.dtype))
        top = sv[:, -1] if sv.shape[-1] else torch.zeros(c.shape[0], device=c.device)
        sigmas.append(torch.where(bad, torch.full((), math.inf, device=c.device), top))
    return torch.cat(sigmas) if sigmas else torch.zeros(0, device=w.device)


def _share_buffer(group: list[torch.Tensor]) -> None:
    """Move a same-shape group of two or more parameters into one contiguous buffer (each
    parameter's ``.data`` becomes a view of it; same objects, same values), so the projection reads
    and scales the whole group as one ``(b, m, n)`` batch with no copy: at depth 64 x 256 x 256 the
    concatenation it saves took longer than the power iteration itself (about 2 ms against 1.5 ms on
    a 2-core CPU). Parameters that already share a buffer are left as they are."""
    if len(group) < 2 or _shared_view(group) is not None:
        return
    first = group[0]
    sizes = [p.numel() for p in group]
    buf = torch.empty(sum(sizes), dtype=first.dtype, device=first.device)
    offset = 0
    for p, n in zip(group, sizes):
        view = buf[offset : offset + n].view(p.shape)
        view.copy_(p.detach())
        p.data = view
        offset += n


def _shared_view(group: list[torch.Tensor]) -> torch.Tensor | None:
    """A ``(b, m, n)`` view over the group's parameters when they lie back to back, in order, in one
    storage (what :func:`_share_buffer` leaves), else None (a single parameter: its own view)."""
    first = group[0]
    m, n = first.shape[-2:]
    if len(group) == 1:
        return first.detach().reshape(-1, m, n) if first.is_contiguous() else None
    storage = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    start = offset
    for p in group:
        if (not p.is_contiguous() or p.storage_offset() != offset
                or p.untyped_storage().data_ptr() != storage):
            return None
        offset += p.numel()
    b = (offset - start) // (m * n)
    return first.detach().as_strided((b, m, n), (m * n, n, 1), start)


class SpectralProjection:
    """Post-step spectral projection of weight matrices (modes ``clip_sv``, ``scale``, ``normalize``)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        mode: str = "clip_sv",
        sigma: str = "exact",
        power_iters: int = 1,
        warmup_iters: int = 50,
        seed: int = 0,
        refresh: int = BOUND_REFRESH,
    ) -> None:
        check_mode(mode)
        if sigma not in SIGMAS:
            raise ValueError(f"sn.sigma: unknown {sigma!r}; allowed: {', '.join(SIGMAS)}")
        if mode == "clip_sv" and sigma != "exact":
            raise ValueError("sn.sigma: clip_sv computes an SVD, so sigma is exact; allowed with clip_sv: exact "
                             "(power applies to sn.mode scale and normalize, bound to scale)")
        if mode == "normalize" and sigma == "bound":
            raise ValueError("sn.sigma: bound divides by an upper bound on sigma, which cannot put a layer at norm "
                             "exactly 1; allowed with normalize: exact, power (bound applies to sn.mode scale)")
        if power_iters < 1:
            raise ValueError(f"sn.power_iters: must be >= 1, got {power_iters}")
        if isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 1:
            raise ValueError(f"sn.refresh: must be an integer >= 1, got {refresh!r}")
        self.mode, self.sigma_source, self.refresh = mode, sigma, refresh
        self.power_iters, self.warmup_iters, self.seed = power_iters, warmup_iters, seed
        groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for p in params:
            if p.dim() < 2:
                raise ValueError(f"spectral projection needs matrices, got a tensor of shape {tuple(p.shape)}")
            groups[(tuple(p.shape[-2:]), p.device, p.dtype)].append(p)
        self.groups = list(groups.values())
        for group in self.groups:
            _share_buffer(group)
        self.u: list[torch.Tensor | None] = [None] * len(self.groups)
        self.last_sigma: list[torch.Tensor | None] = [None] * len(self.groups)
        # sigma="bound": per group the certified bound after the last projection, the step's
        # ||D||_F (from before_step), the weights before the step (generic inner optimizers) and
        # the projections made (exact when it is a multiple of refresh)
        self.bound: list[torch.Tensor | None] = [None] * len(self.groups)
        self._delta: list[torch.Tensor | None] = [None] * len(self.groups)
        self._before: list[torch.Tensor | None] = [None] * len(self.groups)
        self.projections = 0

    @property
    def strict(self) -> bool:
        """Whether every matrix ends at sigma_max <= 1 (to float rounding) by construction."""
        return self.sigma_source in ("exact", "bound")

    @torch.no_grad()
    def before_step(self, inner: torch.optim.Optimizer) -> None:
        """Called by :class:`optlab.optim.projected.Projected` just before ``inner.step()``:
        ``sigma="bound"`` records what it needs for ||D||_F, the size of the coming update (a
        no-op for the other sources). For ``torch.optim.SGD`` without momentum the update is
        -lr (G + wd W), so ||D||_F <= lr (||G||_F + wd ||W||_F) from the gradient; for any other
        optimizer the weights are copied here and ||W_new - W_old||_F is taken after the step.
        No host sync."""
        if self.sigma_source != "bound" or self.projections % self.refresh == 0:
            return  # the coming projection is exact (or not a bound): ||D||_F is not needed
        where = {id(p): g for g in inner.param_groups for p in g["params"]}
        plain = type(inner) is torch.optim.SGD and all(float(g.get("momentum", 0.0)) == 0.0 for g in inner.param_groups)
        for gi, group in enumerate(self.groups):
            if not plain:
                w, view = self._batch(group)
                self._before[gi] = w.clone() if view else w  # a concatenated copy is already a copy
                self._delta[gi] = None
                continue
            norms = []
            for p in group:
                n = p.reshape(-1, *p.shape[-2:]).shape[0]
                g = where.get(id(p))
                if g is None or p.grad is None:  # not stepped by this optimizer: unchanged
                    norms.append(torch.zeros(n, device=p.device))
                    continue
                d = torch.linalg.vector_norm(p.grad.detach().reshape(n, -1).float(), dim=-1)
                wd = float(g.get("weight_decay", 0.0))
                if wd:
                    d = d + wd * torch.linalg.vector_norm(p.detach().reshape(n, -1).float(), dim=-1)
                norms.append(d * g["lr"])
            self._delta[gi] = norms[0] if len(norms) == 1 else torch.cat(norms)
            self._before[gi] = None

    def _bound_sigma(self, gi: int, w: torch.Tensor) -> torch.Tensor:
        b, d, before = self.bound[gi], self._delta[gi], self._before[gi]
        self._delta[gi] = self._before[gi] = None
        if before is not None:
            d = torch.linalg.vector_norm((w - before).float().reshape(w.shape[0], -1), dim=-1)
        if b is None or d is None:  # first, unstepped, or due (before_step recorded nothing)
            return spectral_norm_exact(w) * (1.0 + BOUND_MARGIN)
        return b + d

    @staticmethod
    def _batch(group: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """The group's matrices as one ``(b, m, n)`` batch and whether it is a view of the
        parameters (a single parameter, or several still in the buffer :func:`_share_buffer` put
        them in) rather than a concatenated copy (several parameters that were moved since, e.g.
        by ``module.to`` after the optimizer was built)."""
        shared = _shared_view(group)
        if shared is not None:
            return shared, True
        return torch.cat([p.detach().reshape(-1, *p.shape[-2:]) for p in group]), False

    def _sigma(self, gi: int, w: torch.Tensor) -> torch.Tensor:
        if self.sigma_source == "exact":
            return spectral_norm_exact(w)
        if self.sigma_source == "bound":
            return self._bound_sigma(gi, w)
        u = self.u[gi]
        iters = self.power_iters
        if u is None:
            u = seeded_unit_vectors(w.shape[0], w.shape[1], self.seed + gi, w.device)
            iters = max(iters, self.warmup_iters)
        sigma, u = power_iteration(w, u, iters)
        self.u[gi] = u
        return sigma

    @torch.no_grad()
    def project(self) -> None:
        """Project every matrix in place; no host sync."""
        for gi, group in enumerate(self.groups):
            if self.mode == "clip_sv":  # one batched SVD per same-shape group
                w, view = self._batch(group)
                self.last_sigma[gi] = clip_singular_values(w)
                if not view:  # _batch concatenated copies: write them back
                    offset = 0
                    for p in group:
                        view = p.detach().view(-1, *p.shape[-2:])
                        view.copy_(w[offset : offset + view.shape[0]])
                        offset += view.shape[0]
                continue
            w, view = self._batch(group)
            sigma = self._sigma(gi, w)
            self.last_sigma[gi] = sigma
            scale = 1.0 / (sigma.clamp_min(1e-12) if self.mode == "normalize" else sigma.clamp_min(1.0))
            if self.sigma_source == "bound":
                self.bound[gi] = sigma * scale  # min(1, b): what the divided matrix's sigma is at most
            if view:  # one in-place multiply over the whole batch
                w.mul_(scale.to(w.dtype).view(-1, 1, 1))
                continue
            offset = 0
            for p in group:
                view = p.view(-1, *p.shape[-2:])
                n = view.shape[0]
                view.mul_(scale[offset : offset + n].to(p.dtype).view(n, 1, 1))
                offset += n
        self.projections += 1

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"u": [None if u is None else u.clone() for u in self.u]}
        if self.sigma_source == "bound":
            out.update(bound=[None if b is None else b.clone() for b in self.bound], projections=self.projections)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        us = state["u"]
        if len(us) != len(self.groups):
            raise ValueError(f"spectral projection state has {len(us)} groups, expected {len(self.groups)}")
        self.u = [None if u is None else u.to(self.groups[i][0].device) for i, u in enumerate(us)]
        if self.sigma_source == "bound":  # a state without a bound (older, or another source): exact next
            bounds = state.get("bound") or [None] * len(self.groups)
            self.bound = [None if b is None else b.to(self.groups[i][0].device) for i, b in enumerate(bounds)]
            self.projections = int(state.get("projections", 0))
