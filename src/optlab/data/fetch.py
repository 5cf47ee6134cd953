"""Raw files: local copy, then mirror, then canonical URL; every file MD5-checked."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.request
import warnings
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from ._io import CHUNK, md5sum, open_temp, unlink_quiet
from .errors import ChecksumError, ChecksumWarning, DatasetMissingError, UnverifiedWarning
from .registry import DatasetSpec, RawFile, get_spec

MIRROR_ENV = "OPTLAB_DATA_MIRROR"

log = logging.getLogger(__name__)


class _NetworkError(Exception):
    """A download failed before its content could be checked."""


def resolve_mirror(configured: str | os.PathLike[str] | None) -> Path | None:
    """The mirror directory: ``configured`` if set, else ``$OPTLAB_DATA_MIRROR``, else None.

    Empty strings count as unset. Relative paths resolve against the current directory.
    """
    value: str | os.PathLike[str] | None = configured
    if value is None or str(value) == "":
        value = os.environ.get(MIRROR_ENV) or None
    if value is None:
        return None
    return Path(os.path.abspath(Path(value).expanduser()))


def fetch(
    name: str | DatasetSpec,
    raw_dir: str | os.PathLike[str],
    mirror: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    base_url: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> dict[str, Path]:
    """Make every raw file of a dataset present in ``raw_dir`` with its published MD5.

    Per file: keep ``raw_dir/<file>`` if its MD5 matches (a mismatching one is deleted);
    else copy from the mirror (``<mirror>/<subdir>/<file>``, then ``<mirror>/<file>``),
    skipping copies with a wrong MD5; else download ``<base_url>/<file>``.
    ``mirror`` goes through :func:`resolve_mirror` (None falls back to ``$OPTLAB_DATA_MIRROR``).
    ``base_url`` overrides the canonical URL base (tests use file:// or a local server).

    A file registered with ``md5=None`` (no published checksum) is taken from the first of
    these places that has it, with an :class:`UnverifiedWarning` giving its MD5.

    Returns ``{file name: path in raw_dir}``. Raises :class:`ChecksumError` when a download
    has the wrong MD5 and :class:`DatasetMissingError` when no good copy can be had.
    """
    spec = get_spec(name)
    raw = Path(raw_dir)
    raw.mkdir(parents=True, exist_ok=True)
    mirror_dir = resolve_mirror(mirror)
    return {
        f.name: _fetch_one(spec, f, raw, mirror_dir, base_url, download, progress, timeout)
        for f in spec.files
    }


def _fetch_one(
    spec: DatasetSpec,
    f: RawFile,
    raw_dir: Path,
    mirror: Path | None,
    base_url: str | None,
    download: bool,
    progress: bool,
    timeout: float,
) -> Path:
    target = raw_dir / f.name
    searched: list[str] = []

    if target.is_file():
        actual = md5sum(target)
        if actual == f.md5:
            return target
        if f.md5 is None:
            _warn_unverified(spec, f, target, actual)
            return target
        warnings.warn(
            f"{target} has MD5 {actual}, expected {f.md5}; deleting it and fetching again",
            ChecksumWarning,
            stacklevel=3,
        )
        target.unlink()
        searched.append(f"{target} (MD5 mismatch, deleted)")
    else:
        searched.append(f"{target} (missing)")

    if mirror is None:
        searched.append(f"no mirror (data.mirror and {MIRROR_ENV} unset)")
    elif not mirror.is_dir():
        searched.append(f"mirror {mirror} (not a directory)")
    else:
        for cand in spec.mirror_candidates(mirror, f.name):
            if not cand.is_file():
                searched.append(f"{cand} (missing)")
                continue
            with open(cand, "rb") as src:
                tmp, actual = _stream_to_temp(src.read, target, None, None)
            if actual == f.md5 or f.md5 is None:
                os.replace(tmp, target)
                log.info("copied %s from mirror %s", f.name, cand)
                if f.md5 is None:
                    _warn_unverified(spec, f, cand, actual)
                return target
            unlink_quiet(tmp)
            warnings.warn(
                f"mirror file {cand} has MD5 {actual}, expected {f.md5}; not using it",
                ChecksumWarning,
                stacklevel=3,
            )
            searched.append(f"{cand} (MD5 mismatch, skipped)")

    url = spec.url(f.name, base_url) if (base_url or spec.base_url) else None
    if url is None:
        searched.append("no download URL")
    elif not download:
        searched.append(f"{url} (download disabled)")
    else:
        try:
            tmp, actual = _download(url, target, progress, timeout)
        except _NetworkError as e:
            searched.append(f"{url} (download failed: {e})")
        else:
            if f.md5 is not None and actual != f.md5:
                unlink_quiet(tmp)
                raise ChecksumError(
                    f"MD5 mismatch for {f.name} downloaded from {url}: "
                    f"expected {f.md5}, got {actual}"
                )
            os.replace(tmp, target)
            log.info("downloaded %s from %s", f.name, url)
            if f.md5 is None:
                _warn_unverified(spec, f, url, actual)
            return target

    where = f"{spec.subdir}/{f.name} or {f.name}" if spec.subdir else f.name
    if url is None:
        also = ""
    else:
        also = ", or get network access" if download else ", or allow the download"
    msg = (
        f"dataset {spec.name!r}: no copy of {f.name}"
        f"{'' if f.md5 is None else f' with MD5 {f.md5}'} found; "
        f"searched: {'; '.join(searched)}. "
        f"Fix: set data.mirror in params.yaml or the {MIRROR_ENV} environment variable "
        f"to a directory holding {where}{also}."
    )
    raise DatasetMissingError(msg.replace("\r", " ").replace("\n", " "))


def _warn_unverified(spec: DatasetSpec, f: RawFile, source: object, actual: str) -> None:
    warnings.warn(
        f"dataset {spec.name!r}: {f.name} has no published MD5, so it could not be verified; "
        f"using the copy from {source} (MD5 {actual})",
        UnverifiedWarning,
        stacklevel=4,
    )


def _stream_to_temp(
    read: Callable[[int], bytes], target: Path, total: int | None, desc: str | None
) -> tuple[Path, str]:
    """Copy a byte stream into a temp file next to ``target``; return (temp path, MD5)."""
    h = hashlib.md5(usedforsecurity=False)
    tmp, out = open_temp(target)
    try:
        with out, tqdm(
            total=total,
            desc=desc,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            leave=False,
            disable=desc is None,
        ) as bar:
            while chunk := read(CHUNK):
                out.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
    except BaseException:
        unlink_quiet(tmp)
        raise
    return tmp, h.hexdigest()


def _download(url: str, target: Path, progress: bool, timeout: float) -> tuple[Path, str]:
    try:
        resp = urllib.request.urlopen(url, timeout=timeout)
    except (OSError, http.client.HTTPException) as e:
        raise _NetworkError(str(e)) from e
    with resp:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None

        def read(n: int) -> bytes:
            try:
                return resp.read(n)
            except (OSError, http.client.HTTPException) as e:
                raise _NetworkError(str(e) or type(e).__name__) from e

        return _stream_to_temp(read, target, total, target.name if progress else None)
