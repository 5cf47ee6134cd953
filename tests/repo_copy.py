"""A committed, reproduced copy of the project with tiny params, for tests that drive DVC."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("src", "stages", "dvc.yaml", "params.yaml", "pyproject.toml", "README.md", ".gitignore",
          ".dvc/config", ".dvc/.gitignore")
TINY = {"width": 8, "epochs": 1, "batch_size": 256}


def sh(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``cmd``; on failure raise with the tails of its output."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def clean_env(repo: Path) -> dict[str, str]:
    """The environment without MLflow/optlab/DVC/git settings, this interpreter first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OPTLAB_", "DVC_", "GIT_"))}
    env["PATH"] = f"{Path(sys.executable).absolute().parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(repo / "src")
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "optlab-test"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "test@optlab.invalid"
    return env


def tiny_repo(repo: Path, *, lrs: list[float], seeds: list[int], optimizers: list[str],
              variants: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Copy the project into ``repo`` with a one-study quick profile of depth-2, width-8 MLPs on
    digits (one epoch), commit it, ``dvc repro``, commit the result; return the environment."""
    repo.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        src, dst = ROOT / name, repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dst)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    quick = params["profiles"]["quick"]
    quick.update(depth=2, width=8, epochs=1, batch_size=256)
    quick["studies"] = {"tiny": {"arch": "mlp", "datasets": ["digits"], "grid": {"depth": [2]}, "lrs": lrs,
                                 "search_seeds": seeds[:1], "seeds": seeds, "set": dict(TINY)}}
    quick["ablate"] = {"seeds": [0], "base": {"dataset": "digits", **TINY}, "variants": variants}
    params["sweep"] = {"optimizers": optimizers, "studies": ["tiny"]}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = clean_env(repo)
    sh(["git", "init", "-q", "-b", "main"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "fixture"], repo, env)
    sh(["dvc", "repro"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "baseline"], repo, env)
    return env
