"""Phase policy: debug -> pilot -> frozen. No mlflow import.

- ``debug``: anything runs; the commit and whether the watched paths are dirty are recorded.
- ``pilot``: the watched paths (:data:`WATCHED`: code, params, pipeline, lock file) have no
  uncommitted change, so the recorded commit is the code and params that ran. DVC-written
  outputs (``runs/``, ``reports/``, ``dvc.lock``) are not watched: they change during every repro.
- ``frozen``: the code and configuration that determine the runs are identical to those at
  ``frozen_commit``, whatever later commits added (results, reports, notes, ``dvc.lock``, other
  studies' params). Our definition of "determine the runs": the files under
  :data:`FROZEN_CODE` (minus :data:`FROZEN_CODE_EXCLUDE`, the report code no training run
  imports), compared between the working tree (untracked files included) and the frozen commit,
  and the params the runs read (:func:`optlab.config.determining_params`: the study's section,
  its methods' sections, the engine keys and the data keys), compared as parsed YAML values
  against ``params.yaml`` at the frozen commit, ``phase``/``frozen_commit`` themselves excluded.
  Frozen runs need at least :data:`MIN_FROZEN_SEEDS` distinct seeds per configuration.

Because the frozen commit is compared by content rather than required to be HEAD, a commit can
name an earlier commit as frozen: commit the code, set ``frozen_commit`` to that commit, commit,
``dvc repro``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from optlab.codeset import frozen_code_exclude
from optlab.tracking.provenance import _git, dirty_paths, find_work_tree, git_info, head_commit

PHASES = ("debug", "pilot", "frozen")
WATCHED = ("src", "stages", "params.yaml", "studies.yaml", "dvc.yaml", "pyproject.toml", "requirements.lock")
FROZEN_CODE = ("src", "stages", "requirements.lock", "pyproject.toml")
# the code under src/optlab that no training run executes (the same list as the validate stage's
# training-code fingerprint, optlab.codeset): reports and the make-repro driver may change
FROZEN_CODE_EXCLUDE = frozen_code_exclude()
MIN_FROZEN_SEEDS = 3
_SHA_PREFIX = re.compile(r"[0-9a-fA-F]{7,40}")
_MISSING = object()
_SHOWN = 6  # changed paths/keys named in a message before "and N more"


class PhaseError(ValueError):
    """A run was refused by the phase policy."""


def check_phase(
    phase: str,
    *,
    frozen_commit: str | None,
    seeds_per_config: int,
    root: Path | None,
    watched: Sequence[str] = WATCHED,
    params: Mapping[str, Any] | None = None,
    study: str | None = None,
    params_file: str = "params.yaml",
    where: str = "",
    seeds_key: str = "seeds_per_config",
) -> dict[str, Any]:
    """Enforce the phase rules and return provenance
    `{phase, git_commit, git_dirty, frozen, frozen_commit}`.

    `root` is the git checkout the code runs from (default: the git top-level of cwd, which is
    the experiment's own checkout inside a `dvc exp run --temp/--queue` workspace). `params` is
    the parsed params.yaml the runs use and `study` the study they belong to (None: the headline
    and ablation runs); for a frozen run they are compared with `params_file` (relative to the
    work tree) at the frozen commit. `where` prefixes the key names in messages (for a study's
    own phase keys: ``"studies.<name>."``) and `seeds_key` names the seeds key.
    `git_dirty` refers to the watched paths (untracked files included) relative to HEAD, so it
    is False for pilot runs; a frozen run may be dirty outside what determines it.
    `frozen_commit` in the result is the full sha for frozen runs, else None. Raises PhaseError
    with one line naming the offending key."""
    key_phase, key_commit = f"{where}phase", f"{where}frozen_commit"
    if phase not in PHASES:
        raise PhaseError(f"{key_phase}: {phase!r} is not one of {', '.join(PHASES)}")
    work_tree = find_work_tree(root) if root is not None else find_work_tree()
    if phase == "debug":
        info = git_info(work_tree, watched)
        return {"phase": phase, "git_commit": info["git_commit"], "git_dirty": info["git_dirty"],
                "frozen": False, "frozen_commit": None}

    where_dir = root if root is not None else Path.cwd()
    if work_tree is None:
        raise PhaseError(
            f"{key_phase}: {phase!r} needs a git repository with a commit, but {where_dir} is not in one "
            "(use phase=debug for exploratory runs)"
        )
    head = head_commit(work_tree)
    if head is None:
        raise PhaseError(f"{key_phase}: {phase!r} needs a commit, but the repository at {work_tree} has none")

    if phase == "pilot":
        changed = dirty_paths(work_tree, watched)
        if changed:
            names = ", ".join(sorted({p for _, p in changed}))
            raise PhaseError(
                f"{key_phase}: 'pilot' needs a clean tree for {', '.join(watched)}; uncommitted changes "
                f"in: {names}. Commit them (one commit per change, with its rationale) and rerun; "
                "`dvc exp run -S key=val` edits params.yaml and is refused in pilot for the "
                "same reason: commit the params change instead."
            )
        return {"phase": phase, "git_commit": head, "git_dirty": False, "frozen": False, "frozen_commit": None}

    # frozen
    if not frozen_commit:
        raise PhaseError(f"{key_commit}: required when {key_phase} is 'frozen' (set it to the commit to freeze)")
    if not isinstance(frozen_commit, str) or not _SHA_PREFIX.fullmatch(frozen_commit):
        raise PhaseError(f"{key_commit}: {frozen_commit!r} is not a commit sha (7 to 40 hex characters)")
    if seeds_per_config < MIN_FROZEN_SEEDS:
        raise PhaseError(
            f"{seeds_key}: {seeds_per_config} distinct seeds per configuration (LR x grid point) is below "
            f"{MIN_FROZEN_SEEDS}, the minimum for frozen runs"
        )
    full = resolve_commit(work_tree, frozen_commit)
    if full is None:
        raise PhaseError(f"{key_commit}: {frozen_commit!r} is not a commit of the repository at {work_tree}")
    short = full[:12]
    paths = code_changed_since(work_tree, full)
    keys: list[str] = []
    if params is not None:
        then = params_at(work_tree, full, params_file)
        if then is None:
            raise PhaseError(f"{key_commit}: {short}: {params_file} is missing or not valid YAML at the frozen commit")
        keys = params_changed(params, then, study)
    if paths or keys:
        parts = []
        if paths:
            parts.append(f"{_names(paths)} changed since the frozen commit")
        if keys:
            parts.append(f"params {_names(keys)} changed since the frozen commit")
        raise PhaseError(
            f"{key_commit}: {short}: {'; '.join(parts)}. A frozen run needs the code and params of the "
            "frozen commit: restore them, or freeze a new commit (commit the change, set frozen_commit to "
            "that commit, commit, dvc repro)"
        )
    info = git_info(work_tree, watched)
    return {"phase": phase, "git_commit": head, "git_dirty": bool(info["git_dirty"]), "frozen": True,
            "frozen_commit": full}


def _names(items: Sequence[str]) -> str:
    items = list(items)
    shown = ", ".join(items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def resolve_commit(work_tree: Path, rev: str) -> str | None:
    """Full sha of commit `rev` in the repository at `work_tree`, or None."""
    proc = _git(Path(work_tree), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None


def code_changed_since(work_tree: Path, commit: str, paths: Sequence[str] = FROZEN_CODE,
                       exclude: Sequence[str] = FROZEN_CODE_EXCLUDE) -> list[str]:
    """Paths under `paths` (minus `exclude`) whose working-tree content differs from `commit`:
    ``git diff --name-only <commit>`` (modified, added, deleted tracked files) plus untracked
    files that git does not ignore. Sorted; raises RuntimeError when git fails."""
    spec = ["--", *paths, *(f":(exclude){p}" for p in exclude)]
    root = Path(work_tree)
    diff = _git(root, "diff", "--name-only", "--no-renames", "-z", commit, *spec)
    if diff.returncode != 0:
        raise RuntimeError(f"git diff {commit} failed in {root}: {diff.stderr.strip()}")
    new = _git(root, "ls-files", "--others", "--exclude-standard", "-z", *spec)
    if new.returncode != 0:
        raise RuntimeError(f"git ls-files failed in {root}: {new.stderr.strip()}")
    return sorted({p for p in (diff.stdout + new.stdout).split("\0") if p})


def params_at(work_tree: Path, commit: str, params_file: str = "params.yaml") -> dict[str, Any] | None:
    """params.yaml (`params_file`, relative to the work tree) and the studies.yaml beside it at
    `commit`, parsed and merged (:func:`optlab.paramfiles.read_with`); None when params.yaml is
    missing there or either file is not a YAML mapping."""
    from optlab import paramfiles

    def show(path: str) -> str | None:
        proc = _git(Path(work_tree), "show", f"{commit}:{Path(path).as_posix()}")
        return proc.stdout if proc.returncode == 0 else None

    return paramfiles.read_with(show, params_file)


def params_changed(now: Mapping[str, Any], then: Mapping[str, Any], study: str | None) -> list[str]:
    """Dotted keys of the params that determine `study`'s runs (see
    :func:`optlab.config.determining_params`) whose parsed values differ between `now` and
    `then` (or exist in one only). Values compare as YAML data: ``1`` equals ``1.0``, ``true``
    equals neither."""
    from optlab.config import determining_params

    a = _flatten(determining_params(now, study))
    b = _flatten(determining_params(then, study))
    return sorted(k for k in a.keys() | b.keys() if _norm(a.get(k, _MISSING)) != _norm(b.get(k, _MISSING)))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _norm(v: Any) -> Any:
    """A comparable form: bools kept apart from numbers, NaN equal to NaN, containers recursive."""
    if v is _MISSING:
        return ("<missing>",)
    if isinstance(v, bool):
        return ("bool", v)
    if isinstance(v, float) and math.isnan(v):
        return ("nan",)
    if isinstance(v, (list, tuple)):
        return ("list", tuple(_norm(x) for x in v))
    if isinstance(v, Mapping):
        return ("map", tuple(sorted((str(k), _norm(x)) for k, x in v.items())))
    return v
