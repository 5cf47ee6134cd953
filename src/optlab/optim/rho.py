"""Step-length control from the softmax convergence radius: the rho controller.

Along a unit direction ``v`` in parameter space, with the logits linearized,
``z_k(t) = z_k + a_k t`` with ``a_k = grad z_k . v`` (one JVP). The cross-entropy loss of a sample
is ``log sum_k exp z_k(t) - z_y(t)``; its Taylor series in ``t`` converges out to the nearest
complex zero of the partition function, which is at least ``pi / (max_k a_k - min_k a_k)`` away.
Over a set of samples, ``Delta_a`` is the largest per-sample spread ``max_k a_k - min_k a_k`` and

    rho = pi / Delta_a.

Data-parallel under torchrun (:mod:`optlab.distributed`), ``Delta_a`` is the maximum over the
ranks' slices of the batch (one all-reduce), so every rank takes the single-process step.

A step of length ``tau`` has normalized size ``r = tau / rho``; steps with ``r > 1`` leave the region
where the local model of the loss means anything. (For a binary logistic model the exact radius of
a sample is ``sqrt(delta^2 + pi^2) / Delta_a``, ``delta`` its logit gap, so ``pi / Delta_a`` is a
lower bound.)

:class:`RhoController` wraps a torch optimizer (SGD with or without momentum, dampening, Nesterov
and weight decay; Adam, with or without amsgrad and L2 decay; AdamW; an ``sgd_sn``
:class:`~optlab.optim.projected.Projected` wrapper of SGD) and, each step:

1. ``u`` = the step the base optimizer is about to take at learning rate 1 (:func:`proposed_step`:
   the momentum-corrected step exactly as torch's SGD applies it; Adam's ``m_hat / (sqrt(v_hat) +
   eps)`` with the moments and bias corrections of the step about to happen, plus AdamW's
   decoupled ``weight_decay * p``), batched with ``torch._foreach`` ops; ``v = -u / ||u||``;
2. ``a`` = the directional derivative of the logits along ``v`` on the chosen samples
   (:func:`logit_slopes`, in eval mode, batch-norm statistics untouched): ``jvp``, forward-mode AD
   (:func:`optlab.models.functional.forward_tangents`: ``torch.autograd.forward_ad`` dual tensors
   in the parameters' slots; bitwise the ``torch.func.jvp`` of :func:`optlab.models.jvp_outputs`
   on the MLP and ResNet, within float rounding on the GPT); ``fd``, a central finite difference,
   ``fd_eps = 1e-4`` along the unit direction, two forwards, for models without a forward-mode
   rule; ``auto`` (the default) tries the JVP and falls back to ``fd``; or ``fd1``, only when
   chosen: a one-sided difference against the outputs of the step's own training forward, one
   eval forward, for models whose train- and eval-mode forwards agree (batch norm and dropout
   with p > 0 are refused; samples ``batch`` or ``subset:N``; first order: Delta_a measured within
   2e-4..2e-3 of the JVP's in float32, where the central difference is within 2e-4..7e-4, and
   1e-5..1e-4 in float64);
3. ``eta_eff`` by ``mode``: ``fixed`` (the base LR ``eta``; the base optimizer is unchanged, rho
   and r are still measured), ``capped`` (``min(eta, r_target * rho / ||u||)``) or ``set``
   (``r_target * rho / ||u||``; the base LR is ignored);
4. the base optimizer steps with ``eta_eff``; its state evolves exactly as it would at that LR.

Samples (``samples``): ``batch`` (the step's inputs), ``subset:N`` (N of them, drawn with a seeded
generator on the device), ``probe`` (a fixed pool: the task's probe batch) or ``full`` (a fixed
pool: the training inputs), pools evaluated in chunks of ``chunk`` rows. Outputs of any shape
``(..., K)`` work: every leading index (a token of a language model) is a sample.

Applying the step (``apply``): ``device`` (default) writes the base optimizer's state in place with
the same ops torch's own step runs (the state is bitwise what torch's step leaves) and moves the
parameters by ``-eta_eff * u`` with ``eta_eff`` a device tensor: no host synchronization anywhere
in the step. ``torch`` reads ``eta_eff`` to the host (one sync), sets each param group's ``lr`` to
it for the step, calls the base optimizer's ``step()`` and restores the LR: torch's own arithmetic,
bitwise. In ``fixed`` mode the base optimizer's ``step()`` runs untouched either way.

Per step, on the device (:attr:`RhoController.last_stats`, returned by ``step``): ``tau`` (step
length ``eta_eff * ||u||``), ``rho``, ``r``, ``eta_eff``, ``capped`` (1.0 where the cap bound),
``delta_a``. Accumulators on the device give the run's and the current epoch's mean and max r,
mean eta_eff and capped fraction (:meth:`RhoController.window`, :meth:`RhoController.mark_epoch`).

In a user's own loop (three lines)::

    ctl = RhoController(model, torch.optim.SGD(model.parameters(), lr=0.5), mode="capped", r_target=1.0)
    for x, y in batches:
        ctl.zero_grad(); F.cross_entropy(model(x), y).backward(); stats = ctl.step(x)

``optlab.optim.build(name, model, lr, rho={...})`` returns the same wrapper around optimizer
``name``; its ``step()`` without arguments uses the inputs of the model's last training-mode
forward (a forward pre-hook records them), so the usual ``opt.zero_grad(); loss.backward();
opt.step()`` works unchanged.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .. import distributed
from ..models.functional import ParamSlots, eval_outputs, forward_tangents, functorch_active
from .projected import OptimizerWrapper, Projected

MODES = ("fixed", "capped", "set")
DERIVATIVES = ("auto", "jvp", "fd", "fd1")
APPLY = ("device", "torch")
SAMPLE_KINDS = ("batch", "subset:N", "probe", "full")
STAT_KEYS = ("tau", "rho", "r", "eta_eff", "capped", "delta_a")
FD_EPS = 1e-4
_PI = math.pi


def parse_samples(spec: str) -> tuple[str, int]:
    """``batch`` | ``subset:N`` (N >= 1) | ``probe`` | ``full`` -> (kind, N); ValueError if bad."""
    if not isinstance(spec, str):
        raise ValueError(f"samples: expected one of {', '.join(SAMPLE_KINDS)}, got {spec!r}")
    if spec in ("batch", "probe", "full"):
        return spec, 0
    head, _, tail = spec.partition(":")
    if head == "subset" and tail.isdigit() and int(tail) >= 1:
        return "subset", int(tail)
    raise ValueError(f"samples: expected one of {', '.join(SAMPLE_KINDS)} (N an integer >= 1), got {spec!r}")


# ---------------------------------------------------------------- the step at LR 1


@dataclass
class Proposal:
    """The base optimizer's next step at learning rate 1: ``params`` (those with a gradient, in
    param-group order) and ``u`` (one tensor each: the update is ``p <- p - lr * u``)."""

    params: list[torch.Tensor] = field(default_factory=list)
    u: list[torch.Tensor] = field(default_factory=list)


def _sgd_u(group: dict[str, Any], state: Any, params: list[torch.Tensor], grads: list[torch.Tensor],
           commit: bool) -> list[torch.Tensor]:
    """torch.optim.SGD's step at LR 1 (its ``_single_tensor_sgd``/``_multi_tensor_sgd`` order of
    ops). With ``commit`` the momentum buffers are updated in place, as torch's step does."""
    mu, damp, wd = group["momentum"], group["dampening"], group["weight_decay"]
    g: list[torch.Tensor] = list(torch._foreach_neg(grads)) if group["maximize"] else list(grads)
    if wd != 0:
        g = list(torch._foreach_add(g, params, alpha=wd))
    if mu == 0:
        return g
    bufs = [state[p].get("momentum_buffer") if p in state else None for p in params]
    if all(b is not None for b in bufs):
        if commit:
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, g, alpha=1 - damp)
            new = bufs
        else:
            new = list(torch._foreach_mul(bufs, mu))
            torch._foreach_add_(new, g, alpha=1 - damp)
    else:
        new = []
        for p, b, gi in zip(params, bufs, g):
            if b is None:
                nb = torch.clone(gi).detach()
                if commit:
                    state[p]["momentum_buffer"] = nb
            else:
                nb = (b.mul_(mu) if commit else b.mul(mu)).add_(gi, alpha=1 - damp)
            new.append(nb)
    if group["nesterov"]:
        return list(torch._foreach_add(g, new, alpha=mu))
    return list(new)


