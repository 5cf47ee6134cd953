"""The README section "Vanilla SGD + Spectral Norm: back to basics", from the study's tables."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from ... import report as R
from ...aggregate import format_value, is_pct_column, markdown_table
from .tables import BASELINE, DEFAULT_SPEC

HEADING = "Vanilla SGD + Spectral Norm: back to basics"
METHOD_ORDER = ("sgd", "sgd_momentum", "adam", "sgd_sn")
NAMES = {"adam": "Adam"}
"""How methods are named in the text."""

MEM_WORDS = {"peak": "peak CUDA memory", "step": "peak training-step memory", "state": "training-state memory"}
CAPTIONS = {
    "accuracy_vs_depth.png": "Test accuracy at the selected LR vs depth",
    "grad_ratio_vs_depth.png": "First-layer / last-layer gradient norm at the end of training vs depth",
    "grad_norm_vs_layer.png": "Per-layer gradient norm at the deepest trained grid point",
    "sigma_max.png": "Largest singular value of the weights during training",
    "ablation.png": "Ablation: test accuracy per variant (dots: seeds)",
    "memory_vs_context.png": "Memory and throughput vs context length",
}
REQUIRED = ("verdict", "depth_to_failure", "ablation", "context")
OPTIONAL = ("sn_vs_sgd",)
"""Tables read when aggregate wrote them (``sn_vs_sgd`` only where a verdict task has plain sgd)."""

STATELESS = "any stateless optimizer: plain sgd has it too"
"""The label of a memory advantage that plain SGD (no optimizer state) has over the reference as well."""

ROLES = ("input", "hidden", "output")
"""The weight-matrix roles the projection can act on (``sn.roles``); biases and normalization
parameters (role ``bias_norm``) are never projected."""

ROLE_WORDS = {
    "gpt": {"input": "token and position embeddings", "hidden": "attention and MLP matrices", "output": "LM head"},
    "mlp": {"input": "input layer", "hidden": "hidden layers", "output": "output layer"},
    "resnet18": {"input": "stem convolution", "hidden": "block and shortcut convolutions", "output": "final linear layer"},
}
"""What each role holds, per architecture (``arch``)."""


def name(method: Any) -> str:
    return NAMES.get(str(method), str(method))


def question(m: str, r: str, bar: float, projected: bool = True) -> str:
    """The study's question; ``projected``: ``m`` is SGD with the projection (else the question
    is asked of ``m`` as it is, e.g. a study whose verdict compares two unprojected methods)."""
    if not projected:
        return (f"Does `{m}` reach at least {100 * bar:g}% of {name(r)}'s test accuracy while winning on wall time, "
                "memory or depth tolerance?")
    return (f"Can vanilla SGD with strict spectral normalization after every step (`{m}`: plain SGD, then the "
            "weight matrices of the parameter roles the study names in `sn.roles` projected to σ_max ≤ 1; which "
            f"roles each study projects is listed below) reach at least {100 * bar:g}% of {name(r)}'s test accuracy "
            "while winning on wall time, memory or depth tolerance?")


def _spec(v: pd.DataFrame) -> tuple[str, str, float]:
    if len(v) and {"method", "reference", "bar"} <= set(v.columns):
        r = v.iloc[0]
        return str(r["method"]), str(r["reference"]), float(r["bar"])
    return DEFAULT_SPEC.method, DEFAULT_SPEC.reference, DEFAULT_SPEC.bar


def projected_methods(runs: pd.DataFrame) -> set[str]:
    """The methods whose runs use the projected optimizer (``sgd_sn``); the default spec's method
    when the runs do not say."""
    if runs.empty or not {"optimizer", "method"} <= set(runs.columns):
        return {DEFAULT_SPEC.method}
    return {str(m) for m in runs.loc[runs["optimizer"].astype(str) == DEFAULT_SPEC.method, "method"].dropna()} or {
        DEFAULT_SPEC.method}


def spec_groups(v: pd.DataFrame) -> list[tuple[tuple[str, str, float], pd.DataFrame]]:
    """The verdict's rows per spec (method, reference, bar), in the order they first appear; one
    group (the default spec, no rows) for an empty verdict."""
    if v.empty or not {"method", "reference", "bar"} <= set(v.columns):
        return [(_spec(v), v)]
    keys = [(str(a), str(b), float(c)) for a, b, c in zip(v["method"], v["reference"], v["bar"])]
    out = []
    for key in dict.fromkeys(keys):
        out.append((key, v[[k == key for k in keys]]))
    return out


def section(rd: R.ReportData) -> str:
    t = {n: rd.table(n) for n in REQUIRED}
    for n in OPTIONAL:
        t[n] = rd.table(n) if n in rd.table_names else None
    v = t["verdict"]
    groups = spec_groups(v)
    runs = rd.runs
    proj = projected_methods(runs)
    lines = [f"## {rd.title}", "", rd.comment(), ""]
    if len(groups) == 1:
        lines += [f"**The question.** {question(*groups[0][0], groups[0][0][0] in proj)}", ""]
    else:
        lines += ["**The questions** (the studies' verdict specs differ):", ""]
        lines += [f"- {', '.join(R.values(g['study']))}: {question(*key, key[0] in proj)}" for key, g in groups] + [""]
    lines += projection_lines(runs) + [""]
    lines += mode_lines(runs, t["ablation"], [str(m) for m in R.values(v["method"])] if "method" in v else None)
    lines += [
        "### The answer, task by task", "",
        "A task is one grid point of a study on one dataset; each optimizer runs at its own learning rate, "
        "selected on the validation split. The accuracy comparison pairs the seeds both completed: its 95% "
        "interval decides yes (the whole interval at or above the bar), no (the whole interval below it) or "
        "inconclusive (the interval contains the bar). Each line says what the verdict table says.", "",
    ]
    for key, g in groups:
        if len(groups) > 1:
            lines += [f"**{key[0]} vs {name(key[1])}** (bar {100 * key[2]:g}%):", ""]
        lines += answers(g) + [""]
    lines += ["### Verdict per task", ""]
    for key, g in groups:
        if len(groups) > 1:
            lines += [f"#### {key[0]} vs {name(key[1])}", ""]
        lines += [verdict_note(*key), "", markdown_table(_verdict_view(g, _verdict_cols(g)), max_chars=120), "",
                  "Costs and the other advantage metrics at the selected LR (times: medians over completed seeds, "
                  "with their median absolute deviation in verdict.csv; the rest: means):", "",
                  markdown_table(_verdict_view(g, _cost_cols(g))), ""]
    if t["sn_vs_sgd"] is not None:
        lines += sn_vs_sgd_lines(t["sn_vs_sgd"], v)
    lines += ["### Depth to failure", "", _dtf_note(), ""]
    lines += _deepest_lines(t["depth_to_failure"]) + [""]
    lines += [markdown_table(R.cols(t["depth_to_failure"], DTF_VIEW)), ""]
    lines += ["### Ablation", "", _ablation_note(), "", markdown_table(_ablation_view(t["ablation"])), ""]
    if not t["context"].empty:
        lines += ["### Memory and throughput vs context length", "", _context_note(t["context"]), "",
                  markdown_table(R.cols(t["context"], CONTEXT_VIEW)), ""]
    lines += ["### Selected learning rate per optimizer and grid point", "", R.best_note(), ""]
    lines += R.edge_lines(rd.best) + R.best_tables(rd.best, METHOD_ORDER)
    lines += ["### Runs that did not complete", "", markdown_table(R.divergence_summary(rd.divergence)), ""]
    figs = rd.figure_lines([*rd.loss_curve_figures(), *CAPTIONS.items(), R.HEADLINE_FIGURE])
    if figs:
        lines += ["### Figures", "", *figs]
    lines += ["### Seeds, scale and provenance", ""]
    lines += R.scope(runs, METHOD_ORDER) + [R.frozen_line(runs), ""]
    lines += ["### Measurement caveats", ""]
    lines += _caveats(v, runs) + [""]
    names = ("verdict.csv", *(f"{n}.csv" for n in OPTIONAL if t[n] is not None), "depth_to_failure.csv",
             "ablation.csv", "best_lr.csv", "runs.csv", "divergence.csv", "context.csv")
    lines += [f"Full tables: {rd.table_links(list(names))}.", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


MODE_WORDS = {
    "clip_sv": "`clip_sv` (singular values above 1 set to 1, the rest untouched)",
    "scale": "`scale` (W / max(1, σ_max): every singular value shrinks by one factor)",
    "normalize": "`normalize` (W / σ_max: σ_max forced to 1)",
}


def mode_lines(runs: pd.DataFrame, ablation: pd.DataFrame | None, methods: list[str] | None = None) -> list[str]:
    """Which projection mode the verdict's projected runs (``methods``, default sgd_sn) use, why
    that one answers "strict spectral normalization", and the ablation's comparison of the modes."""
    methods = methods or [DEFAULT_SPEC.method]
    sw = runs[(runs["kind"] == "sweep") & runs["method"].astype(str).isin(methods)] if "method" in runs else runs.iloc[0:0]
    if "in_verdict" in sw:
        sw = sw[sw["in_verdict"].astype(bool)]
    modes = R.values(sw["sn_mode"]) if "sn_mode" in sw and len(sw) else []
    if not modes:
        return []
    used = ", ".join(MODE_WORDS.get(str(m), f"`{m}`") for m in modes)
    s = (f"**Which projection answers it.** The verdict's projected runs use {used}. `clip_sv` is the Euclidean "
         "projection onto the set σ_max ≤ 1: of all matrices with every singular value at most 1 it is the nearest "
         "(in the Frobenius and the spectral norm), changing only the directions whose gain exceeds 1. That makes it "
         "the strict normalization that changes the weights least, so it is the one the question is answered with; "
         f"{MODE_WORDS['scale']} also bounds σ_max by 1 but shrinks every direction, and {MODE_WORDS['normalize']} "
         "is not a projection onto a ball at all. Convolutions are projected on their operator norm at the layer's "
         "input size; there `clip_sv` rescales as `scale` does (see Methods).")
    parts = []
    if ablation is not None and len(ablation) and "sn_mode" in ablation:
        a = ablation[(ablation["optimizer"].astype(str) == "sgd_sn") & ablation["sn_mode"].notna()]
        if "arch" in a:
            a = a[a["arch"].astype(str) == "mlp"]
        for lr, g in a.groupby("lr", sort=True):
            cells = [f"{m} {R.pct(float(r['test_acc_mean']))}" for m in ("clip_sv", "scale", "normalize")
                     for _, r in g[g["sn_mode"].astype(str) == m].head(1).iterrows() if pd.notna(r["test_acc_mean"])]
            if len(cells) >= 2:
                parts.append(f"at LR {format_value(lr)}: {', '.join(cells)}")
    if parts:
        depth = R.values(a["depth"]) if "depth" in a else []
        where = f" (MLP, depth {format_value(depth[0])})" if len(depth) == 1 else " (MLP)"
        s += f" The ablation{where} compares the modes at one configuration: mean test accuracy {'; '.join(parts)}."
    return [s, ""]


