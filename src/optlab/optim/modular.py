"""Muon with the standard routing, and the modular optimizer: (optimizer, constraint, LR multiplier) per role.

:class:`Modular` assigns every trainable parameter, by its role from the model's
``param_roles()`` (:func:`optlab.models.roles_of`; never by name), to

- an **optimizer**: ``muon`` (:class:`optlab.optim.muon.Muon`: Nesterov momentum, Newton-Schulz
  orthogonalized update, shape scaling ``sqrt(max(1, rows/cols))``, decoupled weight decay;
  batched over same-shape matrices) or ``adamw`` (``torch.optim.AdamW``);
- a **post-step constraint** (a projection applied after every step and once at construction, so it
  holds from the first step): ``none``, ``sphere`` (:class:`optlab.optim.manifold.HypersphereProjection`:
  each row to unit norm: an embedding's token vector, a linear layer's fan-in row) or ``stiefel``
  (:class:`optlab.optim.manifold.StiefelProjection`, each matrix to ``W^T W = I`` on its smaller
  side: ``stiefel="exact"`` the polar factor from a batched SVD; ``stiefel="ns"`` the
  *approximate* projection by ``ns_steps`` Newton-Schulz steps of the run's ``ns`` coefficients,
  whose singular values stay roughly in [0.7, 1.2] with the quintic: ``constraint_diagnostics()``
  reports by how much);
- an **LR multiplier**: the group's LR is ``lr * lr_mult`` (Muon groups) or ``adamw_lr * lr_mult``
  (AdamW groups).

**LR scaling across the Muon matrices** (``lr_scaling``, issue #12 item 6g; our own definitions):
``global`` (default) one LR per group as above; ``depth``: every Muon matrix's LR divided by ``L``,
the number of matrices Muon updates (a stack's slices counted one by one): the modular norm's
equal split of one step over ``L`` layers in series, so ``lr`` is the whole network's step and a
deeper network takes smaller per-layer steps (at one depth this is the global LR ``lr / L``; it
differs when the LR is carried to another depth); ``grad_norm``: each matrix's step scaled by its
gradient's Frobenius norm over the mean across the Muon matrices (mean multiplier 1);
``adaptive``: a per-layer trust ratio ``||W_l||_F / ||update_l||_F``, so each matrix moves by
``lr * ||W_l||_F`` (``lr`` a relative step size). See :mod:`optlab.optim.muon` for the exact
rules; AdamW groups (already per-coordinate adaptive) keep ``adamw_lr * lr_mult``.

These are post-step projections, not the tangent-space methods of :mod:`optlab.optim.manifold`
(hyperspherical descent, manifold Muon): the step is taken in the ambient space, then projected.

Presets (the issue's table; ``bias_norm`` parameters always go to AdamW without a constraint or
weight decay; a parameter of fewer than 2 dimensions in a Muon role goes to that role's AdamW group):

| name | input | hidden | output |
| --- | --- | --- | --- |
| ``muon`` | AdamW | Muon | AdamW |
| ``baseline_adamw`` | AdamW | AdamW | AdamW |
| ``baseline_muon`` | Muon | Muon | AdamW |
| ``modular_sphere`` | AdamW + sphere | Muon | Muon |
| ``modular_stiefel`` | Muon | Muon + Stiefel | AdamW |
| ``full_modular`` | AdamW + sphere | Muon + Stiefel | AdamW |

``muon`` is the standard routing (Muon on the hidden matrices only). Any role can be overridden
from params: ``optimizer_options: {roles: {input: {optimizer: adamw, constraint: sphere, lr_mult:
1.0}}}``. Our own definitions, stated:

- ``lr`` is the Muon LR; ``adamw_lr`` the AdamW LR. ``adamw_lr`` unset: ``lr`` itself when no role
  uses Muon (``baseline_adamw``: ``lr`` is its AdamW LR), else :data:`ADAMW_LR` (3e-3).
- ``weight_decay`` (default 0) is one decoupled decay for every weight-role group, Muon and AdamW
  alike (``W <- W (1 - lr_group * wd)``); ``bias_norm`` groups have none.
- The sphere radius is 1 (unit rows). 3-D stacks are constrained matrix by matrix; a 4-D conv kernel
  ``(out, in, kh, kw)`` is the ``out x (in*kh*kw)`` matrix, for the sphere (each filter to unit norm),
  for Stiefel, and for Muon, whose shape scaling then uses that matrix:
  ``sqrt(max(1, out / (in*kh*kw)))`` (:func:`optlab.optim.muon.matrix_shape`; the reference
  implementations' kh/kw rule loses the fan-in factor).
- A parameter shared by two modules (a tied embedding/head) appears once in
  ``model.named_parameters()`` and so gets one role, one optimizer and one constraint.

The result is a ``torch.optim.Optimizer`` (an :class:`optlab.optim.projected.OptimizerWrapper`):
``param_groups`` is the list of the inner optimizers' own group dicts (Muon's, then AdamW's; each
carries ``role`` and ``lr_mult``), so LR schedulers and ``Method.set_lr_scale`` edit them;
``state`` maps a parameter to its inner optimizer's state; ``state_dict()``/``load_state_dict()``
round-trip both inner optimizers (a resumed run continues bitwise). In a user's own loop::

    opt = optlab.optim.build("modular_sphere", model, lr=0.02, adamw_lr=3e-3)
    opt.zero_grad(); loss.backward(); opt.step()

For the probes: :meth:`Modular.constraint_diagnostics` (per constrained layer, device tensors, no
host sync) and :meth:`Modular.muon_params` (the (name, parameter) pairs Muon updates). For the rho
controller: :meth:`Modular.proposed_step` gives the step at LR 1 (``p <- p - lr_group * u``) with
the state advanced as ``step()`` would, and :meth:`Modular.project` the constraints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from ..models import canonical_name, roles_of
from .manifold import HypersphereProjection, StiefelProjection, orthogonality_error, singular_value_range
from .muon import Muon, matrix_shape, newton_schulz, shape_ratio
from .projected import OptimizerWrapper

ROLES = ("input", "hidden", "output", "bias_norm")
OPTIMIZERS = ("muon", "adamw")
CONSTRAINTS = ("none", "sphere", "stiefel")
STIEFEL_MODES = ("exact", "ns")
NS_STEPS = (1, 2, 3, 5, 10)
NS_CHOICES = ("quintic", "polar_express")
LR_SCALINGS = ("global", "depth", "grad_norm", "adaptive")
ADAMW_LR = 3e-3
"""AdamW LR of the AdamW groups of a preset that also uses Muon, when ``adamw_lr`` is not given."""


@dataclass(frozen=True)
class RoleSpec:
    """What one role gets: ``optimizer`` (muon | adamw), ``constraint`` (none | sphere | stiefel), ``lr_mult``."""

    optimizer: str = "adamw"
    constraint: str = "none"
    lr_mult: float = 1.0


def _table(inp: tuple[str, str], hid: tuple[str, str], out: tuple[str, str]) -> dict[str, RoleSpec]:
    return {"input": RoleSpec(*inp), "hidden": RoleSpec(*hid), "output": RoleSpec(*out), "bias_norm": RoleSpec()}


PRESETS: dict[str, dict[str, RoleSpec]] = {
    "muon": _table(("adamw", "none"), ("muon", "none"), ("adamw", "none")),
    "baseline_adamw": _table(("adamw", "none"), ("adamw", "none"), ("adamw", "none")),
    "baseline_muon": _table(("muon", "none"), ("muon", "none"), ("adamw", "none")),
    "modular_sphere": _table(("adamw", "sphere"), ("muon", "none"), ("muon", "none")),
    "modular_stiefel": _table(("muon", "none"), ("muon", "stiefel"), ("adamw", "none")),
    "full_modular": _table(("adamw", "sphere"), ("muon", "stiefel"), ("adamw", "none")),
}
OPTION_KEYS = ("ns_steps", "ns", "momentum", "nesterov", "weight_decay", "adamw_lr", "stiefel", "roles", "lr_scaling")


def _number(key: str, v: Any, *, low: float = 0.0, strict: bool = False, below: float | None = None) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > low if strict else v >= low)
    if ok and below is not None:
        ok = v < below
    if not ok:
        rng = f"{'>' if strict else '>='} {low:g}" + (f" and < {below:g}" if below is not None else "")
        raise ValueError(f"optimizer_options.{key}: got {v!r}; allowed: a number {rng}")
    return float(v)


def parse_options(name: str, opts: Mapping[str, Any]) -> dict[str, Any]:
    """Validated keyword options of :class:`Modular` for preset ``name`` from ``optimizer_options``
    (one-line ValueErrors naming the key and the allowed values); ``roles`` becomes the full
    per-role table (the preset's, with the given overrides)."""
    if name not in PRESETS:
        raise ValueError(f"optimizer: unknown modular preset {name!r}; allowed: {', '.join(PRESETS)}")
    bad = sorted(set(opts) - set(OPTION_KEYS))
    if bad:
        raise ValueError(f"optimizer {name}: unexpected options {bad}; allowed: {', '.join(OPTION_KEYS)}")
    out: dict[str, Any] = {}
    if "ns_steps" in opts:
        v = opts["ns_steps"]
        if isinstance(v, bool) or v not in NS_STEPS:
            raise ValueError(f"optimizer_options.ns_steps: {v!r} not allowed; allowed: {', '.join(map(str, NS_STEPS))}")
        out["ns_steps"] = int(v)
    if "ns" in opts:
        if opts["ns"] not in NS_CHOICES:
            raise ValueError(f"optimizer_options.ns: unknown {opts['ns']!r}; allowed: {', '.join(NS_CHOICES)}")
        out["ns"] = opts["ns"]
    if "momentum" in opts:
        out["momentum"] = _number("momentum", opts["momentum"], below=1.0)
    if "nesterov" in opts:
        if not isinstance(opts["nesterov"], bool):
            raise ValueError(f"optimizer_options.nesterov: expected true or false, got {opts['nesterov']!r}")
        out["nesterov"] = opts["nesterov"]
    if "weight_decay" in opts:
        out["weight_decay"] = _number("weight_decay", opts["weight_decay"])
    if opts.get("adamw_lr") is not None:
        out["adamw_lr"] = _number("adamw_lr", opts["adamw_lr"], strict=True)
    if "stiefel" in opts:
        if opts["stiefel"] not in STIEFEL_MODES:
            raise ValueError(f"optimizer_options.stiefel: unknown {opts['stiefel']!r}; allowed: {', '.join(STIEFEL_MODES)}")
        out["stiefel"] = opts["stiefel"]
    if "lr_scaling" in opts:
        if opts["lr_scaling"] not in LR_SCALINGS:
            raise ValueError(f"optimizer_options.lr_scaling: unknown {opts['lr_scaling']!r}; allowed: {', '.join(LR_SCALINGS)}")
        out["lr_scaling"] = opts["lr_scaling"]
    table = dict(PRESETS[name])
    roles = opts.get("roles") or {}
    if not isinstance(roles, Mapping):
        raise ValueError(f"optimizer_options.roles: expected a mapping of role -> {{optimizer, constraint, lr_mult}}, got {roles!r}")
    for role, spec in roles.items():
        if role not in ROLES:
            raise ValueError(f"optimizer_options.roles: unknown role {role!r}; allowed: {', '.join(ROLES)}")
        where = f"optimizer_options.roles.{role}"
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where}: expected a mapping with keys optimizer, constraint, lr_mult; got {spec!r}")
        extra = sorted(set(spec) - {"optimizer", "constraint", "lr_mult"})
        if extra:
            raise ValueError(f"{where}: unexpected keys {extra}; allowed: optimizer, constraint, lr_mult")
        cur = table[role]
        if "optimizer" in spec:
            if spec["optimizer"] not in OPTIMIZERS:
                raise ValueError(f"{where}.optimizer: unknown {spec['optimizer']!r}; allowed: {', '.join(OPTIMIZERS)}")
            cur = replace(cur, optimizer=spec["optimizer"])
        if "constraint" in spec:
            if spec["constraint"] not in CONSTRAINTS:
                raise ValueError(f"{where}.constraint: unknown {spec['constraint']!r}; allowed: {', '.join(CONSTRAINTS)}")
            cur = replace(cur, constraint=spec["constraint"])
        if "lr_mult" in spec:
            cur = replace(cur, lr_mult=_number(f"roles.{role}.lr_mult", spec["lr_mult"], strict=True))
        if role == "bias_norm" and (cur.optimizer != "adamw" or cur.constraint != "none"):
            raise ValueError(f"{where}: got optimizer {cur.optimizer}, constraint {cur.constraint}; allowed for biases "
                             f"and norm parameters: optimizer adamw, constraint none")
        table[role] = cur
    out["roles"] = table
    return out