def _adam_init(p: torch.Tensor, amsgrad: bool) -> dict[str, torch.Tensor]:
    """Adam's lazily created state, in torch's own format (``step`` a CPU scalar)."""
    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32  # torch's _get_scalar_dtype
    st = {"step": torch.tensor(0.0, dtype=scalar),
          "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
          "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
    if amsgrad:
        st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return st


def _adam_u(group: dict[str, Any], state: Any, params: list[torch.Tensor], grads: list[torch.Tensor],
            commit: bool) -> list[torch.Tensor]:
    """torch.optim.Adam/AdamW's step at LR 1: ``m_hat / (sqrt(v_hat) + eps)`` with the moments and
    bias corrections of the step about to happen (+ ``weight_decay * p`` when decoupled). With
    ``commit`` the moments and step counts are updated in place, as torch's step does."""
    if group.get("capturable") or group.get("fused") or group.get("differentiable"):
        raise ValueError("rho: Adam/AdamW with capturable, fused or differentiable is not supported "
                         "(its step count lives on the device; use the default implementation)")
    b1, b2 = group["betas"]
    if isinstance(b1, torch.Tensor) or isinstance(b2, torch.Tensor):
        raise ValueError("rho: Adam betas must be numbers, not tensors")
    eps, wd, amsgrad = group["eps"], group["weight_decay"], group["amsgrad"]
    decoupled = bool(group.get("decoupled_weight_decay", False))
    g: list[torch.Tensor] = list(torch._foreach_neg(grads)) if group["maximize"] else list(grads)
    if wd != 0 and not decoupled:
        g = list(torch._foreach_add(g, params, alpha=wd))
    sts: list[dict[str, torch.Tensor]] = []
    for p in params:
        st = state[p] if p in state and len(state[p]) else None
        if st is None:
            st = _adam_init(p, amsgrad)
            if commit:
                state[p].update(st)
                st = state[p]
        sts.append(st)
    for st in sts:
        if st["step"].device.type != "cpu":
            raise ValueError("rho: Adam step counts on the device are not supported")
    m = [st["exp_avg"] for st in sts]
    v = [st["exp_avg_sq"] for st in sts]
    if commit:
        torch._foreach_lerp_(m, g, 1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, g, g, 1 - b2)
        for st in sts:
            st["step"] += 1
        t = [float(st["step"]) for st in sts]  # CPU scalars: no device sync
    else:
        m = list(torch._foreach_lerp(m, g, 1 - b1))
        v = list(torch._foreach_mul(v, b2))
        torch._foreach_addcmul_(v, g, g, 1 - b2)
        t = [float(st["step"]) + 1 for st in sts]
    if amsgrad:
        vmax = [st["max_exp_avg_sq"] for st in sts]
        if commit:
            torch._foreach_maximum_(vmax, v)
            v = vmax
        else:
            v = list(torch._foreach_maximum(vmax, v))
    bc1 = [1 - b1**s for s in t]
    bc2_sqrt = [(1 - b2**s) ** 0.5 for s in t]
    denom = list(torch._foreach_sqrt(v))
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    u = list(torch._foreach_div(m, denom))
    torch._foreach_mul_(u, [1.0 / b for b in bc1])
    if wd != 0 and decoupled:
        torch._foreach_add_(u, params, alpha=wd)
    return u


_DIRECTIONS: tuple[tuple[type, Callable[..., list[torch.Tensor]]], ...] = (
    (torch.optim.SGD, _sgd_u),
    (torch.optim.Adam, _adam_u),  # AdamW is an Adam with decoupled_weight_decay
)


def _inner(opt: Any) -> torch.optim.Optimizer:
    return opt.inner if isinstance(opt, Projected) else opt


def _direction_fn(opt: torch.optim.Optimizer) -> Callable[..., list[torch.Tensor]]:
    if callable(getattr(opt, "proposed_step", None)):  # gives its own step at LR 1 (optlab.optim.modular.Modular)
        return opt.proposed_step
    for cls, fn in _DIRECTIONS:
        if isinstance(opt, cls):
            if isinstance(opt, torch.optim.AdamW) and "decoupled_weight_decay" not in opt.defaults:
                raise ValueError("rho: this torch's AdamW has no decoupled_weight_decay flag")
            return fn
    raise ValueError(f"rho: no step rule for {type(opt).__name__}; supported: SGD (any momentum, dampening, "
                     "nesterov, weight decay), Adam, AdamW, and sgd_sn's Projected(SGD)")


def proposed_step(opt: Any, *, commit: bool = False, weights: list[float] | None = None) -> Proposal:
    """The step ``opt`` is about to take, at LR 1, from its current state and hyper-parameters.

    ``commit`` also advances the optimizer's state (momentum buffers, moments, step counts) in
    place exactly as its own ``step()`` would; only the parameters are left for the caller to move.
    ``weights`` (one per param group) scales each group's ``u`` (e.g. by its LR relative to the
    first group's). Never reads a device value back to the host.
    """
    opt = _inner(opt)
    fn = _direction_fn(opt)
    out = Proposal()
    if callable(getattr(opt, "proposed_step", None)):
        out.params, out.u = opt.proposed_step(commit=commit, weights=weights)
        return out
    for gi, group in enumerate(opt.param_groups):
        if isinstance(group["lr"], torch.Tensor):
            raise ValueError("rho: a param group's lr must be a number, not a tensor")
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        grads = [p.grad for p in params]
        if any(g.is_sparse for g in grads) or any(torch.is_complex(p) for p in params):
            raise ValueError("rho: sparse gradients and complex parameters are not supported")
        u = fn(group, opt.state, params, grads, commit)
        w = 1.0 if weights is None else weights[gi]
        if w != 1.0:
            u = list(torch._foreach_mul(u, w))
        out.params += params
        out.u += u
    return out


# ---------------------------------------------------------------- derivatives of the logits


def _fd_slopes(model: nn.Module, inputs: torch.Tensor, tangents: Mapping[str, torch.Tensor], fd_eps: float,
               tangent_norm: torch.Tensor | None, slots: ParamSlots | None = None,
               base_outputs: torch.Tensor | None = None) -> torch.Tensor:
    """A finite difference of the eval-mode outputs along ``tangents`` with step ``fd_eps`` along
    the unit direction, scaled back to a derivative along ``tangents`` (buffers untouched).

    Central (two forwards) by default; with ``base_outputs`` (the outputs at the current
    parameters, e.g. the training forward's where it equals the eval forward) one-sided, one forward
    at ``theta - h * tangents``: ``(base_outputs - f(theta - h * tangents)) / h``."""
    slots = (slots if slots is not None and slots.model is model else ParamSlots(model)).current()
    own = slots.params
    names = list(tangents)
    tan = [tangents[n] for n in names]
    base = [own[n] for n in names]
    if tangent_norm is None:
        tangent_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tan))) if tan else None
    if tangent_norm is None:
        return torch.zeros_like(eval_outputs(slots, inputs))
    h = fd_eps / torch.clamp(tangent_norm, min=torch.finfo(tangent_norm.dtype).tiny)
    with torch.no_grad():
        step = torch._foreach_mul(tan, h)
        minus = eval_outputs(slots, inputs, dict(zip(names, torch._foreach_sub(base, step))))
        if base_outputs is not None:
            return (base_outputs.detach() - minus) / h
        plus = eval_outputs(slots, inputs, dict(zip(names, torch._foreach_add(base, step))))
    return (plus - minus) / (2 * h)


