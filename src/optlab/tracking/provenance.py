"""Provenance: repository root, git state and DVC context of the running process.

Two roots matter and they differ inside a DVC experiment temp workspace
(`dvc exp run --temp` / `--queue` run in `<repo>/.dvc/tmp/exps/<tmpdir>/`, a separate git
checkout of the experiment):

- `find_work_tree()` is the git checkout the code runs from. Commit, dirty state and diff are
  read there, because that is the code that produced the numbers.
- `find_repo_root()` is the user's repository. The tracking store lives there, so temp and
  queued experiments land in the same store as workspace runs.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DVC_EXPS_MARKER = "/.dvc/tmp/exps/"

# Variables that make git ignore `cwd` (set by git hooks, for instance).
_GIT_LOCATION_VARS = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_COMMON_DIR",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_PREFIX",
    "GIT_NAMESPACE",
)


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `git <args>` in `root` with the repository located from `root` alone."""
    env = {k: v for k, v in os.environ.items() if k not in _GIT_LOCATION_VARS}
    env["GIT_OPTIONAL_LOCKS"] = "0"  # `git status` must not take index.lock from parallel runs
    env["LC_ALL"] = "C"
    return subprocess.run(
        ["git", *args], cwd=root, env=env, capture_output=True, text=True, check=False
    )


def find_work_tree(start: Path | None = None) -> Path | None:
    """Git top-level of `start` (default: cwd), or None outside a git checkout."""
    start = Path.cwd() if start is None else Path(start)
    if not start.is_dir():
        return None
    try:
        proc = _git(start, "rev-parse", "--show-toplevel")
    except OSError:  # git not installed
        return None
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    return Path(proc.stdout.strip()).resolve()


def find_repo_root(start: Path | None = None) -> Path | None:
    """The user's repository root: the git top-level of `start` (default: cwd), except that
    inside a DVC experiment temp workspace (`.../.dvc/tmp/exps/...`) it is the original
    repository, the part of the path before `/.dvc/tmp/exps/`."""
    start = (Path.cwd() if start is None else Path(start)).resolve()
    posix = start.as_posix() + "/"
    if DVC_EXPS_MARKER in posix:
        return Path(posix.split(DVC_EXPS_MARKER, 1)[0] or "/")
    return find_work_tree(start)


def head_commit(root: Path | None) -> str | None:
    """HEAD sha of the repository containing `root`, or None (no repository, no commit)."""
    if root is None or not Path(root).is_dir():
        return None
    try:
        proc = _git(Path(root), "rev-parse", "--verify", "HEAD")
    except OSError:  # git not installed
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_info(root: Path | None, paths: Sequence[str] | None = None) -> dict[str, Any]:
    """`git_commit` (HEAD sha), `git_dirty` (tracked or untracked changes under `paths`, or
    anywhere when None; ignored files excluded) and `diff` (`git diff HEAD` text plus a list of
    untracked files, only when dirty, else None). All values are None when `root` is not inside
    a git repository or it has no commit yet."""
    commit = head_commit(root)
    if commit is None:
        return {"git_commit": None, "git_dirty": None, "diff": None}
    assert root is not None
    changes = dirty_paths(root, paths)
    return {"git_commit": commit, "git_dirty": bool(changes), "diff": _diff(root, paths, changes)}


def _diff(root: Path, paths: Sequence[str] | None, changes: list[tuple[str, str]]) -> str | None:
    if not changes:
        return None
    spec = ["--", *paths] if paths is not None else []
    text = _git(Path(root), "diff", "HEAD", "--no-color", "--no-ext-diff", *spec).stdout
    return text + "".join(f"# untracked: {p}\n" for code, p in changes if code == "??")


def dirty_paths(root: Path, paths: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """(status code, path) pairs from `git status --porcelain` restricted to `paths`.

    Raises RuntimeError when git fails (for instance outside a repository)."""
    spec = ["--", *paths] if paths is not None else []
    proc = _git(Path(root), "status", "--porcelain", "--untracked-files=all", *spec)
    if proc.returncode != 0:
        raise RuntimeError(f"git status failed in {root}: {proc.stderr.strip()}")
    out = []
    for line in proc.stdout.splitlines():
        if len(line) > 3:
            out.append((line[:2].strip() or line[:2], line[3:]))
    return out


def dvc_stage() -> str | None:
    """Current DVC stage: `OPTLAB_DVC_STAGE` (set by optlab's stages), else DVC's `DVC_STAGE`."""
    return os.environ.get("OPTLAB_DVC_STAGE") or os.environ.get("DVC_STAGE") or None


def dvc_exp_name() -> str | None:
    """Name of the running DVC experiment (`DVC_EXP_NAME`, set by `dvc exp run`)."""
    return os.environ.get("DVC_EXP_NAME") or None


def dvc_exp_baseline() -> str | None:
    """Baseline commit of the running DVC experiment (`DVC_EXP_BASELINE_REV`)."""
    return os.environ.get("DVC_EXP_BASELINE_REV") or None