# ---------------------------------------------------------------- the answers


def answers(v: pd.DataFrame) -> list[str]:
    m, r, bar = _spec(v)
    if v.empty:
        return [f"- No task has both {m} and {name(r)} results, so the question has no answer from these runs yet."]
    out = [answer_line(row) for _, row in v.iterrows()]
    n = len(v)
    reach = v["reaches_bar"].astype(str)
    k_yes, k_no, k_inc = int((reach == "yes").sum()), int((reach == "no").sum()), int((reach == "inconclusive").sum())
    yes = v[v["answer"].astype(str) == "yes"]
    inc = v[v["answer"].astype(str) == "inconclusive"]
    bar_s = f"{100 * bar:g}%"
    summary = (f"- **Overall**: at the {bar_s} bar, {k_yes} of {n} task{'s' if n != 1 else ''} reached it (whole "
               f"interval above), {k_no} fell below it and {k_inc} {'is' if k_inc == 1 else 'are'} inconclusive; "
               f"{len(yes)} of {n} also won on wall time, memory or depth tolerance (answer yes)")
    summary += (": " + "; ".join(R.task_name(row) for _, row in yes.iterrows()) + ".") if len(yes) else "."
    own = [row for _, row in yes.iterrows() if not _own_question_advantages(row)]
    if own:
        buffers = f", where {name(r)} keeps two buffers per parameter" if r in ("adam", "adamw") else ""
        summary += (f" Of these, {'; '.join(R.task_name(row) for row in own)} rest{'s' if len(own) == 1 else ''} on "
                    f"the memory advantage alone, which any stateless optimizer has over {name(r)} (plain sgd has it "
                    f"too: it keeps no optimizer state{buffers}); it is not an advantage of the projection.")
    if len(inc):
        summary += (f" Inconclusive (an advantage holds but the interval contains the bar): "
                    + "; ".join(R.task_name(row) for _, row in inc.iterrows()) + ".")
    col = f"{m}_sn_active_frac"
    idle = v[pd.to_numeric(v[col], errors="coerce") == 0.0] if col in v else v.iloc[0:0]
    if len(idle):
        summary += (f" In {'; '.join(R.task_name(row) for _, row in idle.iterrows())} the projection never acted, "
                    f"so there {m} is plain SGD and says nothing about spectral normalization.")
    return out + [summary]


