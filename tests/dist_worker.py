"""Run by tests/test_distributed.py, once alone and once under torchrun: trains the configurations
given as JSON and writes, per rank, each run's result and final parameters to OUT."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optlab import engine  # noqa: E402
from optlab.config import RunConfig  # noqa: E402
from tests.conftest import make_splits  # noqa: E402


def main() -> None:
    jobs, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    rank = int(os.environ.get("RANK", "0"))
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    saved: dict[str, dict[str, torch.Tensor]] = {}
    original = engine._Loop._final

    def final(self, wall):  # keep the trained parameters of each run
        original(self, wall)
        saved[self.cfg.run_id] = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    engine._Loop._final = final
    for job in jobs:
        name, cfg_kw, poison = job["name"], job["cfg"], job.get("poison")
        data = make_splits(n_train=256, n_val=64, n_test=64, dim=12, n_classes=4, seed=0)
        if poison is not None:  # one non-finite training example: the batch that holds it diverges
            data.train_x[poison] = float("nan")
        cfg = RunConfig(run_id=name, **cfg_kw)
        if job.get("expect_error"):
            try:
                engine.train(cfg, data=data, progress=False)
            except ValueError as exc:
                (out / f"{name}-error-rank{rank}.txt").write_text(str(exc))
            continue
        res = engine.train(cfg, data=data, progress=False, run_dir=out / f"{name}-run-rank{rank}",
                           checkpoint_dir=out / "ckpt" if cfg.checkpoint_every else None)
        torch.save(saved.get(name, {}), out / f"{name}-params-rank{rank}.pt")
        (out / f"{name}-result-rank{rank}.json").write_text(json.dumps(
            {"status": res.status, "diverged_step": res.diverged_step, "diverge_reason": res.diverge_reason,
             "final": {k: v for k, v in res.final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
             "curves": [list(c) for c in res.curves if c[2] not in engine.TIMING_KEYS]}, default=str))


if __name__ == "__main__":
    main()
