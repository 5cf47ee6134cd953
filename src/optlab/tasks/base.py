"""What every task provides to the engine, methods and probes."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..distributed import SINGLE, World


class Task:
    """A training task: batches, loss, per-step sums, evaluation, primary metric, probe batch.

    Subclasses set the class attributes and implement the batching/evaluation methods:

    - ``epoch_batches(gen)``: one epoch's batch handles, drawn from a CPU generator (a
      checkpoint that stores the generator state at an epoch start can redraw them);
    - ``batch(handle)``: the (inputs, targets) tensors on the device;
    - ``loss(outputs, targets)``: a scalar device tensor;
    - ``step_sums(loss, outputs, targets)``: device tensors summed over an epoch (no host sync),
      reported at epoch end as ``train_<name>`` means (``EPOCH_KEYS`` names them);
    - ``evaluate(model, split)``: a dict of metrics for ``val`` or ``test`` (one host sync);
    - ``probe_batch()``: a fixed, seeded subset of the training split, the same for every method
      and seed of a study, for probes that compare methods on the same inputs;
    - ``model_kwargs()``: what the model needs from the data;
    - ``summary()`` (optional): reference numbers of the task (a floor, a baseline) for the run's record.
    """

    kind: ClassVar[str]
    unit: ClassVar[str]  # what throughput counts: examples, tokens
    primary: ClassVar[tuple[str, str]]  # (final metric, "up" | "down"): what a study compares
    select: ClassVar[str]  # validation metric the LR search selects on
    select_direction: ClassVar[str]
    milestone: ClassVar[tuple[str, float] | None] = None  # (val metric, threshold): epochs_to_<x>
    EPOCH_KEYS: ClassVar[dict[str, str]] = {"loss": "epoch_train_loss", "correct": "train_acc"}
    PROBE_SIZE: ClassVar[int] = 256
    # data-parallel runs (optlab.distributed): the engine sets this; ``evaluate`` then covers the
    # rank's slice of the split and adds the ranks' sums
    world: World = SINGLE
    PROBE_SEED: ClassVar[int] = 1234

    steps_per_epoch: int
    items_per_batch: int

    def n_items(self, targets: torch.Tensor) -> int:
        return int(targets.numel())

    def n_correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs.detach().argmax(-1) == targets).sum()

    def step_sums(self, loss: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": loss * self.n_items(targets), "correct": self.n_correct(outputs, targets)}

    def summary(self) -> dict[str, Any]:
        """Reference numbers of the task itself (not of the run), recorded with each run's final metrics."""
        return {}

    def model_kwargs(self) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def probe_batch(self) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError
