"""The command line: ``--help`` describes every subcommand, and ``train --KEY VALUE`` overrides the
headline's top-level run keys, validated exactly like params.yaml (the same one-line errors).

Like tests/test_bad_input.py, each case runs ``pipeline.main`` in a fresh directory holding a copy
of the repository's params.yaml and a tiny prepared dataset.
"""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from optlab import paramfiles
from optlab import engine, pipeline
from tests.conftest import make_splits

ROOT = Path(__file__).resolve().parents[1]
BASE = paramfiles.read(ROOT / "params.yaml")
COMMANDS = ("prepare", "train", "sweep", "ablate", "aggregate", "plot", "report")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("prepared")
    s = make_splits(dim=64, n_classes=10)
    torch.save({"train_x": s.train_x, "train_y": s.train_y, "val_x": s.val_x, "val_y": s.val_y,
                "test_x": s.test_x, "test_y": s.test_y, "meta": s.meta}, d / "digits.pt")
    return d


def _workdir(tmp_path: Path, prepared: Path, params: dict) -> Path:
    work = tmp_path / "w"
    (work / "data" / "prepared").mkdir(parents=True)
    shutil.copy(prepared / "digits.pt", work / "data" / "prepared" / "digits.pt")
    paramfiles.write(params, work / "params.yaml")
    return work


def _snapshot(work: Path) -> set[str]:
    return {str(p.relative_to(work)) for p in work.rglob("*")}


