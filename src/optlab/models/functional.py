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


# ---------------------------------------------------------------- a cheaper per-step path


class ParamSlots:
    """Where each of ``model``'s parameters lives, found once: for every name of
    ``model.named_parameters()``, the ``(module, attribute)`` pairs that hold it (tied parameters
    have several), and the model's modules, for switching to eval mode and back.

    :meth:`swap` puts other tensors in those slots and :meth:`unswap` puts the parameters back
    (``torch.func.functional_call`` does the same, but walks the model and builds its maps on every
    call, a large share of a small model's forward). :meth:`current` rebuilds the maps if a
    parameter was replaced since.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._build()

    def _build(self) -> None:
        own = dict(self.model.named_parameters())
        where: dict[int, list[tuple[nn.Module, str]]] = {}
        for _, mod in self.model.named_modules(remove_duplicate=False):
            for attr, p in mod._parameters.items():
                if p is not None and (mod, attr) not in where.setdefault(id(p), []):
                    where[id(p)].append((mod, attr))
        self.params: dict[str, torch.Tensor] = own
        self.slots: dict[str, list[tuple[nn.Module, str]]] = {n: where[id(p)] for n, p in own.items()}
        self.modules: list[nn.Module] = list(self.model.modules())
        # a module with its own train() is switched through model.eval(), not by its flag
        self._own_train = any(type(m).train is not nn.Module.train for m in self.modules)

    def current(self) -> "ParamSlots":
        """These maps, rebuilt first if a parameter or module was replaced since they were made."""
        for n, p in self.params.items():
            mod, attr = self.slots[n][0]
            if mod._parameters.get(attr) is not p:
                self._build()
                break
        return self

    def eval_flags(self) -> list[bool]:
        """Switch every module to eval mode; returns the flags to give :meth:`restore_flags`."""
        flags = [m.training for m in self.modules]
        if self._own_train:
            self.model.eval()
        else:
            for m in self.modules:
                m.training = False
        return flags

    def restore_flags(self, flags: list[bool]) -> None:
        for m, was in zip(self.modules, flags):
            m.training = was

    def swap(self, values: Mapping[str, torch.Tensor]) -> list[tuple[nn.Module, str, torch.Tensor]]:
        """Put ``values`` (name -> tensor) in the parameters' slots; returns what :meth:`unswap` restores."""
        saved = []
        slots = self.slots
        for n, v in values.items():
            if n not in slots:
                raise ValueError(f"unknown parameter name {n!r}")
            for mod, attr in slots[n]:
                saved.append((mod, attr, mod._parameters[attr]))
                mod._parameters[attr] = v
        return saved

    @staticmethod
    def unswap(saved: list[tuple[nn.Module, str, torch.Tensor]]) -> None:
        for mod, attr, old in reversed(saved):
            mod._parameters[attr] = old


def eval_outputs(slots: ParamSlots, inputs: torch.Tensor | tuple[torch.Tensor, ...],
                 params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``model(*inputs)`` in eval mode under ``torch.no_grad()``, at the model's parameters with
    ``params`` (name -> tensor) in place of those it names; flags and parameters restored after."""
    if not isinstance(inputs, tuple):
        inputs = (inputs,)
    flags = slots.eval_flags()
    saved = slots.swap(params) if params else []
    try:
        with torch.no_grad():
            return slots.model(*inputs)
    finally:
        slots.unswap(saved)
        slots.restore_flags(flags)


def forward_tangents(model: nn.Module, inputs: torch.Tensor | tuple[torch.Tensor, ...],
                     tangents: Mapping[str, torch.Tensor], *, slots: ParamSlots | None = None) -> torch.Tensor:
    """The directional derivative of ``model(*inputs)`` along ``tangents``, in eval mode: the second
    output of :func:`jvp_outputs`, computed with ``torch.autograd.forward_ad`` dual tensors swapped
    into the parameters' slots instead of ``torch.func.jvp`` over ``functional_call`` (the same
    forward-mode rules, a fraction of the per-call overhead; the same guarantees: eval mode, no
    autograd graph, buffers and train flags untouched, nothing read back to the host).

    Bitwise equal to :func:`jvp_outputs` on the MLP and ResNet models; on the GPT the two differ by
    float rounding (about 1e-15 relative in float64), from functorch's decomposition of some op.
    ``slots`` (a :class:`ParamSlots` of ``model``) saves finding the parameters on every call.
    """
    slots = (slots if slots is not None and slots.model is model else ParamSlots(model)).current()
    if not isinstance(inputs, tuple):
        inputs = (inputs,)
    own = slots.params
    unknown = [n for n in tangents if n not in own]
    if unknown:
        raise ValueError(f"forward_tangents: unknown parameter name(s) {', '.join(sorted(set(unknown)))}")
    flags = slots.eval_flags()
    try:
        with torch.no_grad(), forward_ad.dual_level():
            duals = {n: forward_ad.make_dual(own[n].detach(), t) for n, t in tangents.items()}
            saved = slots.swap(duals)
            try:
                out = model(*inputs)
            finally:
                slots.unswap(saved)
            primal, tangent = forward_ad.unpack_dual(out)
            if tangent is None:  # nothing with a tangent reaches the outputs
                tangent = torch.zeros_like(primal)
    finally:
        slots.restore_flags(flags)
    return tangent
