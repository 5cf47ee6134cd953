"""One statistical standard for every study: spreads over seeds and paired-bootstrap verdicts.

- :func:`spread` / :func:`spread_table`: median and interquartile range (25th/75th percentiles,
  numpy's linear interpolation) of one configuration's values over seeds.
- :func:`paired_ratio_interval`: the ratio ``mean(method) / mean(reference)`` over seeds that both
  sides completed (pairs matched by seed) with a paired bootstrap interval: the same resampled
  seeds on both sides, ``n_resamples`` resamples from a seeded :class:`numpy.random.Generator`, so
  the same inputs always give the same interval. ``direction="down"`` (lower is better, e.g. a
  loss) takes ``mean(reference) / mean(method)`` so that "the method reaches X% of the reference"
  keeps its meaning: above 1 is better than the reference either way.
- :func:`reaches`: the verdict "the method reaches ``bar`` of the reference": ``yes`` when the
  interval's lower end is at or above the bar, ``no`` when its upper end is below it, else
  ``inconclusive``, with an estimate of the number of paired seeds that would decide it.

The interval (``interval="expanded"``, the default) is the *expanded percentile* bootstrap
interval (Hesterberg, "What teachers should know about the bootstrap", 2015, sec. 4.5): the
percentile interval at tails ``Phi(-sqrt(n/(n-1)) * t_{n-1, 1-alpha/2})`` instead of ``alpha/2``.
The plain percentile interval (``interval="percentile"``) is too narrow for few pairs (at 3 seeds
its nominal 95% covers far less), which would turn 3-seed comparisons into confident verdicts;
the expansion corrects that narrowness for small ``n`` and vanishes as ``n`` grows. With 2 or 3
pairs the expanded interval is essentially the range of the resampled ratios, i.e. the range of
the per-seed ratios.

numpy only, plus ``scipy.stats`` (Student t quantile) for the expanded interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np

Direction = Literal["up", "down"]
Answer = Literal["yes", "no", "inconclusive"]
IntervalMethod = Literal["expanded", "percentile"]

LEVEL = 0.95
N_RESAMPLES = 10_000
SEED = 0
SEEDS_CAP = 1000
"""Seed estimates above this are reported as ``">1000"``."""

_CHUNK = 2_000_000  # resampled values held at once (n_resamples x n_pairs is drawn in chunks)


# ---------------------------------------------------------------- spread over seeds



DOWN_HINTS = ("loss", "bpb", "ppl", "perplexity", "error", "time", "mem")
"""A metric whose name contains one of these is lower-is-better when no direction is given."""


def metric_direction(metric: str) -> Direction:
    """``down`` for losses, bits per byte, perplexities, errors, times and memory; else ``up``
    (accuracies, throughput). The one rule the config and the analysis both use."""
    return "down" if any(h in str(metric) for h in DOWN_HINTS) else "up"

@dataclass(frozen=True)
class Spread:
    """Median and quartiles of one configuration's values over seeds (NaN when ``n == 0``)."""

    n: int
    median: float
    q25: float
    q75: float

    @property
    def iqr(self) -> float:
        return self.q75 - self.q25


def spread(values: Iterable[float] | np.ndarray) -> Spread:
    """Median, 25th and 75th percentile (numpy's default linear interpolation); NaNs are dropped."""
    x = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float).ravel()
    x = x[~np.isnan(x)]
    if not len(x):
        return Spread(0, math.nan, math.nan, math.nan)
    q25, med, q75 = np.percentile(x, [25, 50, 75])
    return Spread(len(x), float(med), float(q25), float(q75))


def spread_table(frame: Any, by: Sequence[str], value: str) -> Any:
    """Per group of ``by``: ``<value>_median``, ``<value>_q25``, ``<value>_q75``, ``<value>_n``.

    ``frame`` is a pandas DataFrame (pandas is imported only here); NaN values are dropped, NaN
    group keys are kept.
    """
    import pandas as pd

    rows = []
    for key, g in frame.groupby(list(by), dropna=False, sort=True):
        s = spread(pd.to_numeric(g[value], errors="coerce").to_numpy(dtype=float))
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(by, key)), f"{value}_median": s.median, f"{value}_q25": s.q25,
                     f"{value}_q75": s.q75, f"{value}_n": s.n})
    cols = [*by, f"{value}_median", f"{value}_q25", f"{value}_q75", f"{value}_n"]
    return pd.DataFrame(rows, columns=cols)


# ---------------------------------------------------------------- pairing


