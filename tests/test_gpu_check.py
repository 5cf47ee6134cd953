"""The prepared GPU check (benchmarks/gpu_check.py) at tiny sizes on the CPU, so it cannot rot: every
item runs and reports a status and finite numbers, a failing item is recorded without stopping the
rest, the budget skips what it does not reach, the alarms cut a run at its share (keeping what it
got to) and stop an overrunning item, and the watchdog ends a check stuck in one."""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from pathlib import Path

import pytest
import torch

import benchmarks.gpu_check as G

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = tuple(s for s in G.STATUSES if not s.startswith("skipped"))
INJECTED = "injected failure (test)"


def _boom(ctx: G.Ctx) -> dict:
    raise RuntimeError(INJECTED)


def _oom(ctx: G.Ctx) -> dict:
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny check of every planned item, with bench.rho made to fail and an OOM item added after it."""
    out = tmp_path_factory.mktemp("gpu")
    planned = G.plan()
    items = []
    for it in planned:
        items.append(dataclasses.replace(it, fn=_boom) if it.name == "bench.rho" else it)
        if it.name == "bench.rho":
            items.append(G.Item("injected.oom", "test", "an item that runs out of memory", 0.1, _oom))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread avoids OpenMP spin-waits on a shared CPU
    try:
        check = G.Check(items, torch.device("cpu"), G.Sizes.of(True), 300.0, out, "pytest tiny check", alarms=True)
        t = time.perf_counter()
        check.run()
        seconds = time.perf_counter() - t
    finally:
        torch.set_num_threads(threads)
    md, js = check.paths()
    return {"planned": planned, "doc": json.loads(js.read_text()), "md": md.read_text(), "seconds": seconds,
            "paths": (md, js)}


def test_the_tiny_check_writes_a_report_named_for_the_device(tiny):
    md, js = tiny["paths"]
    assert md.name == "cpu-tiny.md" and js.name == "cpu-tiny.json"
    doc = tiny["doc"]
    assert doc["tiny"] is True and doc["finished"] is True and doc["device"]["type"] == "cpu"
    assert doc["device"]["torch"] == torch.__version__ and doc["budget_s"] == 300.0
    assert "# optlab GPU check:" in tiny["md"] and "## Details" in tiny["md"]


def test_every_planned_item_is_reported_in_order_with_a_status(tiny):
    planned = [it.name for it in tiny["planned"]]
    names = [r["name"] for r in tiny["doc"]["items"]]
    assert [n for n in names if n != "injected.oom"] == planned
    groups = {it.group for it in tiny["planned"]}
    assert {"benchmarks", "deep MLP", "studies"} <= groups
    # one item per study of studies.yaml
    studies = [n for n in planned if n.startswith("study.")]
    from optlab import paramfiles

    assert studies == [f"study.{s}" for s in paramfiles.read(ROOT / "params.yaml")["studies"]]
    for r in tiny["doc"]["items"]:
        assert r["status"] in ALLOWED or r["status"].startswith("skipped("), r
        assert f"| {r['name']} |" in tiny["md"]


def test_a_failing_item_is_recorded_and_the_rest_still_run(tiny):
    items = {r["name"]: r for r in tiny["doc"]["items"]}
    assert items["bench.rho"]["status"] == "failed" and INJECTED in items["bench.rho"]["error"]
    assert items["bench.rho"]["trace"] and _finite_number(items["bench.rho"]["wall_s"])
    assert items["injected.oom"]["status"] == "oom" and "out of memory" in items["injected.oom"]["error"]
    for name, r in items.items():  # everything else ran (or says why it cannot run on a CPU)
        if name in ("bench.rho", "injected.oom"):
            continue
        assert r["status"] in ("ok", "diverged") or r["status"] == "skipped(requires cuda)", r


def test_the_numbers_are_finite(tiny):
    for r in tiny["doc"]["items"]:
        if r["status"] not in ("ok", "diverged"):
            continue
        assert _finite_number(r["wall_s"]) and r["wall_s"] >= 0
        if r["group"] in ("deep MLP", "studies"):
            assert isinstance(r["steps"], int) and r["steps"] >= 1, r
            for key in ("steps_per_s", "items_per_s", "peak_mem_mb"):
                assert _finite_number(r[key]) and r[key] > 0, (r["name"], key, r.get(key))
            assert r["unit"] in ("examples", "tokens")
        for row in r.get("rows") or []:  # the sub-measurements of the benchmarks and the deep MLP
            assert row["status"] == "ok", (r["name"], row)
            nums = [v for v in row.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            assert nums and all(_finite_number(v) for v in nums), (r["name"], row)


def test_the_deep_mlp_item_runs_every_optimizer(tiny):
    deep = next(r for r in tiny["doc"]["items"] if r["name"] == "deep_mlp")
    assert [(row["optimizer"], row["segments"]) for row in deep["rows"]] == [("sgd", 0), ("sgd", 4), ("sgd_sn", 4),
                                                                             ("adam", 4)]
    assert all(row["loss_finite"] and row["steps"] >= 2 for row in deep["rows"])


def test_study_runs_say_what_ran_and_on_which_data(tiny):
    studies = [r for r in tiny["doc"]["items"] if r["group"] == "studies" and r["status"] == "ok"]
    assert studies
    for r in studies:
        assert "@" in r["what"] and "(tiny sizes)" in r["what"], r["what"]
        assert r["data"].startswith(("synthetic:", "generated")), r["data"]
        assert r["steps"] <= G.Sizes.of(True).study_steps
    gpt = next(r for r in studies if r["name"] == "study.gpt")
    assert "bf16 autocast" in gpt["what"] and gpt["unit"] == "tokens"


def test_the_budget_skips_the_items_it_does_not_reach(tmp_path):
    seen = []

    def slow(ctx: G.Ctx) -> dict:
        seen.append(("slow", ctx.share_s))
        time.sleep(0.3)
        return {"steps": 1}

    def quick(ctx: G.Ctx) -> dict:
        seen.append(("quick", ctx.share_s))
        return {}

    items = [G.Item("a", "test", "sleeps past the budget", 1.0, slow), G.Item("b", "test", "never reached", 1.0, quick),
             G.Item("c", "test", "never reached", 2.0, quick)]
    check = G.Check(items, torch.device("cpu"), G.Sizes.of(True), 0.2, tmp_path, "pytest budget", alarms=False)
    recs = check.run()
    assert [r["status"] for r in recs] == ["ok", "skipped(budget)", "skipped(budget)"]
    assert seen[0][0] == "slow" and seen[0][1] == pytest.approx(0.2 * 1 / 4, abs=0.02)  # its weight's share
    doc = json.loads(check.paths()[1].read_text())
    assert [r["status"] for r in doc["items"]] == ["ok", "skipped(budget)", "skipped(budget)"]
    # a zero budget reaches nothing, and still writes the report
    check = G.Check(G.plan(), torch.device("cpu"), G.Sizes.of(True), 0.0, tmp_path / "zero", "pytest zero", alarms=False)
    assert {r["status"] for r in check.run()} == {"skipped(budget)"}
    assert "skipped(budget)" in check.paths()[0].read_text()


def test_the_shares_follow_the_weights_of_what_is_left(tmp_path):
    shares = {}

    def record(name):
        def fn(ctx):
            shares[name] = ctx.share_s
            return {}
        return fn

    items = [G.Item(n, "test", n, w, record(n)) for n, w in (("a", 1.0), ("b", 3.0))]
    G.Check(items, torch.device("cpu"), G.Sizes.of(True), 100.0, tmp_path, "pytest shares", alarms=False).run()
    assert shares["a"] == pytest.approx(25.0, abs=0.5)  # a quarter of the budget: weight 1 of 1 + 3
    assert shares["b"] == pytest.approx(100.0, abs=0.5)  # the last item gets all that is left (a's unused time too)


def test_the_cli_refuses_a_missing_gpu_and_full_sizes_on_a_cpu(tmp_path, capsys):
    assert G.main(["--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "--tiny" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert G.main(["--device", "cuda", "--out", str(tmp_path)]) == 2
        assert "sees no GPU" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written
    assert G.main(["--list", "--only", "bench.*"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == [it.name for it in G.plan() if it.name.startswith("bench.")]


def test_alarms_cut_a_study_like_item_at_its_share_and_stop_an_overrunning_one(tmp_path):
    if not G.Alarm.available():
        pytest.skip("no interval timer here")

    def run_cut(ctx: G.Ctx) -> dict:  # like a study run: trains until its share ends it, then salvaged
        done = {"steps": 0}
        ctx.salvage = lambda: {"status": "ok", "steps": done["steps"], "steps_per_s": 100.0, "note": "cut"}
        while True:
            time.sleep(0.01)
            done["steps"] += 1

    def run_over(ctx: G.Ctx) -> dict:  # a benchmark that overruns: its finished rows are kept
        rows = ctx.partial.setdefault("rows", [])
        rows.append({"part": "first", "status": "ok", "ms": 1.0})
        rows.append({"part": "second", "status": "running"})
        time.sleep(30)
        return {}

    after = []
    items = [G.Item("cut", "test", "cut at its share", 1.0, run_cut, cut=True),
             G.Item("over", "test", "overruns its cap", 1.0, run_over),
             G.Item("after", "test", "still runs", 2.0, lambda ctx: after.append(ctx.share_s) or {})]
    sizes = dataclasses.replace(G.Sizes.of(True), cap_extra_s=0.2)
    check = G.Check(items, torch.device("cpu"), sizes, 2.0, tmp_path, "pytest alarms", alarms=True, grace_s=0.0)
    import signal

    handler = signal.getsignal(signal.SIGALRM)
    t = time.perf_counter()
    recs = {r["name"]: r for r in check.run()}
    assert time.perf_counter() - t < 2.5
    cut = recs["cut"]
    assert cut["status"] == "ok" and cut["note"] == "cut" and cut["steps"] > 0
    assert cut["cap_s"] == pytest.approx(0.5, abs=0.05) and cut["wall_s"] == pytest.approx(0.5, abs=0.2)
    over = recs["over"]
    assert over["status"] == "timeout" and "cap" in over["error"]
    assert [(r["part"], r["status"]) for r in over["rows"]] == [("first", "ok"), ("second", "timeout")]
    assert recs["after"]["status"] == "ok" and after  # the check went on after both
    assert signal.getsignal(signal.SIGALRM) is handler  # the previous handler is back
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0  # and nothing is left armed


def test_a_real_study_run_cut_at_its_share_reports_the_steps_it_got_to(tmp_path):
    """The engine trains toward a million steps; the alarm ends it at the item's share and the step
    clock (an engine sink) gives the steps done and their rate."""
    if not G.Alarm.available():
        pytest.skip("no interval timer here")
    item = next(it for it in G.plan() if it.name == "study.rho_digits")
    sizes = dataclasses.replace(G.Sizes.of(True), study_steps=1_000_000)
    threads = torch.get_num_threads()
    check = G.Check([item], torch.device("cpu"), sizes, 1.5, tmp_path, "pytest cut", alarms=True, grace_s=0.0)
    (rec,) = check.run()
    assert torch.get_num_threads() == threads  # the engine's own thread setting was undone on the way out
    assert rec["status"] == "ok", rec
    assert rec["note"].startswith("cut at its share after") and rec["note"].endswith("of 1000000 steps")
    assert 2 <= rec["steps"] < 1_000_000 and _finite_number(rec["steps_per_s"]) and rec["steps_per_s"] > 0
    assert rec["data"].startswith("synthetic:") and "@" in rec["what"]
    assert rec["wall_s"] == pytest.approx(1.5, abs=0.5)


def test_the_watchdog_ends_a_check_stuck_in_an_item(tmp_path):
    """An item stuck where no alarm reaches it (alarms off here): at the budget and its grace the
    watchdog writes the report (the stuck item killed(budget), the rest skipped(budget)) and calls
    its exit; the command's exit is os._exit(3), here a callback that reads the report."""
    seen = {}

    def stuck(ctx: G.Ctx) -> dict:
        time.sleep(1.5)
        return {}

    items = [G.Item("first", "test", "quick", 1.0, lambda ctx: {}), G.Item("stuck", "test", "stuck", 1.0, stuck),
             G.Item("later", "test", "never reached", 1.0, lambda ctx: {})]
    check = G.Check(items, torch.device("cpu"), G.Sizes.of(True), 0.3, tmp_path, "pytest watchdog", alarms=False)
    check.warm()
    dog = G.Watchdog(check, 0.6, lambda c: seen.update(doc=json.loads(c.paths()[1].read_text())))
    dog.start()
    try:
        check.run()
    finally:
        dog.cancel()
    assert dog.fired
    assert [r["status"] for r in seen["doc"]["items"]] == ["ok", "killed(budget)", "skipped(budget)"]
    assert "budget" in seen["doc"]["items"][1]["error"] and seen["doc"]["finished"] is True
    # the check stopped there: what the stuck item returned later did not overwrite the report
    assert [r["status"] for r in json.loads(check.paths()[1].read_text())["items"]] == ["ok", "killed(budget)",
                                                                                         "skipped(budget)"]


def test_the_command_writes_its_report_and_stops_its_watchdog(tmp_path, capsys):
    before = {t.ident for t in threading.enumerate()}
    assert G.main(["--tiny", "--device", "cpu", "--only", "bench.rho", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu-tiny.json", "cpu-tiny.md"]
    doc = json.loads((tmp_path / "cpu-tiny.json").read_text())
    assert [(r["name"], r["status"]) for r in doc["items"]] == [("bench.rho", "ok")]
    assert doc["command"].startswith("python -m benchmarks.gpu_check --tiny")
    time.sleep(0.05)
    assert not [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]  # no watchdog left behind
