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
