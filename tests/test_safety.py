"""Untrusted files and exposed services: checks over the repository's own code and docs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sources() -> list[Path]:
    return sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "stages").rglob("*.py"))


def test_every_torch_load_is_weights_only():
    offenders = []
    for path in _sources():
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, offenders


def test_no_plain_pickle_loads_in_the_package():
    """Unpickling goes through torch.load(weights_only=True) or a restricted Unpickler only."""
    offenders = []
    for path in _sources():
        text = path.read_text()
        for m in re.finditer(r"pickle\.loads?\(", text):
            offenders.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
    assert not offenders, offenders


def test_documented_mlflow_servers_bind_to_loopback():
    """Every `mlflow ui` / `mlflow server` command we document or run binds to 127.0.0.1."""
    commands = []
    for name in ("Makefile", "README.md"):
        for line in (ROOT / name).read_text().splitlines():
            if re.search(r"\bmlflow\s+(ui|server)\b", line):
                commands.append((name, line.strip()))
    assert commands, "the MLflow UI command is documented"
    for name, cmd in commands:
        assert "--host 127.0.0.1" in cmd, f"{name}: {cmd}"
