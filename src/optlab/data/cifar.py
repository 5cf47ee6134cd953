"""CIFAR-10 ("python version"): read the official archive without trusting its pickles.

The archive ``cifar-10-python.tar.gz`` holds ``cifar-10-batches-py/data_batch_1..5`` and
``test_batch``, each a Python pickle of a dict with ``b'data'`` (uint8 ``[10000, 3072]``, each
row an image in channel-major order: 1024 red, 1024 green, 1024 blue values of a 32x32 image)
and ``b'labels'`` (a list of ints in ``[0, 10)``).

Pickles can run arbitrary code when loaded, so :func:`read_cifar10` (1) checks the archive's
MD5 before anything else, (2) extracts it with :func:`safe_extract` into a temporary directory,
and (3) loads each batch with :class:`RestrictedUnpickler`, which resolves only the globals a
numpy array needs and refuses every other one (``os.system``, ``builtins.eval``, ...).
"""

from __future__ import annotations

import _compat_pickle
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._io import md5sum
from .archive import safe_extract
from .errors import ChecksumError

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
N_CLASSES = 10
INPUT_SHAPE = (3, 32, 32)


def _numpy_reconstruct() -> Any:
    core = getattr(np, "_core", None)  # numpy >= 2
    mod = core.multiarray if core is not None else np.core.multiarray  # type: ignore[attr-defined]
    return mod._reconstruct


# (module, name) -> object. Python 2 pickles name builtins ``__builtin__``; both spellings map
# to the same objects (see _compat_pickle). numpy arrays pickle as _reconstruct + ndarray + dtype.
_ALLOWED: dict[tuple[str, str], Any] = {
    **{(mod, t.__name__): t for mod in ("builtins", "__builtin__") for t in (dict, list, bytes, str, int)},
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class ForbiddenGlobalError(pickle.UnpicklingError):
    """A pickle referenced a global outside the allowed set."""


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only dict, list, bytes, str, int and numpy array reconstruction."""

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key not in _ALLOWED and (module, name) in _compat_pickle.NAME_MAPPING:
            key = _compat_pickle.NAME_MAPPING[(module, name)]
        try:
            return _ALLOWED[key]
        except KeyError:
            raise ForbiddenGlobalError(
                f"refusing to unpickle global {module}.{name}: CIFAR batches may only contain dicts, lists, "
                "bytes, str, int and numpy arrays"
            ) from None


def load_batch(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch file -> (uint8 ``[N, 3072]``, int64 ``[N]``), via :class:`RestrictedUnpickler`.

    Raises ValueError naming the file for a forbidden global, a malformed pickle or content
    that is not a CIFAR-10 batch.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            obj = RestrictedUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"{p}: not a readable CIFAR batch ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{p}: not a CIFAR batch (top level is {type(obj).__name__}, expected dict)")
    data = obj.get(b"data", obj.get("data"))
    labels = obj.get(b"labels", obj.get("labels"))
    dim = INPUT_SHAPE[0] * INPUT_SHAPE[1] * INPUT_SHAPE[2]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != dim:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{p}: data must be a uint8 array [N, {dim}], got {desc}")
    if not isinstance(labels, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        raise ValueError(f"{p}: labels must be a list of ints")
    y = np.asarray(labels, dtype=np.int64)
    if y.shape[0] != data.shape[0]:
        raise ValueError(f"{p}: {y.shape[0]} labels for {data.shape[0]} images")
    if y.size and (y.min() < 0 or y.max() >= N_CLASSES):
        raise ValueError(f"{p}: labels outside [0, {N_CLASSES})")
    return np.ascontiguousarray(data), y


def read_cifar10(
    archive: str | os.PathLike[str], md5: str, work_dir: str | os.PathLike[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_x uint8 [50000, 3072], train_y int64, test_x, test_y) from the official archive.

    The archive's MD5 must equal ``md5`` (checked first: ChecksumError otherwise, nothing read);
    it is extracted with ``safe_extract`` into a temporary directory under ``work_dir`` (default:
    next to the archive), removed afterwards.
    """
    archive = Path(archive)
    actual = md5sum(archive)
    if actual != md5:
        raise ChecksumError(f"{archive}: MD5 {actual}, expected {md5}; refusing to read it")
    parent = Path(work_dir) if work_dir is not None else archive.parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".cifar10-", dir=parent) as tmp:
        safe_extract(archive, tmp)
        root = Path(tmp) / FOLDER
        missing = [n for n in (*TRAIN_BATCHES, TEST_BATCH) if not (root / n).is_file()]
        if missing:
            raise ValueError(f"{archive}: no {', '.join(f'{FOLDER}/{n}' for n in missing)} in the archive")
        train = [load_batch(root / n) for n in TRAIN_BATCHES]
        test_x, test_y = load_batch(root / TEST_BATCH)
    x = np.concatenate([b[0] for b in train])
    y = np.concatenate([b[1] for b in train])
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(test_x), torch.from_numpy(test_y)
