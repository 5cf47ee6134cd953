"""One GPU per process on a machine with several: ``dvc queue start -j N`` without a scheduler.

``dvc exp run --queue`` then ``dvc queue start -j N`` runs N experiments at once, each in its own
workspace and process, none told which GPU to use; left alone, all N would train on GPU 0. A run
whose device is ``cuda`` (or ``auto`` on a CUDA machine) therefore *claims* a GPU when it
resolves its device (:func:`claim`): it takes an exclusive, non-blocking ``flock`` on
``<lock dir>/gpu<i>.lock`` for the first free ``i`` and keeps it until the process ends (the
kernel drops the lock when the process dies, so a killed worker frees its GPU). With N workers
and at least N GPUs each worker trains on its own GPU; with more workers than GPUs the extra ones
share, spread by process id, and say so on stderr.

Nothing is claimed when ``CUDA_VISIBLE_DEVICES`` is set (the user or a scheduler such as SLURM
already chose), when there is one GPU, under torchrun (each rank takes ``LOCAL_RANK``), or with
``OPTLAB_GPU_CLAIM=0``. The lock directory is ``OPTLAB_GPU_LOCK_DIR``, default
``<tmp>/optlab-gpu-locks`` (shared by every user's processes on the machine). Standard library
and torch only; the choice is logged in the run's ``device`` tag (``cuda:<i>``).
"""

from __future__ import annotations

import fcntl
import os
import sys
import tempfile
from pathlib import Path
from typing import IO

import torch

_held: dict[int, IO[bytes]] = {}  # GPU index -> the open lock file this process holds


def lock_dir() -> Path:
    return Path(os.environ.get("OPTLAB_GPU_LOCK_DIR") or Path(tempfile.gettempdir()) / "optlab-gpu-locks")


def _try_lock(path: Path) -> IO[bytes] | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+b")  # noqa: SIM115 - held open for the process's lifetime
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n".encode())
    f.flush()
    return f


def claim(count: int | None = None) -> int | None:
    """This process's GPU index (claimed once, then the same), or None where nothing is claimed
    (see the module docstring). ``count``: the number of GPUs (default: torch's count)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None or os.environ.get("OPTLAB_GPU_CLAIM", "1") == "0":
        return None
    if _held:
        return next(iter(_held))
    n = torch.cuda.device_count() if count is None else count
    if n <= 1:
        return None
    d = lock_dir()
    for i in range(n):
        f = _try_lock(d / f"gpu{i}.lock")
        if f is not None:
            _held[i] = f
            return i
    i = os.getpid() % n
    print(f"optlab: all {n} GPUs are claimed by other optlab processes (locks in {d}); sharing GPU {i}", file=sys.stderr)
    return i


def release() -> None:
    """Give back this process's GPU (tests; a process's claim otherwise lasts until it ends)."""
    for f in _held.values():
        f.close()
    _held.clear()
