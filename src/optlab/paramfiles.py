"""The two params files: ``params.yaml`` (what a user edits) and ``studies.yaml`` beside it.

``params.yaml`` holds the headline run's keys and the engine keys, the knobs ``dvc exp run -S
key=val`` is for. It is written in the form DVC's round trip of the file writes back (blank for
null, block mappings, comments in one column), so such an edit changes that key's line and
nothing else (tests/test_params_files.py applies DVC's own override code to the file).

``studies.yaml`` holds the sections that describe studies: the methods they compare
(``methods``), the studies (``studies``), the scale profiles (``profiles``: headline defaults
and the ablation) and what stage ``prepare`` builds (``datasets``). ``dvc exp run -S
studies.yaml:studies.mlp_depth.quick.seeds=[0,1]`` edits it the same way.

Every reader sees one merged mapping (:func:`read`); each section lives in exactly one file.
This module needs only PyYAML, so the analysis and the phase policy read params without
importing torch or pydantic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

PARAMS_FILE = "params.yaml"
STUDIES_FILE = "studies.yaml"
STUDY_SECTIONS = ("methods", "studies", "profiles", "datasets")


class ParamsFileError(ValueError):
    """A params file is missing, is not YAML, or holds a section that belongs in the other file."""


def studies_path(params_path: str | Path) -> Path:
    """``studies.yaml`` beside ``params_path``."""
    return Path(params_path).with_name(STUDIES_FILE)


def _parse(text: str, where: str) -> dict[str, Any]:
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise ParamsFileError(f"{where}: not valid YAML{line}: {getattr(exc, 'problem', exc)}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ParamsFileError(f"{where}: expected a mapping of keys to values, got {type(doc).__name__}")
    return doc


def merge(user: dict[str, Any], studies: dict[str, Any] | None, names: tuple[str, str] = (PARAMS_FILE, STUDIES_FILE)
          ) -> dict[str, Any]:
    """One mapping from the two files' mappings. A study section in ``params.yaml``, or any other
    key in ``studies.yaml``, is refused with a line saying which file it belongs in."""
    for key in user:
        if key in STUDY_SECTIONS:
            raise ParamsFileError(f"{names[0]}: `{key}` belongs in {names[1]} (which holds {', '.join(STUDY_SECTIONS)})")
    out = dict(user)
    for key, value in (studies or {}).items():
        if key not in STUDY_SECTIONS:
            raise ParamsFileError(f"{names[1]}: unknown key `{key}`; allowed: {', '.join(STUDY_SECTIONS)} "
                                  f"(the headline and engine keys live in {names[0]})")
        out[key] = value
    return out


def read(params_path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """``params.yaml`` and the ``studies.yaml`` beside it (if any), parsed and merged, not validated."""
    p = Path(params_path)
    if not p.is_file():
        raise ParamsFileError(f"params file not found: {p}")
    user = _parse(p.read_text(), str(p))
    s = studies_path(p)
    studies = _parse(s.read_text(), str(s)) if s.is_file() else None
    return merge(user, studies, (p.name, s.name))


def read_with(show: Callable[[str], str | None], params_file: str = PARAMS_FILE) -> dict[str, Any] | None:
    """The merged params from a reader of files by repository path (``git show <commit>:<path>``,
    say): None when ``params_file`` is missing or either file does not parse. A commit from
    before the split (every section in ``params.yaml``) reads as it was."""
    text = show(params_file)
    if text is None:
        return None
    try:
        user = _parse(text, params_file)
        s_name = str(Path(params_file).with_name(STUDIES_FILE).as_posix())
        s_text = show(s_name)
        studies = _parse(s_text, s_name) if s_text is not None else {}
    except ParamsFileError:
        return None
    out = dict(user)
    out.update(studies)
    return out


def split(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``params`` as (params.yaml's mapping, studies.yaml's mapping)."""
    user = {k: v for k, v in params.items() if k not in STUDY_SECTIONS}
    studies = {k: v for k, v in params.items() if k in STUDY_SECTIONS}
    return user, studies


def write(params: dict[str, Any], params_path: str | Path = PARAMS_FILE) -> Path:
    """Write a merged mapping back as the two files (plain YAML dumps: for tests and tools, not
    the committed, commented files). Returns the ``params.yaml`` path."""
    import yaml

    p = Path(params_path)
    user, studies = split(params)
    p.write_text(yaml.safe_dump(user, sort_keys=False))
    studies_path(p).write_text(yaml.safe_dump(studies, sort_keys=False))
    return p
