"""optlab.stats against closed forms and exact references (numpy percentiles, exact float ratios,
the coverage of a known ratio on simulated normal data)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from optlab import stats
from optlab.stats import paired, paired_ratio_interval, reaches, seeds_needed, spread, spread_table


# ---------------------------------------------------------------- spread


@pytest.mark.parametrize("values", [[0.3], [0.9, 0.1], [1.0, 2.0, 4.0], [5.0, 1.0, 3.0, 2.0, 8.0, 13.0]])
def test_spread_equals_numpy_percentile(values: list[float]) -> None:
    s = spread(values + [math.nan])  # NaN is dropped
    q25, med, q75 = np.percentile(values, [25, 50, 75])
    assert (s.n, s.median, s.q25, s.q75) == (len(values), med, q25, q75)
    assert s.iqr == pytest.approx(q75 - q25)


def test_spread_of_nothing_is_nan() -> None:
    s = spread([math.nan])
    assert s.n == 0 and math.isnan(s.median) and math.isnan(s.iqr)


def test_spread_table_per_group() -> None:
    df = pd.DataFrame({"cfg": ["a", "a", "a", "b", "b"], "v": [1.0, 3.0, 2.0, 10.0, np.nan]})
    t = spread_table(df, ["cfg"], "v").set_index("cfg")
    assert t.loc["a", "v_median"] == 2.0 and t.loc["a", "v_q25"] == np.percentile([1, 2, 3], 25)
    assert t.loc["a", "v_q75"] == np.percentile([1, 2, 3], 75) and t.loc["a", "v_n"] == 3
    assert t.loc["b", "v_median"] == 10.0 and t.loc["b", "v_n"] == 1


# ---------------------------------------------------------------- pairing


def test_pairs_are_matched_by_seed() -> None:
    m = pd.Series({0: 0.9, 1: 0.8, 2: np.nan, 5: 0.7})
    r = {1: 0.5, 0: 0.6, 2: 0.4, 3: 0.3}
    a, b, seeds = paired(m, r)
    assert seeds == [0, 1] and a.tolist() == [0.9, 0.8] and b.tolist() == [0.6, 0.5]
    with pytest.raises(ValueError, match="length"):
        paired([1.0, 2.0], [1.0])
    with pytest.raises(TypeError):
        paired({0: 1.0}, [1.0])


# ---------------------------------------------------------------- the ratio and its interval


@pytest.mark.parametrize("interval", ["expanded", "percentile"])
def test_identical_sides_give_one_with_a_degenerate_interval(interval: str) -> None:
    x = np.array([0.61, 0.93, 0.72, 0.55, 0.88])
    iv = paired_ratio_interval(x, x.copy(), interval=interval)
    assert (iv.estimate, iv.low, iv.high, iv.n_pairs) == (1.0, 1.0, 1.0, 5)


@pytest.mark.parametrize("c", [2.0, 0.5, 0.25])
def test_a_constant_ratio_is_returned_exactly(c: float) -> None:
    # power-of-two factors: every resampled mean ratio is exactly c in floating point
    r = np.array([0.31, 0.72, 0.55, 0.9, 0.47, 0.66])
    iv = paired_ratio_interval(c * r, r)
    assert (iv.estimate, iv.low, iv.high) == (c, c, c)
    # any other factor: equal up to rounding
    iv = paired_ratio_interval(0.9 * r, r)
    assert iv.estimate == pytest.approx(0.9, rel=1e-14) and iv.low == pytest.approx(0.9, rel=1e-14)
    assert iv.high == pytest.approx(0.9, rel=1e-14)


def test_estimate_is_the_ratio_of_means_and_the_interval_lies_within_the_per_seed_ratios() -> None:
    m, r = np.array([0.80, 0.91, 0.70, 0.85]), np.array([0.90, 0.88, 0.92, 0.80])
    for interval in ("expanded", "percentile"):
        iv = paired_ratio_interval(m, r, interval=interval)
        assert iv.estimate == pytest.approx(m.mean() / r.mean())
        # a resampled ratio of means is a weighted mean of per-seed ratios (the mediant inequality)
        assert (m / r).min() - 1e-15 <= iv.low <= iv.estimate <= iv.high <= (m / r).max() + 1e-15
    wide, narrow = (paired_ratio_interval(m, r, interval=k) for k in ("expanded", "percentile"))
    assert wide.high - wide.low > narrow.high - narrow.low  # the small-sample expansion


def test_the_interval_is_deterministic_and_seeded() -> None:
    rng = np.random.default_rng(3)
    r = rng.uniform(0.5, 1.0, 8)
    m = r * rng.normal(0.95, 0.05, 8)
    a, b = paired_ratio_interval(m, r, seed=7), paired_ratio_interval(m, r, seed=7)
    assert (a.low, a.high) == (b.low, b.high)
    assert (a.low, a.high) != (paired_ratio_interval(m, r, seed=8).low, paired_ratio_interval(m, r, seed=8).high)


def test_direction_down_takes_reference_over_method() -> None:
    loss_r = np.array([1.2, 0.9, 1.5, 1.1, 1.0])
    loss_m = 0.5 * loss_r  # half the reference's loss: twice as good
    down = paired_ratio_interval(loss_m, loss_r, direction="down")
    assert (down.estimate, down.low, down.high) == (2.0, 2.0, 2.0)
    up = paired_ratio_interval(loss_m, loss_r, direction="up")
    assert up.estimate == 0.5
    # "down" on (method, reference) is "up" on (reference, method), resample for resample
    rng = np.random.default_rng(0)
    a, b = rng.uniform(1, 2, 6), rng.uniform(1, 2, 6)
    x, y = paired_ratio_interval(a, b, direction="down"), paired_ratio_interval(b, a, direction="up")
    assert (x.estimate, x.low, x.high) == (y.estimate, y.low, y.high)
    assert reaches(loss_m, loss_r, 0.95, direction="down").answer == "yes"
    assert reaches(loss_m, loss_r, 0.95, direction="up").answer == "no"
    with pytest.raises(ValueError, match="direction"):
        paired_ratio_interval(a, b, direction="sideways")  # type: ignore[arg-type]


def _coverage(n: int, interval: str, reps: int, true: float = 0.9) -> float:
    rng = np.random.default_rng(12345)
    hits = 0
    for i in range(reps):
        r = rng.normal(1.0, 0.1, n)
        m = true * r + rng.normal(0.0, 0.05, n)  # E[m] / E[r] = true
        iv = paired_ratio_interval(m, r, n_resamples=1000, seed=i, interval=interval)
        hits += iv.low <= true <= iv.high
    return hits / reps


def test_coverage_on_simulated_normal_data() -> None:
    # the 95% interval covers the true ratio of means about 95% of the time (loose bounds: 200 replications)
    expanded = _coverage(12, "expanded", 200)
    assert 0.89 <= expanded <= 0.995
    assert 0.85 <= _coverage(40, "percentile", 200) <= 0.99
    # with few pairs the plain percentile interval is too narrow; the expansion restores most of it
    assert _coverage(5, "percentile", 200) < _coverage(5, "expanded", 200)


# ---------------------------------------------------------------- the verdict


def test_clearly_better_method_reaches_the_bar() -> None:
    r = np.array([0.80, 0.85, 0.82, 0.78, 0.84])
    v = reaches(r * np.array([1.10, 1.12, 1.08, 1.11, 1.09]), r, 0.95)
    assert v.answer == "yes" and v.low >= 0.95 and v.seeds_needed is None and v.seeds_needed_text == ""
    assert v.method.median == pytest.approx(np.median(r * np.array([1.10, 1.12, 1.08, 1.11, 1.09])))
    assert v.reference.q25 == np.percentile(r, 25) and v.reference.q75 == np.percentile(r, 75)


def test_clearly_worse_method_does_not() -> None:
    r = np.array([0.80, 0.85, 0.82, 0.78, 0.84])
    v = reaches(0.7 * r * np.array([1.0, 1.02, 0.99, 1.01, 0.98]), r, 0.95)
    assert v.answer == "no" and v.high < 0.95 and v.seeds_needed is None


def test_overlapping_is_inconclusive_with_more_seeds_needed() -> None:
    r = np.ones(4)
    m = np.array([0.90, 1.00, 0.93, 0.99])  # per-seed ratios on both sides of 95%
    v = reaches(m, r, 0.95)
    assert v.answer == "inconclusive" and v.low < 0.95 <= v.high
    assert v.seeds_needed is not None and v.seeds_needed > 4
    assert "contains 95%" in v.reason


def test_the_bar_on_the_lower_end_counts_as_reached() -> None:
    x = np.array([0.5, 0.7, 0.6])
    assert reaches(x, x, 1.0).answer == "yes"  # degenerate interval [1, 1] with the bar at 1


def test_fewer_than_two_pairs_is_inconclusive_with_the_reason() -> None:
    v = reaches({0: 0.9, 1: np.nan}, {0: 0.5, 1: 0.5}, 0.95)
    assert v.answer == "inconclusive" and v.n_pairs == 1 and "fewer than 2" in v.reason
    assert v.estimate == pytest.approx(1.8) and math.isnan(v.low) and v.seeds_needed is None
    v = reaches({}, {0: 0.5}, 0.95)
    assert v.answer == "inconclusive" and v.n_pairs == 0 and math.isnan(v.estimate)


def test_seeds_needed_closed_form_for_the_percentile_interval() -> None:
    z = stats.critical_value(4, interval="percentile")
    assert z == pytest.approx(1.959964, abs=1e-6)
    # half-width z * se = 0.1 at 4 seeds, 0.05 from the bar: n * (0.1 / 0.05)^2 = 16 seeds
    assert seeds_needed(4, 1.0, 0.1 / z, 0.95, interval="percentile") == 16
    assert seeds_needed(4, 1.0, 0.1 / z, 0.98, interval="percentile") == math.ceil(4 * (0.1 / 0.02) ** 2)
    assert seeds_needed(9, 0.9, 0.03 / z, 0.92, interval="percentile") == math.ceil(9 * (0.03 / 0.02) ** 2)
    # the expanded interval's critical value sqrt(n/(n-1)) t_{n-1} is larger: more seeds, and the
    # answer is the first n' with c(n') * se * sqrt(n / n') <= gap
    from scipy.stats import t

    se, gap = 0.02, 0.03
    need = seeds_needed(3, 1.0, se, 1.0 - gap, interval="expanded")
    c = lambda k: math.sqrt(k / (k - 1)) * t.ppf(0.975, k - 1)  # noqa: E731
    assert c(need) * se * math.sqrt(3 / need) <= gap < c(need - 1) * se * math.sqrt(3 / (need - 1))
    assert need > seeds_needed(3, 1.0, se, 1.0 - gap, interval="percentile")
    # on the bar, or beyond the cap
    assert seeds_needed(4, 0.95, 0.01, 0.95, cap=50) == 51
    assert seeds_needed(4, 1.0, 0.3, 0.999, interval="percentile", cap=100) == 101
    # not estimable
    assert seeds_needed(1, 1.0, 0.1, 0.95) is None and seeds_needed(4, 1.0, 0.0, 0.95) is None


def test_inconclusive_seeds_needed_uses_the_bootstrap_se() -> None:
    m, r = np.array([0.90, 1.00, 0.93, 0.99]), np.ones(4)
    v = reaches(m, r, 0.95)
    se = np.std(m, ddof=0) / math.sqrt(4)  # the bootstrap se of a mean is the plug-in sd / sqrt(n)
    assert v.ratio.se == pytest.approx(se, rel=0.05)
    assert v.seeds_needed == seeds_needed(4, v.estimate, v.ratio.se, 0.95)


def test_seeds_needed_text_caps() -> None:
    v = reaches(np.array([0.5, 1.5]), np.ones(2), 1.0)  # the estimate sits exactly on the bar
    assert v.answer == "inconclusive" and v.estimate == 1.0
    assert v.seeds_needed == stats.SEEDS_CAP + 1 and v.seeds_needed_text == f">{stats.SEEDS_CAP}"
