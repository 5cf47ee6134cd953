"""Probes: diagnostics with a cadence and a point in the step. ``build(cfg, env)``.

| name | point | rows (layers.csv ``metric``) | summary |
| --- | --- | --- | --- |
| ``grad_norm`` | after backward | ``grad_norm`` per layer | |
| ``grad_rank`` | after backward | ``grad_erank`` per layer, ``ns_grad_erank`` per Muon layer; curves ``grad_erank_mean``, ``ns_grad_erank_mean`` | ``grad_erank_mean``, ``grad_erank_final``, ``ns_grad_erank_mean``, ``grad_rank_muon_layers`` |
| ``ns_diag`` | after backward | per Muon layer and k in 1, 2, 3, 5, 10: ``ns_angle@k=<k>``, ``ns_rel_diff@k=<k>``, ``ns_orth_err@k=<k>`` | ``ns_diag_layers``, ``ns_angle_mean@k=<k>``, ``ns_orth_err_mean@k=<k>`` |
| ``weight_spectrum`` | after step | ``cond``, ``top1_energy``, ``top5_energy``, ``top10_energy``, ``sv_max``, ``sv_min`` per layer; ``sv@<i>`` at the last step | ``cond_max``, ``top1_energy_mean`` |
| ``constraint`` | after step | ``orth_err``, ``sv_min``, ``sv_max`` per constrained layer (optimizer's ``constraint_diagnostics()``); curve ``orth_err_max`` | ``orth_err_max``, ``constraint_layers`` |
| ``one_step`` | run end | per direction (gradient, random): ``one_step_rho``, ``one_step_r_rise``, ``one_step_ratio@r=<r>`` | ``one_step_r_rise_grad``, ``one_step_r_rise_random_min``, ``one_step_collapse_below_1`` |
| ``rho`` | epoch end | curves ``epoch_r_mean``, ``epoch_r_max``, ``epoch_eta_eff_mean``, ``epoch_capped_frac`` | ``peak_r``, ``final_eta_eff``, ``final_capped_frac`` |
| ``costate`` | after step | ``costate_cos``, ``costate_rel_l2``, ``costate_norm_ratio``, ``perturb_rho``, ``nudge``, ``update_cos`` per layer; curves ``<metric>_mean`` | the six layer means |
| ``sigma_max`` | after step | ``sigma_max`` per layer, curve ``sigma_max`` | ``sigma_max_max``, ``sn_violations``, ``sn_active_frac`` |

A run's probes are its ``probes`` mapping: name -> options (``every`` and the probe's own).
A new probe is a :class:`optlab.probes.base.Probe` subclass in its own module, registered with
``@PROBES.register(name)``.
"""

from __future__ import annotations

from typing import Any

from ..registry import Registry

PROBES: Registry[Any] = Registry("probe")


def probe_names() -> tuple[str, ...]:
    return PROBES.names()


def validate_options(name: str, options: dict[str, Any] | None, key: str = "probes") -> Any:
    from ..config import pydantic_options

    cls = PROBES.get(name, key=key)
    return pydantic_options(cls.Options, dict(options or {}), f"{key}.{name}")


def build(probes: dict[str, Any], env: Any) -> list[Any]:
    """The run's probes, in the order given."""
    return [PROBES.get(n, key="probes")(validate_options(n, o), env) for n, o in probes.items()]


from . import constraint, costate, grad_norm, grad_rank, ns_diag, one_step, rho, spectral, weight_spectrum  # noqa: E402,F401  (register the built-in probes)
from .base import POINTS, Probe, ProbeEnv, ProbeOptions  # noqa: E402

__all__ = ["PROBES", "POINTS", "Probe", "ProbeEnv", "ProbeOptions", "build", "probe_names", "validate_options"]
