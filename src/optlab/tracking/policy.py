"""Phase policy: debug -> pilot -> frozen. No mlflow import."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from optlab.tracking.provenance import dirty_paths, find_work_tree, git_info, head_commit

PHASES = ("debug", "pilot", "frozen")
WATCHED = ("src", "stages", "params.yaml", "dvc.yaml", "pyproject.toml", "requirements.lock")
MIN_FROZEN_SEEDS = 3
_SHA_PREFIX = re.compile(r"[0-9a-fA-F]{7,40}")


class PhaseError(ValueError):
    """A run was refused by the phase policy."""


def check_phase(
    phase: str,
    *,
    frozen_commit: str | None,
    seeds_per_config: int,
    root: Path | None,
    watched: Sequence[str] = WATCHED,
) -> dict[str, Any]:
    """Enforce the phase rules and return provenance `{phase, git_commit, git_dirty, frozen}`.

    `root` is the git checkout the code runs from (default: the git top-level of cwd, which is
    the experiment's own checkout inside a `dvc exp run --temp/--queue` workspace).
    `git_dirty` refers to the watched paths (untracked files included), so it is always False
    for pilot and frozen runs. Raises PhaseError with one line naming the offending key."""
    if phase not in PHASES:
        raise PhaseError(f"phase: {phase!r} is not one of {', '.join(PHASES)}")
    work_tree = find_work_tree(root) if root is not None else find_work_tree()
    if phase == "debug":
        info = git_info(work_tree, watched)
        return {
            "phase": phase,
            "git_commit": info["git_commit"],
            "git_dirty": info["git_dirty"],
            "frozen": False,
        }

    where = root if root is not None else Path.cwd()
    if work_tree is None:
        raise PhaseError(
            f"phase: {phase!r} needs a git repository with a commit, but {where} is not in one "
            "(use phase=debug for exploratory runs)"
        )
    head = head_commit(work_tree)
    if head is None:
        raise PhaseError(
            f"phase: {phase!r} needs a commit, but the repository at {work_tree} has none"
        )
    changed = dirty_paths(work_tree, watched)
    if changed:
        names = ", ".join(sorted({p for _, p in changed}))
        raise PhaseError(
            f"phase: {phase!r} needs a clean tree for {', '.join(watched)}; uncommitted changes "
            f"in: {names}. Commit them (one commit per change, with its rationale) and rerun; "
            "`dvc exp run -S key=val` edits params.yaml and is refused in pilot/frozen for the "
            "same reason: commit the params change instead."
        )

    frozen = phase == "frozen"
    if frozen:
        if not frozen_commit:
            raise PhaseError(
                "frozen_commit: required when phase is 'frozen' (set it to the commit to freeze)"
            )
        if not _SHA_PREFIX.fullmatch(frozen_commit):
            raise PhaseError(
                f"frozen_commit: {frozen_commit!r} is not a commit sha (7 to 40 hex characters)"
            )
        if not head.lower().startswith(frozen_commit.lower()):
            raise PhaseError(
                f"frozen_commit: {frozen_commit!r} does not match HEAD {head[:12]}; "
                "check out the frozen commit or update frozen_commit"
            )
        if seeds_per_config < MIN_FROZEN_SEEDS:
            raise PhaseError(
                f"seeds_per_config: {seeds_per_config} is below {MIN_FROZEN_SEEDS}, "
                "the minimum for frozen runs"
            )
    return {"phase": phase, "git_commit": head, "git_dirty": False, "frozen": frozen}
