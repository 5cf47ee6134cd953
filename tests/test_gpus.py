"""optlab.gpus: each process on a multi-GPU machine claims a GPU no other optlab process holds
(dvc queue workers), and claims nothing where the user or a scheduler already chose."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from optlab import gpus

HOLD = """
import sys, time
from optlab import gpus
print(gpus.claim(count=int(sys.argv[1])), flush=True)
time.sleep(30)
"""


@pytest.fixture
def locks(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTLAB_GPU_LOCK_DIR", str(tmp_path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("OPTLAB_GPU_CLAIM", raising=False)
    gpus.release()
    yield tmp_path
    gpus.release()


def _holder(count: int) -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(count)], stdout=subprocess.PIPE, text=True)
    return p, int(p.stdout.readline())


def test_workers_get_distinct_gpus_and_a_dead_worker_frees_its_gpu(locks):
    a, ia = _holder(3)
    b, ib = _holder(3)
    try:
        assert {ia, ib} == {0, 1}
        assert gpus.claim(count=3) == 2
        assert gpus.claim(count=3) == 2  # once claimed, the same GPU for the process's lifetime
        gpus.release()
        a.kill()
        a.wait()
        time.sleep(0.1)
        assert gpus.claim(count=3) == ia  # the kernel dropped the killed worker's lock
    finally:
        for p in (a, b):
            p.kill()
            p.wait()


def test_more_workers_than_gpus_share_and_say_so(locks, capsys):
    a, _ = _holder(2)
    b, _ = _holder(2)
    try:
        i = gpus.claim(count=2)
        assert i in (0, 1)
        assert "all 2 GPUs are claimed" in capsys.readouterr().err
    finally:
        for p in (a, b):
            p.kill()
            p.wait()


@pytest.mark.parametrize("env", [{"CUDA_VISIBLE_DEVICES": "1"}, {"OPTLAB_GPU_CLAIM": "0"}])
def test_nothing_is_claimed_where_the_choice_is_made_elsewhere(locks, monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert gpus.claim(count=4) is None
    assert not list(locks.iterdir())


def test_one_gpu_claims_nothing(locks):
    assert gpus.claim(count=1) is None