METRICS = (  # advantage, words, column suffix, unit, comparison column
    ("wall_time", "wall time", "wall_time_s", "s", "time_lower"),
    ("seconds_per_epoch", "seconds per epoch", "seconds_per_epoch", "s", "epoch_time_lower"),
    ("memory", None, "mem_mb", "MB", "mem_lower"),
    ("depth_tolerance", "deepest trainable depth", "deepest", "", "depth_deeper"),
    ("epochs_to_90", "epochs to 90% validation accuracy", "epochs_to_90", "", "e90_fewer"),
)


def stateless(row: pd.Series | dict) -> bool:
    """The memory advantage is one plain sgd (no optimizer state) has over the reference too."""
    return R.true(row.get("memory_stateless"))


def _own_question_advantages(row: pd.Series) -> bool:
    """A question advantage (wall time, depth tolerance, memory) that is not only statelessness."""
    m = str(row.get("method"))
    held = {"wall_time": row.get("time_lower") == m, "depth_tolerance": row.get("depth_deeper") == m,
            "memory": row.get("mem_lower") == m and not stateless(row)}
    return any(held.values())


def advantages_text(row: pd.Series | dict) -> str:
    """The ``advantages`` cell with a stateless memory advantage labelled as such."""
    adv = str(row.get("advantages", "none"))
    if not stateless(row):
        return adv
    return " ".join(f"memory ({STATELESS})" if a == "memory" else a for a in adv.split())


def answer_line(row: pd.Series) -> str:
    m, r = str(row.get("method", DEFAULT_SPEC.method)), str(row.get("reference", DEFAULT_SPEC.reference))
    acc = "next-token accuracy" if R.is_lm(row) else "test accuracy"
    words = acc if str(row.get("metric", "test_acc")) == "test_acc" else str(row.get("metric"))
    s = f"- **{R.task_name(row)}**: "
    if pd.isna(row.get("ratio_of_means")):
        why = []
        for o in (m, r):
            if pd.notna(row.get(f"{o}_n_completed")) and int(row[f"{o}_n_completed"]) == 0:
                why.append(f"{name(o)} had no completed seed at its selected LR")
        s += f"no accuracy ratio ({'; '.join(why) or row.get('verdict_reason') or 'a mean is missing'}); inconclusive."
    else:
        s += R.interval_sentence(row, NAMES, words)
    for o in (m, r):
        e = row.get(f"{o}_lr_edge")
        if e in ("high", "low"):
            s += (f" {name(o)}'s selected LR {format_value(row.get(f'{o}_lr'))} is the {'highest' if e == 'high' else 'lowest'}"
                  " it tried (after extending the grid past that edge up to the study's lr_extend limit), so a better"
                  " one may lie beyond it.")
    won, lost, tied, noise, common = [], [], [], [], []
    for key, words_, col, unit, cmp in METRICS:
        who = str(row.get(cmp, "n/a"))
        if who not in (m, r, "tie"):
            continue
        if key == "memory":
            words_ = MEM_WORDS.get(str(row.get("mem_basis")), "training-state memory")
        va, vb = (R.num(row.get(f"{o}_{col}"), unit) for o in (m, r))
        if key == "epochs_to_90":  # a median over the seeds that reached 90%: say how many did
            va, vb = (f"{v} over {_reached(row, o)}" for v, o in ((va, m), (vb, r)))
        if key == "depth_tolerance":  # no trainable depth at all
            va, vb = (x.replace("n/a", "none") for x in (va, vb))
        text = f"{words_} ({va} vs {vb})"
        if key == "memory" and who == m and stateless(row):
            common.append(f"{words_} ({va} vs {vb}; plain sgd {R.num(row.get('plain_sgd_mem_mb'), unit)})")
        elif who == "tie" and key in ("wall_time", "seconds_per_epoch"):
            noise.append(text)
        else:
            (won if who == m else lost if who == r else tied).append(text)
    s += f" {m} won on: {', '.join(won)}." if won else (" No advantage of its own held." if common else
                                                          " No advantage held.")
    if common:
        s += f" Memory advantage of any stateless optimizer (plain sgd has it too): {', '.join(common)}."
    if lost:
        s += f" {name(r)} won on: {', '.join(lost)}."
    if noise:
        s += f" Within the timing spread over seeds (median ± MAD bands overlap): {', '.join(noise)}."
    if tied:
        s += f" Tied: {', '.join(tied)}."
    for o in (m, r):
        f = row.get(f"{o}_failures")
        if isinstance(f, str) and f.strip():
            kinds = [part.rsplit(" ", 1) for part in f.split(", ")]
            n_bad = sum(int(k[1]) for k in kinds if len(k) == 2 and k[1].isdigit())
            n = row.get(f"{o}_n_seeds")
            of = f" of {int(n)}" if pd.notna(n) else ""
            s += f" {name(o)}: {n_bad}{of} selected-LR runs failed ({', '.join(k[0] for k in kinds)})."
    if R.is_lm(row) and (pd.notna(row.get(f"{m}_test_bpb")) or pd.notna(row.get(f"{r}_test_bpb"))):
        s += f" Test bits per byte: {m} {R.num(row.get(f'{m}_test_bpb'))} vs {name(r)} {R.num(row.get(f'{r}_test_bpb'))}."
    s += binding_text(row.get(f"{m}_sn_active_frac"), m)
    s += idle_text(row, m)
    s += strictness_text(row, m)
    s += flattening_text(row, m, r)
    s += lm_reference_text(row, m, r)
    s += f" Answer: **{row.get('answer', 'no')}**."
    return s


