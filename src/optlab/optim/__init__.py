"""Optimizers. ``build(name, model, **cfg)`` returns a ``torch.optim.Optimizer`` (a torch one, or a ``Projected`` wrapper).

| name | what it is |
| --- | --- |
| ``sgd`` | plain SGD: momentum 0, weight decay 0, fixed LR |
| ``sgd_momentum`` | SGD with momentum 0.9 |
| ``adam`` | torch Adam with its defaults (lr 1e-3 unless given) |
| ``adamw`` | torch AdamW with its defaults |
| ``sgd_sn`` | vanilla SGD, then the chosen weight matrices (``sn_roles``) projected to spectral norm <= 1 after each step |
| ``muon`` | Muon (Nesterov 0.95, ``ns_steps`` Newton-Schulz steps) on hidden-role matrices, AdamW on the rest |
| ``baseline_adamw`` | modular preset: AdamW on every role |
| ``baseline_muon`` | modular preset: Muon on input and hidden, AdamW on output (and biases) |
| ``modular_sphere`` | modular preset: AdamW + unit-row sphere on input, Muon on hidden and output |
| ``modular_stiefel`` | modular preset: Muon on input, Muon + Stiefel projection on hidden, AdamW on output |
| ``full_modular`` | modular preset: AdamW + sphere on input, Muon + Stiefel on hidden, AdamW on output |

``muon`` and the presets are :class:`optlab.optim.modular.Modular` (per-role optimizer, post-step
constraint and LR multiplier from ``param_roles()``; ``lr`` is the Muon LR, ``adamw_lr`` the
AdamW one). Their options (``optimizer_options``): ``ns_steps`` (1, 2, 3, 5, 10; default 5),
``ns`` (quintic | polar_express), ``momentum`` (0.95), ``nesterov`` (true), ``weight_decay`` (0),
``adamw_lr``, ``stiefel`` (exact | ns) and ``roles`` (per-role overrides); see that module.

Any of them with ``rho={...}``: wrapped in the rho step-length controller
(:class:`optlab.optim.rho.RhoController`: the next step measured by a JVP along it, ``rho =
pi / Delta_a``, steps capped at ``r_target * rho``).

In ``sgd_sn`` 2-D (and stacked 3-D) weights go to :class:`SpectralProjection` (``sn_mode``
``clip_sv``: singular values above 1 set to 1, the Euclidean projection; ``scale``: W / max(1,
sigma), with sigma exact, by power iteration, or (``sn_sigma="bound"``) a certified upper bound
refreshed exactly every ``sn_refresh`` steps; ``normalize``: W / sigma); 4-D conv kernels go to :class:`ConvSpectralProjection`,
bounding the convolution's operator norm at the layer's input size (``sn_conv="operator"``,
strict: an exact upper bound; ``"operator_power"``: power iteration, not strict; geometry from
the model's ``conv_specs()``) or the reshaped-kernel matrix norm (``sn_conv="matrix"``). For conv
kernels ``clip_sv`` rescales like ``scale``. ``Projected.strict`` says whether every projected
layer ends at norm <= 1 by construction.

Every optimizer works in a user's own loop: ``opt.zero_grad(); loss.backward(); opt.step()``.
Every one is a ``torch.optim.Optimizer`` (``Projected`` and the rho controller are subclasses that
share the inner optimizer's ``param_groups`` and ``state``), so ``torch.optim.lr_scheduler``
schedulers, ``state_dict()``/``load_state_dict()`` and ``torch.save(opt.state_dict())`` work.
``model`` may be any ``nn.Module``: one without ``param_roles()`` gets roles by
:func:`optlab.models.infer_roles` (every parameter of 2 or more dimensions is a weight matrix,
so ``sgd_sn`` projects it; 1-D parameters are ``bias_norm``), and ``sgd_sn`` warns once, naming
the parameters it treats as weight matrices.
"""

from __future__ import annotations

import math
import warnings

from typing import Any

import torch
from torch import nn

from ..models import WEIGHT_ROLES, canonical_name, infer_roles, params_by_role
from .conv_spectral import FORMS as SN_CONV_FORMS
from .conv_spectral import ConvSpec, ConvSpectralProjection
from .modular import PRESETS as _MODULAR_PRESETS
from .modular import Modular, build_modular
from .projected import Projected
from .spectral import BOUND_REFRESH, SpectralProjection, power_iteration, spectral_norm_exact

__all__ = [
    "build",
    "optimizer_names",
    "validate_options",
    "Modular",
    "ConvSpec",
    "ConvSpectralProjection",
    "Projected",
    "SpectralProjection",
    "power_iteration",
    "spectral_norm_exact",
]