class _MergedState(Mapping):
    """``opt.state``: parameter -> its inner optimizer's state (read view over both)."""

    def __init__(self, opts: list[torch.optim.Optimizer]) -> None:
        self._opts = opts

    def __getitem__(self, p: Any) -> Any:
        for o in self._opts:
            if p in o.state:
                return o.state[p]
        raise KeyError(p)

    def __iter__(self) -> Iterator[Any]:
        for o in self._opts:
            yield from o.state

    def __len__(self) -> int:
        return sum(len(o.state) for o in self._opts)


@dataclass
class _Constrained:
    name: str
    role: str
    constraint: str
    param: nn.Parameter
    layer: int  # first layer number (LayerIndex numbering: weight parameters in module order, stacks by slice)


class Modular(OptimizerWrapper):
    """Per-role (optimizer, constraint, LR multiplier); see the module docstring."""

    def __init__(self, model: nn.Module, lr: float, roles: Mapping[str, RoleSpec], *, adamw_lr: float | None = None,
                 weight_decay: float = 0.0, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 ns: str = "quintic", stiefel: str = "exact", lr_scaling: str = "global", preset: str = "custom") -> None:
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"optimizer {preset}: lr must be a number > 0, got {lr!r}")
        if lr_scaling not in LR_SCALINGS:
            raise ValueError(f"optimizer {preset}: lr_scaling {lr_scaling!r} not allowed; allowed: {', '.join(LR_SCALINGS)}")
        self.lr_scaling = lr_scaling
        self.preset, self.stiefel_mode = preset, stiefel
        self.roles = {r: roles.get(r, RoleSpec()) for r in ROLES}
        uses_muon = any(s.optimizer == "muon" for s in self.roles.values())
        self.adamw_lr = float(adamw_lr) if adamw_lr is not None else (ADAMW_LR if uses_muon else float(lr))
        role_of = roles_of(model)
        layer_of: dict[int, int] = {}
        n = 0
        for pname, p in model.named_parameters():
            if role_of[canonical_name(pname)] != "bias_norm" and p.dim() >= 2:
                layer_of[id(p)] = n
                n += 1 if p.dim() == 4 else p.reshape(-1, *p.shape[-2:]).shape[0]
        by_role: dict[str, list[tuple[str, nn.Parameter]]] = {r: [] for r in ROLES}
        for pname, p in model.named_parameters():  # shared (tied) parameters appear once
            if p.requires_grad:
                by_role[role_of[canonical_name(pname)]].append((canonical_name(pname), p))
        muon_groups, adamw_groups = [], []
        # depth scaling: 1 / (the number of matrices Muon updates); the other modes run inside Muon
        self.muon_matrices = sum(matrix_shape(p)[0] for r in ROLES if self.roles[r].optimizer == "muon"
                                 for _, p in by_role[r] if p.dim() >= 2)
        depth_mult = 1.0 / self.muon_matrices if lr_scaling == "depth" and self.muon_matrices else 1.0
        muon_mode = lr_scaling if lr_scaling in ("grad_norm", "adaptive") else "global"
        self._muon_named: list[tuple[str, nn.Parameter]] = []
        self._constrained: list[_Constrained] = []
        for role in ROLES:
            spec = self.roles[role]
            wd = 0.0 if role == "bias_norm" else float(weight_decay)
            mats = [(nm, p) for nm, p in by_role[role] if p.dim() >= 2]
            rest = [(nm, p) for nm, p in by_role[role] if p.dim() < 2]
            if spec.optimizer == "muon":
                if mats:
                    muon_groups.append({"params": [p for _, p in mats], "lr": lr * spec.lr_mult * depth_mult,
                                        "weight_decay": wd, "role": role, "lr_mult": spec.lr_mult * depth_mult,
                                        "lr_scaling": muon_mode})
                    self._muon_named += mats
                to_adamw = rest
            else:
                to_adamw = by_role[role]
            if to_adamw:
                adamw_groups.append({"params": [p for _, p in to_adamw], "lr": self.adamw_lr * spec.lr_mult,
                                     "weight_decay": wd, "role": role, "lr_mult": spec.lr_mult})
            if spec.constraint != "none":
                if rest:
                    raise ValueError(f"constraint {spec.constraint} on role {role}: needs matrices, got "
                                     f"{[nm for nm, _ in rest]} of fewer than 2 dimensions")
                self._constrained += [_Constrained(nm, role, spec.constraint, p, layer_of[id(p)]) for nm, p in mats]
        self.muon = Muon(muon_groups, lr=lr, weight_decay=float(weight_decay), momentum=momentum, nesterov=nesterov,
                         ns_steps=ns_steps, ns=ns) if muon_groups else None
        self.adamw = torch.optim.AdamW(adamw_groups, lr=self.adamw_lr, weight_decay=float(weight_decay)) if adamw_groups else None
        self._inner = [o for o in (self.muon, self.adamw) if o is not None]
        if not self._inner:
            raise ValueError(f"optimizer {preset}: the model has no trainable parameters")
        self._groups = [g for o in self._inner for g in o.param_groups]
        self._defaults = {"lr": lr, "adamw_lr": self.adamw_lr, "weight_decay": float(weight_decay), "momentum": momentum,
                          "nesterov": nesterov, "ns_steps": ns_steps, "ns": ns, "stiefel": stiefel,
                          "lr_scaling": lr_scaling}
        self.projections: list[Any] = []
        sphere = [c.param for c in self._constrained if c.constraint == "sphere"]
        stiefel_ps = [c.param for c in self._constrained if c.constraint == "stiefel"]
        if sphere:  # conv kernels as (out, in*kh*kw) views: each filter a row
            self.projections.append(HypersphereProjection([p.view(p.shape[0], -1) if p.dim() == 4 else p for p in sphere]))
        if stiefel_ps:
            self.projections.append(StiefelProjection(stiefel_ps, mode=stiefel, steps=ns_steps, ns=ns))
        self.project()

    # -- optimizer surface
    def _wrapped(self) -> torch.optim.Optimizer:  # pragma: no cover - the properties below replace it
        return self._inner[0]

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self._groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        raise AttributeError("Modular: param_groups are the inner optimizers' own; edit the groups in place")

    @property  # type: ignore[override]
    def state(self) -> Any:
        return _MergedState(self._inner)

    @state.setter
    def state(self, state: Any) -> None:
        raise AttributeError("Modular: state belongs to the inner optimizers; use load_state_dict")

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self._defaults

    @defaults.setter
    def defaults(self, defaults: dict[str, Any]) -> None:
        self._defaults = dict(defaults)

    def project(self) -> None:
        """Apply every constraint now (after each step; once at construction)."""
        for proj in self.projections:
            proj.project()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self._inner:
            o.step()
        self.project()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self._inner:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "muon": None if self.muon is None else self.muon.state_dict(),
                "adamw": None if self.adamw is None else self.adamw.state_dict(),
                "projections": [p.state_dict() for p in self.projections]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, o in (("muon", self.muon), ("adamw", self.adamw)):
            if (state.get(key) is None) != (o is None):
                raise ValueError(f"Modular: checkpoint {key} state does not match this optimizer ({self.preset})")
            if o is not None:
                o.load_state_dict(state[key])
        self._groups[:] = [g for o in self._inner for g in o.param_groups]  # torch replaces the group dicts
        if len(state.get("projections", [])) != len(self.projections):
            raise ValueError("Modular: projection count in state does not match this optimizer")
        for proj, st in zip(self.projections, state["projections"]):
            proj.load_state_dict(st)

    def __repr__(self) -> str:
        spec = ", ".join(f"{r}={s.optimizer}{'+' + s.constraint if s.constraint != 'none' else ''}"
                         f"{'x' + format(s.lr_mult, 'g') if s.lr_mult != 1 else ''}" for r, s in self.roles.items())
        scaling = "" if self.lr_scaling == "global" else f", lr_scaling={self.lr_scaling}"
        return f"Modular({self.preset}: {spec}; lr={self._defaults['lr']:g}, adamw_lr={self.adamw_lr:g}{scaling})"

    # -- for the probes
    def muon_params(self) -> list[tuple[str, nn.Parameter]]:
        """The (name, parameter) pairs Muon updates, in role then module order."""
        return list(self._muon_named)

    @torch.no_grad()
    def constraint_diagnostics(self) -> list[dict[str, Any]]:
        """One dict per constrained layer (a stack contributes one per matrix): ``layer`` (its number in
        :class:`optlab.metrics.layers.LayerIndex` order), ``name`` (parameter name, ``[i]`` for a
        stack's matrix), ``role``, ``constraint``, ``orth_err``, ``sv_min``, ``sv_max`` (0-d device
        tensors, batched over same-shape matrices, no host sync). ``orth_err`` is the constraint's
        own residual: Stiefel ``||W^T W - I||_F`` on the smaller side; sphere
        ``||diag(W W^T) - 1||_2`` (the rows' squared norms against 1). ``sv_min``/``sv_max``: the
        extreme singular values of the matrix (fp32 SVD)."""
        by_shape: dict[tuple, list[_Constrained]] = {}
        for c in self._constrained:
            by_shape.setdefault((matrix_shape(c.param)[1:], c.constraint, c.param.device), []).append(c)
        out: list[dict[str, Any]] = []
        for (_, constraint, _), cs in by_shape.items():
            w = torch.cat([c.param.detach().reshape(matrix_shape(c.param)).float() for c in cs])
            lo, hi = singular_value_range(w)
            if constraint == "stiefel":
                err = orthogonality_error(w)
            else:
                err = (w.square().sum(-1) - 1.0).norm(dim=-1)
            off = 0
            for c in cs:
                k = matrix_shape(c.param)[0]
                for j in range(k):
                    nm = f"{c.name}[{j}]" if c.param.dim() == 3 else c.name
                    out.append({"layer": c.layer + j, "name": nm, "role": c.role, "constraint": constraint,
                                "orth_err": err[off + j], "sv_min": lo[off + j], "sv_max": hi[off + j]})
                off += k
        return sorted(out, key=lambda d: d["layer"])

    # -- for the rho controller
    @torch.no_grad()
    def proposed_step(self, commit: bool = False, weights: list[float] | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """(params, u): the step ``p <- p - lr * u`` at LR 1 that ``step()`` would take before its
        projections, ``u`` of group ``i`` (in ``param_groups`` order) scaled by ``weights[i]``.
        Muon: ``u = ratio * NS(nesterov momentum) + wd * p`` (NS batched by shape); AdamW: torch's
        ``m_hat / (sqrt(v_hat) + eps) + wd * p``. ``commit`` advances the momentum buffers, moments
        and step counts in place as ``step()`` does."""
        from .rho import _adam_u

        if self.lr_scaling in ("grad_norm", "adaptive"):
            raise ValueError(f"optimizer {self.preset}: lr_scaling {self.lr_scaling} is not supported with the rho "
                             f"controller; allowed there: global, depth")
        params: list[Tensor] = []
        us: list[Tensor] = []
        gi = 0
        if self.muon is not None:
            shapes: dict[tuple, list[tuple[Tensor, dict, Tensor, float]]] = {}
            for group in self.muon.param_groups:
                w = 1.0 if weights is None else weights[gi]
                gi += 1
                mu = group["momentum"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    st = self.muon.state[p]
                    buf = st.get("momentum_buffer")
                    if buf is None:
                        buf = torch.zeros_like(p, memory_format=torch.preserve_format)
                        if commit:
                            st["momentum_buffer"] = buf
                    buf = buf.lerp_(p.grad, 1 - mu) if commit else buf.lerp(p.grad, 1 - mu)
                    u = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                    shapes.setdefault(matrix_shape(p)[1:], []).append((p, group, u, w))
            for (r, c), items in shapes.items():
                g0 = items[0][1]
                x = torch.cat([u.reshape(matrix_shape(p)) for p, _, u, _ in items])
                o = newton_schulz(x, g0["ns_steps"], g0["ns"], g0["ns_dtype"], g0["eps"])
                off = 0
                for p, group, _, w in items:
                    k = matrix_shape(p)[0]
                    ui = o[off : off + k].reshape(p.shape).to(p.dtype) * shape_ratio(r, c, group["adjust_lr_fn"])
                    off += k
                    if group["weight_decay"]:
                        ui = ui + group["weight_decay"] * p
                    params.append(p)
                    us.append(ui * w if w != 1.0 else ui)
        if self.adamw is not None:
            for group in self.adamw.param_groups:
                w = 1.0 if weights is None else weights[gi]
                gi += 1
                ps = [p for p in group["params"] if p.grad is not None]
                if not ps:
                    continue
                u = _adam_u(group, self.adamw.state, ps, [p.grad for p in ps], commit)
                params += ps
                us += list(torch._foreach_mul(u, w)) if w != 1.0 else list(u)
        return params, us


def build_modular(name: str, model: nn.Module, lr: float | None, options: Mapping[str, Any]) -> Modular:
    """``optim.build(name, ...)`` for ``muon`` and the presets: validated ``options`` (see
    :func:`parse_options`), ``lr`` required (the Muon LR; the AdamW LR of ``baseline_adamw``)."""
    opts = parse_options(name, options)
    if lr is None:
        raise ValueError(f"optimizer {name}: lr is required")
    roles = opts.pop("roles")
    return Modular(model, lr, roles, preset=name, **opts)
