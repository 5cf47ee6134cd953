"""The benchmark harness runs (at tiny sizes) and its peers do the same work as optlab's side."""

import torch

import benchmarks.__main__ as B
from optlab.optim.spectral import SpectralProjection


def test_every_main_benchmark_runs_at_tiny_size():
    dev = torch.device("cpu")
    rows = [B.bench_projection(dev, 2, 8), B.bench_clip_sv(dev, 2, 8), B.bench_mode_cost(dev, 2, 8, "clip_sv"),
            B.bench_mode_cost(dev, 2, 8, "normalize"), B.bench_sigma(dev, 2, 8), B.bench_power(dev, 2, 8),
            B.bench_train_step(dev, 2, 8, 4), B.bench_batching(dev, 64, 4, 16)]
    for r in rows:
        assert r["optlab"] > 0 and r["peer"] > 0 and r["name"] and r["peer_name"]


def test_clip_sv_peer_is_the_same_projection():
    torch.manual_seed(0)
    w = torch.nn.Parameter(2.0 * torch.randn(3, 16, 16) / 4)
    ref = w.detach().clone()
    SpectralProjection([w], mode="clip_sv", sigma="exact").project()
    for i in range(3):
        u, s, vh = torch.linalg.svd(ref[i], full_matrices=False)
        ref[i] = (u * s.clamp_max(1.0)) @ vh
    torch.testing.assert_close(w.detach(), ref, atol=1e-5, rtol=1e-5)
    assert float(torch.linalg.matrix_norm(w.detach(), ord=2).max()) <= 1 + 1e-5


def test_the_muon_benchmark_runs_at_tiny_size(tmp_path):
    import argparse

    import benchmarks.muon as BM

    dev = torch.device("cpu")
    rows = [BM.bench_muon(dev, 2, 8, 8, 1, 0)]
    assert rows[0]["diff_2d"] == 0.0 and rows[0]["ratio_2d"] > 0
    st = BM.bench_stiefel(dev, 2, 8, 4, 1, 0)
    pr = BM.bench_presets(dev, 1, 16, 8, 2, 1, 0)
    assert set(pr["tokens_per_s"]) == set(BM.PRESETS) and pr["vs_baseline_muon"]["baseline_muon"] == 1.0
    args = argparse.Namespace(quick=True, repeats=1, threads=0)
    text = BM.write(rows, st, args, dev, tmp_path, pr).read_text()
    assert "Tokens/s per preset" in text and "| modular_stiefel |" in text


# -- benchmarks.sgd_sn (issue #14 goals a, b) ------------------------------------------------------
def test_the_sgd_sn_benchmark_runs_at_quick_size_and_its_strict_variants_hold(tmp_path):
    import argparse

    import benchmarks.sgd_sn as BS

    dev = torch.device("cpu")
    row = BS.bench_depth(2, 8, 4, dev, repeats=1, warmup=1, check_steps=BS.BOUND_REFRESH + 1)
    assert set(row["ms"]) == {BS.PLAIN, BS.TORCH_SN, *BS.SN_VARIANTS}
    assert all(v > 0 for v in row["ms"].values()) and row["over_plain"][BS.PLAIN] == 1.0
    for label in BS.SN_VARIANTS:  # the strict flag comes from the real optimizer
        assert row["strict"][label] is ("power" not in label)
        st = row["strictness"][label]
        assert st["checks"] == 2 + BS.BOUND_REFRESH  # after the timed steps, then after every checked step
        if row["strict"][label]:
            assert st["violations"] == 0 and st["sigma_max"] <= 1 + BS.SN_TOL
    assert row["strictness"][BS.TORCH_SN]["checks"] >= 2 and BS.PLAIN not in row["strictness"]
    kinds = [g["target"] for g in row["goals"]]
    assert kinds.count("<= 1.5") == 4 and kinds.count("<= 1.1") == 1 and kinds.count("> 1 (faster)") == 5
    bound = next(k for k in BS.SN_VARIANTS if "bound" in k)  # the certified bound is strict, a whole period checked
    assert row["strict"][bound] and row["strictness"][bound]["violations"] == 0
    fl = BS.bench_flops(2, 8, 4, dev, repeats=1, warmup=0, sizes=(16,))
    assert fl["step_flops"] == BS.mlp_step_flops(4, BS.INPUT_DIM, 8, 2, BS.N_CLASSES) and fl["fraction_of_peak"] > 0
    args = argparse.Namespace(quick=True, depths=[2], width=8, batch=4, repeats=1, warmup=1, check_steps=11,
                              check_steps_deep=3, repeats_deep=0, min_sample_ms=30.0, threads=0)
    text = BS.write([row], [fl], args, dev, tmp_path, 1.0).read_text()
    assert "| sgd_sn clip_sv exact | yes |" in text and "Goal (b)" in text
    import json

    doc = json.loads((tmp_path / "sgd_sn_cpu.json").read_text())
    assert doc["goals"][-1]["goal"].startswith("(b)") and doc["benchmark"] == "sgd_sn"


