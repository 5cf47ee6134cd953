"""A committed, reproduced copy of the project with tiny params, for tests that drive DVC."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from optlab import paramfiles

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("src", "stages", "dvc.yaml", "params.yaml", "studies.yaml", "pyproject.toml", "README.md", ".gitignore",
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


def tiny_study(methods: list[str], lrs: list[float], seeds: list[int], *, grid: dict[str, list] | None = None,
               verdict: Any = None, lr_extend: int = 0) -> dict[str, Any]:
    """A params.yaml study section: depth-2 (or ``grid``), width-8 MLPs on digits, one epoch; the LR
    search does not extend past the grid unless ``lr_extend`` says so (run counts stay fixed)."""
    study: dict[str, Any] = {"analysis": "sgd_sn", "arch": "mlp", "methods": list(methods)}
    if verdict is not None:
        study["verdict"] = verdict
    study["quick"] = {"datasets": ["digits"], "grid": grid or {"depth": [2]}, "lrs": list(lrs),
                      "lr_extend": lr_extend, "search_seeds": list(seeds[:1]), "seeds": list(seeds),
                      "set": dict(TINY)}
    return study


def study_stage(dvc: dict[str, Any], study: str, template: str) -> dict[str, Any]:
    """The dvc.yaml matrix stage of ``study``: the ``template`` study's block with the name replaced
    (what README/dvc.yaml tell a user to do for a new study)."""
    pattern = re.compile(rf"\b{re.escape(template)}\b")

    def sub(v: Any) -> Any:
        if isinstance(v, str):
            return pattern.sub(study, v)
        if isinstance(v, list):
            return [sub(x) for x in v]
        if isinstance(v, dict):
            return {sub(k): sub(x) for k, x in v.items()}
        return v

    return sub(copy.deepcopy(dvc["stages"][template]))


def set_studies(repo: Path, studies: dict[str, dict[str, Any]], *, replace: bool) -> None:
    """Write ``studies`` into the copy's params.yaml and give each its matrix stage in dvc.yaml
    (``replace``: instead of the project's studies; else added to them, after the last study)."""
    params = paramfiles.read(repo / "params.yaml")
    dvc = yaml.safe_load((repo / "dvc.yaml").read_text())
    old = list(params.get("studies") or {})
    assert old, "params.yaml has no study whose dvc.yaml block could be the template"
    template = old[0]
    for name in old:  # the premise of cloning: every study's block is the template's but for the name
        assert dvc["stages"][name] == study_stage(dvc, name, template), f"dvc.yaml: stage {name} is not {template}'s block"
    blocks = {name: study_stage(dvc, name, template) for name in studies}
    params["studies"] = dict(studies) if replace else {**(params.get("studies") or {}), **studies}
    stages: dict[str, Any] = {}
    for name, block in dvc["stages"].items():
        if name in old:
            if not replace:
                stages[name] = block
            if name == old[-1]:
                stages.update(blocks)
        else:
            stages[name] = block
    dvc["stages"] = stages
    paramfiles.write(params, repo / "params.yaml")
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))


def tiny_repo(repo: Path, *, lrs: list[float], seeds: list[int], methods: list[str],
              variants: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Copy the project into ``repo`` with one tiny study (``tiny``: the ``methods`` on depth-2,
    width-8 MLPs on digits, one epoch; its stages ``tiny@<method>`` replace the project's studies),
    a tiny headline run and ablation, commit it, ``dvc repro``, commit the result; return the
    environment."""
    repo.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        src, dst = ROOT / name, repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dst)
    params = paramfiles.read(repo / "params.yaml")
    quick = params["profiles"]["quick"]
    quick.update(depth=2, width=8, epochs=1, batch_size=256)
    quick["ablate"] = {"seeds": [0], "base": {"dataset": "digits", **TINY}, "variants": variants}
    paramfiles.write(params, repo / "params.yaml")
    set_studies(repo, {"tiny": tiny_study(methods, lrs, seeds)}, replace=True)
    env = clean_env(repo)
    sh(["git", "init", "-q", "-b", "main"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "fixture"], repo, env)
    sh(["dvc", "repro"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "baseline"], repo, env)
    return env
