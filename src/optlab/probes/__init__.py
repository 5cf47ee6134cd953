"""Probes: diagnostics with a cadence and a point in the step. ``build(cfg, env)``.

| name | point | rows (layers.csv ``metric``) | summary |
| --- | --- | --- | --- |
| ``grad_norm`` | after backward | ``grad_norm`` per layer | |
| ``one_step`` | run end | per direction (gradient, random): ``one_step_rho``, ``one_step_r_rise``, ``one_step_ratio@r=<r>`` | ``one_step_r_rise_grad``, ``one_step_r_rise_random_min``, ``one_step_collapse_below_1`` |
| ``rho`` | epoch end | curves ``epoch_r_mean``, ``epoch_r_max``, ``epoch_eta_eff_mean``, ``epoch_capped_frac`` | ``peak_r``, ``final_eta_eff``, ``final_capped_frac`` |
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


from . import grad_norm, one_step, rho, spectral  # noqa: E402,F401  (register the built-in probes)
from .base import POINTS, Probe, ProbeEnv, ProbeOptions  # noqa: E402

__all__ = ["PROBES", "POINTS", "Probe", "ProbeEnv", "ProbeOptions", "build", "probe_names", "validate_options"]
