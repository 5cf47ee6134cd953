"""What the DVC stages do: prepare data, the headline run, one sweep slice, the reports.

Each function reads params.yaml, checks the phase policy, opens the tracking sinks and calls
the engine. The stage scripts in ``stages/`` only parse their arguments and call these, so
the same work runs without DVC (``python -m optlab.pipeline train``), e.g. on a GPU machine
that has torch but neither DVC nor MLflow: tracking is then skipped with a warning, and the
DVC outs (metrics.json, curves.csv, layers.csv) are still written.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

from . import engine
from .config import ConfigError, RunConfig, load_params, prepared_datasets, resolve_run, resolve_sweep


def _tracking_enabled() -> bool:
    return os.environ.get("OPTLAB_TRACKING", "1").lower() not in ("0", "false", "no", "off")


def _provenance(cfg: RunConfig, seeds_per_config: int, stage: str) -> tuple[dict[str, str], dict[str, Any]]:
    """Phase check (raises PhaseError before anything is written) and the run tags."""
    from .tracking.policy import check_phase
    from .tracking.policy import WATCHED
    from .tracking.provenance import dvc_stage, find_work_tree, git_info

    root = find_work_tree(Path.cwd())  # the tree being run (a DVC temp workspace is its own checkout)
    prov = check_phase(cfg.phase, frozen_commit=cfg.frozen_commit, seeds_per_config=seeds_per_config, root=root)
    # dirty means code or params changed; dvc.lock and outs change during every repro
    info = git_info(root, WATCHED) if root is not None else {"git_commit": None, "git_dirty": None, "diff": None}
    tags = {
        "phase": cfg.phase,
        "git_commit": str(info.get("git_commit") or "unknown"),
        "git_dirty": "unknown" if info.get("git_dirty") is None else str(bool(info["git_dirty"])).lower(),
        "study": cfg.study,
        "dvc_stage": dvc_stage() or stage,
        "scale": cfg.scale,
    }
    if info.get("git_dirty") and info.get("diff"):
        tags["_diff"] = info["diff"]
    return tags, prov


def _checkpoint_dir() -> Path:
    """Checkpoints live outside the DVC outs, at the (original) repository root."""
    from .tracking.provenance import find_repo_root

    root = find_repo_root() or Path.cwd()
    return Path(os.environ.get("OPTLAB_CHECKPOINT_DIR", root / ".optlab" / "checkpoints"))


def _sink(params: dict[str, Any], run_name: str, parent_run_id: str | None = None) -> list[Any]:
    if not _tracking_enabled():
        return []
    try:
        from .tracking import MlflowSink
    except ImportError as exc:  # torch-only machine
        warnings.warn(f"MLflow tracking skipped ({exc}); DVC outs are still written")
        return []
    experiment = (params.get("tracking") or {}).get("experiment", "optlab")
    return [MlflowSink(experiment=experiment, run_name=run_name, parent_run_id=parent_run_id)]


@contextlib.contextmanager
def _parent(params: dict[str, Any], name: str, tags: dict[str, str]) -> Iterator[Any]:
    """A parent MLflow run for a sweep slice, or None without tracking."""
    if not _tracking_enabled():
        yield None
        return
    try:
        from .tracking import parent_run
    except ImportError as exc:
        warnings.warn(f"MLflow tracking skipped ({exc})")
        yield None
        return
    experiment = (params.get("tracking") or {}).get("experiment", "optlab")
    with parent_run(tags.get("study", "adhoc"), experiment=experiment, tags=tags, run_name=name) as parent:
        yield parent


def prepare(params_path: str = "params.yaml", raw_dir: str = "data/raw", out_dir: str | None = None) -> list[Path]:
    """Build data/prepared/<dataset>.pt for every dataset the profile and sweep use."""
    from .data import prepare as prepare_one
    from .data import resolve_mirror

    params = load_params(params_path)
    data = params.get("data") or {}
    out = Path(out_dir or data.get("prepared_dir") or "data/prepared")
    mirror = resolve_mirror(data.get("mirror"))
    offline = os.environ.get("OPTLAB_OFFLINE", "0").lower() in ("1", "true", "yes")
    written = []
    for name in prepared_datasets(params):
        path = out / f"{name}.pt"
        prepare_one(
            name,
            Path(raw_dir),
            path,
            mirror=mirror,
            val_fraction=float(data.get("val_fraction", 0.1)),
            test_fraction=float(data.get("test_fraction", 0.2)),
            seed=0,
            download=not offline,
        )
        written.append(path)
        print(f"prepared {name} -> {path}")
    return written


def train_headline(params_path: str = "params.yaml", out_dir: str = "runs/train") -> engine.RunResult:
    """The headline run from the top-level params (stage ``train``)."""
    params = load_params(params_path)
    cfg = resolve_run(params, run_id="train")
    # the single-seed headline is exempt from the frozen seed rule and never counts as frozen
    tags, prov = _provenance(cfg, seeds_per_config=3, stage="train")
    tags["frozen"] = "false"
    result = engine.train(cfg, sinks=_sink(params, "train"), run_dir=out_dir, tags=tags, checkpoint_dir=_checkpoint_dir())
    print(_summary_line(result))
    return result


def sweep(optimizer: str, params_path: str = "params.yaml", out_root: str = "runs/sweep") -> list[engine.RunResult]:
    """One slice of the study: ``optimizer`` x datasets x depths x lrs x seeds (stage ``sweep@<optimizer>``)."""
    params = load_params(params_path)
    grid = resolve_sweep(params)
    if optimizer not in grid["optimizers"]:
        raise ConfigError(f"sweep: optimizer {optimizer!r} is not in sweep.optimizers {grid['optimizers']}")
    if not grid["lrs"]:
        raise ConfigError("sweep.lrs: empty; give a learning-rate grid in profiles.<scale>.sweep.lrs or sweep.lrs")
    combos = list(itertools.product(grid["datasets"], grid["depths"], grid["lrs"], grid["seeds"]))
    first = resolve_run(params, optimizer=optimizer, lr=grid["lrs"][0], run_id=f"sweep@{optimizer}")
    tags, prov = _provenance(first, seeds_per_config=len(grid["seeds"]), stage=f"sweep@{optimizer}")
    tags["frozen"] = str(bool(prov.get("frozen"))).lower()
    device = engine.resolve_device(first.device)
    cache = {ds: engine.load_prepared(first.prepared_dir, ds, device) for ds in grid["datasets"]}
    out = Path(out_root) / optimizer
    out.mkdir(parents=True, exist_ok=True)
    results: list[engine.RunResult] = []
    failures: list[str] = []
    bar = _outer_bar(len(combos), f"sweep@{optimizer}")
    with _parent(params, f"sweep@{optimizer}", {**tags, "seed": ",".join(map(str, grid["seeds"]))}) as parent:
        for dataset, depth, lr, seed in combos:
            run_id = f"{optimizer}-{dataset}-d{depth}-lr{lr:g}-s{seed}"
            cfg = resolve_run(params, optimizer=optimizer, dataset=dataset, depth=depth, lr=lr, seed=seed, run_id=run_id)
            try:
                res = engine.train(
                    cfg,
                    sinks=_sink(params, run_id, parent_run_id=parent),
                    run_dir=out / run_id,
                    data=cache[dataset],
                    tags=tags,
                    progress=sys.stderr.isatty(),
                    checkpoint_dir=_checkpoint_dir() / "sweep",
                )
                results.append(res)
            except Exception as exc:  # recorded as failed by the engine; the slice goes on
                failures.append(f"{run_id}: {type(exc).__name__}: {exc}")
            if bar is not None:
                bar.update(1)
                if results:
                    bar.set_postfix_str(_summary_line(results[-1]))
    if bar is not None:
        bar.close()
    for r in results:
        print(_summary_line(r))
    if failures:
        raise RuntimeError("failed runs (bugs, see metrics.json): " + "; ".join(failures))
    return results


def _outer_bar(total: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, dynamic_ncols=True)


def _summary_line(r: engine.RunResult) -> str:
    f = r.final
    if r.status == "diverged":
        return f"{r.run_id}: diverged at step {r.diverged_step} ({r.diverge_reason})"
    if r.status == "failed":
        return f"{r.run_id}: failed ({r.error})"
    return (
        f"{r.run_id}: val_acc {f.get('val_acc', float('nan')):.4f} test_acc {f.get('test_acc', float('nan')):.4f} "
        f"in {f.get('wall_time_s', float('nan')):.1f}s"
    )


def aggregate(runs_root: str = "runs", out_dir: str = "reports/tables") -> None:
    from .analysis.aggregate import aggregate as agg

    agg(Path(runs_root), Path(out_dir))


def plot(runs_root: str = "runs", out_dir: str = "reports/figures") -> None:
    from .analysis.plots import plot_all

    plot_all(Path(runs_root), Path(out_dir))


def report(
    tables: str = "reports/tables", figures: str = "reports/figures", out_md: str = "reports/results.md", readme: str = "README.md"
) -> None:
    from .analysis.report import write_report

    write_report(Path(tables), Path(figures), Path(out_md), Path(readme) if readme else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m optlab.pipeline", description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare")
    sub.add_parser("train")
    sp = sub.add_parser("sweep")
    sp.add_argument("--optimizer", required=True)
    sub.add_parser("aggregate")
    sub.add_parser("plot")
    sub.add_parser("report")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "prepare":
            prepare(args.params)
        elif args.cmd == "train":
            train_headline(args.params)
        elif args.cmd == "sweep":
            sweep(args.optimizer, args.params)
        elif args.cmd == "aggregate":
            aggregate()
        elif args.cmd == "plot":
            plot()
        elif args.cmd == "report":
            report()
    except ValueError as exc:  # ConfigError, PhaseError, ChecksumError: one clear line
        print(f"optlab: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"optlab: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
