"""The README section "Step-length control from the softmax convergence radius (rho)", from the
study's tables only (every number in it is a cell of ``<study>.csv`` / ``<study>_seeds.csv``, the
core's verdict, divergence and runs tables)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ... import report as R
from ...aggregate import format_value, markdown_table
from .figures import figure_names
from .tables import (METHOD_ORDER, R_TARGET_DEFAULT, SINGLE_SEED, WORDS, seeds_view, single_view, status_word,
                     table_names, text)

HEADING = "Step-length control from the softmax convergence radius (rho)"
R_TOL = 1e-5
"""Relative tolerance of "r stayed at or below r_target" (the controller's float32 arithmetic)."""


def section(rd: R.ReportData, single_seed: int = SINGLE_SEED) -> str:
    lines = [f"## {rd.title}", "", rd.comment(), "", intro(), ""]
    refs_name = f"{rd.name}_references"
    refs = rd.table(refs_name) if refs_name in rd.table_names else pd.DataFrame(columns=["study", "skipped", "label", "value"])
    studies = [s for s in rd.studies if table_names(s)[0] in rd.table_names]
    if not studies:
        lines += ["No rho study has runs yet.", ""]
    for study in studies:
        single_name, seeds_name = table_names(study)
        single, multi = rd.table(single_name), rd.table(seeds_name)
        seed = int(single["seed"].dropna().iloc[0]) if len(single) and single["seed"].notna().any() else single_seed
        lines += study_lines(rd, study, single, multi, seed)
        lines += reference_lines(refs, study)
    for study in sorted(set(refs.loc[refs["skipped"].fillna("").astype(str) != "", "study"])) if len(refs) else []:
        if study in studies:
            continue
        reason = text(refs.loc[refs["study"] == study, "skipped"].iloc[0])
        lines += [f"### {study}", "", f"Not run at this scale: {reason}. Its configuration is in studies.yaml "
                  f"(`studies.{study}`); `scale: full` runs it.", ""]
        lines += reference_lines(refs, study)
    v = rd.table(f"{rd.name}_verdict") if f"{rd.name}_verdict" in rd.table_names else pd.DataFrame()
    if len(v):
        lines += ["### At the validation-selected LR", "",
                  "The study's paired verdict (the core's): each method at the LR with the best mean final "
                  "validation accuracy over all its seeds (a diverged seed counts as 0), compared on the seeds both "
                  "completed.", ""]
        lines += [f"- **{R.task_name(r)}**: {R.interval_sentence(r)}" for _, r in v.iterrows()] + [""]
    lines += ["### Runs that did not complete", "",
              "Diverged runs are results: they are rows of the tables above, never dropped.", "",
              markdown_table(R.divergence_summary(rd.divergence)), ""]
    lines += ["### Seeds, scale and provenance", "", *R.scope(rd.runs, METHOD_ORDER), R.frozen_line(rd.runs), ""]
    names = [f"{t}.csv" for t in rd.table_names] + ["runs.csv", "divergence.csv"]
    lines += [f"Full tables: {rd.table_links(names)}.", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def reference_lines(refs: pd.DataFrame, study: str) -> list[str]:
    """The study's labeled published reference (``studies.<s>.published``), printed as given."""
    g = refs[(refs["study"] == study) & (refs["label"].fillna("").astype(str) != "")] if len(refs) else refs
    if g.empty:
        return []
    cells = "; ".join(f"{text(r['label'])}: {text(r['value'])}" for _, r in g.iterrows())
    return [f"**Published reference** (as given by the seed, not an optlab run): {cells}.", ""]


def intro() -> str:
    return ("**The question** (issue #11, item 2). Along the unit direction of the step the optimizer is about to "
            "take, the linearized logits move as z_k + a_k t; the cross-entropy's Taylor series in t converges at "
            "least out to rho = π / Δa (Δa the largest per-sample spread of a_k), and a step of length τ has "
            "normalized size r = τ / rho. The rho controller measures rho every step (`fixed`: the base optimizer "
            "unchanged), caps the LR at r_target · rho / ‖u‖ (`capped`) or sets it to that (`set`, the base LR "
            "ignored). The seed's claim: capping makes every LR safe — fixed-LR SGD diverges at the largest LR "
            "of the grid and the capped runs do not diverge at any LR. What follows says, from the tables only, "
            "where our runs agree with it and where not.")


# ---------------------------------------------------------------- one study


def _mode(df: pd.DataFrame, mode: str) -> pd.DataFrame:
    return df[df["mode"].astype(str) == mode].sort_values("lr", kind="mergesort")


def _lr(v: Any) -> str:
    return format_value(float(v))


def _lrs(vals: Any) -> str:
    vals = [_lr(v) for v in vals]
    return ", ".join(vals) if vals else "none"


def study_lines(rd: R.ReportData, study: str, single: pd.DataFrame, multi: pd.DataFrame, single_seed: int) -> list[str]:
    single_name, seeds_name = table_names(study)
    seeds_words = _seed_words(multi)
    out = [f"### {study}", ""]
    out += setup_lines(single, multi, single_seed) + [""]
    out += ["#### Does capping make every LR safe?", ""]
    out += claim_single(single, single_seed) + claim_seeds(multi, seeds_words)
    out += cap_lines(single, multi, single_seed, seeds_words) + set_lines(single, multi) + [""]
    out += [f"#### Seed {single_seed} (the seed setup's single seed)", "", _single_note(), "",
            markdown_table(single_view(single)) if len(single) else "_(none)_", ""]
    out += [f"#### {seeds_words.capitalize()}: median [IQR]", "", _seeds_note(), "",
            markdown_table(seeds_view(multi)) if len(multi) else "_(none)_", ""]
    curves, control = figure_names(study)
    figs = rd.figure_lines([
        (curves, f"{study}: training loss and validation accuracy per epoch"),
        (control, f"{study}: mean eta_eff and max r per epoch, with the r_target line"),
    ])
    if figs:
        out += ["#### Figures", "", _figure_note(single_seed, seeds_words), "", *figs]
    out += differences(single) + [""]
    out += [f"Tables: {rd.table_links([f'{single_name}.csv', f'{seeds_name}.csv'])}.", ""]
    return out


def _seed_words(multi: pd.DataFrame) -> str:
    seeds = sorted({int(s) for s in " ".join(text(x) for x in multi.get("seeds", [])).split()}) if len(multi) else []
    if not seeds:
        return "the other seeds"
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"seeds {seeds[0]}–{seeds[-1]}"
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def _first(df: pd.DataFrame, col: str) -> str:
    vals = [text(v) for v in df[col].dropna().unique()] if col in df else []
    return ", ".join(vals) if vals else "n/a"


def setup_lines(single: pd.DataFrame, multi: pd.DataFrame, single_seed: int) -> list[str]:
    src = single if len(single) else multi
    if src.empty:
        return ["No runs."]
    modes = ", ".join(f"{m} ({_first(g, 'mode')})" for m, g in src.groupby("method", sort=False))
    targets = sorted({float(x) for x in src["r_target"].dropna()}) if "r_target" in src else []
    return [f"Setup (from the tables): dataset {_first(src, 'dataset')}; model {_first(src, 'arch')}, depth "
            f"{_first(src, 'depth')}, width {_first(src, 'width')}, activation {_first(src, 'activation')}, init "
            f"{_first(src, 'init')}; {_first(src, 'epochs')} epochs at batch size {_first(src, 'batch_size')}; base "
            f"optimizer {_first(src, 'optimizer')}; methods (mode) {modes}; r_target "
            f"{', '.join(format_value(t) for t in targets) or 'n/a'}; Δa over samples `{_first(src, 'samples')}`; "
            f"learning rates {_lrs(sorted({float(x) for x in src['lr']}))}, every LR run with every seed (no LR "
            f"selection); seed {single_seed} and {_seed_words(multi)}."]


def base_word(df: pd.DataFrame) -> str:
    """The base optimizer in words (the table's ``optimizer`` column): SGD, SGD with momentum, Adam."""
    names = [text(v) for v in df["optimizer"].dropna().unique()] if "optimizer" in df else []
    words = {"sgd": "SGD", "sgd_momentum": "SGD with momentum", "adam": "Adam", "adamw": "AdamW", "sgd_sn": "SGD+SN"}
    return " / ".join(words.get(n, n) for n in names) or "SGD"


def claim_single(single: pd.DataFrame, seed: int) -> list[str]:
    B = base_word(single)
    fixed, capped = _mode(single, "fixed"), _mode(single, "capped")
    if fixed.empty or capped.empty:
        return [f"- **Seed {seed}**: the claim cannot be checked: no {'fixed' if fixed.empty else 'capped'}-mode runs."]
    top = fixed.iloc[-1]
    top_div = status_word(top["status"]) == "diverged"
    bad = capped[capped["status"].map(status_word) != "completed"]
    div = bad[bad["status"].map(status_word) == "diverged"]
    missing = bad[bad["status"].map(status_word) == "not run"]
    s = f"- **Seed {seed}**: fixed {B} at the largest LR ({_lr(top['lr'])}) {_status_phrase(top['status'])}; "
    if bad.empty:
        s += f"every capped run completed (LRs {_lrs(capped['lr'])}). "
    else:
        s += "capped: " + "; ".join(f"LR {_lr(r['lr'])} {_status_phrase(r['status'])}" for _, r in bad.iterrows()) + ". "
    other = fixed.iloc[:-1]
    other_div = other[other["status"].map(status_word) == "diverged"]
    if len(other_div):
        s += f"Fixed {B} also diverged at LR {_lrs(other_div['lr'])}. "
    if status_word(top["status"]) == "not run" or len(missing):
        s += "**Cannot be fully checked** (runs missing)."
    elif top_div and div.empty and bad.empty:
        s += "**Agrees** with the claim."
    else:
        why = []
        if not top_div:
            why.append(f"fixed {B} did not diverge at LR {_lr(top['lr'])}")
        if len(div):
            why.append(f"capped {B} diverged at LR {_lrs(div['lr'])}")
        if len(bad) > len(div):
            why.append("a capped run failed")
        s += f"**Does not agree**: {'; '.join(why)}."
    s += " " + _acc_line(single, seed)
    return [s]


def _status_phrase(status: Any) -> str:
    st = text(status) or "not run"
    return "was not run" if st == "not run" else st


def _acc_line(single: pd.DataFrame, seed: int) -> str:
    view = single_view(single)
    view["lr_f"] = single["lr"].astype(float)
    parts = []
    for lr, g in view.groupby("lr_f", sort=True):
        parts.append(f"LR {_lr(lr)}: " + ", ".join(f"{r['mode']} {r[WORDS['test_acc']]}" for _, r in g.iterrows()))
    return f"Test accuracy (seed {seed}) — {'; '.join(parts)}."


def claim_seeds(multi: pd.DataFrame, words: str) -> list[str]:
    B = base_word(multi)
    fixed, capped = _mode(multi, "fixed"), _mode(multi, "capped")
    if fixed.empty or capped.empty or int(multi["n_seeds"].sum()) == 0:
        return [f"- **{words.capitalize()}**: no multi-seed runs of both fixed and capped mode."]
    top = fixed.iloc[-1]
    n_top, d_top = int(top["n_seeds"]), int(top["n_diverged"])
    c_div = int(capped["n_diverged"].sum())
    c_fail = int(capped["n_failed"].sum())
    c_n = int(capped["n_seeds"].sum())
    s = (f"- **{words.capitalize()}**: fixed {B} at LR {_lr(top['lr'])} diverged in {d_top} of {n_top} seeds; "
         f"capped {B} diverged in {c_div} of {c_n} runs over LRs {_lrs(capped['lr'])}")
    s += f" ({c_fail} failed otherwise). " if c_fail else ". "
    if len(capped) and c_div:
        s += "Capped divergences by LR: " + ", ".join(
            f"{_lr(r['lr'])}: {int(r['n_diverged'])} of {int(r['n_seeds'])}" for _, r in capped.iterrows()
            if int(r["n_diverged"])) + ". "
    other = fixed.iloc[:-1]
    other = other[other["n_diverged"].astype(int) > 0]
    if len(other):
        s += f"Fixed {B} also diverged at " + ", ".join(
            f"LR {_lr(r['lr'])} ({int(r['n_diverged'])} of {int(r['n_seeds'])})" for _, r in other.iterrows()) + ". "
    missing = int(top["n_seeds"]) == 0 or (capped["n_seeds"].astype(int) == 0).any()
    if missing:
        s += "**Cannot be fully checked** (runs missing)."
    elif d_top == n_top and c_div == 0 and c_fail == 0:
        s += "**Agrees** with the claim in every seed."
    elif d_top > 0 and c_div == 0 and c_fail == 0:
        s += f"**Agrees in part**: fixed {B} diverged in {d_top} of {n_top} seeds only; no capped run diverged."
    else:
        why = []
        if d_top == 0:
            why.append(f"fixed {B} did not diverge at LR {_lr(top['lr'])} in any seed")
        if c_div:
            why.append(f"capped {B} diverged in {c_div} runs")
        if c_fail:
            why.append(f"{c_fail} capped runs failed")
        s += f"**Does not agree**: {'; '.join(why)}."
    view = seeds_view(multi)
    view["lr_f"] = multi["lr"].astype(float)
    col = f"{WORDS['test_acc']} median [IQR]"
    parts = [f"LR {_lr(lr)}: " + ", ".join(f"{r['mode']} {r[col]}" for _, r in g.iterrows())
             for lr, g in view.groupby("lr_f", sort=True)]
    s += f" Median test accuracy [IQR] — {'; '.join(parts)}."
    return [s]


def _frac(v: Any) -> str:
    return R.pct(v) if v is not None and not pd.isna(v) else "n/a"


def cap_lines(single: pd.DataFrame, multi: pd.DataFrame, seed: int, words: str) -> list[str]:
    """How large r got under each mode, and how often the cap bound."""
    B = base_word(single)
    out = []
    fixed, capped, setm = (_mode(single, m) for m in ("fixed", "capped", "set"))
    if len(fixed):
        out.append(f"- Peak r of fixed {B} (seed {seed}; r > 1: a step beyond the convergence radius): " + ", ".join(
            f"LR {_lr(r['lr'])} {format_value(r['peak_r'])}" for _, r in fixed.iterrows()) + ".")
    big = fixed[(fixed["status"].map(status_word) == "completed") & (fixed["peak_r"].astype(float) > 1.0)]
    if len(big):
        out.append(f"- Fixed {B} completed at LR {_lrs(big['lr'])} although some of its steps had r > 1 (seed {seed}): "
                   "a step beyond the radius did not by itself make a run diverge.")
    for name, g in (("capped", capped), ("set", setm)):
        g = g[g["peak_r"].notna()]
        if g.empty:
            continue
        rt = g["r_target"].astype(float).fillna(R_TARGET_DEFAULT)
        over = g[g["peak_r"].astype(float) > rt * (1 + R_TOL)]
        peak = float(g["peak_r"].astype(float).max())
        s = (f"- Peak r of {name} {B} (seed {seed}): at most {format_value(peak)} over LRs {_lrs(g['lr'])} "
             f"(r_target {', '.join(format_value(x) for x in sorted(set(rt)))}); ")
        s += ("no step exceeded r_target." if over.empty else
              f"r_target was exceeded at LR {_lrs(over['lr'])}.")
        out.append(s)
    if len(capped):
        parts = []
        for _, r in capped.iterrows():
            if pd.isna(r.get("capped_frac")):
                continue
            p = f"LR {_lr(r['lr'])} {_frac(r['capped_frac'])} of all steps, {_frac(r['final_capped_frac'])} in the last epoch"
            if float(r["capped_frac"]) == 0.0:
                p += f" (never bound: the run is fixed {B} at that LR)"
            parts.append(p)
        if parts:
            out.append(f"- How often the cap bound (seed {seed}): " + "; ".join(parts) + ".")
    mc = _mode(multi, "capped")
    if len(mc) and "peak_r_median" in mc:
        cells = seeds_view(mc)
        out.append(f"- {words.capitalize()}, capped: peak r median [IQR] " + "; ".join(
            f"LR {_lr(lr)} {c}" for lr, c in zip(mc["lr"], cells[f"{WORDS['peak_r']} median [IQR]"])) +
            "; final capped fraction " + "; ".join(
            f"LR {_lr(lr)} {c}" for lr, c in zip(mc["lr"], cells[f"{WORDS['final_capped_frac']} median [IQR]"])) + ".")
    return out


SAME_COLS = ("test_acc", "peak_r", "final_eta_eff", "final_capped_frac")


def _same(df: pd.DataFrame, cols: tuple[str, ...]) -> bool:
    a = df[[c for c in cols if c in df]].to_numpy(dtype=float)
    return bool(len(a) > 1 and all(np.array_equal(a[0], row, equal_nan=True) for row in a[1:]))


def set_lines(single: pd.DataFrame, multi: pd.DataFrame) -> list[str]:
    """`set` ignores the base LR: its rows at the grid's LRs are repeats of one configuration."""
    g = _mode(single, "set")
    if len(g) < 2:
        return []
    s = (f"- Set mode ignores the base LR, so its rows at LRs {_lrs(g['lr'])} are repeats of one configuration: ")
    s += ("identical in every column for the single seed (a determinism check)" if _same(g, SAME_COLS) else
          "they differ across LRs, so these runs are not bitwise reproducible")
    m = _mode(multi, "set")
    if len(m) > 1:
        cols = tuple(f"{c}_{k}" for c in SAME_COLS for k in ("median", "q25", "q75"))
        s += (" and in the multi-seed medians and quartiles." if _same(m, cols) else
              "; the multi-seed statistics differ across LRs.")
    else:
        s += "."
    return [s]


def _single_note() -> str:
    return ("One row per (method, LR). `status`: completed, or diverged with the engine's reason and step, or "
            "failed; a diverged run's test accuracy is `diverged` (it has none), its controller columns are what the "
            "controller measured up to the divergence. `peak r`: the largest r = τ / rho of any step (`inf`: r "
            "overflowed; such a run's peak r is read from its per-step rows, as metrics.json cannot hold inf); `final mean "
            "eta_eff`, `final capped fraction`: the mean effective LR and the fraction of steps at which the cap "
            "bound, over the last epoch (the last epoch reached, for a run that diverged).")


def _seeds_note() -> str:
    return ("Median and IQR (25th–75th percentile, numpy's linear interpolation) of each column over the seeds. "
            "`runs` counts the seeds by outcome; test accuracy is over the completed seeds (`over k of n` when "
            "some diverged), the controller columns over every seed that recorded them, diverged ones included.")


def _figure_note(seed: int, words: str) -> str:
    return (f"One column per LR. Lines: the median over {words}, band: their IQR; dashed: seed {seed}. An `x` at the "
            "top of a panel is a run that diverged, at its epoch. Accuracy per epoch is validation accuracy (the "
            "runs measure test accuracy at the end only). Per-epoch eta_eff and max r come from the rho probe; for the "
            "epoch a run diverged in, from its per-step records (finite values), drawn as an open circle.")


def differences(single: pd.DataFrame) -> list[str]:
    """How this study differs from the seed setup (digits only)."""
    if single.empty or "digits" not in {text(d) for d in single["dataset"]}:
        return []
    init = _first(single, "init")
    return [
        "#### Differences from the seed setup", "",
        "- Data: optlab's prepared digits split: train, validation and test carved once with a fixed seed "
        "(the fractions are `data.val_fraction` / `data.test_fraction` in params.yaml) and features standardized "
        "with the training split's statistics. The seed setup draws a 75/25 stratified train/test split per "
        "seed (random_state = seed) and divides pixels by 16. Here the seeds change the initialization and the "
        "batch order, not the split, and seed 7 does not see the seed setup's seed-7 split.",
        f"- Initialization: `{init}` (the project's), not PyTorch's nn.Linear default; the weights are not the "
        "seed setup's.",
        "- Accuracy per epoch is validation accuracy; the seed setup plots test accuracy per epoch.",
        "- No published numbers accompany this study in the issue, so there is nothing to print beside ours.",
    ]