def logit_slopes(model: nn.Module, inputs: torch.Tensor, tangents: Mapping[str, torch.Tensor], *,
                 derivative: str = "jvp", fd_eps: float = FD_EPS,
                 tangent_norm: torch.Tensor | None = None, slots: ParamSlots | None = None,
                 base_outputs: torch.Tensor | None = None) -> torch.Tensor:
    """``d/dt model(theta + t * tangents)`` at ``t = 0`` in eval mode (names as in
    ``model.named_parameters()``; missing names are zero tangents): ``jvp`` (forward-mode AD,
    exact: :func:`optlab.models.functional.forward_tangents`), ``fd`` (a central finite difference
    of step ``fd_eps`` along the unit direction) or ``fd1`` (the one-sided difference against
    ``base_outputs``, the outputs at ``theta``: one forward instead of two, first-order accurate).
    ``slots`` (a :class:`~optlab.models.functional.ParamSlots` of ``model``) is reused if given."""
    if derivative == "jvp":
        return forward_tangents(model, inputs, tangents, slots=slots)
    if derivative == "fd":
        return _fd_slopes(model, inputs, tangents, fd_eps, tangent_norm, slots)
    if derivative == "fd1":
        if base_outputs is None:
            raise ValueError("derivative fd1: needs base_outputs (the outputs at the current parameters)")
        return _fd_slopes(model, inputs, tangents, fd_eps, tangent_norm, slots, base_outputs)
    raise ValueError(f"derivative: unknown {derivative!r}; allowed: jvp, fd, fd1")


