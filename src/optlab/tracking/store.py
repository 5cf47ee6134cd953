"""Where the tracking store lives. No mlflow import here."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from optlab.tracking.provenance import find_repo_root

DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"


def default_tracking_uri(root: Path | None = None) -> str:
    """`MLFLOW_TRACKING_URI` when set; else `sqlite:///<abs repo root>/mlflow.db`.

    The repository root is `root` if given, else `find_repo_root()` (the original repository
    even inside a `dvc exp run --temp/--queue` workspace), else the current directory."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if root is None:
        root = find_repo_root()
    base = Path.cwd() if root is None else Path(root)
    return f"sqlite:///{(base / DB_NAME).resolve().as_posix()}"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URI, or None (other schemes, in-memory)."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme != "sqlite":
        return None
    path = unquote(parsed.path)
    if not path or path in ("/", "/:memory:"):
        return None
    # sqlite:///rel.db -> "/rel.db" (relative); sqlite:////abs.db -> "//abs.db" (absolute)
    path = path[1:] if path.startswith("/") else path
    return Path(path).resolve()


def default_artifact_location(tracking_uri: str) -> str | None:
    """Absolute `file://` URI of `mlartifacts/` beside a sqlite store's database file, so runs
    from temp workspaces never write artifacts into the temporary copy. None for other stores
    (their server decides)."""
    db = sqlite_path(tracking_uri)
    if db is None:
        return None
    return (db.parent / ARTIFACTS_DIR).as_uri()
