"""The two params files: what `dvc exp run -S key=val` does to params.yaml, and how the files split."""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

import pytest
import yaml

from optlab import paramfiles
from optlab.config import ConfigError, load_params

ROOT = Path(__file__).resolve().parents[1]


def _copy(tmp_path: Path) -> Path:
    for name in (paramfiles.PARAMS_FILE, paramfiles.STUDIES_FILE):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path / paramfiles.PARAMS_FILE


@pytest.mark.parametrize("override, key, value", [
    ("optimizer=adam", "optimizer", "adam"),
    ("lr=0.01", "lr", 0.01),
    ("seed=3", "seed", 3),
    ("sn.mode=scale", ("sn", "mode"), "scale"),
    ("frozen_commit='abc1234'", "frozen_commit", "abc1234"),
    ("dataset=mnist", "dataset", "mnist"),
])
def test_dvc_set_param_changes_exactly_the_line_it_sets(tmp_path, override, key, value):
    """DVC's own override code (what `dvc exp run -S` calls) on the committed params.yaml."""
    hydra = pytest.importorskip("dvc.utils.hydra")
    path = _copy(tmp_path)
    before = path.read_text().splitlines()
    hydra.apply_overrides(str(path), [override])
    after = path.read_text().splitlines()
    changed = [ln for ln in difflib.unified_diff(before, after, lineterm="", n=0)
               if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]
    assert len(changed) == 2, "\n".join(changed)  # one line out, one line in
    doc = yaml.safe_load("\n".join(after))
    got = doc[key[0]][key[1]] if isinstance(key, tuple) else doc[key]
    assert got == value
    # and the comment after the value survived
    old_line = next(ln[1:] for ln in changed if ln.startswith("-"))
    new_line = next(ln[1:] for ln in changed if ln.startswith("+"))
    if "#" in old_line:
        assert old_line[old_line.index("#"):] == new_line[new_line.index("#"):]


def test_the_committed_files_split_by_section():
    user = yaml.safe_load((ROOT / "params.yaml").read_text())
    studies = yaml.safe_load((ROOT / "studies.yaml").read_text())
    assert set(studies) == set(paramfiles.STUDY_SECTIONS)
    assert not set(user) & set(paramfiles.STUDY_SECTIONS)
    merged = paramfiles.read(ROOT / "params.yaml")
    assert merged == {**user, **studies}
    assert paramfiles.split(merged) == (user, studies)


def test_a_study_section_in_params_yaml_is_refused_naming_the_file(tmp_path):
    path = _copy(tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["studies"] = {}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(paramfiles.ParamsFileError, match=r"params.yaml: `studies` belongs in studies.yaml"):
        paramfiles.read(path)
    with pytest.raises(ConfigError, match="belongs in studies.yaml"):
        load_params(str(path))


def test_an_unknown_key_in_studies_yaml_is_refused_with_the_allowed_ones(tmp_path):
    path = _copy(tmp_path)
    s = paramfiles.studies_path(path)
    s.write_text(s.read_text() + "\noptimzer: adam\n")
    with pytest.raises(paramfiles.ParamsFileError,
                       match=r"studies.yaml: unknown key `optimzer`; allowed: methods, studies, profiles, datasets"):
        paramfiles.read(path)


def test_broken_yaml_names_the_file_and_line(tmp_path):
    path = _copy(tmp_path)
    s = paramfiles.studies_path(path)
    s.write_text("methods: [\n")
    with pytest.raises(paramfiles.ParamsFileError, match=r"studies.yaml: not valid YAML at line \d+"):
        paramfiles.read(path)


def test_write_then_read_round_trips(tmp_path):
    merged = paramfiles.read(ROOT / "params.yaml")
    out = paramfiles.write(merged, tmp_path / "params.yaml")
    assert paramfiles.read(out) == merged
    assert (tmp_path / "studies.yaml").is_file()


def test_an_old_commit_with_everything_in_params_yaml_still_reads():
    merged = paramfiles.read(ROOT / "params.yaml")
    files = {"params.yaml": yaml.safe_dump(merged)}
    assert paramfiles.read_with(files.get) == merged
    files = dict(zip(("params.yaml", "studies.yaml"),
                     (yaml.safe_dump(part) for part in paramfiles.split(merged))))
    assert paramfiles.read_with(files.get) == merged
    assert paramfiles.read_with({}.get) is None
    assert paramfiles.read_with({"params.yaml": "a: [\n"}.get) is None


def test_make_exps_keeps_the_headline_columns_only():
    """`make exps`: DVC's experiments table with the headline params and metrics, not ~165 hash columns."""
    import re
    import subprocess
    import sys

    pytest.importorskip("dvc")
    if not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout")
    line = next(ln for ln in (ROOT / "Makefile").read_text().splitlines() if ln.startswith("EXP_COLUMNS"))
    keep = line.split(":=", 1)[1].strip().replace("$$", "$")
    dvc = Path(sys.executable).with_name("dvc")
    full = subprocess.run([str(dvc), "exp", "show", "--csv", "--hide-queued"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout.splitlines()[0].split(",")
    kept = subprocess.run([str(dvc), "exp", "show", "--csv", "--drop", ".*", "--keep", keep], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout.splitlines()[0].split(",")
    assert len(full) > 100  # what plain `dvc exp show` lists
    assert {"Experiment", "test_acc", "val_acc", "optimizer", "lr", "seed", "depth"} <= set(kept)
    assert len(kept) <= 25 and all(re.fullmatch(keep, c) for c in kept)
