"""Exceptions and warnings raised by the data layer."""

from __future__ import annotations


class ChecksumError(ValueError):
    """A fetched raw file does not have the expected MD5."""


class DatasetMissingError(FileNotFoundError):
    """A raw or prepared dataset file could not be found or fetched."""


class ChecksumWarning(UserWarning):
    """A local or mirror copy with a wrong MD5 was skipped or deleted."""


class UnverifiedWarning(UserWarning):
    """A raw file with no published MD5 was used without verification (its MD5 is recorded)."""
