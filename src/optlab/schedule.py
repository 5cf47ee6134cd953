"""Learning-rate schedules: a multiplier of every param group's base learning rate, per step.

The only schedule is the LR spike (run keys ``lr_spike_step``, ``lr_spike_factor``): the step
with index ``lr_spike_step`` (steps counted from 0: the step after ``lr_spike_step`` steps have
completed) and every later one run at ``factor`` times the base LR; the steps before it at the
base LR. ``lr_spike_step: 0`` (the default) is no schedule at all (a factor other than 1 with it is
refused by the config).

The seam: when :func:`active` is true for the run, the engine calls
``method.set_lr_scale(lr_scale(cfg, step))`` before every step
(:meth:`optlab.methods.base.Method.set_lr_scale`: every param group of every optimizer the
method owns gets ``lr = base_lr * scale``, the base LRs being the groups' LRs as the method
built them). When no schedule is configured the engine never calls it, so a run without a
schedule is exactly what it was before schedules existed.
"""

from __future__ import annotations

from typing import Any


def active(cfg: Any) -> bool:
    """Whether the run has an LR schedule (the engine skips the per-step call when not)."""
    return int(getattr(cfg, "lr_spike_step", 0) or 0) > 0


def lr_scale(cfg: Any, step: int) -> float:
    """The multiplier of the base LRs for the step with index ``step`` (steps completed before it)."""
    start = int(getattr(cfg, "lr_spike_step", 0) or 0)
    if start > 0 and step >= start:
        return float(cfg.lr_spike_factor)
    return 1.0