MODULAR_NAMES = tuple(_MODULAR_PRESETS)  # muon and the modular presets (optlab.optim.modular)
_NAMES = ("sgd", "sgd_momentum", "adam", "adamw", "sgd_sn", *MODULAR_NAMES)
CONV_WARMUP_ITERS = 100  # Lanczos steps for each conv's operator norm at construction
# optimizers that read the run's ``sn`` section (the post-step spectral projection)
_USES_SN = frozenset({"sgd_sn"})


def optimizer_names() -> list[str]:
    return list(_NAMES)


def run_options(cfg: Any, model: nn.Module) -> dict[str, Any]:
    """``build`` keyword options for the run config ``cfg``: its ``optimizer_options`` plus, for an
    optimizer with a spectral projection, the ``sn`` section (the conv form only for models with
    conv kernels)."""
    opts: dict[str, Any] = dict(getattr(cfg, "optimizer_options", None) or {})
    if cfg.optimizer in _USES_SN:
        sn = cfg.sn
        opts.update(sn_mode=sn.mode, sn_sigma=sn.sigma, sn_power_iters=sn.power_iters, sn_refresh=sn.refresh,
                    sn_roles=tuple(sn.roles),
                    seed=cfg.seed)
        if any(p.dim() == 4 for p in model.parameters()):
            opts["sn_conv"] = sn.conv
    return opts


def _params(model: nn.Module | Any) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _note_inferred_roles(name: str, model: nn.Module) -> None:
    """One warning when ``model`` has no ``param_roles()``: which parameters are treated as weight matrices."""
    if callable(getattr(model, "param_roles", None)):
        return
    roles = infer_roles(model)
    mats = [n for n, r in roles.items() if r != "bias_norm"]
    rest = len(roles) - len(mats)
    warnings.warn(
        f"optim.build({name!r}): {type(model).__name__} has no param_roles(); treating its {len(mats)} parameters of 2+ "
        f"dimensions as weight matrices ({', '.join(mats) or 'none'}; first input, last output, others hidden) and "
        f"the other {rest} as bias_norm",
        stacklevel=3,
    )