def paired(method: Mapping[Any, float] | Sequence[float] | np.ndarray | Any,
           reference: Mapping[Any, float] | Sequence[float] | np.ndarray | Any) -> tuple[np.ndarray, np.ndarray, list]:
    """The (method, reference, seeds) values of the seeds both sides have, finite on both.

    Mappings and pandas Series are matched on their keys / index (the seed), in sorted order;
    plain sequences are matched by position and must have the same length.
    """
    def as_map(v: Any) -> dict | None:
        if isinstance(v, Mapping):
            return dict(v)
        if hasattr(v, "index") and hasattr(v, "to_numpy") and hasattr(v, "items"):  # pandas Series
            return dict(v.items())
        return None

    ma, ra = as_map(method), as_map(reference)
    if (ma is None) != (ra is None):
        raise TypeError("pair two mappings/Series (matched by seed) or two sequences (matched by position)")
    if ma is not None and ra is not None:
        seeds = sorted(set(ma) & set(ra), key=lambda s: (str(type(s)), s))
        m = np.array([float(ma[s]) for s in seeds], dtype=float)
        r = np.array([float(ra[s]) for s in seeds], dtype=float)
    else:
        m, r = np.asarray(method, dtype=float).ravel(), np.asarray(reference, dtype=float).ravel()
        if len(m) != len(r):
            raise ValueError(f"paired sequences differ in length ({len(m)} vs {len(r)})")
        seeds = list(range(len(m)))
    ok = np.isfinite(m) & np.isfinite(r)
    return m[ok], r[ok], [s for s, keep in zip(seeds, ok) if keep]


# ---------------------------------------------------------------- the ratio and its interval


@dataclass(frozen=True)
class RatioInterval:
    """``estimate`` = mean(method)/mean(reference) over the pairs (reference/method for ``down``),
    with its paired bootstrap interval [``low``, ``high``] (NaN when undefined: see ``reason``)."""

    estimate: float
    low: float
    high: float
    n_pairs: int
    direction: Direction
    level: float
    interval: IntervalMethod
    n_resamples: int
    reason: str = ""
    se: float = math.nan  # the bootstrap standard error of the ratio (sd of the resampled ratios)

    @property
    def defined(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))


def critical_value(n: int | np.ndarray, level: float = LEVEL, interval: IntervalMethod = "expanded") -> np.ndarray | float:
    """The normal quantile whose tails the interval takes: ``z_{1-alpha/2}`` for the percentile
    interval, ``sqrt(n/(n-1)) * t_{n-1, 1-alpha/2}`` for the expanded one (``n >= 2``)."""
    alpha = 1.0 - level
    if interval == "percentile":
        from statistics import NormalDist

        z = NormalDist().inv_cdf(1.0 - alpha / 2)
        return np.full(np.shape(n), z) if np.ndim(n) else z
    if interval != "expanded":
        raise ValueError(f"interval: unknown value {interval!r}; allowed: expanded, percentile")
    from scipy.stats import t

    n_arr = np.asarray(n, dtype=float)
    if np.any(n_arr < 2):
        raise ValueError("the expanded interval needs at least 2 pairs")
    c = np.sqrt(n_arr / (n_arr - 1.0)) * t.ppf(1.0 - alpha / 2, n_arr - 1.0)
    return c if np.ndim(n) else float(c)


def _tail(n: int, level: float, interval: IntervalMethod) -> float:
    if interval == "percentile":
        return (1.0 - level) / 2
    from scipy.stats import norm

    return float(norm.sf(critical_value(n, level, interval)))


