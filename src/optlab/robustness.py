"""Do the verdicts survive a change of CPU kernels? (``python -m optlab.robustness``)

The same seeds and code give different floating-point results on another machine: which CPU
kernels run (AVX-512 vs AVX2, MKL/oneDNN paths) changes rounding, and a few hundred steps of SGD
amplify it. This command reruns the verdict studies of one analysis (by default the SGD + spectral
norm studies of the quick profile) under several numeric paths on this one machine, each in its
own runs tree (tracking off, nothing in ``runs/`` or MLflow touched), aggregates each with the
study's analysis, and writes a table of which verdict answers held under every path.

    python -m optlab.robustness                      # default and ATEN_CPU_CAPABILITY=avx2
    python -m optlab.robustness --paths default avx2 mkl_compat --studies mlp_depth

It is not part of ``dvc repro`` (it trains every slice once per path: minutes x paths).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

PATHS: dict[str, dict[str, str]] = {
    "default": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "mkl_compat": {"MKL_CBWR": "COMPATIBLE"},
    "onednn_avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
}
"""Named numeric paths: environment variables that select other CPU kernels (set before torch loads)."""

ANSWER_COLUMNS = ("reaches_bar", "answer")
"""Verdict-table columns compared across paths (those present are used)."""
SHOWN_COLUMNS = ("ratio_of_means", "ratio_lo", "ratio_hi")
"""Numbers shown beside the answers (the ratio and its interval), not compared."""
KEY_COLUMNS = ("study", "dataset", "point", "task")
"""What identifies a verdict task in the verdict table (those present are used)."""


def verdict_studies(params: dict[str, Any], analysis: str) -> list[str]:
    from .config import resolve_study

    return [n for n in params.get("studies") or {} if (s := resolve_study(params, n)).analysis == analysis and s.verdict]


def run_path(name: str, studies: list[str], params_path: str, out: Path) -> Path:
    """Every slice of ``studies`` under numeric path ``name`` into ``out/<name>/runs``."""
    from .config import load_params, resolve_study

    params = load_params(params_path)
    root = out / name / "runs"
    env = {**os.environ, **PATHS[name], "OPTLAB_TRACKING": "0", "OPTLAB_CHECKPOINT_DIR": str(out / name / "checkpoints")}
    for study in studies:
        for method in resolve_study(params, study).methods:
            cmd = [sys.executable, "-m", "optlab.pipeline", "--params", params_path, "sweep", "--study", study,
                   "--method", method, "--out-root", str(root / "sweep")]
            print(f"[{name}] {study}@{method}", flush=True)
            subprocess.run(cmd, env=env, check=True)
    return root


def compare(tables: dict[str, Path]) -> tuple[Any, list[str]]:
    """One row per verdict task: each path's answers and whether they agree."""
    import pandas as pd

    frames = {}
    for name, path in tables.items():
        df = pd.read_csv(path / "verdict.csv")
        frames[name] = df
    first = next(iter(frames.values()))
    cols = [c for c in ANSWER_COLUMNS if all(c in f.columns for f in frames.values())]
    keys = [k for k in KEY_COLUMNS if all(k in f.columns for f in frames.values())] or [first.columns[0]]
    out = first[keys].copy()
    out.insert(0, "verdict_task", [" / ".join(str(v) for v in row if str(v) not in ("", "nan")) for row in out.itertuples(index=False)])
    for name, df in frames.items():
        sub = df.assign(_k=[tuple(map(str, r)) for r in df[keys].itertuples(index=False)]).set_index("_k")
        k = [tuple(map(str, r)) for r in out[keys].itertuples(index=False)]
        for c in cols + [c for c in SHOWN_COLUMNS if c in df.columns]:
            out[f"{c}@{name}"] = [sub[c].get(i) for i in k]
    out["held"] = [all(len({str(out.loc[i, f"{c}@{n}"]) for n in frames}) == 1 for c in cols) for i in out.index]
    return out.drop(columns=keys), cols


def changed_runs(roots: dict[str, Path], key: str = "test_acc") -> tuple[int, int]:
    """(runs present under every path, runs whose ``key`` differs between some two paths)."""
    import json

    values: dict[str, dict[str, Any]] = {}
    for name, root in roots.items():
        for f in root.glob("sweep/*/*/*/metrics.json"):
            values.setdefault(str(f.relative_to(root)), {})[name] = json.loads(f.read_text())["final"].get(key)
    common = [v for v in values.values() if len(v) == len(roots)]
    return len(common), sum(len({str(x) for x in v.values()}) > 1 for v in common)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m optlab.robustness", description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--analysis", default="sgd_sn", help="the analysis whose verdict studies are rerun")
    ap.add_argument("--studies", nargs="*", help="default: every verdict study of --analysis")
    ap.add_argument("--paths", nargs="+", default=["default", "avx2"], choices=sorted(PATHS))
    ap.add_argument("--out", default="reports/robustness")
    ap.add_argument("--reuse", action="store_true", help="keep the runs of a path already trained under --out (compare again)")
    args = ap.parse_args(argv)
    from .analysis.aggregate import aggregate, markdown_table
    from .config import load_params
    from .numerics import machine_numerics

    params = load_params(args.params)
    studies = args.studies or verdict_studies(params, args.analysis)
    out = Path(args.out)
    tables = {}
    for name in args.paths:
        root = out / name / "runs"
        if not (args.reuse and (root / "sweep").is_dir()):
            root = run_path(name, studies, args.params, out)
        aggregate(root, out / name / "tables")
        tables[name] = out / name / "tables"
    table, cols = compare(tables)
    table.to_csv(out / "robustness.csv", index=False)
    held = int(table["held"].sum())
    n_runs, n_changed = changed_runs({n: out / n / "runs" for n in args.paths})
    m = machine_numerics("cpu")
    lines = [
        "# Verdicts under different CPU kernels", "",
        f"Machine: {m['cpu_model']} (torch CPU capability {m['cpu_capability']}, {m['threads']} threads, "
        f"MKL {m['mkl_version']}, oneDNN {m['onednn_version']}). Studies: {', '.join(studies)}. "
        f"Paths: " + "; ".join(f"{n} ({', '.join(f'{k}={v}' for k, v in PATHS[n].items()) or 'no override'})" for n in args.paths) + ".",
        "", f"Same seeds, code and configuration: {n_changed} of {n_runs} runs changed their test accuracy between the "
        f"paths. {held} of {len(table)} verdicts held under every path (compared: {', '.join(cols)}; the ratio of "
        "means and its paired bootstrap 95% interval are shown beside them).", "",
        markdown_table(table), "",
    ]
    (out / "robustness.md").write_text("\n".join(lines))
    print(f"wrote {out / 'robustness.md'}: {held}/{len(table)} verdicts held")
    return 0


if __name__ == "__main__":
    sys.exit(main())
