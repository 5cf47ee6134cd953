"""The results section: generated text, tables and figure links, from reports/tables only.

``write_report`` writes ``results.md`` and, when given a README, replaces the text between
``<!-- results:start -->`` and ``<!-- results:end -->`` with the same section (links made
relative to the README's directory). Every number in the section is read from the tables that
``aggregate`` wrote; nothing is recomputed from runs here.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from .aggregate import FAILURE_KINDS, TARGET_RATIO, format_value, markdown_table, parse_point, read_table

START = "<!-- results:start -->"
END = "<!-- results:end -->"
HEADING = "Vanilla SGD + Spectral Norm: back to basics"
METHOD, REFERENCE = "sgd_sn", "adam"

QUESTION = (
    "Can vanilla SGD with strict spectral normalization after every step (`sgd_sn`: plain SGD, then every "
    "weight matrix projected to σ_max ≤ 1) reach at least 95% of Adam's test accuracy while winning on wall "
    "time, memory or depth tolerance?"
)

FIGURE_CAPTIONS = {
    "accuracy_vs_depth.png": "Test accuracy at the selected LR vs depth",
    "grad_ratio_vs_depth.png": "First-layer / last-layer gradient norm at the end of training vs depth",
    "grad_norm_vs_layer.png": "Per-layer gradient norm at the deepest trained grid point",
    "sigma_max.png": "Largest singular value of the weights during training",
    "ablation.png": "Ablation: test accuracy per variant (dots: seeds)",
    "headline_curves.png": "Headline run",
    "memory_vs_context.png": "Memory and throughput vs context length",
}
LOSS_PREFIX = "loss_curves_"

MEM_WORDS = {"peak": "peak CUDA memory", "step": "peak training-step memory", "state": "training-state memory"}

TABLES = ("runs", "best_lr", "verdict", "depth_to_failure", "ablation", "divergence", "context")

VERDICT_VIEW = ["task", "sgd_sn_lr", "adam_lr", "sgd_sn_test_acc", "adam_test_acc", "ratio_of_means", "ratio_median",
                "ratio_q25", "ratio_q75", "n_pairs", "meets_95pct", "advantages", "answer"]
COST_VIEW = ["task", "sgd_sn_wall_time_s", "adam_wall_time_s", "sgd_sn_seconds_per_epoch", "adam_seconds_per_epoch",
             "mem_basis", "sgd_sn_mem_mb", "adam_mem_mb", "sgd_sn_deepest", "adam_deepest", "sgd_sn_epochs_to_90",
             "adam_epochs_to_90", "sgd_sn_test_bpb", "adam_test_bpb", "sgd_sn_sn_active_frac", "sgd_sn_failures",
             "adam_failures"]
DTF_VIEW = ["study", "dataset", "optimizer", "axis", "points_tried", "deepest_trained", "first_failing", "failure_kinds",
            "skipped", "selected_lrs"]
ABLATION_VIEW = ["variant", "arch", "depth", "optimizer", "reparam", "sn_mode", "sn_sigma", "sn_power_iters", "sn_conv",
                 "batch_norm", "residual", "lr", "n_seeds", "n_diverged", "test_acc (mean ± std)", "val_acc_mean",
                 "wall_time_s_mean", "sigma_max_max_mean", "sn_active_frac_mean", "sn_violations_total", "frozen"]
BEST_VIEW = ["dataset", "optimizer", "point", "lr", "n_seeds", "n_completed", "n_diverged", "failures", "val_acc_mean",
             "val_loss_mean", "test_acc_mean", "test_acc_std", "test_bpb_mean", "test_ppl_mean", "wall_time_s_mean",
             "seconds_per_epoch_mean", "epochs_to_90_mean", "n_reached_90", "peak_mem_mb_mean", "step_mem_mb_mean",
             "state_mem_mb_mean", "frozen"]


def write_report(
    tables_dir: Path | str,
    figures_dir: Path | str,
    out_md: Path | str,
    readme: Path | str | None = None,
    *,
    heading: str = HEADING,
) -> str:
    """Write ``out_md`` (and the README's marked section); return the text written to ``out_md``.

    Raises ``FileNotFoundError`` if a table is missing and ``ValueError`` if the README lacks
    exactly one start marker followed by exactly one end marker (the README is then untouched).
    """
    tables_dir, figures_dir, out_md = Path(tables_dir), Path(figures_dir), Path(out_md)
    tables = _read_tables(tables_dir)
    new_readme = None
    if readme is not None:
        readme = Path(readme)
        section = _section(tables, tables_dir, figures_dir, readme.parent, heading)
        new_readme = replace_marked(readme.read_text(), section, source=str(readme))
    text = _section(tables, tables_dir, figures_dir, out_md.parent, heading)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(text)
    if readme is not None and new_readme is not None and new_readme != readme.read_text():
        readme.write_text(new_readme)
    return text


def replace_marked(text: str, section: str, source: str = "README") -> str:
    """``text`` with the part between the results markers replaced by ``section`` (markers kept)."""
    n_start, n_end = text.count(START), text.count(END)
    if n_start != 1 or n_end != 1:
        raise ValueError(
            f"{source}: expected exactly one {START!r} and one {END!r} marker "
            f"(found {n_start} and {n_end}); add them around the place for the results section"
        )
    i, j = text.index(START) + len(START), text.index(END)
    if j < i:
        raise ValueError(f"{source}: {END!r} comes before {START!r}")
    return text[:i] + "\n" + section.strip("\n") + "\n" + text[j:]


# ---------------------------------------------------------------- building the section


def _read_tables(tables_dir: Path) -> dict[str, pd.DataFrame]:
    out = {}
    for name in TABLES:
        path = tables_dir / f"{name}.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run the aggregate stage first")
        out[name] = read_table(path)
    return out


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def _section(t: dict[str, pd.DataFrame], tables_dir: Path, figures_dir: Path, base: Path, heading: str) -> str:
    runs = t["runs"]
    lines = [
        f"## {heading}",
        "",
        "<!-- generated by optlab.analysis.report from the tables in "
        f"{_rel(tables_dir, base)}/; do not edit by hand -->",
        "",
        f"**The question.** {QUESTION}",
        "",
        "### The answer, task by task",
        "",
        "A task is one grid point of a study on one dataset; each optimizer runs at its own learning rate, "
        "selected on the validation split. Each line says what the verdict table says.",
        "",
    ]
    lines += _answers(t["verdict"]) + [""]
    lines += ["### Verdict per task", "", _verdict_note(), "", markdown_table(_verdict_view(t["verdict"], VERDICT_VIEW)), "",
              "Costs and the other advantage metrics at the selected LR (times: medians over completed seeds; the "
              "rest: means):", "",
              markdown_table(_verdict_view(t["verdict"], COST_VIEW)), ""]
    lines += ["### Depth to failure", "", _dtf_note(), ""]
    lines += _deepest_lines(t["depth_to_failure"]) + [""]
    lines += [markdown_table(_cols(t["depth_to_failure"], DTF_VIEW)), ""]
    lines += ["### Ablation", "", _ablation_note(), "", markdown_table(_ablation_view(t["ablation"])), ""]
    if not t["context"].empty:
        lines += ["### Memory and throughput vs context length", "", _context_note(t["context"]), "",
                  markdown_table(_cols(t["context"], CONTEXT_VIEW)), ""]
    lines += ["### Selected learning rate per optimizer and grid point", "", _best_note(), ""]
    lines += _best_tables(t["best_lr"])
    lines += ["### Runs that did not complete", "", markdown_table(_divergence_summary(t["divergence"])), ""]
    figs = _figures(figures_dir)
    if figs:
        lines += ["### Figures", ""]
        for name, caption in figs:
            lines += [f"![{caption}]({_rel(figures_dir / name, base)})", ""]
    lines += ["### Seeds, scale and provenance", ""]
    lines += _scope(runs) + [_frozen_line(runs), ""]
    lines += ["### Measurement caveats", ""]
    lines += _caveats(t) + [""]
    lines += [f"Full tables: {_table_links(tables_dir, base)}.", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


# ---------------------------------------------------------------- helpers


def _cols(df: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    keep = [c for c in cols if c in df.columns]
    for c in ("dataset", "study", "axis"):
        if c in keep and df[c].nunique(dropna=False) <= 1 and len(df):
            keep.remove(c)
    return df[keep]


def _values(s: pd.Series) -> list[Any]:
    return sorted(s.dropna().unique().tolist(), key=lambda v: (isinstance(v, str), v))


def _join(vals: list[Any]) -> str:
    return ", ".join(format_value(v) for v in vals) if vals else "n/a"


def _ordered(opts: list[str]) -> list[str]:
    first = [o for o in ("sgd", "sgd_momentum", "adam", "sgd_sn") if o in opts]
    return first + sorted(o for o in opts if o not in first)


def _pct(v: Any) -> str:
    return format_value(v, "acc")


def _num(v: Any, unit: str = "") -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isinf(v):
        return "never" if v > 0 else "-inf"
    s = format_value(v)
    return s if s == "n/a" or not unit else f"{s} {unit}"


def _point_text(point: Any) -> str:
    pt = parse_point(point)
    return ", ".join(f"{k} {v}" for k, v in pt.items())


def _point_key(point: Any) -> tuple:
    """Sort key: the point's numeric values in order (non-numbers last), then its text."""
    vals = parse_point(point).values()
    return tuple(float(v) if isinstance(v, (int, float)) else math.inf for v in vals), str(point)


def _task_name(r: pd.Series) -> str:
    name = " / ".join(str(r[k]) for k in ("study", "dataset") if k in r and pd.notna(r[k]))
    pt = _point_text(r.get("point"))
    return f"{name}, {pt}" if pt else name


def _is_lm(r: pd.Series) -> bool:
    return str(r.get("task")) == "lm"


def _true(v: Any) -> bool:
    return str(v).strip().lower() in ("true", "1", "yes")


# ---------------------------------------------------------------- the answers


def _answers(v: pd.DataFrame) -> list[str]:
    m, r = METHOD, REFERENCE
    if v.empty:
        return [f"- No task has both {m} and {r} results, so the question has no answer from these runs yet."]
    out = [_answer_line(row) for _, row in v.iterrows()]
    n = len(v)
    meets = int(v["meets_95pct"].map(_true).sum())
    yes = v[v["answer"].astype(str) == "yes"]
    summary = (f"- **Overall**: {meets} of {n} task{'s' if n != 1 else ''} reached the 95% bar; "
               f"{len(yes)} of {n} also won on wall time, memory or depth tolerance (answer yes)")
    summary += (": " + "; ".join(_task_name(row) for _, row in yes.iterrows()) + ".") if len(yes) else "."
    col = f"{m}_sn_active_frac"
    idle = v[pd.to_numeric(v[col], errors="coerce") == 0.0] if col in v else v.iloc[0:0]
    if len(idle):
        summary += (f" In {'; '.join(_task_name(row) for _, row in idle.iterrows())} the projection never acted, "
                    f"so there {m} is plain SGD and says nothing about spectral normalization.")
    return out + [summary]


METRICS = (  # advantage, words, method column, reference column, unit, comparison column
    ("wall_time", "wall time", "wall_time_s", "s", "time_lower"),
    ("seconds_per_epoch", "seconds per epoch", "seconds_per_epoch", "s", "epoch_time_lower"),
    ("memory", None, "mem_mb", "MB", "mem_lower"),
    ("depth_tolerance", "deepest trainable depth", "deepest", "", "depth_deeper"),
    ("epochs_to_90", "epochs to 90% validation accuracy", "epochs_to_90", "", "e90_fewer"),
)


def _answer_line(row: pd.Series) -> str:
    m, r = METHOD, REFERENCE
    acc = "next-token accuracy" if _is_lm(row) else "test accuracy"
    s = f"- **{_task_name(row)}**: "
    ratio = row.get("ratio_of_means")
    if pd.isna(ratio):
        why = []
        for o in (m, r):
            if pd.notna(row.get(f"{o}_n_completed")) and int(row[f"{o}_n_completed"]) == 0:
                why.append(f"{o} had no completed seed at its selected LR")
        s += f"no accuracy ratio ({'; '.join(why) or 'a mean is missing'}); below the 95% bar."
    else:
        s += (f"{m} reached {_pct(ratio)} of Adam's mean {acc} "
              f"({_pct(row[f'{m}_test_acc'])} vs {_pct(row[f'{r}_test_acc'])})")
        n = int(row["n_pairs"]) if pd.notna(row.get("n_pairs")) else 0
        if n > 0:
            s += (f"; per-seed ratio median {_pct(row['ratio_median'])}, IQR {_pct(row['ratio_q25'])}–"
                  f"{_pct(row['ratio_q75'])} over {n} paired seed{'s' if n != 1 else ''}"
                  + (" (fewer than 3)" if n < 3 else ""))
        else:
            s += "; no seed completed under both, so no per-seed ratio"
        s += ". " + ("At or above the 95% bar." if _true(row.get("meets_95pct")) else "Below the 95% bar.")
    won, lost, tied = [], [], []
    for key, words, col, unit, cmp in METRICS:
        who = str(row.get(cmp, "n/a"))
        if who not in (m, r, "tie"):
            continue
        if key == "memory":
            words = MEM_WORDS.get(str(row.get("mem_basis")), "training-state memory")
        va, vb = (_num(row.get(f"{o}_{col}"), unit) for o in (m, r))
        if key == "depth_tolerance":  # no trainable depth at all
            va, vb = (x.replace("n/a", "none") for x in (va, vb))
        text = f"{words} ({va} vs {vb})"
        (won if who == m else lost if who == r else tied).append(text)
    s += f" {m} won on: {', '.join(won)}." if won else " No advantage held."
    if lost:
        s += f" Adam won on: {', '.join(lost)}."
    if tied:
        s += f" Tied: {', '.join(tied)}."
    for o, name in ((m, m), (r, "Adam")):
        f = row.get(f"{o}_failures")
        if isinstance(f, str) and f.strip():
            kinds = [part.rsplit(" ", 1) for part in f.split(", ")]
            n_bad = sum(int(k[1]) for k in kinds if len(k) == 2 and k[1].isdigit())
            n = row.get(f"{o}_n_seeds")
            of = f" of {int(n)}" if pd.notna(n) else ""
            s += f" {name}: {n_bad}{of} selected-LR runs failed ({', '.join(k[0] for k in kinds)})."
    if _is_lm(row) and (pd.notna(row.get(f"{m}_test_bpb")) or pd.notna(row.get(f"{r}_test_bpb"))):
        s += f" Test bits per byte: {m} {_num(row.get(f'{m}_test_bpb'))} vs Adam {_num(row.get(f'{r}_test_bpb'))}."
    s += _binding_text(row.get(f"{m}_sn_active_frac"))
    s += f" Answer: **{row.get('answer', 'no')}**."
    return s


def _binding_text(frac: Any) -> str:
    """How often the projection changed the weights in the method's selected runs."""
    if frac is None or pd.isna(frac):
        return ""
    frac = float(frac)
    if frac == 0.0:
        return (f" The projection never acted in these runs (every projected layer kept σ ≤ 1), so {METHOD} "
                "trained exactly as plain SGD at the same LR.")
    return f" The projection changed the weights at {_pct(frac)} of steps."


def _verdict_view(v: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    if v.empty:
        return v
    v = v.copy()
    v["task"] = [_task_name(r) for _, r in v.iterrows()]
    keep = [c for c in cols if c in v.columns]
    # LM-only and unmeasured columns are left out when no task has them
    keep = [c for c in keep if c in ("task",) or not v[c].isna().all()]
    if "sgd_sn_failures" in keep and v[["sgd_sn_failures", "adam_failures"]].isna().all().all():
        keep = [c for c in keep if c not in ("sgd_sn_failures", "adam_failures")]
    return v[keep]


CONTEXT_VIEW = ["study", "dataset", "block_size", "optimizer", "lr", "n_seeds", "mem_basis", "mem_mb", "tokens_per_s",
                "val_bpb", "failures"]


def _context_note(c: pd.DataFrame) -> str:
    """What the context sweep measured, and the memory growth from its shortest to longest context."""
    basis = sorted(set(c["mem_basis"].dropna().astype(str)))
    words = ", ".join(MEM_WORDS.get(b, b) for b in basis) or "n/a"
    parts = []
    for opt in _ordered(_values(c["optimizer"])):
        g = c[(c["optimizer"] == opt) & c["mem_mb"].notna()].sort_values("block_size")
        if len(g) >= 2:
            lo, hi = g.iloc[0], g.iloc[-1]
            parts.append(f"{opt} {format_value(lo['mem_mb'])} → {format_value(hi['mem_mb'])} MB "
                         f"(context {format_value(lo['block_size'])} → {format_value(hi['block_size'])})")
    growth = ("; ".join(parts) + ".") if parts else ""
    return ("A cost study (`verdict: false`, so not in the accuracy verdict): each optimizer trains the same "
            f"transformer at one LR for a short budget at each context length. Memory is {words} (`mem_basis`); "
            f"tokens/s is the training loop's throughput. {growth}").rstrip()


def _verdict_note() -> str:
    return (f"Each optimizer at its own validation-selected LR. `ratio_of_means` = {METHOD} mean test accuracy / "
            f"Adam's (next-token accuracy for language models); the per-seed ratio pairs seeds that completed under "
            f"both (median and quartiles with numpy's linear interpolation). `meets_95pct`: ratio of means ≥ "
            f"{100 * TARGET_RATIO:.0f}%. `advantages` lists what {METHOD} does strictly better than Adam: "
            "`wall_time` and `seconds_per_epoch` (lower medians over completed seeds, so one seed slowed by a "
            "shared machine does not decide), `memory` (lower peak CUDA memory where both "
            "recorded it, else lower peak of a profiled training step, else lower training-state size: "
            "`mem_basis` peak / step / state), `depth_tolerance` (deeper deepest-"
            "trainable depth in the study and dataset, where Adam failed at or before that depth) and "
            "`epochs_to_90` (every completed seed reached 90% validation accuracy, in fewer epochs on average "
            "or where Adam did not). `answer` = yes when the task meets the bar and holds a wall-time, memory or "
            "depth-tolerance advantage. `never`/`inf` for epochs to 90%: some completed seed never reached 90%.")


# ---------------------------------------------------------------- depth to failure


def _dtf_note() -> str:
    return ("Along the first grid axis of each study (depth for the depth studies): a grid point trained when its "
            "selected configuration had no recorded failure (the sweep's summary.json together with the runs: "
            "`nonfinite`/`exploding` divergence, `vanishing` gradients at the first layer, `chance`-level test "
            "accuracy, `error` for a crashed run). `skipped`: points the depth-to-failure search did not run "
            "beyond the first failure.")


def _deepest_lines(d: pd.DataFrame) -> list[str]:
    if d.empty:
        return ["- No study has a grid axis with results yet."]
    out = []
    for (study, dataset, axis), g in d.groupby(["study", "dataset", "axis"], dropna=False, sort=True):
        noun = "network" if axis == "depth" else f"{axis}"
        parts = []
        for opt in _ordered(g["optimizer"].astype(str).tolist()):
            r = g[g["optimizer"] == opt].iloc[0]
            deep = format_value(r["deepest_trained"]) if pd.notna(r["deepest_trained"]) else "none"
            p = f"{opt} {deep}"
            if pd.notna(r["first_failing"]):
                p += f" (first failure at {format_value(r['first_failing'])}: {r['failure_kinds']}"
                skipped = str(r["skipped"]).strip() if pd.notna(r["skipped"]) else ""
                p += f"; skipped {skipped})" if skipped else ")"
            parts.append(p)
        tried = _values(g["points_tried"].astype(str).str.split().explode().dropna().astype(float))
        out.append(f"- Deepest trainable {noun} per optimizer, {study} / {dataset} ({axis} tried: "
                   f"{', '.join(format_value(x) for x in tried)}): " + "; ".join(parts) + ".")
    return out


# ---------------------------------------------------------------- ablation


def _ablation_note() -> str:
    return ("Each variant at a fixed LR over the ablation seeds, in params.yaml order. Means are over completed "
            "seeds; `sn_violations_total` (layers above σ = 1 + 1e-4 at a check, projected runs only) is summed "
            "over all seeds. n/a: the setting does not apply (projection settings only for sgd_sn, "
            "`sn_power_iters` only for power iteration, conv/batch-norm/residual settings only for the ResNet); "
            "columns that apply to no variant are in ablation.csv only.")


def _ablation_view(a: pd.DataFrame) -> pd.DataFrame:
    if a.empty:
        return a
    a = a.copy()
    a["test_acc (mean ± std)"] = [
        f"{_pct(mu)} ± {_pct(sd)}" if pd.notna(sd) else _pct(mu) for mu, sd in zip(a["test_acc_mean"], a["test_acc_std"])
    ]
    keep = [c for c in ABLATION_VIEW if c in a.columns]
    keep = [c for c in keep if c in ("variant", "test_acc (mean ± std)") or not a[c].isna().all()]
    return a[keep]


# ---------------------------------------------------------------- best LR


def _best_note() -> str:
    return ("LRs are selected per (optimizer, grid point) on the search seeds' mean final validation accuracy "
            "(validation loss for language models), a diverged or failed seed counting as the worst value; the "
            "selected LR is rerun with the other seeds and reported over its completed seeds. Test metrics never "
            "enter the selection. `failures` counts the selected LR's runs by failure kind.")


def _best_tables(best: pd.DataFrame) -> list[str]:
    if best.empty:
        return ["_(none)_", ""]
    best = best.copy()
    kinds = [f"n_{k}" for k in FAILURE_KINDS if f"n_{k}" in best]
    best["failures"] = [
        ", ".join(f"{k[2:]} {int(r[k])}" for k in kinds if pd.notna(r[k]) and int(r[k]) > 0) or "none"
        for _, r in best.iterrows()
    ]
    out = []
    studies = _values(best["study"]) if "study" in best else []
    for study in studies or [None]:
        g = best if study is None else best[best["study"] == study]
        keep = [c for c in BEST_VIEW if c in g.columns]
        lm = "task" in g and (g["task"] == "lm").all()
        drop = {"test_bpb_mean", "test_ppl_mean"} if not lm else {"epochs_to_90_mean", "n_reached_90"}
        keep = [c for c in keep if c not in drop and (c in ("dataset", "optimizer", "point", "lr") or not g[c].isna().all())]
        if "dataset" in keep and g["dataset"].nunique(dropna=False) <= 1:
            keep.remove("dataset")
        if study is not None:
            out += [f"#### {study}", ""]
        out += [markdown_table(g[keep]), ""]
    return out


# ---------------------------------------------------------------- divergence


def _divergence_summary(div: pd.DataFrame) -> pd.DataFrame:
    keys = ["study", "optimizer", "point", "status"]
    cols = [*keys, "n_runs", "lrs", "first_step", "median_step", "reasons"]
    if div.empty:
        return pd.DataFrame(columns=cols)
    div = div.copy()
    for k in keys:
        if k not in div:
            div[k] = math.nan
    rows = []
    for key, g in div.groupby(keys, dropna=False, sort=True):
        d = dict(zip(keys, key))
        steps = pd.to_numeric(g["diverged_step"], errors="coerce").dropna()
        reasons = g["diverge_reason"].dropna().astype(str).unique().tolist()
        if d["status"] == "failed":
            reasons = [str(e).split(":")[0] for e in g["error"].dropna().unique()]
        rows.append({
            **d, "n_runs": len(g),
            "lrs": " ".join(format_value(x) for x in sorted(g["lr"].dropna().unique())),
            "first_step": int(steps.min()) if len(steps) else math.nan,
            "median_step": float(steps.median()) if len(steps) else math.nan,
            "reasons": ", ".join(sorted(set(reasons))) or "n/a",
        })
    out = pd.DataFrame(rows, columns=cols)
    order = sorted(range(len(out)), key=lambda i: (str(out["study"][i]), str(out["optimizer"][i]),
                                                   _point_key(out["point"][i]), str(out["status"][i])))
    return _cols(out.iloc[order].reset_index(drop=True), cols)


# ---------------------------------------------------------------- figures, scope, provenance, caveats


def _figures(figures_dir: Path) -> list[tuple[str, str]]:
    out = []
    for p in sorted(figures_dir.glob(f"{LOSS_PREFIX}*.png")):
        study = p.stem[len(LOSS_PREFIX):]
        out.append((p.name, f"{study}: train and validation loss at the deepest trained grid point"))
    out += [(n, c) for n, c in FIGURE_CAPTIONS.items() if (figures_dir / n).is_file()]
    return out


def _scope(runs: pd.DataFrame) -> list[str]:
    if runs.empty or "kind" not in runs:
        return ["No runs were found.", ""]
    out = []
    sweep = runs[runs["kind"] == "sweep"]
    for study, g in (sweep.groupby("study", dropna=False, sort=True) if len(sweep) else []):
        get = lambda c: _values(g[c]) if c in g else []  # noqa: E731
        lrs = get("lr")
        lr_text = f"{format_value(lrs[0])}–{format_value(lrs[-1])} ({len(lrs)} values)" if len(lrs) > 1 else _join(lrs)
        axes = [a for a in get("axis") if isinstance(a, str)]
        grid = "; ".join(f"{a} {_join(_values(g.loc[g['axis'] == a, 'axis_value']))}" for a in axes) or "one configuration"
        search = _values(g.loc[g["role"] == "search", "seed"]) if "role" in g else []
        confirm = _values(g.loc[g["role"] == "confirm", "seed"]) if "role" in g else []
        if search:
            seeds = f"LRs searched with seed {_join(search)}, the selected LR rerun with seeds {_join(confirm) or 'none'}"
        else:
            seeds = f"seeds {_join(get('seed'))}"
        out.append(f"- {study if pd.notna(study) else 'sweep'} (scale {_join(get('scale'))}): datasets "
                   f"{_join(get('dataset'))}; {grid}; optimizers {', '.join(_ordered(get('optimizer')))}; "
                   f"learning rates {lr_text}; {seeds}; {len(g)} runs.")
    ab = runs[runs["kind"] == "ablation"]
    if len(ab):
        out.append(f"- ablation (scale {_join(_values(ab['scale']) if 'scale' in ab else [])}): "
                   f"{ab['variant'].nunique()} variants on {_join(_values(ab['dataset']))}, seeds "
                   f"{_join(_values(ab['seed']))}; {len(ab)} runs.")
    head = runs[runs["kind"] == "headline"]
    for _, r in head.iterrows():
        out.append(f"- headline run `{r['run_dir']}`: {r.get('optimizer')} on {r.get('dataset')}, status {r['status']}.")
    peak = pd.to_numeric(runs["peak_mem_mb"], errors="coerce").notna().sum() if "peak_mem_mb" in runs else 0
    out.append(f"- Device: {int(peak)} of {len(runs)} runs recorded a peak CUDA memory"
               + (" (the others ran on CPU)." if 0 < peak < len(runs) else
                  " (all ran on CPU)." if peak == 0 else " (all ran on a GPU)."))
    return out + [""]


def _frozen_line(runs: pd.DataFrame) -> str:
    n = len(runs)
    frozen = runs["frozen"].astype(str).str.lower().eq("true") if "frozen" in runs else pd.Series(False, index=runs.index)
    k = int(frozen.sum())
    phases = ", ".join(str(p) for p in _values(runs["phase"])) if "phase" in runs else "unknown"
    dirty = int(runs["git_dirty"].astype(str).str.lower().eq("true").sum()) if "git_dirty" in runs else 0
    if k == 0:
        line = (f"Provenance: none of these runs are frozen (phase={phases or 'unknown'}), so no number here comes "
                "from frozen runs.")
    elif k == n:
        commits = ", ".join(str(c)[:12] for c in _values(runs["git_commit"])) if "git_commit" in runs else "?"
        line = f"Provenance: all {n} runs are frozen (commit {commits}); every number here comes from frozen runs."
    else:
        line = (f"Provenance: {k} of {n} runs are frozen (phases {phases}); the `frozen` column of the verdict, "
                "best-LR and ablation tables marks the rows whose runs are all frozen.")
    if dirty:
        line += f" {dirty} of {n} runs were made from a work tree with uncommitted changes."
    return line


def _caveats(t: dict[str, pd.DataFrame]) -> list[str]:
    v = t["verdict"]
    out = [
        "- Memory: CUDA runs record the allocator's peak over the run (`peak_mem_mb`, data on the device "
        "included). CPU keeps no such peak, so there the engine profiles one training step (the second) and "
        "records its peak from the allocator's events: parameters, gradients, optimizer state, activations "
        "and temporaries, the resident dataset excluded (`step_mem_mb`, `mem_basis` step).",
        "- Wall time: one measurement per seed on a machine shared with the rest of the sweep, the verdict takes the "
        "median over completed seeds; it includes evaluation and the exact σ_max checks every `sn.check_every` steps that "
        "every optimizer's runs make. `seconds_per_epoch` times the training loop only.",
        "- Ratios: each optimizer is at its own selected LR; where Adam's selected runs failed (e.g. `chance`), a "
        "ratio above 100% says that Adam did not train there, not that sgd_sn trained well.",
        "- Depth tolerance compares the deepest grid point trained without a recorded failure; it counts only "
        "where the other optimizer failed at or before that depth.",
        "- Failure kinds are those recorded in each run's metrics.json (`failure`) and in the sweep's summary.json.",
        "- Epochs to 90%: the first epoch with validation accuracy ≥ 90%; `never` when a completed seed did not "
        "reach it.",
    ]
    lm = "task" in v and (v["task"] == "lm").any() if len(v) else False
    lm = lm or ("task" in t["runs"] and (t["runs"]["task"] == "lm").any())
    if lm:
        out.append("- Language models: accuracy is next-token accuracy and bits per byte (`test_bpb`) is the "
                   "compression measure; the synthetic Markov language's entropy floor is not in the run files and "
                   "is not reported.")
    return out


def _table_links(tables_dir: Path, base: Path) -> str:
    names = ("verdict.csv", "depth_to_failure.csv", "ablation.csv", "best_lr.csv", "runs.csv", "divergence.csv",
             "context.csv")
    return ", ".join(f"[{n}]({_rel(tables_dir / n, base)})" for n in names)
