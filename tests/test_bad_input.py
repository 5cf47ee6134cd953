"""Bad input: one clear error naming what is wrong and what is allowed, and nothing left behind.

Each case edits a copy of the repository's params.yaml (or its files) in a fresh directory,
runs the pipeline entry point (what the DVC stages call) in-process, and checks the exit code,
that the error is one line naming the key or file, and that no output appeared.
"""

from __future__ import annotations

import copy
import gzip
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from optlab import paramfiles
from optlab import pipeline
from tests.conftest import make_splits

ROOT = Path(__file__).resolve().parents[1]
BASE = paramfiles.read(ROOT / "params.yaml")


def _set(params: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    d = params
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


CASES = [
    # (id, stage args, params edits, expected regex)
    ("unknown-optimizer", ["train"], {"optimizer": "adamw2"}, r"optimizer: unknown value 'adamw2'.*allowed: sgd, sgd_momentum, adam, adamw, sgd_sn"),
    ("unknown-arch", ["train"], {"arch": "vgg"}, r"arch: unknown value 'vgg'; allowed: mlp, resnet18, gpt, gpt_modern, vit, cnn"),
    ("unknown-dataset", ["train"], {"dataset": "imagenet"}, r"dataset: unknown value 'imagenet'.*allowed: digits, mnist, fashion_mnist"),
    ("unknown-activation", ["train"], {"activation": "swish"}, r"activation: unknown value 'swish'; allowed: tanh, relu, gelu"),
    ("unknown-init", ["train"], {"init": "xavier"}, r"init: unknown value 'xavier'; allowed: orthogonal, kaiming"),
    ("negative-lr", ["train"], {"lr": -0.1}, r"lr: must be a finite number > 0, got -0.1"),
    ("zero-lr", ["train"], {"lr": 0}, r"lr: must be a finite number > 0, got 0"),
    ("string-lr", ["train"], {"lr": "fast"}, r"lr: expected a number, got 'fast'"),
    ("bool-lr", ["train"], {"lr": True}, r"lr: expected a number, got True"),
    ("zero-depth", ["train"], {"depth": 0}, r"depth: must be an integer >= 1, got 0"),
    ("float-depth", ["train"], {"depth": 2.5}, r"depth: expected an integer, got 2.5"),
    ("negative-width", ["train"], {"width": -4}, r"width: must be an integer >= 1, got -4"),
    ("zero-epochs", ["train"], {"epochs": 0}, r"epochs: must be an integer >= 1"),
    ("string-batch", ["train"], {"batch_size": "64"}, r"batch_size: expected an integer, got '64'"),
    ("negative-seed", ["train"], {"seed": -1}, r"seed: must be an integer >= 0"),
    ("misspelled-key", ["train"], {"optimiser": "sgd"}, r"optimiser: unknown key \(did you mean 'optimizer'\?\); allowed: "),
    ("misspelled-sn-key", ["train"], {"sn.power_iter": 2}, r"sn.power_iter: unknown key \(did you mean 'power_iters'\?\)"),
    ("bad-sn-mode", ["train"], {"sn.mode": "clamp"}, r"sn.mode: unknown value 'clamp'.*allowed: clip_sv, scale, normalize"),
    ("bad-scale", ["train"], {"scale": "medium"}, r"scale: unknown value 'medium'; allowed: quick, cpu, full"),
    ("bad-phase", ["train"], {"phase": "final"}, r"phase: unknown value 'final'; allowed: debug, pilot, frozen"),
    ("bad-device", ["train"], {"device": "tpu"}, r"device: unknown value 'tpu'.*; allowed: auto, cpu, cuda"),
    ("bad-default-lr", ["train"], {"default_lr.sgd_sn": -1}, r"default_lr.sgd_sn: must be a finite number > 0"),
    ("method-unknown-optimizer", ["sweep", "--study", "mlp_depth", "--method", "sgd"], {"methods.lion": {"optimizer": "lion"}}, r"methods.lion.optimizer: unknown value 'lion'.*allowed: sgd, sgd_momentum, adam, adamw, sgd_sn"),
    ("method-misspelled-key", ["sweep", "--study", "mlp_depth", "--method", "sgd"], {"methods.sgd.optimiser": "sgd"}, r"methods.sgd.optimiser: unknown key \(did you mean 'optimizer'\?\); allowed: "),
    ("study-unknown-method", ["sweep", "--study", "mlp_depth", "--method", "sgd"], {"studies.mlp_depth.methods": ["sgd", "lion", "adam", "sgd_sn"]}, r"studies.mlp_depth.methods: unknown value 'lion'.*allowed: .*\bsgd_momentum\b"),
    ("sweep-zero-lr", ["sweep", "--study", "mlp_depth", "--method", "sgd"], {"studies.mlp_depth.quick.lrs": [0.1, 0.0]}, r"studies.mlp_depth.quick.lrs: must be a finite number > 0, got 0.0"),
    ("sweep-method-not-in-study", ["sweep", "--study", "mlp_depth", "--method", "adamw"], {"methods.adamw": {"optimizer": "adamw"}}, r"mlp_depth: method 'adamw' is not in studies.mlp_depth.methods; allowed: sgd, sgd_momentum, adam, sgd_sn"),
    ("sweep-unknown-study", ["sweep", "--study", "vit", "--method", "sgd"], {}, r"study: 'vit' is not defined in studies; defined: .*\bmlp_depth\b"),
    ("study-bad-grid-axis", ["train"], {"studies.mlp_depth.quick.grid": {"depht": [2]}}, r"studies.mlp_depth.quick.grid.depht: unknown key \(did you mean 'depth'\?\)"),
    ("study-dataset-not-prepared", ["sweep", "--study", "mlp_depth", "--method", "sgd"], {"studies.mlp_depth.quick.datasets": ["mnist"]}, r"studies.mlp_depth.quick.datasets: 'mnist' is not prepared at scale quick; add it to datasets.quick"),
    ("study-dataset-wrong-task", ["sweep", "--study", "mlp_depth", "--method", "sgd"], {"studies.mlp_depth.quick.datasets": ["markov"]}, r"studies.mlp_depth.quick.datasets: unknown value 'markov'.*allowed: digits, mnist"),
    ("study-bad-verdict-method", ["train"], {"studies.mlp_depth.verdict.method": "adamw"}, r"studies.mlp_depth.verdict.method: unknown value 'adamw'.*allowed: sgd, sgd_momentum, adam, sgd_sn"),
    ("frozen-needs-commit", ["train"], {"phase": "frozen"}, r"phase: 'frozen' needs a git repository"),
    ("not-a-mapping", ["train"], "just a string", r"params.yaml: expected a mapping"),
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A prepared digits-shaped file made from a tiny in-memory dataset (no download, no mirror)."""
    d = tmp_path_factory.mktemp("prepared")
    s = make_splits(dim=64, n_classes=10)
    torch.save({"train_x": s.train_x, "train_y": s.train_y, "val_x": s.val_x, "val_y": s.val_y,
                "test_x": s.test_x, "test_y": s.test_y, "meta": s.meta}, d / "digits.pt")
    return d


def _workdir(tmp_path: Path, prepared: Path, params) -> Path:
    work = tmp_path / "w"
    (work / "data" / "prepared").mkdir(parents=True)
    shutil.copy(prepared / "digits.pt", work / "data" / "prepared" / "digits.pt")
    if isinstance(params, str):
        (work / "params.yaml").write_text(params)
    else:
        paramfiles.write(params, work / "params.yaml")
    return work


def _snapshot(work: Path) -> set[str]:
    return {str(p.relative_to(work)) for p in work.rglob("*")}


def _run_main(work: Path, args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.chdir(work)
    monkeypatch.setenv("OPTLAB_OFFLINE", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    monkeypatch.delenv("OPTLAB_DATA_MIRROR", raising=False)
    code = pipeline.main(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_params_fail_cleanly(case, tmp_path, prepared, monkeypatch, capsys):
    _, args, edits, pattern = case
    if isinstance(edits, str):
        params = edits
    else:
        params = copy.deepcopy(BASE)
        for k, v in edits.items():
            _set(params, k, v)
    work = _workdir(tmp_path, prepared, params)
    before = _snapshot(work)
    code, err = _run_main(work, args, monkeypatch, capsys)
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("optlab: error: "), err
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert _snapshot(work) == before, "no partial outputs"


def test_missing_prepared_dataset(tmp_path, prepared, monkeypatch, capsys):
    work = _workdir(tmp_path, prepared, copy.deepcopy(BASE))
    (work / "data/prepared/digits.pt").unlink()
    before = _snapshot(work)
    code, err = _run_main(work, ["train"], monkeypatch, capsys)
    assert code == 2
    assert "prepared dataset not found: data/prepared/digits.pt" in err and "dvc repro prepare" in err
    assert _snapshot(work) == before


def test_missing_params_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert pipeline.main(["train"]) == 2
    assert "params file not found: params.yaml" in capsys.readouterr().err


def test_invalid_yaml(tmp_path, prepared, monkeypatch, capsys):
    work = _workdir(tmp_path, prepared, "optimizer: [sgd\n")
    code, err = _run_main(work, ["train"], monkeypatch, capsys)
    assert code == 2 and "not valid YAML at line" in err


def _fake_mnist(mirror: Path) -> None:
    """Raw files with the real names but wrong contents: their MD5 cannot match."""
    raw = mirror / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (raw / name).write_bytes(gzip.compress(b"not the real file"))


def test_dataset_with_wrong_checksum_is_refused(tmp_path, prepared, monkeypatch, capsys):
    params = copy.deepcopy(BASE)
    params["datasets"]["quick"] = ["mnist"]  # what stage prepare builds
    params["studies"] = {}  # the studies use digits, which is not prepared here
    params["profiles"]["quick"]["dataset"] = "mnist"
    params["profiles"]["quick"]["ablate"]["base"]["dataset"] = "mnist"
    work = _workdir(tmp_path, prepared, params)
    _fake_mnist(tmp_path / "mirror")
    params["data"]["mirror"] = str(tmp_path / "mirror")
    paramfiles.write(params, work / "params.yaml")
    before = _snapshot(work)
    with pytest.warns(UserWarning, match="MD5"):
        code, err = _run_main(work, ["prepare"], monkeypatch, capsys)
    assert code == 2
    assert "train-images-idx3-ubyte.gz" in err and "OPTLAB_DATA_MIRROR" in err
    new = _snapshot(work) - before
    assert not [p for p in new if p.endswith(".gz") or p.endswith(".pt")], new


def test_pilot_phase_refuses_dirty_tree(tmp_path, prepared, monkeypatch, capsys):
    params = copy.deepcopy(BASE)
    params["phase"] = "pilot"
    work = _workdir(tmp_path, prepared, params)
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@optlab.invalid", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@optlab.invalid"}
    for cmd in (["git", "init", "-q"], ["git", "add", "params.yaml", "studies.yaml"], ["git", "commit", "-qm", "x"]):
        subprocess.run(cmd, cwd=work, check=True, env={**env, "PATH": "/usr/bin:/bin"})
    params["lr"] = 0.05  # an uncommitted change to params
    paramfiles.write(params, work / "params.yaml")
    before = _snapshot(work)
    code, err = _run_main(work, ["train"], monkeypatch, capsys)
    assert code == 2 and "params.yaml" in err and "commit" in err, err
    assert _snapshot(work) == before