def _reached(row: pd.Series | dict, o: str) -> str:
    """'k of n seeds': how many completed seeds reached 90% validation accuracy."""
    k, n = row.get(f"{o}_n_reached_90"), row.get(f"{o}_n_completed")
    if k is None or pd.isna(k):
        return "no recorded seeds"
    return f"{int(k)} of {int(n)} seeds" if n is not None and pd.notna(n) else f"{int(k)} seeds"


SN_TOL = 1e-4
"""The tolerance above 1 at which the spectral probe counts a violation (probes/spectral.py)."""
_TOL = f"{SN_TOL:.0e}".replace("e-0", "e-")  # 1e-4

FLAT_TOL = {"val_acc": 0.005, "val_loss": 0.01}
"""A last-epoch change of the selection metric within this counts as a flattened curve
(half a point of accuracy, 0.01 nats of loss)."""


def strictness_text(row: pd.Series | dict, m: str) -> str:
    """Violations of σ ≤ 1 + 1e-4 in the method's selected runs, and whether its projection is strict."""
    n = row.get(f"{m}_sn_violations")
    if n is None or pd.isna(n):
        return ""
    strict = row.get(f"{m}_sn_strict")
    kind = ("a strict projection (σ ≤ 1 by construction)" if R.true(strict) else
            "a projection labeled not strict (an estimate of σ)") if pd.notna(strict) else "its projection"
    smax = row.get(f"{m}_sigma_max_max")
    top = f"; the largest σ_max any check saw was {float(smax):.4f}" if pd.notna(smax) else ""
    if int(n) == 0:
        return f" {m} used {kind}: no layer-check exceeded σ = 1 + {_TOL} in its selected runs{top}."
    return (f" {m} used {kind}: {int(n)} layer-check{'s' if int(n) != 1 else ''} exceeded σ = 1 + {_TOL} in its "
            f"selected runs{top}, so there the method was not strictly normalized.")


def flattening_text(row: pd.Series | dict, m: str, r: str) -> str:
    """Did each side's validation curve flatten by the last epoch (the budget's check)?"""
    sel = "val_loss" if R.is_lm(row) else "val_acc"
    tol = FLAT_TOL[sel]
    parts, moving = [], []
    for o in (m, r):
        d = row.get(f"{o}_val_last_change")
        if d is None or pd.isna(d):
            continue
        d = float(d)
        parts.append(f"{name(o)} {100 * d:+.1f} points" if sel == "val_acc" else f"{name(o)} {d:+.3f} nats")
        if abs(d) > tol:
            moving.append(name(o))
    if not parts:
        return ""
    what = "validation accuracy" if sel == "val_acc" else "validation loss"
    s = f" Last-epoch change of {what}: {', '.join(parts)}"
    if moving:
        return s + (f"; {' and '.join(moving)} had not flattened (beyond {100 * tol:g} points)" if sel == "val_acc" else
                    f"; {' and '.join(moving)} had not flattened (beyond {tol:g} nats)") + ", so a longer budget may change the ratio."
    return s + "; both flattened."


def lm_reference_text(row: pd.Series | dict, m: str, r: str) -> str:
    """Language models: each side's test bits per token beside the entropy floor and an n-gram baseline."""
    if not R.is_lm(row):
        return ""
    bits = [(name(o), row.get(f"{o}_test_bits")) for o in (m, r)]
    bits = [(o, float(b)) for o, b in bits if b is not None and pd.notna(b)]
    floor, ng_acc, ng_bits, order = (row.get(k) for k in ("entropy_floor_bits", "ngram_test_acc", "ngram_test_bits",
                                                          "ngram_order"))
    parts = []
    if bits:
        parts.append("test bits per token " + ", ".join(f"{o} {b:.2f}" for o, b in bits))
    if floor is not None and pd.notna(floor):
        parts.append(f"the data's entropy rate (floor) {float(floor):.2f}")
    if ng_acc is not None and pd.notna(ng_acc):
        k = int(order) if order is not None and pd.notna(order) else 2
        parts.append(f"an order-{k} count model of the training split {float(ng_bits):.2f} bits and "
                     f"{R.pct(float(ng_acc))} next-token accuracy")
    if len(parts) < 2:
        return ""
    s = " Reference: " + "; ".join(parts) + "."
    if ng_bits is not None and pd.notna(ng_bits) and bits and all(b > float(ng_bits) for _, b in bits):
        s += " Both models are above the count model's bits: they are undertrained at this budget."
    return s


def idle_text(row: pd.Series | dict, m: str) -> str:
    """Where the projection never acted: how σ_max of the projected layers moved, and whether a
    longer run at this LR could make it act (the budget check of the GPT)."""
    frac, a, b = row.get(f"{m}_sn_active_frac"), row.get(f"{m}_sigma_first"), row.get(f"{m}_sigma_last_check")
    if frac is None or pd.isna(frac) or float(frac) != 0.0 or a is None or pd.isna(a) or pd.isna(b):
        return ""
    t0, t1, rate = row.get(f"{m}_sigma_first_step"), row.get(f"{m}_sigma_last_step"), row.get(f"{m}_sigma_growth_per_100")
    s = (f" The projected layers' largest σ went from {float(a):.4f} (step {int(t0)}) to {float(b):.4f} (step {int(t1)}), "
         f"{float(rate):+.4f} per 100 steps (mean over the selected runs)")
    if pd.notna(rate) and float(rate) > 1e-4:
        more = (1.0 - float(b)) / float(rate) * 100.0
        return s + f": at that rate (a linear extrapolation) it would reach 1 after about {more:,.0f} more steps, beyond this profile's budget."
    return s + ": it is not growing, so a longer run at this LR would not make the projection act either."


