"""Datasets: registry, download with checksum and mirror, preparation to tensors, batching."""

from .archive import safe_extract
from .errors import ChecksumError, ChecksumWarning, DatasetMissingError
from .fetch import MIRROR_ENV, fetch, resolve_mirror
from .idx import read_idx
from .loading import Splits, batch_indices, load
from .prepare import prepare
from .registry import DATASETS, DatasetSpec, RawFile, dataset_names, get_spec

__all__ = [
    "DATASETS",
    "MIRROR_ENV",
    "ChecksumError",
    "ChecksumWarning",
    "DatasetMissingError",
    "DatasetSpec",
    "RawFile",
    "Splits",
    "batch_indices",
    "dataset_names",
    "fetch",
    "get_spec",
    "load",
    "prepare",
    "read_idx",
    "resolve_mirror",
    "safe_extract",
]