def spread(slopes: torch.Tensor) -> torch.Tensor:
    """Largest per-sample spread ``max_k a_k - min_k a_k`` over every leading index (device scalar)."""
    lo, hi = torch.aminmax(slopes.detach().reshape(-1, slopes.shape[-1]), dim=-1)
    return (hi - lo).max()


# ---------------------------------------------------------------- the controller


class _InputTap:
    """A forward pre-hook that keeps the inputs of the model's last training-mode call (and, as a
    forward hook too, its outputs, detached, for ``derivative="fd1"``)."""

    def __init__(self) -> None:
        self.last: torch.Tensor | None = None
        self.last_out: torch.Tensor | None = None  # the outputs of the call whose inputs are ``last``

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if module.training and args and isinstance(args[0], torch.Tensor) and not functorch_active():
            self.last, self.last_out = args[0], None

    def outputs(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if (module.training and args and args[0] is self.last and isinstance(out, torch.Tensor)
                and not functorch_active()):
            self.last_out = out.detach()


def _train_dependent(model: nn.Module) -> list[str]:
    """Names of the modules whose train- and eval-mode forwards are known to differ: batch norm
    (batch statistics vs running ones), instance norm with running statistics, dropout with p > 0."""
    out = []
    for name, m in model.named_modules():
        if (isinstance(m, nn.modules.batchnorm._BatchNorm)
                or (isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats)
                or (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0)):
            out.append(name or type(m).__name__)
    return out


_N_SUM = 4  # accumulator sums: steps, r, eta_eff, capped


class RhoController(OptimizerWrapper):
    """A base optimizer whose steps are measured (and, in ``capped``/``set`` mode, sized) by rho.

    See the module docstring. A ``torch.optim.Optimizer`` (:class:`optlab.optim.projected.OptimizerWrapper`)
    for training loops, schedulers and checkpoints: ``step(inputs=None)``, ``zero_grad``,
    ``param_groups``/``state``/``defaults`` (the base optimizer's own objects, so an LR scheduler
    reaches it), step hooks (around the controller's whole step), ``state_dict``/``load_state_dict``
    (the base optimizer's state plus the controller's generator, accumulators and derivative
    choice); ``projections`` and ``active_steps`` pass through to an ``sgd_sn`` base.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        *,
        mode: str = "capped",
        r_target: float = 1.0,
        samples: str = "batch",
        derivative: str = "auto",
        fd_eps: float = FD_EPS,
        pool: torch.Tensor | None = None,
        seed: int = 0,
        chunk: int = 4096,
        apply: str = "device",
        capture_inputs: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode: unknown {mode!r}; allowed: {', '.join(MODES)}")
        if derivative not in DERIVATIVES:
            raise ValueError(f"derivative: unknown {derivative!r}; allowed: {', '.join(DERIVATIVES)}")
        if apply not in APPLY:
            raise ValueError(f"apply: unknown {apply!r}; allowed: {', '.join(APPLY)}")
        if not (isinstance(r_target, (int, float)) and math.isfinite(r_target) and r_target > 0):
            raise ValueError(f"r_target: must be a finite number > 0, got {r_target!r}")
        if not (isinstance(fd_eps, (int, float)) and fd_eps > 0):
            raise ValueError(f"fd_eps: must be a number > 0, got {fd_eps!r}")
        if not (isinstance(chunk, int) and chunk >= 1):
            raise ValueError(f"chunk: must be an integer >= 1, got {chunk!r}")
        self.kind, self.subset = parse_samples(samples)
        if self.kind in ("probe", "full") and pool is None:
            raise ValueError(f"samples={samples}: needs a pool of inputs (the task's probe batch or training inputs)")
        self.model, self.base = model, optimizer
        self.mode, self.r_target, self.samples = mode, float(r_target), samples
        self.derivative, self.fd_eps, self.pool, self.seed, self.chunk, self.apply = derivative, float(fd_eps), pool, seed, chunk, apply
        self.derivative_used = "jvp" if derivative in ("auto", "jvp") else derivative
        if derivative == "fd1":
            if self.kind in ("probe", "full"):
                raise ValueError(f"derivative fd1: reuses the training forward's outputs, so samples must be batch or "
                                 f"subset:N, not {samples}")
            bad = _train_dependent(model)
            if bad:
                raise ValueError(f"derivative fd1: {type(model).__name__}'s train- and eval-mode forwards differ "
                                 f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); use jvp or fd")
        inner = _inner(optimizer)
        _direction_fn(inner)  # refuse an unsupported optimizer now, not at the first step
        self._name = {id(p): n for n, p in model.named_parameters()}
        missing = [i for g in inner.param_groups for i, p in enumerate(g["params"]) if id(p) not in self._name]
        if missing:
            raise ValueError("rho: the optimizer holds parameters that are not the model's own")
        self._slots = ParamSlots(model)  # where the parameters live: for the JVP's and the differences' forwards
        self._ones: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # see _one
        self._tap: _InputTap | None = None
        self._hook = None
        self._out_hook = None
        if capture_inputs:
            self._tap = _InputTap()
            self._hook = model.register_forward_pre_hook(self._tap)
            if derivative == "fd1":
                self._out_hook = model.register_forward_hook(self._tap.outputs)
        self._gen: torch.Generator | None = None
        self._gen_state: torch.Tensor | None = None  # restored before the generator exists
        self._sums: torch.Tensor | None = None  # run: steps, sum r, sum eta_eff, sum capped
        self._max: torch.Tensor | None = None  # run: max r
        self._wsums: torch.Tensor | None = None  # current window (epoch)
        self._wmax: torch.Tensor | None = None
        self._prev: torch.Tensor | None = None  # the last closed window: mean r, max r, mean eta, capped frac
        self._epoch: int | None = None
        self.last_stats: dict[str, torch.Tensor] = {}

    # -- optimizer surface (param_groups, state, defaults: OptimizerWrapper's, from _wrapped)
    def _wrapped(self) -> Any:
        return self.base

    @property
    def projections(self) -> list[Any]:
        return list(getattr(self.base, "projections", []) or [])

    @property
    def active_steps(self) -> int:
        return int(getattr(self.base, "active_steps", 0))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def close(self) -> None:
        """Remove the input-recording hook from the model."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._out_hook is not None:
            self._out_hook.remove()
            self._out_hook = None

    def __repr__(self) -> str:
        return (f"RhoController({self.base!r}, mode={self.mode}, r_target={self.r_target}, samples={self.samples}, "
                f"derivative={self.derivative_used}, apply={self.apply})")

    # -- samples and slopes
    def _sample_sets(self, inputs: torch.Tensor | None,
                     outputs: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(inputs, outputs at the current parameters or None) per chunk of the samples."""
        fd1 = self.derivative_used == "fd1"
        out = None
        if self.kind in ("probe", "full"):
            x = self.pool
        else:
            if inputs is None:
                inputs = self._tap.last if self._tap is not None else None
                if fd1 and outputs is None and self._tap is not None:
                    outputs = self._tap.last_out
            elif fd1 and outputs is None and self._tap is not None and self._tap.last is inputs:
                outputs = self._tap.last_out
            if inputs is None:
                raise ValueError("rho: step() needs the batch inputs (or a training-mode forward of the model first)")
            x = inputs
            if fd1:
                if outputs is None:
                    raise ValueError("rho: derivative fd1 needs the training forward's outputs: step(inputs, outputs) "
                                     "(or a training-mode forward of the model with capture_inputs)")
                p0 = self._slots.params[next(iter(self._slots.params))]
                if outputs.shape[:1] != x.shape[:1] or outputs.dtype != p0.dtype:
                    raise ValueError(f"rho: derivative fd1: outputs {tuple(outputs.shape)} {outputs.dtype} do not match "
                                     f"inputs {tuple(x.shape)} and parameters {p0.dtype} (autocast is not supported)")
                out = outputs.detach()
            if self.kind == "subset" and x.shape[0] > self.subset:
                if self._gen is None or self._gen.device != x.device:
                    self._gen = torch.Generator(device=x.device).manual_seed(self.seed)
                    if self._gen_state is not None:
                        self._gen.set_state(self._gen_state)
                        self._gen_state = None
                idx = torch.randperm(x.shape[0], generator=self._gen, device=x.device)[: self.subset]
                x = x[idx]
                out = None if out is None else out[idx]
        assert x is not None
        c = self.chunk
        if x.shape[0] <= c:
            return [(x, out)]
        return [(x[i : i + c], None if out is None else out[i : i + c]) for i in range(0, x.shape[0], c)]

    def _spread(self, sets: list[tuple[torch.Tensor, torch.Tensor | None]], tangents: dict[str, torch.Tensor],
                unorm: torch.Tensor) -> torch.Tensor:
        def run(how: str) -> torch.Tensor:
            vals = [spread(logit_slopes(self.model, x, tangents, derivative=how, fd_eps=self.fd_eps, tangent_norm=unorm,
                                        slots=self._slots, base_outputs=o))
                    for x, o in sets]
            return vals[0] if len(vals) == 1 else torch.stack(vals).max()

        if self.derivative == "auto" and self.derivative_used == "jvp":
            try:
                return run("jvp")
            except (RuntimeError, NotImplementedError) as exc:
                warnings.warn(f"rho: forward-mode AD failed on {type(self.model).__name__} ({type(exc).__name__}: {exc}); "
                              f"using a central finite difference (eps {self.fd_eps:g}) from now on")
                self.derivative_used = "fd"
        return run(self.derivative_used)

    # -- the step
    def step(self, inputs: torch.Tensor | None = None, outputs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Measure the base optimizer's next step on the samples, size it by ``mode`` and take it.

        ``inputs``: the batch the gradients came from (default: the model's last training-mode
        inputs). ``outputs``: that forward's outputs, used by ``derivative="fd1"`` only (default:
        recorded by the hook). Returns the per-step statistics (device scalars, see ``STAT_KEYS``).
        """
        inner = _inner(self.base)
        raw = [g["lr"] for g in inner.param_groups]
        if any(isinstance(x, torch.Tensor) for x in raw):
            raise ValueError("rho: a param group's lr must be a number, not a tensor")
        lrs = [float(x) for x in raw]
        eta = lrs[0]
        weights = [1.0] * len(lrs) if self.mode == "set" else [x / eta if eta else 1.0 for x in lrs]
        commit = self.mode != "fixed" and self.apply == "device"
        prop = proposed_step(inner, commit=commit, weights=weights)
        if not prop.params:  # nothing to move
            self.base.step()
            return {}
        dev = prop.params[0].device
        norms = torch._foreach_norm(prop.u)
        if len({n.dtype for n in norms}) > 1:
            norms = [n.float() for n in norms]
        unorm = torch.linalg.vector_norm(torch.stack(norms))
        name = self._name
        tangents = {name[id(p)]: u for p, u in zip(prop.params, prop.u)}
        s = self._spread(self._sample_sets(inputs, outputs), tangents, unorm)  # Delta_a * ||u||
        world = distributed.current()
        if world.active:  # data-parallel: the spread over every rank's slice of the batch (one all-reduce)
            s = distributed.all_max(s.clone(), world)
        zero = torch.zeros((), device=dev, dtype=unorm.dtype)
        delta_a = torch.where(unorm > 0, s / unorm, zero)
        cap = self.r_target * _PI / s  # r_target * rho / ||u|| (inf where the logits do not move)
        if self.mode == "fixed":
            eta_eff = torch.full((), eta, device=dev, dtype=unorm.dtype)
            capped = zero
        elif self.mode == "capped":
            eta_eff = torch.clamp(cap, max=eta)
            capped = (cap < eta).float()
        else:
            eta_eff = torch.where(torch.isfinite(cap), cap, zero)
            capped = zero
        stats = {"tau": eta_eff * unorm, "rho": _PI / delta_a, "r": eta_eff * s / _PI, "eta_eff": eta_eff,
                 "capped": capped, "delta_a": delta_a}
        if self.mode == "fixed":
            self.base.step()
        elif self.apply == "device":
            with torch.no_grad():
                torch._foreach_add_(prop.params, torch._foreach_mul(prop.u, -eta_eff.to(prop.u[0].dtype)))
            if isinstance(self.base, Projected):
                self.base.project()
                self.base._count_active()
            elif callable(getattr(self.base, "project", None)):  # a modular optimizer's constraints
                self.base.project()
        else:
            e = float(eta_eff)  # the one host sync of apply="torch"
            saved = [g["lr"] for g in inner.param_groups]
            try:
                for g, w in zip(inner.param_groups, weights):
                    g["lr"] = e * w
                self.base.step()
            finally:
                for g, lr in zip(inner.param_groups, saved):
                    g["lr"] = lr
        self._accumulate(stats)
        self.last_stats = stats
        return stats

    def _one(self, r: torch.Tensor) -> torch.Tensor:
        """A cached device scalar 1 like ``r`` (internal: only ever copied by ``torch.stack``)."""
        key = (r.device, r.dtype)
        one = self._ones.get(key)
        if one is None:
            one = self._ones[key] = torch.ones((), device=r.device, dtype=r.dtype)
        return one

    # -- accumulators (device-side)
    def _accumulate(self, st: dict[str, torch.Tensor]) -> None:
        r = st["r"].float()
        row = torch.stack([self._one(r), r, st["eta_eff"].float(), st["capped"].float()])
        if self._sums is None:
            self._sums, self._max = torch.zeros(_N_SUM, device=r.device), torch.full((), -math.inf, device=r.device)
        if self._wsums is None:
            self._wsums, self._wmax = torch.zeros(_N_SUM, device=r.device), torch.full((), -math.inf, device=r.device)
        assert self._max is not None and self._wmax is not None
        self._sums += row
        self._wsums += row
        self._max = torch.fmax(self._max, r)  # a diverging step's NaN does not erase the peak before it
        self._wmax = torch.fmax(self._wmax, r)

    @staticmethod
    def _summarize(sums: torch.Tensor | None, mx: torch.Tensor | None) -> torch.Tensor:
        """(mean r, max r, mean eta_eff, capped fraction) as one device vector (NaN when empty)."""
        if sums is None or mx is None:
            return torch.full((4,), math.nan)
        n = sums[0]
        return torch.stack([sums[1] / n, torch.where(n > 0, mx, torch.full_like(mx, math.nan)), sums[2] / n, sums[3] / n])

    def window(self) -> torch.Tensor:
        """The current window's (epoch's) mean r, max r, mean eta_eff, capped fraction (device)."""
        return self._summarize(self._wsums, self._wmax)

    def totals(self) -> torch.Tensor:
        """The same four over every step since construction (device)."""
        return self._summarize(self._sums, self._max)

    def mark_epoch(self, epoch: int) -> None:
        """Start a new window when ``epoch`` differs from the last one marked (no host sync)."""
        if self._epoch is not None and epoch != self._epoch and self._wsums is not None and self._wmax is not None:
            self._prev = self.window()
            self._wsums = torch.zeros_like(self._wsums)
            self._wmax = torch.full_like(self._wmax, -math.inf)
        self._epoch = epoch

    def summary(self) -> dict[str, float]:
        """Final metrics (host sync): ``peak_r``, ``mean_r``, ``capped_frac`` over the run;
        ``final_eta_eff``, ``final_r_mean``, ``final_capped_frac`` over the last epoch (the one in
        progress, else the last closed one). Peaks skip NaN steps (a diverging step); means do not."""
        tot = self.totals().tolist()
        last = self.window() if self._wsums is not None and float(self._wsums[0]) > 0 else self._prev
        fin = last.tolist() if last is not None else [math.nan] * 4
        return {"peak_r": tot[1], "mean_r": tot[0], "capped_frac": tot[3],
                "final_r_mean": fin[0], "final_eta_eff": fin[2], "final_capped_frac": fin[3]}

    # -- checkpoints
    def state_dict(self) -> dict[str, Any]:
        def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().cpu()

        gen = self._gen.get_state() if self._gen is not None else self._gen_state
        return {"base": self.base.state_dict(),
                "rho": {"sums": cpu(self._sums), "max": cpu(self._max), "wsums": cpu(self._wsums), "wmax": cpu(self._wmax),
                        "prev": cpu(self._prev), "epoch": -1 if self._epoch is None else self._epoch,
                        "generator": gen, "derivative_used": self.derivative_used}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state["base"])
        st = state["rho"]
        dev = next(self.model.parameters()).device

        def on(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(dev)

        self._sums, self._max, self._wsums, self._wmax = on(st["sums"]), on(st["max"]), on(st["wsums"]), on(st["wmax"])
        self._prev = on(st["prev"])
        self._epoch = None if int(st["epoch"]) < 0 else int(st["epoch"])
        self.derivative_used = str(st["derivative_used"])
        self._gen, self._gen_state = None, st["generator"]


def build_controller(model: nn.Module, optimizer: Any, **options: Any) -> RhoController:
    """A :class:`RhoController` around ``optimizer`` (what ``optim.build(..., rho=options)`` returns);
    unknown option names are a one-line ValueError."""
    allowed = ("mode", "r_target", "samples", "derivative", "fd_eps", "pool", "seed", "chunk", "apply", "capture_inputs")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"rho: unexpected options {unknown}; allowed: {', '.join(allowed)}")
    return RhoController(model, optimizer, **options)
