"""Data-parallel training under ``torchrun``: the process group, the shards, the reductions.

``torchrun --nproc-per-node N -m optlab.pipeline train`` (or ``--nnodes M`` with a rendezvous
endpoint, for several machines) starts N processes that train one run together. The engine reads
the world from torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) and, with more
than one rank:

- initializes the process group: ``nccl`` on CUDA (each rank on GPU ``LOCAL_RANK``), ``gloo`` on
  the CPU;
- builds the model identically on every rank (same seed), wraps the training forward in
  ``DistributedDataParallel`` (which broadcasts rank 0's parameters and buffers and averages the
  gradients in backward); the optimizers see the plain module's parameters;
- draws every epoch's global batches from the same seeded generator on every rank and gives rank
  r the r-th of ``N`` contiguous slices of each batch (:func:`shard`), so N ranks with a global
  batch B take the steps one process takes with batch B (equal slices: B divisible by N; the
  gradient of a last, shorter batch weights the ranks' slices equally);
- reduces what the run records: the buffered training losses and the method's per-step
  statistics (mean over ranks, at the engine's flush), the epoch's train sums (sum), evaluation
  (each rank evaluates its slice of the split, the sums are added), and the divergence decision
  (a rank that sees a bad loss stops every rank at the same flush: no rank is left waiting in the
  next all-reduce);
- writes only from rank 0: MLflow runs, the run directory, checkpoints, the progress bar.

Seeds per rank: the model, the data order and the evaluation are the same on every rank (seeded
by ``seed``); torch's global generator, which dropout and augmentation draw from, is reseeded
with ``seed + rank`` on ranks above 0 after the model is built, so their random masks and crops
differ from rank 0's (rank 0 keeps the single-process stream).

Only training-step methods that take their gradients from one backward through the step's
forward can run data-parallel (:attr:`optlab.methods.base.Method.distributed`); the others are
refused with the list of those that can. Muon orthogonalizes a share of the matrices on each rank
and gathers the results (:mod:`optlab.optim.muon`); the rho controller takes the largest logit
spread over the ranks' slices (:mod:`optlab.optim.rho`), so both step exactly as one process
would with the whole batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the ranks (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def env_world() -> World:
    """The world torchrun describes in the environment (no environment: one process)."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return SINGLE
    return World(rank=int(os.environ.get("RANK", "0")), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def current() -> World:
    """The initialized process group's world, else :data:`SINGLE`."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    return SINGLE


def setup(device: torch.device) -> World:
    """Join the process group torchrun describes (once per process); returns the world.

    ``device`` picks the backend: ``nccl`` for CUDA, ``gloo`` otherwise. With one process this
    does nothing."""
    world = env_world()
    if not world.active:
        return SINGLE
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=float(os.environ.get("OPTLAB_DIST_TIMEOUT_S", "600")))
        dist.init_process_group(backend=backend, timeout=timeout)
    if dist.get_world_size() != world.size or dist.get_rank() != world.rank:
        raise RuntimeError(f"distributed: the process group ({dist.get_rank()}/{dist.get_world_size()}) does not match "
                           f"WORLD_SIZE={world.size}, RANK={world.rank}")
    return world


def rank_device(device: torch.device, world: World) -> torch.device:
    """A CUDA run's device on this rank: GPU ``LOCAL_RANK`` (one GPU per rank)."""
    if device.type == "cuda" and world.active:
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return device


def shard(idx: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's contiguous slice of a global batch of indices (the whole batch with one rank)."""
    if not world.active:
        return idx
    return idx.tensor_split(world.size)[world.rank]


def span(n: int, world: World) -> tuple[int, int]:
    """This rank's contiguous range ``[lo, hi)`` of ``n`` items (evaluation's share)."""
    if not world.active:
        return 0, n
    lo = n * world.rank // world.size
    return lo, n * (world.rank + 1) // world.size


def all_sum(t: torch.Tensor, world: World) -> torch.Tensor:
    """``t`` summed over the ranks (in place; ``t`` itself with one rank)."""
    if world.active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_mean(t: torch.Tensor, world: World) -> torch.Tensor:
    """``t`` averaged over the ranks (a new tensor with several ranks)."""
    if not world.active:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / world.size


def all_max(t: torch.Tensor, world: World) -> torch.Tensor:
    """``t``'s elementwise maximum over the ranks (in place)."""
    if world.active:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def any_true(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank (one small all-reduce)."""
    if not world.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def reseed_rank(seed: int, world: World) -> None:
    """Ranks above 0 draw their dropout and augmentation from ``seed + rank`` (see the module docstring)."""
    if world.active and world.rank > 0:
        torch.manual_seed(seed + world.rank)
