"""Datasets: registry, download with checksum and mirror, preparation to tensors, batching."""

from .archive import safe_extract
from .errors import ChecksumError, ChecksumWarning, DatasetMissingError, UnverifiedWarning
from .fetch import MIRROR_ENV, fetch, resolve_mirror
from .idx import read_idx
from .loading import Splits, batch_indices, load
from .prepare import prepare
from .registry import DATASETS, DatasetSpec, RawFile, dataset_names, get_spec, text_dataset_names
from .text import (
    TokenSplits,
    bits_per_byte,
    bits_per_char,
    lm_batch,
    lm_eval_batches,
    load_text,
    perplexity,
    prepare_text,
)

__all__ = [
    "DATASETS",
    "MIRROR_ENV",
    "ChecksumError",
    "ChecksumWarning",
    "DatasetMissingError",
    "DatasetSpec",
    "RawFile",
    "Splits",
    "TokenSplits",
    "UnverifiedWarning",
    "batch_indices",
    "bits_per_byte",
    "bits_per_char",
    "dataset_names",
    "fetch",
    "get_spec",
    "lm_batch",
    "lm_eval_batches",
    "load",
    "load_text",
    "perplexity",
    "prepare",
    "prepare_text",
    "read_idx",
    "resolve_mirror",
    "safe_extract",
    "text_dataset_names",
]
