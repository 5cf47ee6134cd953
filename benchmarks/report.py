"""Collect every benchmark result into one report: ``python -m benchmarks.report``.

    python -m benchmarks.report [--results benchmarks/results] [--out reports]

Reads every ``<results>/*.json`` (each benchmark writes one, beside its ``.md``) and writes
``<out>/benchmarks.md`` and ``<out>/benchmarks.csv``:

- the machine the report was collected on: CPU model (``/proc/cpuinfo``), cores, torch threads,
  torch's CPU capability and the ISA flags that matter for the kernels (AVX2, AVX-512, AMX, ...),
  the GPU's name when torch sees one; and, per benchmark, the machine its own file recorded
  (results measured on another machine are marked as such);
- a goals table (goal, issue, measured, target, met / not met / no target, source, machine):
  the rows a benchmark states itself (a ``goals`` list in its JSON: ``sgd_sn``, ``storage``,
  ``repro_time``), plus rows extracted here from the Muon (issue #12), rho controller (#11) and
  main-harness (on-device batching) results;
- one section per benchmark: its own Markdown table, headings moved down two levels.

The CSV holds the goals table. Nothing is measured here; a benchmark that has not been run is
simply absent.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
from pathlib import Path
from typing import Any, Callable

ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")
COLUMNS = ("goal", "issue", "measured", "target", "met", "source", "machine")


# -- the machine ------------------------------------------------------------------------------------
def cpu_info(text: str | None = None) -> dict[str, Any]:
    """CPU model and ISA flags from ``/proc/cpuinfo`` (or ``text``)."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            text = ""
    model, flags = platform.processor() or platform.machine(), set()
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model") and model in ("", platform.processor() or platform.machine()):
            model = val.strip() or model
        elif key in ("flags", "Features") and not flags:
            flags = set(val.split())
    return {"cpu": model, "isa": [f for f in ISA_FLAGS if f in flags]}


def machine_info() -> dict[str, Any]:
    import torch

    info = cpu_info()
    cap = None
    with_cap = getattr(torch.backends.cpu, "get_cpu_capability", None)
    if callable(with_cap):
        cap = with_cap()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {**info, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch_cpu_capability": cap,
            "torch": torch.__version__, "mkldnn": bool(torch.backends.mkldnn.is_available()),
            "mkl": bool(torch.backends.mkl.is_available()), "gpu": gpu,
            "load_avg": None if load is None else [round(x, 2) for x in load]}


def machine_lines(m: dict[str, Any]) -> list[str]:
    return [f"- CPU: {m['cpu']}, {m['cores']} cores; torch {m['torch']} with {m['torch_threads']} thread(s) by default, "
            f"CPU capability {m['torch_cpu_capability'] or 'unknown'}; MKL {'yes' if m['mkl'] else 'no'}, "
            f"oneDNN {'yes' if m['mkldnn'] else 'no'}",
            f"- ISA flags: {', '.join(m['isa']) or 'none of ' + ', '.join(ISA_FLAGS)}",
            f"- GPU: {m['gpu'] or 'none (torch.cuda.is_available() is false)'}",
            "- load average when collected: " + ("n/a" if m["load_avg"] is None else ", ".join(map(str, m["load_avg"])))]


# -- goals extracted from results that do not state their own -----------------------------------------
def _row(goal: str, issue: str, measured: str, target: str, met: bool | None) -> dict[str, Any]:
    return {"goal": goal, "issue": issue, "measured": measured, "target": target, "met": met}