def binding_text(frac: Any, method: str = DEFAULT_SPEC.method) -> str:
    """How often the projection changed the weights in the method's selected runs."""
    if frac is None or pd.isna(frac):
        return ""
    frac = float(frac)
    if frac == 0.0:
        return (f" The projection never acted in these runs (every projected layer kept σ ≤ 1), so {method} "
                "trained exactly as plain SGD at the same LR.")
    return f" The projection changed the weights at {R.pct(frac)} of steps."


def _verdict_cols(v: pd.DataFrame) -> list[str]:
    m, r, _ = _spec(v)
    return ["task", f"{m}_lr", f"{r}_lr", f"{m} median [IQR]", f"{r} median [IQR]", "ratio_of_means", "95% interval",
            "per-seed ratio median [IQR]", "n_pairs", "reaches_bar", "seeds_needed", "advantages", "answer"]


def _cost_cols(v: pd.DataFrame) -> list[str]:
    m, r, _ = _spec(v)
    return ["task", f"{m}_wall_time_s", f"{r}_wall_time_s", f"{m}_seconds_per_epoch", f"{r}_seconds_per_epoch",
            "mem_basis", f"{m}_mem_mb", f"{r}_mem_mb", "plain_sgd_mem_mb", f"{m}_deepest", f"{r}_deepest", f"{m}_epochs_to_90",
            f"{r}_epochs_to_90", f"{m}_test_bpb", f"{r}_test_bpb", f"{m}_test_bits", f"{r}_test_bits",
            "entropy_floor_bits", "ngram_test_bits", "ngram_test_acc", f"{m}_sn_active_frac", f"{m}_sn_violations",
            f"{m}_sigma_max_max", f"{m}_val_last_change", f"{r}_val_last_change", f"{m}_failures", f"{r}_failures"]


