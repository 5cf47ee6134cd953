"""The full profile (GPU sizes) starts and runs a few steps on CPU.

Every study resolves at scale full (its `full` section) and has its matrix stage in dvc.yaml;
the first grid point of each (study, method) slice trains for a few steps on a tiny synthetic
dataset of the right shape; the 10,000-layer MLP of width 256 runs one step.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import yaml

from optlab import paramfiles
from optlab import engine
from optlab.config import datasets_to_prepare, resolve_ablation, resolve_run, resolve_study, study_run
from optlab.data.synthetic import TokenSplits
from tests.conftest import make_splits

ROOT = Path(__file__).resolve().parents[1]
PARAMS = paramfiles.read(ROOT / "params.yaml")
FULL = {**copy.deepcopy(PARAMS), "scale": "full"}
SHAPES = {"mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32), "digits": (1, 8, 8)}


def _data(dataset: str):
    if dataset == "lq":  # issue #13's synthetic linear-quadratic toy, small
        from optlab.data import Splits
        from optlab.data.lq import make_lq

        return Splits(**make_lq(n_train=64, n_val=32, n_test=32))
    if dataset in SHAPES:
        shape = SHAPES[dataset]
        s = make_splits(n_train=64, n_val=32, n_test=32, dim=int(torch.tensor(shape).prod()), n_classes=10)
        s.meta["input_shape"] = list(shape)
        return s
    g = torch.Generator().manual_seed(0)
    toks = {k: torch.randint(0, 65, (n,), generator=g) for k, n in (("train", 20000), ("val", 9000), ("test", 9000))}
    meta = {"kind": "lm", "vocab_size": 65, "n_tokens": {k: v.numel() for k, v in toks.items()},
            "n_bytes": {k: v.numel() for k, v in toks.items()}}
    return TokenSplits(**toks, meta=meta)


DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())


def test_every_study_has_its_matrix_stage_and_full_datasets_are_prepared():
    """The equivalent of "the sweep matrix runs every study": one `<study>@<method>` stage per study."""
    assert FULL["studies"]
    for name in FULL["studies"]:
        stage = DVC["stages"].get(name)
        assert stage is not None, f"dvc.yaml has no stage for study {name}"
        assert stage["matrix"] == {"method": f"${{studies.{name}.methods}}"}
        assert stage["cmd"] == f"python stages/sweep.py --study {name} --method ${{item.method}}"
        assert f"runs/config/{name}/${{item.method}}.json" in stage["deps"] and "params" not in stage
        spec = resolve_study(FULL, name)
        assert set(spec.datasets) <= set(datasets_to_prepare(FULL)) == set(FULL["datasets"]["full"])


def test_every_full_slice_configuration_resolves():
    """Every run of every `<study>@<method>` slice at scale full is a valid RunConfig."""
    for name in FULL["studies"]:
        spec = resolve_study(FULL, name)
        for method in spec.methods:
            for dataset in spec.datasets:
                for point in spec.points():
                    cfg = study_run(FULL, spec, method, dataset=dataset, point=point, lr=spec.lrs[0], seed=0, run_id="r")
                    assert cfg.scale == "full" and cfg.method_name == method and cfg.dataset == dataset


def _cases():
    """Per study, its verdict method (sgd_sn, the costliest step), else its last method."""
    for name in FULL["studies"]:
        spec = resolve_study(FULL, name)
        method = spec.verdict_spec["method"] if spec.verdict else spec.methods[-1]
        yield name, method, spec, spec.datasets[0], spec.points()[0]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: f"{c[0]}@{c[1]}")
def test_full_study_first_point_runs_a_few_steps(case):
    name, method, spec, dataset, point = case
    if spec.arch != "mlp":
        pytest.importorskip(f"optlab.models.{'resnet' if spec.arch == 'resnet18' else 'gpt'}")
    point = dict(point)
    if spec.arch == "mlp":
        point["depth"] = min(point.get("depth", 100), 100)  # 10,000 layers are tested on their own below
    cfg = study_run(FULL, spec, method, dataset=dataset, point=point, lr=spec.lrs[0], seed=0, run_id=f"{name}@{method}")
    assert cfg.scale == "full" and cfg.study == name and cfg.method_name == method
    assert cfg.optimizer == FULL["methods"][method]["optimizer"]
    cfg = cfg.replace(max_steps=2, epochs=1, device="cpu", eval_tokens=512, batch_size=16)
    res = engine.train(cfg, data=_data(dataset), progress=False)
    assert res.status in ("completed", "diverged") and res.final["steps"] == 2


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("OPTLAB_BIG_TESTS") != "1", reason="about 1 min and 13 GB of RAM (peak RSS) on a 2-core CPU: set OPTLAB_BIG_TESTS=1")
def test_full_size_mlp_10000_layers_takes_a_step():
    """One step (plus the exact sigma check of all 10,002 layers); its measured peak fits one GPU.
    Peaks per optimizer and with checkpointing: benchmarks/results/memory_cpu_depth10000.md."""
    spec = resolve_study(FULL, "mlp_depth")
    depth = max(spec.grid["depth"])
    assert depth == 10_000
    cfg = resolve_run(FULL, **{**spec.fixed, "arch": "mlp", "optimizer": "sgd", "dataset": "mnist", "depth": depth,
                               "lr": 0.01, "seed": 0, "run_id": "deep", "max_steps": 1, "epochs": 1, "device": "cpu",
                               "batch_size": 16, "probes": {"grad_norm": {"every": 1000}, "sigma_max": {"every": 1000}}})
    res = engine.train(cfg, data=_data("mnist"), progress=False)
    assert res.final["steps"] == 1 and res.status == "completed"
    assert res.final["state_mem_mb"] > 10_000 * 256 * 256 * 4 * 2 / 2**20  # weights + grads of the stack
    assert res.final["step_mem_mb"] < 80 * 1024  # an 80 GiB GPU


def test_full_ablation_variants_resolve():
    variants = resolve_ablation(FULL)
    assert variants
    for name, var in variants.items():
        resolve_run(FULL, **var, seed=0, run_id=name)