def build(
    name: str,
    model: nn.Module,
    lr: float | None = None,
    *,
    sn_mode: str = "clip_sv",
    sn_sigma: str = "exact",
    sn_power_iters: int = 1,
    sn_refresh: int = BOUND_REFRESH,
    sn_roles: tuple[str, ...] = WEIGHT_ROLES,
    sn_conv: str = "operator",
    sn_conv_warmup: int = CONV_WARMUP_ITERS,
    seed: int = 0,
    rho: dict[str, Any] | None = None,
    **extra: Any,
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` for ``model``.

    ``rho`` (a mapping of :class:`optlab.optim.rho.RhoController` options, e.g. ``{"mode":
    "capped", "r_target": 1.0}``) wraps the optimizer in the rho step-length controller; without
    it nothing changes.

    ``lr`` None takes the torch default for adam/adamw and raises for SGD variants (SGD has
    no sensible default). ``sn_*`` configure the spectral projection of ``sgd_sn``; it is
    applied to parameters whose role is in ``sn_roles`` (every weight matrix by default),
    once at construction (so the constraint holds from the first step) and after each step.

    4-D conv kernels among them are projected by :class:`ConvSpectralProjection` with form
    ``sn_conv``: ``operator`` (default, strict; the convolution's norm as a map at its input size,
    divided by an exact upper bound on it; needs the model's ``conv_specs()``), ``operator_power``
    (the same norm by power iteration: ``sn_conv_warmup`` Lanczos steps at construction, then
    ``sn_power_iters`` power iterations per step; a lower bound, not strict) or ``matrix`` (the
    reshaped ``(out, in*kh*kw)`` kernel, with ``sn_sigma`` like the matrices).

    ``model`` may be any ``nn.Module``: without ``param_roles()`` its roles follow
    :func:`optlab.models.infer_roles` and ``sgd_sn`` warns which parameters it projects (a plain
    module's convs have no ``conv_specs()``: give ``sn_conv="matrix"``). The result is always a
    ``torch.optim.Optimizer``.
    """
    if rho is not None:
        from .rho import build_controller

        base = build(name, model, lr, sn_mode=sn_mode, sn_sigma=sn_sigma, sn_power_iters=sn_power_iters,
                     sn_refresh=sn_refresh, sn_roles=sn_roles,
                     sn_conv=sn_conv, sn_conv_warmup=sn_conv_warmup, seed=seed, **extra)
        return build_controller(model, base, **dict(rho))
    if name not in _NAMES:
        raise ValueError(f"optimizer: unknown {name!r}; allowed: {', '.join(_NAMES)}")
    if name in MODULAR_NAMES:
        _note_inferred_roles(name, model)
        return build_modular(name, model, lr, extra)
    if sn_conv not in SN_CONV_FORMS:
        raise ValueError(f"sn.conv: unknown {sn_conv!r}; allowed: {', '.join(SN_CONV_FORMS)}")
    wd = extra.pop("weight_decay", None)
    if extra:
        raise ValueError(f"optimizer {name}: unexpected options {sorted(extra)}; allowed: weight_decay")
    if wd is not None and not (isinstance(wd, (int, float)) and not isinstance(wd, bool) and math.isfinite(wd) and wd >= 0):
        raise ValueError(f"optimizer_options.weight_decay: expected a number >= 0, got {wd!r}")
    params = _params(model)
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        kw: dict[str, Any] = {} if wd is None else {"weight_decay": float(wd)}  # adam: L2 in the gradient; adamw: decoupled
        return cls(params, **kw) if lr is None else cls(params, lr=lr, **kw)
    if lr is None:
        raise ValueError(f"optimizer {name}: lr is required")
    decay = 0.0 if wd is None else float(wd)  # torch SGD's weight_decay: L2 added to the gradient
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=decay)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=decay)
    # sgd_sn
    _note_inferred_roles(name, model)
    inner = torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=decay)
    chosen = [(canonical_name(n), p) for n, p in params_by_role(model, sn_roles) if p.dim() >= 2]
    matrices = [p for _, p in chosen if p.dim() <= 3]
    kernels = [(n, p) for n, p in chosen if p.dim() == 4]
    if any(p.dim() > 4 for _, p in chosen):
        raise ValueError(f"sgd_sn: cannot project weights of more than 4 dimensions: {[n for n, p in chosen if p.dim() > 4]}")
    projs: list[Any] = [SpectralProjection(matrices, mode=sn_mode, sigma=sn_sigma, power_iters=sn_power_iters, seed=seed,
                                           refresh=sn_refresh)]
    if kernels and sn_sigma == "bound":
        if sn_conv == "matrix":
            raise ValueError("sn.sigma: bound applies to weight matrices; with sn.conv matrix the conv kernels need "
                             "sn.sigma exact or power (or sn.conv operator, strict, or operator_power)")
        sn_sigma = "exact"  # the operator forms compute their own sigma: sn.sigma does not reach them
    if kernels:
        specs = _conv_specs(model, [n for n, _ in kernels], required=sn_conv != "matrix")
        projs.append(ConvSpectralProjection(
            [(p, specs.get(n)) for n, p in kernels], mode=sn_mode, form=sn_conv, power_iters=sn_power_iters,
            warmup_iters=sn_conv_warmup, sigma=sn_sigma, seed=seed,
        ))
    opt = Projected(inner, projs)
    opt.project()
    return opt


def validate_options(name: str, options: dict[str, Any]) -> None:
    """Check ``optimizer_options`` for optimizer ``name`` without building it (one-line ValueError
    naming the key and the allowed values). ``build``'s own keywords (``rho``, ``sn_*``, ``seed``)
    pass through: ``build`` checks them."""
    own = {"rho", "sn_mode", "sn_sigma", "sn_power_iters", "sn_refresh", "sn_roles", "sn_conv", "sn_conv_warmup", "seed"}
    options = {k: v for k, v in options.items() if k not in own}
    if name in MODULAR_NAMES:
        from .modular import parse_options

        parse_options(name, options)
        return
    extra = sorted(set(options) - {"weight_decay"})
    if extra:
        raise ValueError(f"optimizer {name}: unexpected options {extra}; allowed: weight_decay")
    wd = options.get("weight_decay")
    if wd is not None and not (isinstance(wd, (int, float)) and not isinstance(wd, bool) and math.isfinite(wd) and wd >= 0):
        raise ValueError(f"optimizer_options.weight_decay: expected a number >= 0, got {wd!r}")


def _conv_specs(model: nn.Module, names: list[str], required: bool) -> dict[str, Any]:
    """Conv geometry by parameter name from ``model.conv_specs()``; ValueError if required and missing."""
    fn = getattr(model, "conv_specs", None)
    specs = dict(fn()) if callable(fn) else {}
    missing = [n for n in names if n not in specs]
    if required and missing:
        raise ValueError(
            f"sn.conv=operator and operator_power need each conv's input size and geometry from model.conv_specs(); "
            f"{type(model).__name__} gives none for {missing}. Use sn_conv='matrix' or add conv_specs()."
        )
    return specs