def muon_goals(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for r in doc.get("muon") or []:
        stack, flat = r.get("ratio_stack"), r.get("ratio_2d")
        if stack is None:
            continue
        out.append(_row(f"(c) Muon step, {r['case']}: torch.optim.Muon / optlab Muon", "#12",
                        f"{stack:.2f} (one stack), {flat:.2f} (2-D params)", ">= 1.4 (stack)", stack >= 1.4))
    st = doc.get("stiefel")
    if st:
        accurate = {k: v for k, v in st["over_train"].items() if st["ortho_error"].get(k, 1.0) <= 1e-4}
        if accurate:
            best = min(accurate, key=accurate.get)
            out.append(_row(f"(c) Stiefel projection / training step, {st['case']} (cheapest with ortho error <= 1e-4: "
                            f"{best})", "#12", f"{100 * accurate[best]:.1f} %", "< 10 %", accurate[best] < 0.10))
    return out


def rho_goals(doc: dict[str, Any]) -> list[dict[str, Any]]:
    rows = doc.get("rows") or []
    out = []
    for key, label, target, ok in (("rho_over_plain", "rho (jvp) step / plain step", "<= 1.6", lambda v: v <= 1.6),
                                   ("naive_over_rho", "naive rho step / optlab rho step", ">= 1.5", lambda v: v >= 1.5)):
        vals = [(r[key], f"{r['case']}, {r['optimizer']}") for r in rows if r.get(key) is not None]
        if not vals:
            continue
        worst = max(vals) if key == "rho_over_plain" else min(vals)
        n_ok = sum(ok(v) for v, _ in vals)
        out.append(_row(f"(c) {label}, every (model, optimizer) case", "#11",
                        f"met in {n_ok} of {len(vals)}; worst {worst[0]:.2f} ({worst[1]})", target, n_ok == len(vals)))
    return out


def main_goals(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for r in doc.get("rows") or []:
        if r.get("name", "").startswith("epoch of batches"):
            out.append(_row(f"(d) on-device batching, {r['name']}: DataLoader time / optlab time", "#14",
                            f"{r['ratio']:.2f}", "> 1 (faster)", r["ratio"] > 1))
    return out


EXTRACTORS: dict[str, Callable[[dict[str, Any]], list[dict[str, Any]]]] = {
    "muon": muon_goals, "rho": rho_goals, "main": main_goals}


def kind(path: Path, doc: dict[str, Any]) -> str:
    """Which benchmark wrote ``path``: its ``benchmark`` field, else from the file name."""
    if doc.get("benchmark"):
        return str(doc["benchmark"])
    stem = path.stem
    for prefix in ("muon", "rho", "memory", "conv_sn"):
        if stem.startswith(prefix):
            return prefix
    return "main" if stem in ("cpu", "cuda") else stem


def goals_of(path: Path, doc: dict[str, Any]) -> list[dict[str, Any]]:
    own = [{"goal": g["goal"], "issue": g.get("issue", ""), "measured": g.get("measured_text", g.get("measured")),
            "target": g.get("target", ""), "met": g.get("met")} for g in doc.get("goals") or []]
    fn = EXTRACTORS.get(kind(path, doc))
    return own + (fn(doc) if fn else [])


def _letter(row: dict[str, Any]) -> str:
    m = re.match(r"\((\w)\)", str(row.get("goal", "")))
    return m.group(1) if m else "~"


def same_machine(recorded: str, here: str) -> str:
    """A note for a result whose recorded machine is not (or may not be) the report's."""
    if here in recorded or recorded.startswith("as recorded"):
        return ""
    if recorded == "not recorded" or recorded.startswith("CPU ("):  # no CPU model in the record
        return " (CPU model not recorded: maybe not this report's machine)"
    return " (**not this report's machine**: compare its ratios, not its times)"


# -- the report ---------------------------------------------------------------------------------------
def _met(v: bool | None) -> str:
    return "no target" if v is None else ("met" if v else "not met")


def demote(md: str, levels: int = 2) -> str:
    out = []
    for line in md.splitlines():
        out.append("#" * levels + line if line.startswith("#") else line)
    return "\n".join(out).strip() + "\n"


def _order(path: Path) -> tuple[int, str]:
    rank = {"sgd_sn": 0, "main": 1, "storage": 2, "repro_time": 3, "muon": 4, "rho": 5, "memory": 6}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        doc = {}
    return rank.get(kind(path, doc), 9), path.name


def collect(results: Path, out: Path, machine: dict[str, Any] | None = None) -> tuple[Path, Path]:
    machine = machine if machine is not None else machine_info()
    rows: list[dict[str, Any]] = []
    sections: list[str] = []
    here = machine["cpu"]
    for path in sorted(results.glob("*.json"), key=_order):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            sections.append(f"## {path.name}\n\nunreadable ({type(exc).__name__}: {exc})\n")
            continue
        if not isinstance(doc, dict):
            continue
        dev = str(doc.get("device") or "not recorded")
        for g in goals_of(path, doc):
            rows.append({**g, "source": path.as_posix(), "machine": dev})
        md = path.with_suffix(".md")
        head = f"## {path.stem}\n\nSource: `{path.as_posix()}`; machine recorded: {dev}{same_machine(dev, here)}.\n"
        body = demote(md.read_text()) if md.is_file() else "(no Markdown table beside it)\n"
        sections.append(head + "\n" + body)
    rows.sort(key=_letter)  # the issue's order, (a) to (e); stable within a letter
    lines = ["# optlab benchmarks", "",
             "Collected by `python -m benchmarks.report` from `benchmarks/results/*.json` (run by `make bench`). Each",
             "benchmark times optlab against its peer in the same process, interleaved, and reports median ratios;",
             "absolute times depend on the machine and on what else it was running (each section gives its load average).", "",
             "## Machine", "", *machine_lines(machine), "",
             "## Goals", "",
             "| goal | issue | measured | target | | source | machine |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        met = _met(r["met"])
        lines.append(f"| {r['goal']} | {r['issue']} | {r['measured']} | {r['target']} | "
                     f"{'**' + met + '**' if met == 'not met' else met} | {r['source']} | {r['machine']} |")
    n_t = sum(r["met"] is not None for r in rows)
    n_ok = sum(bool(r["met"]) for r in rows)
    lines += ["", f"{n_ok} of {n_t} goals with a target met; {len(rows) - n_t} rows are measurements without one.", ""]
    out.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out / "benchmarks.md", out / "benchmarks.csv"
    md_path.write_text("\n".join(lines) + "\n" + "\n".join(sections))
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (_met(r["met"]) if k == "met" else r.get(k, "")) for k in COLUMNS})
    return md_path, csv_path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="benchmarks/results")
    ap.add_argument("--out", default="reports")
    args = ap.parse_args(argv)
    md, csv_path = collect(Path(args.results), Path(args.out))
    print(f"wrote {md} and {csv_path}")


if __name__ == "__main__":
    main()
