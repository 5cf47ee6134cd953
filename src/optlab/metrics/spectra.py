"""Spectral metrics of weights and gradients, batched over same-shape matrices (float32 SVD).

Every function takes ``(..., m, n)`` (one matrix or a stack: the deep MLP's hidden stack, several
same-shape layers concatenated; a 4-D conv kernel is viewed as ``out x (in*kh*kw)`` by
:func:`as_matrices`) and returns device tensors over the leading dimensions, with no host sync.

- :func:`singular_values`: the full spectrum, descending, float32 (float64 stays float64).
- :func:`effective_rank`: ``exp(H(p))`` with ``p_i = sigma_i / sum_j sigma_j`` and ``H`` the Shannon
  entropy (Roy & Vetterli's effective rank); ``n`` for ``I_n``, ``k`` for a rank-``k`` projector,
  between 1 and ``min(m, n)`` in general; 0 for the zero matrix (by convention, no direction).
- :func:`condition_number`: ``sigma_max / sigma_min`` (``inf`` when ``sigma_min`` is exactly 0;
  a numerically rank-deficient float32 matrix gives a large finite number).
- :func:`energy_concentration`: ``sum_{i<=k} sigma_i^2 / sum_i sigma_i^2`` for each ``k``
  (default 1, 5, 10; ``k`` above the rank gives 1).
- :func:`spectrum_metrics`: all of the above from one SVD.
- :func:`ns_diagnostics`: for a gradient ``G`` and each NS step count ``k`` (default 1, 2, 3, 5, 10),
  with ``O = NS_k(G)`` (:func:`optlab.optim.muon.newton_schulz`, bfloat16 like Muon by default):
  the angle between ``G`` and ``O`` (radians, from their Frobenius inner product), ``||G - O||_F /
  ||G||_F`` (note: scale-dependent, ``O`` has singular values near 1 whatever ``G``'s scale; it is
  the quantity the issue names), the orthogonality error ``||O^T O - I||_F`` (smaller side), the
  singular-value range of ``O`` and the effective rank of ``O``. One NS pass serves all ``k``.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from ..optim.manifold import orthogonality_error
from ..optim.muon import Coefficients, newton_schulz_iterates

__all__ = ["as_matrices", "singular_values", "effective_rank", "condition_number", "energy_concentration",
           "spectrum_metrics", "ns_diagnostics", "orthogonality_error"]

NS_STEPS = (1, 2, 3, 5, 10)
TOP_K = (1, 5, 10)


def as_matrices(t: Tensor) -> Tensor:
    """``(m, n)`` and ``(..., m, n)`` as they are; a 4-D conv kernel ``(out, in, kh, kw)`` as ``(out, in*kh*kw)``."""
    if t.dim() < 2:
        raise ValueError(f"spectral metrics need matrices, got shape {tuple(t.shape)}")
    return t.reshape(t.shape[0], -1) if t.dim() == 4 else t


def _f(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.float()


def singular_values(w: Tensor) -> Tensor:
    """Singular values ``(..., min(m, n))`` of each matrix, descending (float32 SVD)."""
    return torch.linalg.svdvals(_f(as_matrices(w.detach())))


def _entropy_rank(s: Tensor) -> Tensor:
    tiny = torch.finfo(s.dtype).tiny
    total = s.sum(-1, keepdim=True)
    p = s / total.clamp_min(tiny)
    h = -(torch.where(p > 0, p * p.clamp_min(tiny).log(), torch.zeros_like(p))).sum(-1)
    return torch.where(total.squeeze(-1) > 0, h.exp(), torch.zeros_like(h))


def effective_rank(w: Tensor | None = None, *, sigma: Tensor | None = None) -> Tensor:
    """``exp`` of the Shannon entropy of ``sigma / sum(sigma)`` per matrix (pass ``w`` or its ``sigma``)."""
    return _entropy_rank(singular_values(w) if sigma is None else _f(sigma))


def condition_number(w: Tensor | None = None, *, sigma: Tensor | None = None) -> Tensor:
    """``sigma_max / sigma_min`` per matrix (``inf`` where ``sigma_min`` is 0)."""
    s = singular_values(w) if sigma is None else _f(sigma)
    lo, hi = s[..., -1], s[..., 0]
    return torch.where(lo > 0, hi / lo.clamp_min(torch.finfo(s.dtype).tiny), torch.full_like(hi, float("inf")))


def energy_concentration(w: Tensor | None = None, ks: Iterable[int] = TOP_K, *,
                         sigma: Tensor | None = None) -> dict[int, Tensor]:
    """``{k: sum of the top-k sigma^2 / sum of all sigma^2}`` per matrix (0 for a zero matrix)."""
    s = singular_values(w) if sigma is None else _f(sigma)
    c = (s * s).cumsum(-1)
    total = c[..., -1]
    out = {}
    for k in ks:
        top = c[..., min(int(k), s.shape[-1]) - 1]
        out[int(k)] = torch.where(total > 0, top / total.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(total))
    return out


def spectrum_metrics(w: Tensor, ks: Iterable[int] = TOP_K) -> dict[str, Tensor]:
    """From one SVD: ``sigma`` (full spectra), ``sigma_max``, ``sigma_min``, ``effective_rank``,
    ``condition_number`` and ``energy_top{k}`` for each ``k``."""
    s = singular_values(w)
    out = {"sigma": s, "sigma_max": s[..., 0], "sigma_min": s[..., -1], "effective_rank": _entropy_rank(s),
           "condition_number": condition_number(sigma=s)}
    for k, v in energy_concentration(sigma=s, ks=ks).items():
        out[f"energy_top{k}"] = v
    return out


def ns_diagnostics(g: Tensor, steps: Iterable[int] = NS_STEPS, ns: str | Coefficients = "quintic",
                   dtype: torch.dtype = torch.bfloat16) -> dict[int, dict[str, Tensor]]:
    """``{k: {"angle", "rel_diff", "ortho_error", "sigma_min", "sigma_max", "effective_rank"}}``
    per matrix of ``g`` (see the module docstring)."""
    gm = as_matrices(g.detach())
    gf = _f(gm)
    gnorm = gf.norm(dim=(-2, -1))
    tiny = torch.finfo(gf.dtype).tiny
    out: dict[int, dict[str, Tensor]] = {}
    for k, o in newton_schulz_iterates(gm, steps, ns, dtype).items():
        of = o.to(gf.dtype)
        onorm = of.norm(dim=(-2, -1))
        cos = (gf * of).sum((-2, -1)) / (gnorm * onorm).clamp_min(tiny)
        s = torch.linalg.svdvals(of)
        out[k] = {
            "angle": torch.arccos(cos.clamp(-1.0, 1.0)),
            "rel_diff": (gf - of).norm(dim=(-2, -1)) / gnorm.clamp_min(tiny),
            "ortho_error": orthogonality_error(of),
            "sigma_min": s[..., -1],
            "sigma_max": s[..., 0],
            "effective_rank": _entropy_rank(s),
        }
    return out
