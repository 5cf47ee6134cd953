"""Config errors name the key and the allowed values; resolution order is as documented."""

import copy
from pathlib import Path

import pytest
import yaml

from optlab.config import ConfigError, load_params, resolve_run, resolve_study

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def params():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_repo_params_resolve(params):
    cfg = resolve_run(params)
    assert cfg.dataset == params["profiles"]["quick"]["dataset"]
    assert cfg.lr == params["default_lr"][cfg.optimizer]


def test_profile_then_top_level_then_overrides(params):
    p = copy.deepcopy(params)
    p["depth"] = 5
    assert resolve_run(p).depth == 5
    assert resolve_run(p, depth=7).depth == 7
    p["scale"] = "full"
    assert resolve_run(p).width == params["profiles"]["full"]["width"]
    assert resolve_study(p, "mlp_depth").grid["depth"] == params["profiles"]["full"]["studies"]["mlp_depth"]["grid"]["depth"]


def test_lr_null_takes_optimizer_default(params):
    p = copy.deepcopy(params)
    p["optimizer"] = "adam"
    assert resolve_run(p).lr == params["default_lr"]["adam"]


@pytest.mark.parametrize(
    "patch,match",
    [
        ({"optimizer": "adamm"}, r"optimizer: unknown value 'adamm' \(did you mean 'adam'\?\); allowed: sgd, sgd_momentum, adam, adamw, sgd_sn"),
        ({"arch": "resnet"}, r"arch: unknown value 'resnet'.*; allowed: mlp, resnet18, gpt"),
        ({"dataset": "cifar"}, r"dataset: unknown value 'cifar'.*allowed: digits, mnist, fashion_mnist"),
        ({"lr": -0.1}, r"lr: must be a finite number > 0"),
        ({"lr": 0}, r"lr: must be a finite number > 0"),
        ({"lr": "fast"}, r"lr: expected a number"),
        ({"depth": 0}, r"depth: must be an integer >= 1"),
        ({"depth": 2.5}, r"depth: expected an integer >= 1"),
        ({"optimzer": "sgd"}, r"optimzer: unknown key \(did you mean 'optimizer'\?\); allowed: "),
        ({"sn": {"mode": "clamp"}}, r"sn.mode: unknown value 'clamp'.*allowed: clip, normalize"),
        ({"sn": {"iters": 3}}, r"sn.iters: unknown key.*allowed: mode, sigma, power_iters, check_every"),
        ({"scale": "huge"}, r"scale: unknown value 'huge'; allowed: quick, full"),
        ({"phase": "final"}, r"phase: unknown value 'final'; allowed: debug, pilot, frozen"),
        ({"activation": "sigmoid"}, r"activation: unknown value 'sigmoid'; allowed: tanh, relu, gelu"),
        ({"sweep": {"optimizers": ["sgd", "rmsprop"], "studies": []}}, r"sweep.optimizers: unknown value 'rmsprop'"),
        ({"sweep": {"optimizers": ["sgd"], "studies": ["nope"]}}, r"sweep.studies: 'nope' is not defined in profiles.quick.studies"),
        ({"compile": "yes"}, r"compile: expected true or false"),
    ],
)
def test_bad_input_is_one_clear_error(params, patch, match):
    p = copy.deepcopy(params)
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(p.get(k), dict):
            p[k] = {**p[k], **v}
        else:
            p[k] = v
    with pytest.raises(ConfigError, match=match) as info:
        resolve_run(p)
    assert "\n" not in str(info.value)


def test_load_params_rejects_misspelled_key(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("optimizer: sgd\nwidht: 3\n")
    with pytest.raises(ConfigError, match=r"widht: unknown key \(did you mean 'width'\?\)"):
        load_params(f)


def test_cost_study_flag(params):
    assert resolve_study(params, "gpt_context").verdict is False
    assert resolve_study(params, "mlp_depth").verdict is True
    p = copy.deepcopy(params)
    p["profiles"]["quick"]["studies"]["gpt_context"]["verdict"] = "no"
    with pytest.raises(ConfigError, match=r"profiles\.quick\.studies\.gpt_context\.verdict: expected true or false, got 'no'"):
        resolve_study(p, "gpt_context")


def test_resnet_records_its_own_depth(params):
    cfg = resolve_run(params, arch="resnet18", dataset="digits")
    assert cfg.depth == 18
    assert resolve_run(params, arch="mlp", depth=5).depth == 5