def _run_main(work: Path, args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.chdir(work)
    monkeypatch.setenv("OPTLAB_OFFLINE", "1")
    monkeypatch.setenv("OPTLAB_TRACKING", "0")
    monkeypatch.setenv("OPTLAB_CHECKPOINT_DIR", str(work.parent / "ckpt"))
    monkeypatch.delenv("OPTLAB_DATA_MIRROR", raising=False)
    try:
        code = pipeline.main(args)
    except SystemExit as exc:  # argparse's own errors and --help
        code = exc.code
    return code, capsys.readouterr().err


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("optlab: error: "), err
    return lines[0]


# ---------------------------------------------------------------- --help


def test_help_describes_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        pipeline.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "prepare data, the headline run" in out  # the program's description
    for cmd in COMMANDS:
        line = next((ln for ln in out.splitlines() if re.match(rf"\s+{cmd}\s+\S", ln)), None)
        assert line is not None, f"{cmd} has no description in --help:\n{out}"


@pytest.mark.parametrize("cmd", COMMANDS)
def test_each_subcommand_help_has_a_description(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        pipeline.main([cmd, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    body = out.split("\n\n", 1)[1]
    assert len(body.split("\n\n", 1)[0].split()) >= 8, out  # a sentence, not just the usage line


def test_train_help_lists_the_headline_keys(capsys):
    with pytest.raises(SystemExit):
        pipeline.main(["train", "--help"])
    out = capsys.readouterr().out
    for key in ("optimizer", "lr", "arch", "dataset", "depth", "width", "epochs", "batch_size", "seed"):
        assert f"--{key} VALUE" in out, key
    assert "sgd, sgd_momentum, adam, adamw, sgd_sn" in out
    assert "--phase" not in out  # the phase policy stays in params.yaml


# ---------------------------------------------------------------- overrides: errors like params.yaml's

SAME_AS_PARAMS = [
    # (flags, the same edit typed into params.yaml)
    (["--optimizer", "adamm"], {"optimizer": "adamm"}),
    (["--lr", "-1"], {"lr": -1}),
    (["--lr", "0"], {"lr": 0}),
    (["--lr", "fast"], {"lr": "fast"}),
    (["--lr", "true"], {"lr": True}),
    (["--arch", "vgg"], {"arch": "vgg"}),
    (["--dataset", "imagenet"], {"dataset": "imagenet"}),
    (["--depth", "0"], {"depth": 0}),
    (["--depth", "2.5"], {"depth": 2.5}),
    (["--width", "-4"], {"width": -4}),
    (["--epochs", "0"], {"epochs": 0}),
    (["--batch_size", "many"], {"batch_size": "many"}),
    (["--batch-size", "0"], {"batch_size": 0}),
    (["--seed", "-1"], {"seed": -1}),
    (["--activation", "swish"], {"activation": "swish"}),
    (["--scale", "medium"], {"scale": "medium"}),
    (["--compile", "maybe"], {"compile": "maybe"}),
]


@pytest.mark.parametrize("flags,edit", SAME_AS_PARAMS, ids=[" ".join(f) for f, _ in SAME_AS_PARAMS])
def test_bad_override_is_refused_like_params(flags, edit, tmp_path, prepared, monkeypatch, capsys):
    bad = copy.deepcopy(BASE)
    bad.update(edit)
    code, err = _run_main(_workdir(tmp_path / "p", prepared, bad), ["train"], monkeypatch, capsys)
    assert code == 2
    from_params = _one_line(err)
    work = _workdir(tmp_path / "c", prepared, copy.deepcopy(BASE))
    before = _snapshot(work)
    code, err = _run_main(work, ["train", *flags], monkeypatch, capsys)
    assert code == 2
    assert _one_line(err) == from_params
    assert _snapshot(work) == before, "nothing written"


def test_misspelled_flag_is_argparses_error_naming_the_allowed_flags(tmp_path, prepared, monkeypatch, capsys):
    work = _workdir(tmp_path, prepared, copy.deepcopy(BASE))
    before = _snapshot(work)
    code, err = _run_main(work, ["train", "--optimzer", "adam"], monkeypatch, capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("python -m optlab.pipeline train: error: unrecognized arguments: --optimzer adam"), err
    assert "(did you mean --optimizer?)" in last
    allowed = last.split("allowed: ", 1)[1].split(", ")
    assert {"--optimizer", "--lr", "--arch", "--dataset", "--depth", "--width", "--epochs", "--batch_size",
            "--seed"} <= set(allowed)
    assert _snapshot(work) == before


def test_flags_are_not_abbreviated(tmp_path, prepared, monkeypatch, capsys):
    work = _workdir(tmp_path, prepared, copy.deepcopy(BASE))
    code, err = _run_main(work, ["train", "--optim", "adam"], monkeypatch, capsys)
    assert code == 2 and "unrecognized arguments: --optim adam" in err


def test_overrides_are_debug_phase_only(tmp_path, prepared, monkeypatch, capsys):
    params = copy.deepcopy(BASE)
    params["phase"] = "pilot"
    work = _workdir(tmp_path, prepared, params)
    before = _snapshot(work)
    code, err = _run_main(work, ["train", "--lr", "0.01"], monkeypatch, capsys)
    assert code == 2
    assert re.search(r"phase: 'pilot' records the committed params; command-line overrides \(--lr\)", _one_line(err))
    assert _snapshot(work) == before


def test_parse_override_reads_values_like_params_yaml():
    p = pipeline.parse_override
    assert p("0.01") == 0.01 and p("1e-2") == 0.01 and p("64") == 64 and isinstance(p("64"), int)
    assert p("true") is True and p("null") is None and p("adam") == "adam" and p("[1, 2]") == "[1, 2]"


# ---------------------------------------------------------------- overrides: a run


def test_train_with_overrides_runs_them(tmp_path, prepared, monkeypatch, capsys):
    params = copy.deepcopy(BASE)
    work = _workdir(tmp_path, prepared, params)
    text = (work / "params.yaml").read_text()
    seen = {}
    real = engine.train

    def spy(cfg, **kw):
        seen["cfg"], seen["tags"], seen["run_dir"] = cfg, kw.get("tags"), kw.get("run_dir")
        return real(cfg, **kw)

    monkeypatch.setattr(pipeline.engine, "train", spy)
    args = ["train", "--optimizer", "adam", "--lr", "1e-2", "--depth", "2", "--width", "8", "--epochs", "1",
            "--batch-size", "64", "--seed", "3", "--out-dir", "runs/adam"]
    code, err = _run_main(work, args, monkeypatch, capsys)
    assert code == 0, err
    cfg = seen["cfg"]
    assert (cfg.optimizer, cfg.lr, cfg.depth, cfg.width, cfg.epochs, cfg.batch_size, cfg.seed) == \
        ("adam", 0.01, 2, 8, 1, 64, 3)
    assert cfg.dataset == "digits"  # keys not given keep params.yaml's (profile) values
    assert seen["tags"]["cli_overrides"] == "optimizer=adam lr=0.01 depth=2 width=8 epochs=1 batch_size=64 seed=3"
    assert (work / "runs" / "adam" / "metrics.json").exists() and not (work / "runs" / "train").exists()
    assert (work / "params.yaml").read_text() == text, "params.yaml is not changed"