def test_the_strictness_check_counts_a_layer_above_one():
    import benchmarks.sgd_sn as BS

    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(3, 16, 16))
    q = q * torch.tensor([1.0, 1.01, 1.0 + 0.5e-4]).view(3, 1, 1)  # sigmas 1, 1.01, inside the tolerance
    v = BS.Variant("fake", lambda: None, lambda: [q], lambda: [torch.zeros_like(q)], strict=True)
    assert v.check() == 1
    assert v.stats.violations == 1 and v.stats.violating_checks == 1 and abs(v.stats.sigma_max - 1.01) < 1e-5
    bad = torch.full((4, 4), float("nan"))
    assert BS.Variant("nan", lambda: None, lambda: [bad], lambda: [], strict=True).check() == 1  # non-finite counts
    # the certified bound sigma_prev + lr ||G||_F: below 1 only where the layer had room
    st = BS.Strictness()
    st.record(torch.tensor([0.5, 1.0], dtype=torch.float64))
    st.record(torch.tensor([0.6, 1.0], dtype=torch.float64), grad_norms=torch.tensor([1.0, 1.0], dtype=torch.float64), lr=0.1)
    assert st.gate_layer_steps == 2 and st.gate_skippable == 1 and st.to_json()["gate_skippable_frac"] == 0.5


def test_the_flop_count_matches_torchs_flop_counter():
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    import benchmarks.sgd_sn as BS
    from optlab import models

    for depth, width, batch, d_in in ((3, 8, 4, 12), (1, 5, 2, 7)):
        m = models.build("mlp", input_dim=d_in, n_classes=5, depth=depth, width=width)
        x, y = torch.randn(batch, d_in), torch.randint(0, 5, (batch,))
        with FlopCounterMode(display=False) as fc:
            F.cross_entropy(m(x), y).backward()
        assert fc.get_total_flops() == BS.mlp_step_flops(batch, d_in, width, depth, 5)


def test_the_torch_spectral_norm_peer_is_the_same_network():
    import benchmarks.sgd_sn as BS

    m = BS.build_mlp(3, 8, torch.device("cpu"))
    seq, lins = BS.torch_sn_peer(m)
    assert len(lins) == 5 and all(torch.nn.utils.parametrize.is_parametrized(lin) for lin in lins)
    x = torch.randn(4, BS.INPUT_DIM)
    seq.eval()  # orthogonal init: every sigma is 1, so W / sigma is W
    torch.testing.assert_close(seq(x), m(x), atol=1e-5, rtol=1e-5)


# -- benchmarks.storage, benchmarks.repro_time, benchmarks.report -----------------------------------
def test_the_checkpoint_benchmark_writes_through_the_engines_checkpointer(tmp_path):
    import benchmarks.storage as BST

    r = BST.bench_checkpoint(2, 8, "adam", 2, tmp_path / "ck")
    assert r["ms"] > 0 and r["mb"] > 0 and len(r["ms_all"]) == 2
    assert not any((tmp_path / "ck").rglob("*.pt"))  # cleared afterwards
    res = {"checkpoint": [r], "logging": [], "server": {"store": "mlflow server", "measured": False, "reason": "skipped"}}
    goals = BST.goals(res)
    assert goals[0]["met"] is None and goals[-1]["measured"] is None and "not measured" in goals[-1]["measured_text"]


