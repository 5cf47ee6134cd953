"""Small file helpers: MD5 and temp files for atomic replacement."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO

CHUNK = 1 << 20


def md5sum(path: str | os.PathLike[str]) -> str:
    """Hex MD5 of a file, read in chunks."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def open_temp(final: Path) -> tuple[Path, BinaryIO]:
    """Create a new hidden temp file next to ``final`` (same filesystem, so os.replace is atomic).

    Created with mode 0o666 filtered by the umask, like a normal file.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    return tmp, os.fdopen(fd, "wb")


def unlink_quiet(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def atomic_save(out: Path, obj: Any) -> None:
    """Write ``bytes``, or ``torch.save`` any other object, to ``out`` atomically (temp, fsync, rename)."""
    import torch

    tmp, fh = open_temp(out)
    try:
        with fh:
            if isinstance(obj, bytes):
                fh.write(obj)
            else:
                torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        unlink_quiet(tmp)
        raise
