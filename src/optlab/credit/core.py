"""Layer states, exact costates and the local surrogate update (our definitions, issue #13).

A network is viewed as a discrete-time system ``s_k = F_k(s_{k-1}; theta_k)``, ``k = 1..L``, with
``s_0`` the input and ``s_L`` the output the task's loss ``L(s_L, y)`` is computed on. The costate
of state ``k`` is ``lambda_k = dL/ds_k`` (backprop computes it exactly).

A *credit-capable* model exposes its states through four methods (the deep MLP ``mlp`` with
``norm: none`` and the toy linear system ``lq`` have them; neither changes what ``forward``
computes):

| method | what it returns |
| --- | --- |
| ``credit_layers()`` | ``L``, the number of layers |
| ``credit_widths()`` | ``(d, d_out)``: the width of the hidden states ``s_1..s_{L-1}`` and of the output ``s_L`` |
| ``layer_states(x)`` | ``[s_0, ..., s_L]`` with autograd connections (``s_L`` equals ``forward(x)``) |
| ``layer_forward(inputs)`` | ``[F_1(inputs[0]), ..., F_L(inputs[L-1])]``: each layer applied to the given input alone, batched over same-shape layers |
| ``forward_from(k, h)`` | the output ``s_L`` when state ``k`` is set to ``h`` (layers ``k+1..L``) |
| ``layer_param_groups()`` | per layer, its parameters as ``(name, slice)`` (``slice``: the index into a stacked parameter, or ``None``) |

The states ``s_1..s_{L-1}`` (the hidden states, whose credit a method estimates) must share one
width, so that per-layer networks and feedback matrices are stacked and run batched.

**Local surrogate** (every method of the study updates with it): given credits ``lambda_hat_k``,
``a_k = lambda_hat_k / (RMS(lambda_hat_k) + 1e-6)`` (RMS over the whole batch tensor) and the model
receives the gradient of ``(1/B) sum_k <stopgrad(a_k), F_k(stopgrad(s_{k-1}); theta_k)>`` (the
``1/B`` batch average is our scaling, so learning rates are per example). With exact costates each
layer's update is the backprop gradient of that layer times a positive number.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

RMS_EPS = 1e-6

CREDIT_METHODS = ("credit_layers", "credit_widths", "layer_states", "layer_forward", "forward_from", "layer_param_groups")


def check_credit_model(model: nn.Module, who: str = "step_method") -> None:
    """Raise a one-line ValueError unless ``model`` exposes its layer states."""
    missing = [m for m in CREDIT_METHODS if not callable(getattr(model, m, None))]
    if missing:
        raise ValueError(f"{who}: needs a model that exposes its layer states (arch mlp or lq); "
                         f"{type(model).__name__} lacks {', '.join(missing)}")
    ok = getattr(model, "credit_supported", None)
    if callable(ok):
        reason = ok()
        if reason:
            raise ValueError(f"{who}: {reason}")


def normalize(lam: torch.Tensor) -> torch.Tensor:
    """``a = lambda / (RMS(lambda) + 1e-6)``, RMS over every element of the batch tensor."""
    return lam / (lam.float().square().mean().sqrt().to(lam.dtype) + RMS_EPS)


def exact_costates(model: nn.Module, task: Any, x: torch.Tensor, y: torch.Tensor,
                   create_graph: bool = False) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    """(states ``s_0..s_L`` detached, the loss, costates ``dL/ds_1..dL/ds_L``) by autograd."""
    with torch.enable_grad():
        states = model.layer_states(x)
        loss = task.loss(states[-1], y)
        lams = torch.autograd.grad(loss, states[1:], create_graph=create_graph)
    return [s.detach() for s in states], loss.detach(), [l if create_graph else l.detach() for l in lams]


def output_error(task: Any, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, ``e = dL/ds_L``) at the output (the only gradient the non-backprop methods take)."""
    with torch.enable_grad():
        o = out.detach().requires_grad_(True)
        loss = task.loss(o, y)
        (e,) = torch.autograd.grad(loss, o)
    return loss.detach(), e


def sample_losses(task: Any, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example losses ``(B,)`` (the task's loss of each row alone), by ``torch.func.vmap``."""
    return torch.func.vmap(lambda o, t: task.loss(o.unsqueeze(0), t.unsqueeze(0)))(out, y)


def surrogate(model: nn.Module, inputs: list[torch.Tensor], credits: list[torch.Tensor]) -> torch.Tensor:
    """``(1/B) sum_k <stopgrad(a_k), F_k(stopgrad(s_{k-1}))>`` with ``a_k = normalize(credits[k])``.

    ``inputs`` are ``s_0..s_{L-1}``, ``credits`` the ``L`` credits ``lambda_hat_1..lambda_hat_L``."""
    outs = model.layer_forward([s.detach() for s in inputs])
    b = inputs[0].shape[0]
    total = sum(((normalize(c.detach()) * o).sum() for c, o in zip(credits, outs)), torch.zeros((), device=inputs[0].device))
    return total / b


def layer_parts(model: nn.Module) -> list[list[tuple[nn.Parameter, int | None]]]:
    """Per layer: (parameter, slice index or None) from ``model.layer_param_groups()``."""
    params = dict(model.named_parameters())
    return [[(params[n], i) for n, i in group] for group in model.layer_param_groups()]


def per_layer_cosine(model: nn.Module, a: dict[nn.Parameter, torch.Tensor], b: dict[nn.Parameter, torch.Tensor]) -> torch.Tensor:
    """Cosine per layer ``(L,)`` between two parameter-gradient sets (keys: parameters). A stacked
    parameter's slices are reduced in one batched op."""
    cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def sums(p: nn.Parameter) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if id(p) not in cache:
            ga, gb = a[p].float(), b[p].float()
            dims = tuple(range(1, ga.dim())) if ga.dim() > 1 else ()
            cache[id(p)] = ((ga * gb).sum(dims) if dims else ga * gb, ga.square().sum(dims) if dims else ga.square(),
                            gb.square().sum(dims) if dims else gb.square())
        return cache[id(p)]

    rows = []
    for group in layer_parts(model):
        dot = aa = bb = None
        for p, i in group:
            d, x, z = sums(p)
            if i is None:
                d, x, z = d.sum(), x.sum(), z.sum()
            else:
                d, x, z = d[i], x[i], z[i]
            dot, aa, bb = (d, x, z) if dot is None else (dot + d, aa + x, bb + z)
        rows.append(dot / (aa.sqrt() * bb.sqrt()).clamp_min(1e-30))
    return torch.stack(rows)


def credit_update(model: nn.Module, states: list[torch.Tensor], credits: list[torch.Tensor]) -> dict[nn.Parameter, torch.Tensor]:
    """The local surrogate's parameter gradient (no ``.grad`` written), keyed by parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
        g = torch.autograd.grad(surrogate(model, states[:-1], credits), params, allow_unused=True)
    return {p: torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g)}


def backprop_grads(model: nn.Module, task: Any, x: torch.Tensor, y: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """The loss's parameter gradient by backprop (no ``.grad`` written), keyed by parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
        loss = task.loss(model.layer_states(x)[-1], y)
        g = torch.autograd.grad(loss, params, allow_unused=True)
    return {p: torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g)}
