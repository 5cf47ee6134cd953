"""Forward-mode derivatives of a model's outputs along a direction in parameter space.

``jvp_outputs(model, inputs, tangents, params=None) -> (outputs, doutputs)`` evaluates the model
functionally (``torch.func.functional_call``) at its own parameters, or at ``params`` where given,
and pushes ``tangents`` (parameter name, as in ``model.named_parameters()``, -> tangent tensor; a
missing name means a zero tangent) through it with ``torch.func.jvp``. ``doutputs`` is the
directional derivative d/dt model(theta + t * tangents) at t = 0; ``outputs`` equals ``model(x)``
in eval mode.

It always runs the model in eval mode (no dropout; batch norm uses its running statistics) and
under ``torch.no_grad()`` (no autograd graph is recorded; forward-mode AD is unaffected), and
sets every module's train/eval flag back afterwards. Nothing is written: buffers (batch-norm
``running_mean``/``running_var``/``num_batches_tracked``) stay bitwise unchanged, and a model
that tried to update a buffer inside the transform would raise instead. It copies no parameter,
allocates no zero tangent for the parameters left out (they enter as constants) and never reads
a value back to the host, so it can run every training step. (Train mode is not an option:
train-mode batch norm updates its running statistics in place, which ``torch.func.jvp`` refuses.)

Models take their reference paths when forward-mode AD or a ``torch.func`` transform is active
(:func:`forward_ad_active`, :func:`functorch_active`): the deep MLP walks its hidden stack with
autograd through ``unbind`` instead of its custom autograd function, and the GPT uses explicit
causal softmax attention instead of ``F.scaled_dot_product_attention``, whose CPU flash kernel has
no forward-mode rule. Ordinary training takes neither branch.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch._C._functorch as _functorch
from torch import nn
from torch.autograd import forward_ad
from torch.func import functional_call, jvp

_JVP = _functorch.TransformType.Jvp


def functorch_active() -> bool:
    """True inside any ``torch.func`` transform (jvp, grad, vmap, ...)."""
    return _functorch.peek_interpreter_stack() is not None


def forward_ad_active(*tensors: torch.Tensor) -> bool:
    """True inside ``torch.func.jvp``, or when one of ``tensors`` carries a ``forward_ad`` tangent."""
    stack = _functorch.get_interpreter_stack()
    if stack and any(i.key() == _JVP for i in stack):
        return True
    if forward_ad._current_level >= 0:  # inside a forward_ad.dual_level()
        return any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)
    return False


def jvp_outputs(
    model: nn.Module,
    inputs: torch.Tensor | tuple[torch.Tensor, ...],
    tangents: Mapping[str, torch.Tensor],
    *,
    params: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs, directional derivative of the outputs along ``tangents``), in eval mode.

    ``tangents`` and ``params`` map names of ``model.named_parameters()`` to tensors of the
    parameter's shape; ``params`` overrides the point of evaluation for the names it holds.
    """
    own = dict(model.named_parameters())
    unknown = [n for n in (*tangents, *(params or {})) if n not in own]
    if unknown:
        raise ValueError(f"jvp_outputs: unknown parameter name(s) {', '.join(sorted(set(unknown)))}")
    point = own if params is None else {**own, **params}
    names = list(tangents)
    fixed = {n: p for n, p in point.items() if n not in tangents}
    if not isinstance(inputs, tuple):
        inputs = (inputs,)

    def f(*moving: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {**fixed, **dict(zip(names, moving))}, inputs)

    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            if not names:  # torch.func.jvp needs at least one primal
                out = f()
                return out, torch.zeros_like(out)
            out, dout = jvp(f, tuple(point[n] for n in names), tuple(tangents[n] for n in names))
    finally:
        for m, was in flags:
            m.training = was
    return out, dout