def test_repro_time_reads_make_repro_records_and_leaves_repro_cpu_out():
    import benchmarks.repro_time as BR

    assert BR.durations("took 1,117 s, then 10m33s and 5 s") == [1117.0, 633.0, 5.0]
    recs = BR.log_records([("a" * 40, "2026-12-06", "cpu profile (make repro-cpu, 3067 s); quick outputs from the 787 s make repro"),
                           ("b" * 40, "2026-12-05", "docs only; no timing here")])
    assert [r["wall_s"] for r in recs] == [787.0] and recs[0]["source"].startswith("git commit aaaaaaa")
    rd = BR.readme_records("Time: `make repro` took 787 s here on 2 cores; `make repro REPRO_ARGS=--force` (every stage) took 1,117 s.")
    assert [(r["command"], r["wall_s"]) for r in rd] == [("make repro", 787.0), ("make repro REPRO_ARGS=--force", 1117.0)]


def test_the_collector_writes_the_goals_table_from_fake_results(tmp_path):
    import csv
    import json

    import benchmarks.report as BR

    res = tmp_path / "results"
    res.mkdir()
    (res / "sgd_sn_cpu.json").write_text(json.dumps({"benchmark": "sgd_sn", "device": "CPU Fake 9000, 2 cores", "goals": [
        {"goal": "(a) strict step / plain", "issue": "#14", "measured": 4.0, "measured_text": "4.00", "target": "<= 1.5",
         "met": False},
        {"goal": "(b) FLOP fraction", "issue": "#14", "measured": 0.6, "measured_text": "0.60", "target": ">= 0.5", "met": True}]}))
    (res / "sgd_sn_cpu.md").write_text("# SGD + SN on a fake machine\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n")
    (res / "muon_cpu.json").write_text(json.dumps({"device": "CPU Other 1", "muon": [
        {"case": "4 x 8x8", "ratio_2d": 1.2, "ratio_stack": 1.5}], "stiefel": {
        "case": "tiny", "over_train": {"exact": 0.5, "rough": 0.01}, "ortho_error": {"exact": 1e-6, "rough": 0.1}}}))
    (res / "rho_cpu.json").write_text(json.dumps({"device": "CPU Fake 9000, 2 cores", "rows": [
        {"case": "m", "optimizer": "sgd", "rho_over_plain": 1.5, "naive_over_rho": 1.4},
        {"case": "m", "optimizer": "adam", "rho_over_plain": 1.7, "naive_over_rho": 1.6}]}))
    (res / "cpu.json").write_text(json.dumps({"device": "CPU (x86_64, 2 threads)", "rows": [
        {"name": "epoch of batches, 10x2, batch 5", "ratio": 3.0}]}))
    (res / "broken.json").write_text("{not json")
    fake = {"cpu": "Fake 9000", "isa": ["avx2", "avx512f"], "cores": 2, "torch_threads": 1, "torch_cpu_capability": "AVX512",
            "torch": "x", "mkldnn": True, "mkl": True, "gpu": None, "load_avg": [1.0, 1.0, 1.0]}
    md, csv_path = BR.collect(res, tmp_path / "reports", machine=fake)
    text = md.read_text()
    assert "CPU: Fake 9000, 2 cores" in text and "avx2, avx512f" in text and "GPU: none" in text
    assert "### SGD + SN on a fake machine" in text and "unreadable" in text
    assert "**not this report's machine**" in text  # the Muon file came from another CPU
    rows = list(csv.DictReader(csv_path.open()))
    by = {r["goal"]: r for r in rows}
    assert by["(a) strict step / plain"]["met"] == "not met" and by["(b) FLOP fraction"]["met"] == "met"
    muon = [r for r in rows if r["issue"] == "#12"]
    assert [r["met"] for r in muon] == ["met", "not met"] and "exact" in muon[1]["goal"]  # rough is not accurate enough
    rho = [r for r in rows if r["issue"] == "#11"]
    assert [r["met"] for r in rho] == ["not met", "not met"] and "met in 1 of 2; worst 1.70" in rho[0]["measured"]
    assert any(r["goal"].startswith("(d) on-device batching") and r["met"] == "met" for r in rows)
    assert BR.cpu_info("model name\t: Chip X\nflags\t\t: fpu avx2 amx_tile\n") == {"cpu": "Chip X", "isa": ["avx2", "amx_tile"]}