def _verdict_view(v: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    if v.empty:
        return v
    v = R.verdict_cells(v)
    m, r, _ = _spec(v)
    if "advantages" in v:
        v["advantages"] = [advantages_text(row) for _, row in v.iterrows()]
    keep = [c for c in columns if c in v.columns]
    # LM-only and unmeasured columns are left out when no task has them
    keep = [c for c in keep if c in ("task", "seeds_needed") or not v[c].isna().all()]
    if "seeds_needed" in keep and not (v["seeds_needed"] != "").any():
        keep.remove("seeds_needed")
    fail = [c for c in (f"{m}_failures", f"{r}_failures") if c in keep]
    if fail and v[fail].fillna("").astype(str).eq("").all().all():
        keep = [c for c in keep if c not in fail]
    return v[keep]


def verdict_note(m: str, r: str, bar: float) -> str:
    rn = name(r)
    return (f"Each optimizer at its own validation-selected LR (`(lowest tried)` / `(highest tried)`: the selected "
            f"LR is at the edge of the LRs tried, after the search extended its grid past an edge up to the study's "
            f"`lr_extend` limit). The comparison is over the seeds that completed under both: "
            f"`ratio_of_means` = {m}'s mean test accuracy / {rn}'s (next-token accuracy for language models), "
            "`95% interval` its paired bootstrap interval (seeds resampled together), and the medians and IQRs "
            "(25th–75th percentile) of each side and of the per-seed ratio. `reaches_bar`: yes when the interval's "
            f"lower end is at or above {100 * bar:g}%, no when its upper end is below, else inconclusive, with "
            f"`seeds_needed` the estimated paired seeds that would decide it. `advantages` lists what {m} does "
            f"strictly better than {rn}: "
            "`wall_time` and `seconds_per_epoch` (lower beyond the spread over completed seeds: the bands "
            "median ± MAD, the median absolute deviation, do not overlap, so neither one seed slowed by a shared "
            "machine nor a difference inside the run-to-run spread decides), `memory` (lower peak CUDA memory "
            "where both recorded it, else lower peak of a profiled training step, else lower training-state size: "
            f"`mem_basis` peak / step / state; labelled `{STATELESS}` where plain sgd, which keeps no optimizer "
            f"state, is below {rn} on the same basis as well, `plain_sgd_mem_mb`), `depth_tolerance` (deeper deepest-"
            f"trainable depth in the study and dataset, where {rn} failed at or before that depth) and "
            "`epochs_to_90` (every completed seed reached 90% validation accuracy, in fewer epochs (median) "
            f"or where {rn} did not). `answer` = yes when the bar is reached and a wall-time, memory or "
            "depth-tolerance advantage holds; inconclusive when such an advantage holds but the interval contains "
            "the bar; else no. Epochs to 90% are the median over the seeds that reached 90%, with their count.")


# ---------------------------------------------------------------- what the projection acts on


def _roles(v: Any) -> tuple[str, ...] | None:
    """A runs.csv ``sn_roles`` cell (a JSON list) as a tuple; None when not recorded."""
    if v is None or (not isinstance(v, (list, tuple)) and pd.isna(v)):
        return None
    if isinstance(v, (list, tuple)):
        return tuple(str(x) for x in v)
    try:
        parsed = json.loads(str(v))
    except ValueError:
        return tuple(str(v).split())
    return tuple(str(x) for x in parsed) if isinstance(parsed, list) else (str(parsed),)


def _role_phrase(roles: tuple[str, ...] | None, arch: str) -> str:
    if roles is None:
        return "roles not recorded in the runs"
    words = ROLE_WORDS.get(arch, {})
    say = lambda rs: ", ".join(f"`{x}`" + (f" ({words[x]})" if x in words else "") for x in rs)  # noqa: E731
    left = [x for x in ROLES if x not in roles]
    if not left:
        return f"every weight matrix: {say(roles)}"
    return f"{say(roles)} only; not {' or '.join(say([x]) for x in left)}"


def projection_lines(runs: pd.DataFrame) -> list[str]:
    """Which parameter roles the projection acted on, per study (and for the ablation and the
    headline run), from the ``sn_roles`` of the projected runs."""
    head = ("**What is projected.** The projection acts on the weight matrices of the roles in each projected run's "
            "`sn_roles` (biases and normalization parameters are never projected):")
    if runs.empty or "optimizer" not in runs:
        return [head, "", "- No projected runs."]
    sn = runs[runs["optimizer"].astype(str) == DEFAULT_SPEC.method]
    if sn.empty:
        return [head, "", "- No projected runs."]
    groups: dict[tuple[str, tuple[str, ...] | None], list[str]] = {}
    cols = pd.DataFrame({c: sn[c] if c in sn else pd.Series(None, index=sn.index, dtype=object)
                         for c in ("kind", "study", "arch", "sn_roles")})
    for _, row in cols.iterrows():
        what = {"ablation": "the ablation's projected variants", "headline": "the headline run"}.get(
            str(row["kind"]), str(row.get("study")))
        arch = str(row.get("arch")) if pd.notna(row.get("arch")) else ""
        key = (arch, _roles(row.get("sn_roles")))
        if what not in groups.setdefault(key, []):
            groups[key].append(what)
    order = lambda k: min(0 if w[0].isalnum() else 1 for w in groups[k])  # noqa: E731
    out = [head, ""]
    for key in sorted(groups, key=lambda k: (order(k), sorted(groups[k]))):
        arch, roles = key
        names = sorted(groups[key], key=lambda w: (w.startswith("the "), w))
        out.append(f"- {', '.join(names)}{f' (arch {arch})' if arch else ''}: {_role_phrase(roles, arch)}.")
    return out


# ---------------------------------------------------------------- the projection against plain SGD


def _diff_text(v: Any, metric: str, unit: bool = True) -> str:
    """A difference in the metric's units: percentage points for accuracies (``unit``: say
    "points"), else 4 significant digits."""
    if v is None or pd.isna(v):
        return "n/a"
    if is_pct_column(metric):
        x = 100 * float(v)
        return (f"{x:+.1f}" if round(x, 1) != 0 else "0.0") + (" points" if unit else "")
    return f"{float(v):+.4g}" if float(v) != 0 else "0"


def _range_text(lo: Any, hi: Any, metric: str) -> str:
    """``-4.6 to +3.6 points``."""
    if lo is None or pd.isna(lo) or hi is None or pd.isna(hi):
        return "n/a"
    return f"{_diff_text(lo, metric, unit=False)} to {_diff_text(hi, metric)}"


def sn_vs_sgd_note() -> str:
    return ("The verdict asks whether the projected method matches Adam; this asks whether the projection adds "
            f"anything to plain SGD (`{BASELINE}`), each at its own validation-selected LR, on the verdict's metric. "
            "`diff` = mean of the projected method − mean of plain sgd over the seeds both completed (accuracies in "
            "percentage points), `95% interval` its paired bootstrap interval (seeds resampled together, the "
            "expanded percentile interval the verdict uses), with the per-seed differences' median and IQR. "
            "`verdict`: better / worse when the whole interval lies above / below 0 (for a lower-is-better metric "
            "the other way round), inconclusive when it contains 0 (the runs do not tell the two apart; "
            "`seeds_needed` estimates the paired seeds that might). Costs: median wall time over completed seeds "
            "and memory on a common basis (`mem_basis`); `sn_active_frac`: the fraction of steps at which the "
            "projection changed a weight.")


def sn_vs_sgd_line(row: pd.Series) -> str:
    m, x = str(row.get("method")), str(row.get("metric", "test_acc"))
    words = ("next-token accuracy" if R.is_lm(row) else "test accuracy") if x == "test_acc" else x
    s = f"- **{R.task_name(row)}**: "
    lrs = (f"{m} at LR {R.lr_text(row.get('method_lr'), row.get('method_lr_edge'))}, {BASELINE} at LR "
           f"{R.lr_text(row.get('sgd_lr'), row.get('sgd_lr_edge'))}")
    n = int(row["n_pairs"]) if pd.notna(row.get("n_pairs")) else 0
    if pd.isna(row.get("diff")):
        s += f"{lrs}: no difference ({row.get('reason') or 'no paired seeds'}). Verdict: **inconclusive**."
        return s
    s += (f"{lrs}; mean {words} {R.metric_value(row.get('method_mean'), x)} vs {R.metric_value(row.get('sgd_mean'), x)} "
          f"over {n} paired seed{'s' if n != 1 else ''}, difference {_diff_text(row['diff'], x)}")
    if pd.notna(row.get("diff_lo")):
        s += (f" (95% interval {_range_text(row['diff_lo'], row['diff_hi'], x)}; per-seed median "
              f"{_diff_text(row.get('diff_median'), x)}, IQR {_range_text(row.get('diff_q25'), row.get('diff_q75'), x)})")
    s += "."
    if R.true(row.get("identical")):
        s += f" Every paired seed gave the same value under both: here {m} ran as plain SGD"
        frac = row.get("method_sn_active_frac")
        s += " (the projection never acted)." if pd.notna(frac) and float(frac) == 0.0 else "."
    else:
        s += binding_text(row.get("method_sn_active_frac"), m)
    if pd.notna(row.get("method_wall_time_s")) and pd.notna(row.get("sgd_wall_time_s")):
        s += (f" Cost: wall time {R.num(row.get('method_wall_time_s'), 's')} vs {R.num(row.get('sgd_wall_time_s'), 's')}")
        if pd.notna(row.get("method_mem_mb")):
            s += (f", {MEM_WORDS.get(str(row.get('mem_basis')), 'memory')} {R.num(row.get('method_mem_mb'), 'MB')} vs "
                  f"{R.num(row.get('sgd_mem_mb'), 'MB')}")
        s += "."
    word = str(row.get("verdict"))
    why = str(row.get("reason") or "the interval contains 0")
    if word == "better":
        why += f": {m} is better"
    elif word == "worse":
        why += f": plain {BASELINE} is better"
    elif R.true(row.get("identical")):
        why = "the interval is 0 to 0: the same results"
    need = str(row.get("seeds_needed") or "").strip()
    if word == "inconclusive" and need and need.lower() != "nan":
        why += f"; about {need} paired seeds might decide it, an estimate"
    return s + f" Verdict: **{word}** ({why})."


SN_VS_SGD_VIEW = ["task", "method_lr", "sgd_lr", "method median [IQR]", "sgd median [IQR]", "diff", "95% interval",
                  "per-seed diff median [IQR]", "n_pairs", "verdict", "seeds_needed", "method_wall_time_s",
                  "sgd_wall_time_s", "mem_basis", "method_mem_mb", "sgd_mem_mb", "method_sn_active_frac"]


def _sn_vs_sgd_view(d: pd.DataFrame) -> pd.DataFrame:
    if d.empty:
        return d
    d = d.copy()
    metric = lambda row: str(row.get("metric", "test_acc"))  # noqa: E731
    d["task"] = [R.task_name(row) for _, row in d.iterrows()]
    for side in ("method", "sgd"):
        d[f"{side}_lr"] = [R.lr_text(row.get(f"{side}_lr"), row.get(f"{side}_lr_edge")) for _, row in d.iterrows()]
        d[f"{side} median [IQR]"] = [
            f"{R.metric_value(row.get(f'{side}_median'), metric(row))} [{R.metric_value(row.get(f'{side}_q25'), metric(row))}–"
            f"{R.metric_value(row.get(f'{side}_q75'), metric(row))}]" if pd.notna(row.get(f"{side}_median")) else "n/a"
            for _, row in d.iterrows()]
    d["diff"] = [_diff_text(row.get("diff"), metric(row)) for _, row in d.iterrows()]
    d["95% interval"] = [_range_text(row.get("diff_lo"), row.get("diff_hi"), metric(row)) for _, row in d.iterrows()]
    d["per-seed diff median [IQR]"] = [
        f"{_diff_text(row.get('diff_median'), metric(row), unit=False)} "
        f"[{_range_text(row.get('diff_q25'), row.get('diff_q75'), metric(row))}]"
        if pd.notna(row.get("diff_median")) else "n/a" for _, row in d.iterrows()]
    d["seeds_needed"] = [s if isinstance(s, str) and s and s.lower() != "nan" else "" for s in d["seeds_needed"]]
    keep = [c for c in SN_VS_SGD_VIEW if c in d.columns]
    keep = [c for c in keep if c in ("task", "verdict") or not d[c].isna().all()]
    if "seeds_needed" in keep and not (d["seeds_needed"] != "").any():
        keep.remove("seeds_needed")
    view = d[keep]
    methods = R.values(d["method"].astype(str))
    if len(methods) == 1:  # one projected method: name it in the headers
        view = view.rename(columns={c: methods[0] + c[len("method"):] for c in keep if c.startswith("method")})
    return view


def sn_vs_sgd_lines(d: pd.DataFrame, verdict: pd.DataFrame | None = None) -> list[str]:
    """The section "Does the projection add anything over plain SGD?": a line per task, an overall
    line and the table (``verdict``: to name the verdict tasks that have no plain sgd runs)."""
    out = ["### Does the projection add anything over plain SGD?", "", sn_vs_sgd_note(), ""]
    if d.empty:
        return out + [f"- No verdict task has both the projected method and plain {BASELINE} results.", ""]
    out += [sn_vs_sgd_line(row) for _, row in d.iterrows()]
    if verdict is not None and len(verdict) and "method" in verdict:
        have = {R.task_name(row) for _, row in d.iterrows()}
        sn = verdict[verdict["method"].astype(str).isin(set(d["method"].astype(str)))]
        missing = [R.task_name(row) for _, row in sn.iterrows() if R.task_name(row) not in have]
        if missing:
            out.append(f"- Not compared (no plain {BASELINE} runs): {'; '.join(missing)}.")
    words = d["verdict"].astype(str)
    n = len(d)
    k = {w: int((words == w).sum()) for w in ("better", "worse", "inconclusive")}
    summary = (f"- **Overall**: the projection raised the metric over plain {BASELINE} in {k['better']} of {n} "
               f"task{'s' if n != 1 else ''} (whole interval above 0), lowered it in {k['worse']} and "
               f"{k['inconclusive']} {'is' if k['inconclusive'] == 1 else 'are'} inconclusive (the interval contains 0)")
    same = d[d["identical"].map(R.true)] if "identical" in d else d.iloc[0:0]
    if len(same):
        summary += (f"; in {'; '.join(R.task_name(row) for _, row in same.iterrows())} the projected runs were "
                    "plain SGD runs (same values on every seed)")
    out += [summary + ".", "", markdown_table(_sn_vs_sgd_view(d)), ""]
    return out


# ---------------------------------------------------------------- depth to failure

DTF_VIEW = ["study", "dataset", "method", "axis", "points_tried", "deepest_trained", "first_failing", "failure_kinds",
            "skipped", "selected_lrs"]


def _dtf_note() -> str:
    return ("Along the first grid axis of each study (depth for the depth studies): a grid point trained when its "
            "selected configuration had no recorded failure (the sweep's summary.json together with the runs: "
            "`nonfinite`/`exploding` divergence, `vanishing` gradients at the first layer, `chance`-level test "
            "accuracy, `error` for a crashed run). `skipped`: points the depth-to-failure search did not run "
            "beyond the first failure.")


def _deepest_lines(d: pd.DataFrame) -> list[str]:
    if d.empty:
        return ["- No study has a grid axis with results yet."]
    from ...aggregate import method_order

    out = []
    for (study, dataset, axis), g in d.groupby(["study", "dataset", "axis"], dropna=False, sort=True):
        noun = "network" if axis == "depth" else f"{axis}"
        parts = []
        for meth in method_order(g["method"].astype(str).tolist(), METHOD_ORDER):
            row = g[g["method"] == meth].iloc[0]
            deep = format_value(row["deepest_trained"]) if pd.notna(row["deepest_trained"]) else "none"
            p = f"{meth} {deep}"
            if pd.notna(row["first_failing"]):
                p += f" (first failure at {format_value(row['first_failing'])}: {row['failure_kinds']}"
                skipped = str(row["skipped"]).strip() if pd.notna(row["skipped"]) else ""
                p += f"; skipped {skipped})" if skipped else ")"
            parts.append(p)
        tried = R.values(g["points_tried"].astype(str).str.split().explode().dropna().astype(float))
        out.append(f"- Deepest trainable {noun} per optimizer, {study} / {dataset} ({axis} tried: "
                   f"{', '.join(format_value(x) for x in tried)}): " + "; ".join(parts) + ".")
    return out


# ---------------------------------------------------------------- ablation

ABLATION_VIEW = ["variant", "arch", "depth", "optimizer", "reparam", "sn_mode", "sn_sigma", "sn_power_iters", "sn_refresh",
                 "sn_conv", "batch_norm", "residual", "lr", "n_seeds", "n_diverged", "test_acc (mean ± std)",
                 "test_acc median [IQR]", "val_acc_mean", "wall_time_s_mean", "sigma_max_max_mean",
                 "sn_active_frac_mean", "sn_violations_total", "frozen"]


def _ablation_note() -> str:
    return ("Each variant at a fixed LR over the ablation seeds, in studies.yaml order (`profiles.<scale>.ablate.variants`). Means, medians and IQRs are "
            "over completed seeds; `sn_violations_total` (layers above σ = 1 + 1e-4 at a check, projected runs "
            "only) is summed over all seeds. n/a: the setting does not apply (projection settings only for sgd_sn, "
            "`sn_power_iters` only for power iteration, `sn_refresh` only for the certified bound, conv/batch-norm/residual settings only for the ResNet); "
            "columns that apply to no variant are in ablation.csv only.")


def _ablation_view(a: pd.DataFrame) -> pd.DataFrame:
    if a.empty:
        return a
    a = a.copy()
    a["test_acc (mean ± std)"] = [
        f"{R.pct(mu)} ± {R.pct(sd)}" if pd.notna(sd) else R.pct(mu) for mu, sd in zip(a["test_acc_mean"], a["test_acc_std"])
    ]
    if "test_acc_median" in a:
        a["test_acc median [IQR]"] = [f"{R.pct(x)} [{R.pct(lo)}–{R.pct(hi)}]" if pd.notna(x) else "n/a"
                                      for x, lo, hi in zip(a["test_acc_median"], a["test_acc_q25"], a["test_acc_q75"])]
    keep = [c for c in ABLATION_VIEW if c in a.columns]
    keep = [c for c in keep if c in ("variant", "test_acc (mean ± std)") or not a[c].isna().all()]
    return a[keep]


# ---------------------------------------------------------------- context

CONTEXT_VIEW = ["study", "dataset", "block_size", "method", "lr", "n_seeds", "mem_basis", "mem_mb", "tokens_per_s",
                "tokens_per_s_mad", "steady_epochs", "val_bpb", "failures"]


def _context_note(c: pd.DataFrame) -> str:
    """What the context sweep measured, and the memory growth from its shortest to longest context."""
    from ...aggregate import method_order

    basis = sorted(set(c["mem_basis"].dropna().astype(str)))
    words = ", ".join(MEM_WORDS.get(b, b) for b in basis) or "n/a"
    parts = []
    for meth in method_order(R.values(c["method"]), METHOD_ORDER):
        g = c[(c["method"] == meth) & c["mem_mb"].notna()].sort_values("block_size")
        if len(g) >= 2:
            lo, hi = g.iloc[0], g.iloc[-1]
            parts.append(f"{meth} {format_value(lo['mem_mb'])} → {format_value(hi['mem_mb'])} MB "
                         f"(context {format_value(lo['block_size'])} → {format_value(hi['block_size'])})")
    growth = ("; ".join(parts) + ".") if parts else ""
    return ("A cost study (`verdict: false`, so not in the accuracy verdict): each optimizer trains the same "
            f"transformer at one LR for a short budget at each context length. Memory is {words} (`mem_basis`); "
            f"tokens/s is the training loop's throughput over the epochs after the first (the first holds the "
            f"warm-up), median with `tokens_per_s_mad` its median absolute deviation over those epochs; blank "
            f"where a run had only one epoch. {growth}").rstrip()


# ---------------------------------------------------------------- caveats


def _caveats(v: pd.DataFrame, runs: pd.DataFrame) -> list[str]:
    m, r, _ = _spec(v)
    out = [
        "- Memory: CUDA runs record the allocator's peak over the run (`peak_mem_mb`, data on the device "
        "included). CPU keeps no such peak, so there the engine profiles one training step (the second) and "
        "records its peak from the allocator's events: parameters, gradients, optimizer state, activations "
        "and temporaries, the resident dataset excluded (`step_mem_mb`, `mem_basis` step).",
        "- Wall time: one measurement per seed on a machine shared with the rest of the sweep, the verdict takes the "
        "median over completed seeds and counts a difference only beyond the median absolute deviation of both "
        "sides; it includes evaluation and the exact σ_max checks every `sn.check_every` steps that "
        "every optimizer's runs make. `seconds_per_epoch` times the training loop only.",
        f"- Ratios: each optimizer is at its own selected LR; where {name(r)}'s selected runs failed (e.g. `chance`), a "
        f"ratio above 100% says that {name(r)} did not train there, not that {m} trained well. A seed that diverged "
        "under either side is left out of the pairs (the answer line counts failed runs).",
        R.INTERVAL_CAVEAT,
        "- Depth tolerance compares the deepest grid point trained without a recorded failure; it counts only "
        "where the other optimizer failed at or before that depth.",
        "- Failure kinds are those recorded in each run's metrics.json (`failure`) and in the sweep's summary.json.",
        "- Epochs to 90%: the first epoch with validation accuracy ≥ 90%, the median over the completed seeds that "
        "reached it, with how many did (`n_reached_90` of `n_completed`); n/a when none did.",
    ]
    lm = bool("task" in v and (v["task"] == "lm").any()) if len(v) else False
    lm = lm or bool("task" in runs and (runs["task"] == "lm").any())
    if lm:
        out.append("- Language models: accuracy is next-token accuracy and bits per byte (`test_bpb`) is the "
                   "compression measure. Each run records the data's entropy rate where the data knows it "
                   "(`entropy_floor_bits`: the synthetic Markov language's exact rate; nan for text corpora) and an "
                   "order-2 count model of the training split scored on the same test tokens (`ngram_test_bits`, "
                   "`ngram_test_acc`, add-one smoothing): a model above the count model's bits has not yet learned "
                   "what two tokens of context give.")
    out.append("- Budgets: `*_val_last_change` is the selection metric's change over each side's last epoch (mean over "
               "completed selected seeds); beyond half a point of accuracy (0.01 nats of loss) the answer line says the "
               "curve had not flattened. Half a point is below one example of a small validation split (digits: 144 "
               "examples, 0.69 points each), so there a change of one example per seed reads as not flattened. Budgets "
               "are bounded by the profile's time limit (`make repro`: 15 minutes on 2 cores); where the projection "
               "never acted, the answer line says how its layers' σ moved and whether a longer run could change that.")
    return out

