"""The probe interface: a diagnostic with a cadence and a point in the step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

POINTS = ("after_backward", "after_step", "epoch_end", "run_end")
"""Where in the loop a probe measures: after the method's backward (gradients in place, before
the optimizer step), after the step, at each epoch end, once at run end."""


class ProbeOptions(BaseModel):
    """Options every probe has: ``every`` K steps (epochs for an epoch-end probe) and whether a
    last measurement is taken at run end when the final step was not a multiple of ``every``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    every: int = Field(25, ge=1)
    at_end: bool = True


@dataclass
class ProbeEnv:
    """What probes can read: the model, its layer index, the method (and its optimizer), the
    task (and its fixed probe batch), the run config and device."""

    model: nn.Module
    index: Any
    method: Any
    task: Any
    cfg: Any
    device: torch.device


class Probe:
    """Base class. A probe measures at its ``point`` on due steps (device-side, no host sync),
    then ``emit`` writes its rows once the step is counted (the host sync happens there, at the
    probe's cadence only). Rows are long-format: ``rec.layer_rows(step, epoch, metric, values)``
    per layer, ``rec.metric(step, epoch, key, value)`` for whole-model values. ``summary()``
    gives the probe's final metrics; ``state_dict`` whatever a resumed run needs to measure
    exactly as an uninterrupted one."""

    name: ClassVar[str]
    point: ClassVar[str] = "after_step"
    Options: ClassVar[type[ProbeOptions]] = ProbeOptions

    def __init__(self, options: ProbeOptions, env: ProbeEnv) -> None:
        self.options, self.env = options, env
        self.every = options.every

    def due(self, steps_done: int) -> bool:
        """Whether the step after ``steps_done`` completed steps is measured."""
        return (steps_done + 1) % self.every == 0

    def measure(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def emit(self, step: int, epoch: int, rec: Any) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def summary(self, steps: int) -> dict[str, Any]:
        """Final metrics after ``steps`` training steps (host syncs allowed: called once)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
