"""Helpers shared by the matrix probes: layer numbers, same-shape batching, the Muon layers.

Layers are numbered as in :class:`optlab.metrics.layers.LayerIndex` (module order over the weight
parameters; a 3-D stack contributes one layer per matrix, a 4-D conv kernel one layer, viewed as
``out x (in*kh*kw)``). :func:`per_layer` stacks every layer matrix of the same shape (across
parameters: the deep MLP's hidden stack and any same-shape 2-D layers become one batch), calls a
batched metric function once per shape and returns the values in layer order, device-side (no
host sync: the layer numbers are Python ints known from the shapes alone).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from ..metrics.layers import LayerIndex


def as_stack(t: Tensor) -> Tensor:
    """A parameter (or its gradient) as ``(k, m, n)``: 2-D one matrix, 3-D a stack, 4-D a conv
    kernel ``(out, in, kh, kw)`` as one ``out x (in*kh*kw)`` matrix."""
    if t.dim() == 2:
        return t.unsqueeze(0)
    if t.dim() == 3:
        return t
    if t.dim() == 4:
        return t.reshape(1, t.shape[0], -1)
    raise ValueError(f"expected a 2-D, 3-D or 4-D parameter, got shape {tuple(t.shape)}")


def layer_offsets(index: LayerIndex) -> dict[int, tuple[int, int]]:
    """``id(param) -> (first layer number, number of layers)`` for every parameter of the index."""
    out, at = {}, 0
    for p in index.params:
        k = 1 if p.dim() == 4 else as_stack(p).shape[0]
        out[id(p)] = (at, k)
        at += k
    return out


def per_layer(items: Iterable[tuple[int, Tensor]], fn: Callable[[Tensor], dict[str, Tensor]]
              ) -> tuple[list[int], dict[str, Tensor]]:
    """``items``: (first layer number, ``(k, m, n)`` tensor). ``fn`` maps a float32 ``(B, m, n)``
    batch to ``{name: (B, ...) tensor}``. Returns the layer numbers in ascending order and each
    name's values concatenated in that order (one ``fn`` call per distinct shape and device)."""
    groups: dict[tuple, list[tuple[int, Tensor]]] = {}
    for first, t in items:
        groups.setdefault((tuple(t.shape[1:]), t.device), []).append((first, t))
    ids: list[int] = []
    parts: dict[str, list[Tensor]] = {}
    for members in groups.values():
        batch = torch.cat([t.detach().float() for _, t in members]) if len(members) > 1 else members[0][1].detach().float()
        for first, t in members:
            ids.extend(range(first, first + t.shape[0]))
        for name, v in fn(batch).items():
            parts.setdefault(name, []).append(v)
    if not ids:
        return [], {}
    order = sorted(range(len(ids)), key=ids.__getitem__)
    out = {}
    for name, vs in parts.items():
        v = torch.cat(vs)
        out[name] = v[torch.tensor(order, device=v.device)] if order != list(range(len(order))) else v
    return [ids[i] for i in order], out


def layer_items(index: LayerIndex, *, grads: bool, only: set[int] | None = None) -> list[tuple[int, Tensor]]:
    """(first layer number, ``(k, m, n)`` weights or gradients) of the index's parameters (those
    whose ``id`` is in ``only`` when given; parameters without a gradient are left out)."""
    offsets = layer_offsets(index)
    out = []
    for p in index.params:
        if only is not None and id(p) not in only:
            continue
        t = p.grad if grads else p
        if t is None:
            continue
        out.append((offsets[id(p)][0], as_stack(t.detach())))
    return out


def muon_parameters(opt: Any) -> list[tuple[str, torch.nn.Parameter]] | None:
    """The optimizer's ``muon_params()`` (the (name, parameter) pairs Muon updates), looked up on
    the optimizer and on what it wraps; None when it has none (not a Muon-routing optimizer)."""
    seen = 0
    while opt is not None and seen < 4:
        fn = getattr(opt, "muon_params", None)
        if callable(fn):
            return list(fn())
        opt = getattr(opt, "base", None) or getattr(opt, "optimizer", None) or getattr(opt, "inner", None)
        seen += 1
    return None


def ns_settings(opt: Any, p: torch.nn.Parameter) -> tuple[int, Any]:
    """(``ns_steps``, ``ns`` coefficients) of the param group that holds ``p`` (default 5, quintic)."""
    for g in getattr(opt, "param_groups", []) or []:
        if any(q is p for q in g["params"]) and "ns_steps" in g:
            return int(g["ns_steps"]), g.get("ns", "quintic")
    return 5, "quintic"
