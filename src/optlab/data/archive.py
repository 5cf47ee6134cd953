"""Tar extraction that refuses members escaping the destination."""

from __future__ import annotations

import os
import posixpath
import tarfile
from pathlib import Path


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _check_member(m: tarfile.TarInfo, root: str, links: set[str]) -> str | None:
    """Why ``m`` is unsafe to extract under ``root``, or None when it is safe."""
    name = m.name
    if name.startswith(("/", "\\")) or os.path.isabs(name):
        return "absolute path"
    norm = posixpath.normpath(name)
    if norm == ".." or norm.startswith("../"):
        return "path escapes the destination"
    # A member inside a directory that an earlier archive member made a link could escape.
    parts = norm.split("/")
    for i in range(1, len(parts)):
        if "/".join(parts[:i]) in links:
            return "path goes through a link member"
    target = os.path.realpath(os.path.join(root, norm))
    if not _inside(root, target):
        return "path escapes the destination"
    if not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
        return "device, fifo or other special file"
    if m.issym():
        link = m.linkname
        if link.startswith(("/", "\\")) or os.path.isabs(link):
            return "absolute symlink"
        dest = os.path.realpath(os.path.join(root, posixpath.dirname(norm), link))
        if not _inside(root, dest):
            return f"symlink to {link!r} escapes the destination"
    if m.islnk():
        link = m.linkname
        if link.startswith(("/", "\\")) or os.path.isabs(link):
            return "absolute hardlink"
        dest = os.path.realpath(os.path.join(root, link))
        if not _inside(root, dest):
            return f"hardlink to {link!r} escapes the destination"
    return None


def safe_extract(tar_path: str | os.PathLike[str], dest: str | os.PathLike[str]) -> list[Path]:
    """Extract a (possibly compressed) tar archive into ``dest``.

    Every member is checked before anything is written: absolute paths, paths resolving
    outside ``dest``, links pointing outside it, paths through link members and special files
    (devices, fifos) make it raise ValueError with nothing extracted. Extraction also uses
    tarfile's ``data`` filter. Returns the extracted paths.
    """
    root_path = Path(dest)
    root_path.mkdir(parents=True, exist_ok=True)
    root = os.path.realpath(root_path)
    with tarfile.open(tar_path, "r:*") as tar:
        members = tar.getmembers()
        links: set[str] = set()
        for m in members:
            why = _check_member(m, root, links)
            if why is not None:
                raise ValueError(f"{tar_path}: refusing to extract member {m.name!r}: {why}")
            if m.issym() or m.islnk():
                links.add(posixpath.normpath(m.name))
        try:
            tar.extractall(root, members=members, filter="data")
        except tarfile.FilterError as e:
            raise ValueError(f"{tar_path}: refusing to extract: {e}") from e
    return [Path(root, posixpath.normpath(m.name)) for m in members]