def paired_ratio_interval(
    method: Any,
    reference: Any,
    *,
    direction: Direction = "up",
    level: float = LEVEL,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
    interval: IntervalMethod = "expanded",
) -> RatioInterval:
    """The paired ratio of means and its bootstrap interval (see the module docstring).

    ``method`` and ``reference`` are per-seed values (mappings/Series by seed, or aligned
    sequences; see :func:`paired`). Each resample draws ``n`` of the ``n`` pairs with
    replacement and takes the ratio of the two resampled means. The ratio needs positive means
    (accuracies, losses); a non-positive denominator value leaves the interval undefined.
    """
    if direction not in ("up", "down"):
        raise ValueError(f"direction: unknown value {direction!r}; allowed: up, down")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    m, r, _ = paired(method, reference)
    num, den = (m, r) if direction == "up" else (r, m)
    n = len(m)
    nan = math.nan

    def out(est: float, lo: float = nan, hi: float = nan, reason: str = "", se: float = nan) -> RatioInterval:
        return RatioInterval(est, lo, hi, n, direction, level, interval, n_resamples if not reason else 0, reason, se)

    if n == 0:
        return out(nan, reason="no seed completed under both")
    if np.any(den <= 0) or np.any(num < 0):
        return out(nan, reason="the ratio needs positive values")
    est = float(num.mean() / den.mean())
    if n < 2:
        return out(est, reason="fewer than 2 paired seeds")
    rng = np.random.default_rng(seed)
    boot = np.empty(n_resamples, dtype=float)
    step = max(1, _CHUNK // n)
    for start in range(0, n_resamples, step):
        k = min(step, n_resamples - start)
        idx = rng.integers(0, n, size=(k, n))
        boot[start:start + k] = num[idx].mean(axis=1) / den[idx].mean(axis=1)
    tail = _tail(n, level, interval)
    lo, hi = np.quantile(boot, [tail, 1.0 - tail])
    return out(est, float(lo), float(hi), se=float(np.std(boot, ddof=1)))


# ---------------------------------------------------------------- the verdict


@dataclass(frozen=True)
class Verdict:
    """Whether the method reaches ``bar`` of the reference: ``answer`` yes / no / inconclusive.

    ``seeds_needed``: for an inconclusive answer, the estimated number of paired seeds that
    would decide it (``SEEDS_CAP + 1`` stands for "more than the cap"); None when decided or
    not estimable. ``method`` / ``reference``: median and IQR of each side over the paired seeds.
    """

    answer: Answer
    bar: float
    ratio: RatioInterval
    seeds_needed: int | None
    reason: str
    method: Spread
    reference: Spread
    cap: int = SEEDS_CAP

    @property
    def estimate(self) -> float:
        return self.ratio.estimate

    @property
    def low(self) -> float:
        return self.ratio.low

    @property
    def high(self) -> float:
        return self.ratio.high

    @property
    def n_pairs(self) -> int:
        return self.ratio.n_pairs

    @property
    def seeds_needed_text(self) -> str:
        """``"12"``, ``">1000"``, or ``""`` when there is no estimate."""
        if self.seeds_needed is None:
            return ""
        return f">{self.cap}" if self.seeds_needed > self.cap else str(self.seeds_needed)


def seeds_needed(
    n: int,
    estimate: float,
    se: float,
    bar: float,
    *,
    level: float = LEVEL,
    interval: IntervalMethod = "expanded",
    cap: int = SEEDS_CAP,
) -> int | None:
    """An estimate of the paired seeds that would move the interval off the bar.

    Assumes the estimate and the per-seed spread stay as observed, so that the ratio's standard
    error ``se`` (the bootstrap's, at ``n`` pairs) shrinks as ``1/sqrt(n')`` and the interval's
    half-width is ``c(n') * se * sqrt(n / n')`` (``c``: :func:`critical_value`; for the percentile
    interval this is ``ceil(n * (half_width / |estimate - bar|)^2)``). Returns the smallest
    ``n' > n`` whose half-width no longer reaches the bar, ``cap + 1`` when none up to ``cap``
    does (or the estimate sits on the bar), None when not estimable (fewer than 2 pairs or no
    spread). An estimate, not a power analysis: the next seeds may move the estimate itself.
    (The interval's own width is not used: with 2 or 3 pairs it is capped by the range of the
    per-seed ratios, which would make the extrapolation far too optimistic.)
    """
    if n < 2 or any(not math.isfinite(v) for v in (estimate, se, bar)) or se <= 0:
        return None
    gap = abs(estimate - bar)
    if gap == 0.0 or n + 1 > cap:
        return cap + 1
    grid = np.arange(n + 1, cap + 1, dtype=float)
    half = np.asarray(critical_value(grid, level, interval), dtype=float) * se * np.sqrt(n / grid)
    ok = np.nonzero(half <= gap * (1.0 + 1e-12))[0]
    return int(grid[ok[0]]) if len(ok) else cap + 1


def reaches(
    method: Any,
    reference: Any,
    bar: float,
    *,
    direction: Direction = "up",
    level: float = LEVEL,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
    interval: IntervalMethod = "expanded",
    cap: int = SEEDS_CAP,
) -> Verdict:
    """Does the method reach ``bar`` (e.g. 0.95) of the reference? See the module docstring.

    ``yes``: the interval's lower end >= bar; ``no``: its upper end < bar; otherwise
    ``inconclusive`` (also with fewer than 2 paired seeds or an undefined ratio, with the reason).
    """
    ratio = paired_ratio_interval(method, reference, direction=direction, level=level,
                                  n_resamples=n_resamples, seed=seed, interval=interval)
    m, r, _ = paired(method, reference)
    sm, sr = spread(m), spread(r)
    if not ratio.defined:
        return Verdict("inconclusive", bar, ratio, None, ratio.reason, sm, sr, cap)
    pct = f"{100 * bar:g}%"
    if ratio.low >= bar:
        return Verdict("yes", bar, ratio, None, f"the interval's lower end is at or above {pct}", sm, sr, cap)
    if ratio.high < bar:
        return Verdict("no", bar, ratio, None, f"the interval's upper end is below {pct}", sm, sr, cap)
    need = seeds_needed(ratio.n_pairs, ratio.estimate, ratio.se, bar, level=level, interval=interval, cap=cap)
    return Verdict("inconclusive", bar, ratio, need, f"the interval contains {pct}", sm, sr, cap)
