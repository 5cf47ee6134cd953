"""Config errors name the key and the allowed values; resolution order is as documented."""

import copy
from pathlib import Path

import pytest
import yaml

from optlab import paramfiles
from optlab.config import ConfigError, load_params, resolve_run, resolve_study

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def params():
    return paramfiles.read(ROOT / "params.yaml")


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
    assert resolve_study(p, "mlp_depth").grid["depth"] == params["studies"]["mlp_depth"]["full"]["grid"]["depth"]


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
        ({"depth": 2.5}, r"depth: expected an integer, got 2.5"),
        ({"optimzer": "sgd"}, r"optimzer: unknown key \(did you mean 'optimizer'\?\); allowed: "),
        ({"sn": {"mode": "clamp"}}, r"sn.mode: unknown value 'clamp'.*allowed: clip_sv, scale, normalize"),
        ({"sn": {"iters": 3}}, r"sn.iters: unknown key.*allowed: mode, sigma, power_iters, refresh, conv, roles"),
        ({"scale": "huge"}, r"scale: unknown value 'huge'; allowed: quick, cpu, full"),
        ({"phase": "final"}, r"phase: unknown value 'final'; allowed: debug, pilot, frozen"),
        ({"activation": "sigmoid"}, r"activation: unknown value 'sigmoid'; allowed: tanh, relu, gelu"),
        ({"methods": {"rms": {"optimizer": "rmsprop"}}}, r"methods.rms.optimizer: unknown value 'rmsprop'"),
        ({"methods": {"x": {"optimizer": "sgd", "step_method": "backprob"}}}, r"methods.x.step_method: unknown value 'backprob' \(did you mean 'backprop'\?\)"),
        ({"methods": {"x": {"optimiser": "sgd"}}}, r"methods.x.optimiser: unknown key \(did you mean 'optimizer'\?\)"),
        ({"studies": {"s": {"methods": ["nope"], "quick": {"datasets": ["digits"], "lrs": [0.1]}}}}, r"studies.s.methods: unknown value 'nope'"),
        ({"studies": {"s": {"methods": ["sgd"], "quick": {"datasets": ["digits"], "lrs": [0.1], "seeds": "x"}}}}, r"studies.s.quick.seeds"),
        ({"probes": {"grad_norm": {"evry": 2}}}, r"probes.grad_norm.evry: unknown key \(did you mean 'every'\?\)"),
        ({"probes": {"sigma": {"every": 2}}}, r"probes: unknown value 'sigma' \(did you mean 'sigma_max'\?\)"),
        ({"step_method": "feedback_alignment"}, r"step_method: unknown value 'feedback_alignment'; allowed: backprop, "),
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
    p["studies"]["gpt_context"]["quick"]["stop_on_failure"] = "no"
    with pytest.raises(ConfigError, match=r"studies\.gpt_context\.quick\.stop_on_failure: expected true or false, got 'no'"):
        resolve_study(p, "gpt_context")


def test_resnet_records_its_own_depth(params):
    cfg = resolve_run(params, arch="resnet18", dataset="digits")
    assert cfg.depth == 18
    assert resolve_run(params, arch="mlp", depth=5).depth == 5


def test_verdict_direction_follows_its_metric(params):
    p = copy.deepcopy(params)
    assert resolve_study(p, "mlp_depth").verdict_spec["direction"] == "up"  # test_acc, the task's primary
    p["studies"]["gpt"]["verdict"] = {"method": "sgd_sn", "reference": "adam", "metric": "test_acc"}
    assert resolve_study(p, "gpt").verdict_spec["direction"] == "up"  # accuracy on an LM task: still up
    p["studies"]["gpt"]["verdict"] = {"method": "sgd_sn", "reference": "adam"}
    assert resolve_study(p, "gpt").verdict_spec == {"method": "sgd_sn", "reference": "adam", "metric": "test_loss",
                                                    "bar": 0.95, "direction": "down"}
    p["studies"]["gpt"]["verdict"] = {"method": "sgd_sn", "reference": "adam", "metric": "test_bpb"}
    assert resolve_study(p, "gpt").verdict_spec["direction"] == "down"
