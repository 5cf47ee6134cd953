"""The cpu profile (#9 item 6): a third scale whose pipeline, profiles/cpu/dvc.yaml, runs the same
params files with `--set` overrides into its own paths, and never runs under `make repro`."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from optlab import config, paramfiles, pipeline, repro
from optlab.analysis.report import replace_marked
from optlab.data.lq import make_lq
from optlab.tasks.classification import ClassificationTask
from tests.conftest import make_splits

ROOT = Path(__file__).resolve().parents[1]
CPU_DVC = ROOT / "profiles" / "cpu" / "dvc.yaml"


def _cpu_params() -> dict:
    return config.apply_overrides(paramfiles.read(ROOT / "params.yaml"), [("scale", "cpu")])


def test_steps_per_epoch_caps_a_classification_epoch_at_its_permutations_first_batches():
    data = make_splits(n_train=1000)
    full = ClassificationTask(data, SimpleNamespace(batch_size=64, steps_per_epoch=0), torch.device("cpu"))
    capped = ClassificationTask(data, SimpleNamespace(batch_size=64, steps_per_epoch=3), torch.device("cpu"))
    assert full.steps_per_epoch == 16 and capped.steps_per_epoch == 3
    a = full.epoch_batches(torch.Generator().manual_seed(5))
    b = capped.epoch_batches(torch.Generator().manual_seed(5))
    assert len(b) == 3 and all(torch.equal(x, y) for x, y in zip(a[:3], b))
    # the next epoch draws a fresh permutation, not the rest of this one
    gen = torch.Generator().manual_seed(5)
    first, second = capped.epoch_batches(gen), capped.epoch_batches(gen)
    assert not torch.equal(torch.cat(first), torch.cat(second))
    over = ClassificationTask(data, SimpleNamespace(batch_size=64, steps_per_epoch=99), torch.device("cpu"))
    assert over.steps_per_epoch == 16  # never more than one pass


def test_the_cpu_profile_runs_only_its_listed_studies_at_their_cpu_sections():
    params = _cpu_params()
    assert config.profile(params)["studies"] == ["mlp_depth", "credit_mlp"]
    spec = config.resolve_study(params, "mlp_depth")
    assert spec.skip is None and spec.datasets == ("mnist", "fashion_mnist")
    assert spec.grid == {"depth": [8, 32, 100, 300]} and spec.fixed["width"] == 128
    run = config.study_run(params, spec, "sgd_sn", dataset="mnist", point={"depth": 300}, lr=0.01, seed=0, run_id="x")
    assert (run.depth, run.width, run.steps_per_epoch, run.dataset) == (300, 128, 100, "mnist")
    other = config.resolve_study(params, "resnet")
    assert other.skip is not None and "profiles.cpu.studies" in other.skip
    quick = config.resolve_study(paramfiles.read(ROOT / "params.yaml"), "resnet")
    assert quick.skip is None  # the quick profile lists no studies: it runs them all


def test_a_profile_naming_an_undefined_study_is_one_clear_error():
    params = _cpu_params()
    params["profiles"]["cpu"]["studies"] = ["mlp_dept"]
    with pytest.raises(config.ConfigError, match=r"profiles.cpu.studies: unknown value 'mlp_dept'.*allowed: .*mlp_depth"):
        config.validate_params(params)


def test_set_overrides_reach_every_params_reader_and_bad_ones_are_one_line(tmp_path, capsys):
    cfg_dir, out = tmp_path / "config", tmp_path / "validated.txt"
    try:
        rc = pipeline.main(["--params", str(ROOT / "params.yaml"), "validate", "--set", "scale=cpu",
                            "--set=data.prepared_dir=data/cpu", "--out", str(out), "--config-dir", str(cfg_dir)])
        assert rc == 0
        doc = json.loads((cfg_dir / "mlp_depth" / "sgd_sn.json").read_text())
        assert {r["dataset"] for r in doc["runs"]} == {"mnist", "fashion_mnist"}
        assert {r["prepared_dir"] for r in doc["runs"]} == {"data/cpu"}
        assert "cpu" in doc["study"] and "quick" not in doc["study"]
        skipped = json.loads((cfg_dir / "resnet" / "sgd.json").read_text())
        assert skipped["runs"] == []
        capsys.readouterr()
        assert pipeline.main(["validate", "--set", "scale=huge", "--out", str(out), "--config-dir", str(cfg_dir)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == "optlab: error: scale: unknown value 'huge'; allowed: quick, cpu, full"
        assert pipeline.main(["validate", "--set", "scale"]) == 2
        assert "expected KEY=VALUE" in capsys.readouterr().err
    finally:
        config.PARAM_OVERRIDES.clear()
    assert config.load_params(ROOT / "params.yaml")["scale"] == "quick"  # nothing leaks past the command


def test_apply_overrides_sets_dotted_keys_without_touching_the_original():
    params = {"data": {"mirror": None}, "scale": "quick"}
    out = config.apply_overrides(params, [("data.prepared_dir", "data/cpu"), ("tracking.experiment", "x"), ("scale", "cpu")])
    assert out == {"data": {"mirror": None, "prepared_dir": "data/cpu"}, "tracking": {"experiment": "x"}, "scale": "cpu"}
    assert params == {"data": {"mirror": None}, "scale": "quick"}
    with pytest.raises(config.ConfigError, match="scale is not a mapping"):
        config.apply_overrides(params, [("scale.x", 1)])


def test_the_cpu_pipeline_has_its_own_paths_and_the_studys_methods():
    doc = yaml.safe_load(CPU_DVC.read_text())
    sets = doc["vars"][1]["sets"]
    assert "--set scale=cpu" in sets and "--set data.prepared_dir=data/cpu" in sets
    studies = yaml.safe_load((ROOT / "studies.yaml").read_text())
    assert doc["vars"][0] == "../../studies.yaml"
    for study in studies["profiles"]["cpu"]["studies"]:  # a stage per study the profile runs
        assert doc["stages"][study]["matrix"]["method"] == f"${{studies.{study}.methods}}"
    for name, st in doc["stages"].items():
        assert st["wdir"] == "../..", name
        if name in ("validate", "prepare", "mlp_depth", "credit_mlp", "track"):
            assert "${sets}" in st["cmd"], name
    root_outs = set()
    for st in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values():
        for o in st.get("outs", []) + st.get("metrics", []) + st.get("plots", []):
            root_outs.add(next(iter(o)) if isinstance(o, dict) else o)
    cpu_outs = [next(iter(o)) if isinstance(o, dict) else o for st in doc["stages"].values() for o in st.get("outs", [])]
    for c in cpu_outs:  # no out inside another's: DVC refuses overlapping outputs across dvc.yaml files
        for r in root_outs:
            r0 = r.replace("${item.method}", "")
            assert not (c + "/").startswith(r0.rstrip("/") + "/") and not r0.startswith(c.rstrip("/") + "/"), (c, r)
    assert "mlp_depth" in studies["profiles"]["cpu"]["studies"]


def test_the_cpu_pipeline_runs_the_toy_lq_studies_at_their_full_published_size():
    """toy_lq_v1 / v2 are CPU-sized at full size: the cpu pipeline runs their `full` sections (8,000
    steps, the published setup) on the quick profile's lq data, each slice behind its own validated
    full-scale config, so a code or study change reruns it and nothing else."""
    doc = yaml.safe_load(CPU_DVC.read_text())
    full_sets = next(v["full_sets"] for v in doc["vars"] if isinstance(v, dict) and "full_sets" in v)
    assert "--set scale=full" in full_sets and "--set data.prepared_dir=data/prepared" in full_sets
    assert "--set tracking.experiment=optlab-cpu" in full_sets
    assert "${full_sets}" in doc["stages"]["validate_full"]["cmd"]
    assert "--config-dir runs/cpu/config_full" in doc["stages"]["validate_full"]["cmd"]
    studies = yaml.safe_load((ROOT / "studies.yaml").read_text())["studies"]
    for study in ("toy_lq_v1", "toy_lq_v2"):
        st = doc["stages"][study]
        assert st["matrix"]["method"] == f"${{studies.{study}.methods}}"
        assert "${full_sets}" in st["cmd"] and f"--study {study}" in st["cmd"]
        assert f"runs/cpu/config_full/{study}/${{item.method}}.json" in st["deps"]
        assert "data/prepared/lq.pt" in st["deps"]
        assert st["outs"] == [f"runs/cpu/sweep/{study}/${{item.method}}"]
        full = studies[study]["full"]
        assert full["seeds"] == [42, 123, 456] and full["datasets"] == ["lq"]
        # the lq training split in batches of 64 (2,048 examples: 32 steps an epoch), 250 epochs = the published 8,000 steps
        n_train = inspect.signature(make_lq).parameters["n_train"].default
        assert full["set"]["batch_size"] == 64 and full["set"]["epochs"] * n_train // 64 == 8000
        assert "8,000 steps" in studies[study]["published"]["setup"]


def test_make_repro_reads_the_root_pipelines_status_only(monkeypatch):
    seen = []

    def fake_run(cmd, **kw):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout='{"mlp_depth@sgd": []}', stderr="")

    monkeypatch.setattr(repro.subprocess, "run", fake_run)
    assert repro.stale_stages() == ["mlp_depth@sgd"]
    assert seen[0][-3:] == ["status", "--json", "dvc.yaml"]


def test_dvc_lists_the_cpu_stages_apart_from_the_root_ones():
    dvc = [sys.executable, "-m", "dvc"]
    cpu = subprocess.run([*dvc, "stage", "list", "--name-only", str(CPU_DVC.relative_to(ROOT))], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    root = subprocess.run([*dvc, "stage", "list", "--name-only", "dvc.yaml"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.split()
    methods = yaml.safe_load((ROOT / "studies.yaml").read_text())["studies"]["mlp_depth"]["methods"]
    assert {f"mlp_depth@{m}" for m in methods} <= {c.split(":")[-1] for c in cpu}
    assert not any("profiles/cpu" in r for r in root)


def test_a_second_profile_writes_between_its_own_markers_only():
    text = "a\n<!-- results:start -->\nquick\n<!-- results:end -->\nb\n<!-- results-cpu:start -->\nold\n<!-- results-cpu:end -->\n"
    new = replace_marked(text, "cpu section", marker="results-cpu")
    assert "quick" in new and "old" not in new and "cpu section" in new
    assert replace_marked(new, "q2") == new.replace("quick", "q2")
    with pytest.raises(ValueError, match="results-x:start"):
        replace_marked(text, "s", marker="results-x")
    readme = (ROOT / "README.md").read_text()
    assert readme.count("<!-- results-cpu:start -->") == 1 and readme.count("<!-- results-cpu:end -->") == 1


def test_the_quick_profiles_tables_leave_out_the_cpu_profiles_runs(tmp_path):
    """runs/cpu/ lies under runs/: the root pipeline's aggregate must not read it (it did, once
    the cpu profile had run: the quick best-LR table took in 40 cpu rows)."""
    from optlab.analysis.aggregate import load_slices, run_files

    root = tmp_path / "runs"
    for sub in ("sweep/s/m/r1", "cpu/sweep/s/m/r2"):
        (root / sub).mkdir(parents=True)
        (root / sub / "metrics.json").write_text("{}")
        (root / sub).parent.joinpath("summary.json").write_text("{}")
    (root / "validated.txt").write_text("x\n")
    (root / "cpu" / "validated.txt").write_text("x\n")
    assert run_files(root, "metrics.json") == [root / "sweep/s/m/r1/metrics.json"]
    assert run_files(root / "cpu", "metrics.json") == [root / "cpu/sweep/s/m/r2/metrics.json"]
    assert run_files(root, "summary.json") == [root / "sweep/s/m/summary.json"]
    assert len(load_slices(root)) <= 1
