"""``make bench-drift``: our drift check vs plain Evidently ``DataDriftPreset``, same windows, one run.

A synthetic 20-column frame (14 numerical, 6 categorical, some nulls) gives a reference and current
windows: stable, subtle (shifts near the 0.1 threshold), covariate (8 columns) and broad (12 columns)
drift. At each size the reference profile is built once (timed on its own), then every window is checked
by ``check_drift`` and by a full Evidently report with the same methods and thresholds (Wasserstein and
Jensen-Shannon at 0.1, which is also what Evidently picks on its own for samples over 1,000 rows). Prints
the times, the speed-up and how many per-column verdicts agree. Evidently takes minutes at 1M rows, so
it runs one window there. The comparison uses Evidently's exact formula (``clip_quantile=0``); the
timing of the default, clipped policy is printed beside it.

Then robustness, on the generator's fraud data in 2,000-row windows (the monitor's): how often
same-distribution windows alarm, how often a 0.5 std shift of one feature is caught, each with and
without a handful of extreme rows, for the default policy and for Evidently's exact formula (the old
check), in the same run. ``python -m monitoring.bench robustness`` runs only that part.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from typing import TypeVar

import numpy as np
import pandas as pd

from driftloop.contracts import MODEL_FEATURES
from monitoring.drift import (
    CATEGORICAL,
    DRIFT,
    NUMERICAL,
    DriftPolicy,
    NumericalProfile,
    ReferenceProfile,
    build_profile,
    check_drift,
    evidently_drift,
)

NUMERICAL_COLUMNS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "num_00": lambda g, n: g.normal(0.0, 1.0, n),
    "num_01": lambda g, n: g.normal(100.0, 15.0, n),
    "num_02": lambda g, n: g.lognormal(3.0, 0.8, n),
    "num_03": lambda g, n: g.exponential(50.0, n),
    "num_04": lambda g, n: g.gamma(2.0, 2.0, n),
    "num_05": lambda g, n: g.uniform(0.0, 1.0, n),
    "num_06": lambda g, n: g.beta(2.0, 5.0, n),
    "num_07": lambda g, n: g.standard_t(5.0, n),
    "num_08": lambda g, n: g.poisson(30.0, n),
    "num_09": lambda g, n: g.integers(0, 24, n),
    "num_10": lambda g, n: g.integers(0, 10_000, n),
    "num_11": lambda g, n: np.where(g.uniform(size=n) < 0.3, g.normal(-2.0, 0.5, n), g.normal(1.0, 1.0, n)),
    "num_12": lambda g, n: np.where(g.uniform(size=n) < 0.08, np.nan, g.lognormal(1.0, 0.5, n)),
    "num_13": lambda g, n: np.where(g.uniform(size=n) < 0.03, np.nan, g.normal(5.0, 2.0, n)).astype(np.float32),
}
CATEGORICAL_COLUMNS: dict[str, tuple[float, ...]] = {  # category shares, in order
    "cat_00": (0.6, 0.3, 0.1),
    "cat_01": (0.3, 0.15, 0.2, 0.15, 0.1, 0.1),
    "cat_02": (0.2, 0.15, 0.12, 0.1, 0.08, 0.08, 0.07, 0.06, 0.05, 0.04, 0.03, 0.02),
    "cat_03": (0.85, 0.15),
    "cat_04": (0.4, 0.25, 0.15, 0.1, 0.1),
    "cat_05": (0.25, 0.2, 0.15, 0.1, 0.1, 0.1, 0.05, 0.05),
}
T = TypeVar("T")
COLUMN_KINDS = {**dict.fromkeys(NUMERICAL_COLUMNS, NUMERICAL), **dict.fromkeys(CATEGORICAL_COLUMNS, CATEGORICAL)}

# Drift per window: numerical columns move by a share of their std, categorical shares tilt towards their
# reverse order by a share (0 = unchanged, 1 = reversed).
WINDOWS: dict[str, dict[str, float]] = {
    "stable": {},
    "subtle": {"num_00": 0.08, "num_01": 0.1, "num_02": 0.12, "num_05": 0.09, "cat_01": 0.25, "cat_02": 0.3},
    "covariate": {"num_02": 0.5, "num_03": 0.4, "num_07": 0.3, "num_10": 0.6, "num_12": 1.0, "num_13": 0.25,
                  "cat_00": 0.6, "cat_04": 0.8},
    "broad": {**{f"num_{i:02d}": 0.2 + 0.05 * i for i in range(9)}, "cat_00": 0.6, "cat_01": 0.8,
              "cat_02": 0.7, "cat_05": 0.9},
}


def synthetic_frame(rows: int, seed: int, drift: Mapping[str, float] | None = None) -> pd.DataFrame:
    """``rows`` x 20 columns; ``drift`` maps a column to its shift (see ``WINDOWS``)."""
    g = np.random.default_rng(seed)
    drift = drift or {}
    data: dict[str, np.ndarray] = {}
    for name, draw in NUMERICAL_COLUMNS.items():
        values = draw(g, rows)
        if drift.get(name):
            scale = float(np.nanstd(draw(np.random.default_rng(0), 50_000)))  # the undrifted std
            shift = drift[name] * scale
            values = values + np.asarray(round(shift) if values.dtype.kind == "i" else shift, dtype=values.dtype)
        data[name] = values
    for name, shares in CATEGORICAL_COLUMNS.items():
        p = np.asarray(shares)
        tilt = drift.get(name, 0.0)
        p = (1 - tilt) * p + tilt * p[::-1]
        labels = np.asarray([f"{name}_{i}" for i in range(p.size)], dtype=object)
        values = labels[g.choice(p.size, rows, p=p / p.sum())]
        if name == "cat_04":
            values[g.uniform(size=rows) < 0.05] = None
        data[name] = values
    return pd.DataFrame(data)


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    gc.collect()
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def run_size(rows: int, windows: list[str], evidently_windows: list[str], policy: DriftPolicy,
             clipped: DriftPolicy) -> dict[str, float]:
    numerical = sum(k == NUMERICAL for k in COLUMN_KINDS.values())
    say(f"\n{rows:,} rows x {len(COLUMN_KINDS)} columns ({numerical} numerical, "
        f"{len(COLUMN_KINDS) - numerical} categorical); reference {rows:,} rows")
    reference = synthetic_frame(rows, seed=1)
    profile, t_profile = timed(lambda: build_profile(reference, COLUMN_KINDS))
    say(f"  our profile build (once per reference):  {t_profile:7.2f} s")
    ours_t, clipped_t, theirs_t, agree, total = [], [], [], 0, 0
    for i, window in enumerate(windows):
        current = synthetic_frame(rows, seed=100 + i, drift=WINDOWS[window])
        report, t_ours = timed(lambda current=current: check_drift(profile, current, policy))
        robust, t_clipped = timed(lambda current=current: check_drift(profile, current, clipped))
        ours_t.append(t_ours)
        clipped_t.append(t_clipped)
        line = (f"  window {window:<10} ours {t_ours:6.2f} s  verdict {report.verdict:<9} "
                f"drifted {len(report.drifted_columns):>2}/20 (clipped {t_clipped:5.2f} s, "
                f"{len(robust.drifted_columns):>2}/20)")
        if window in evidently_windows:
            theirs, t_theirs = timed(lambda current=current: evidently_drift(reference, current, COLUMN_KINDS, policy))
            theirs_t.append(t_theirs)
            same = [c for c, r in theirs.items() if r.drifted == report.columns[c].drifted]
            agree, total = agree + len(same), total + len(theirs)
            worst = max(abs(r.score - report.columns[c].score) for c, r in theirs.items())
            line += (f" | Evidently {t_theirs:7.2f} s  drifted {sum(r.drifted for r in theirs.values()):>2}/20"
                     f"  agree {len(same)}/{len(theirs)}  max |score diff| {worst:.1e}")
        say(line)
        del current
    ours, theirs_med = statistics.median(ours_t), statistics.median(theirs_t)
    robust = statistics.median(clipped_t)
    say(f"  median check: ours {ours:.2f} s, Evidently DataDriftPreset {theirs_med:.2f} s "
        f"-> {theirs_med / ours:.0f}x faster ({theirs_med / (ours + t_profile):.0f}x counting the profile build)")
    say(f"  median check with the default policy (clipped): {robust:.2f} s -> {theirs_med / robust:.0f}x faster")
    say(f"  per-column verdicts agreeing with Evidently: {agree}/{total} ({agree / total:.1%})")
    return {"profile": t_profile, "ours": ours, "clipped": robust, "evidently": theirs_med, "agree": agree / total}


# --- robustness: a handful of extreme rows, on the monitor's own kind of data ------------------------------

WORLD = dict(rows=60_000, customers=2_000, merchants=200, days=60, seed=23)  # the model tests' world
REFERENCE_ROWS = 5_000  # what training logs as the reference sample
SHIFTED = ("amount", "merchant_fraud_rate_30d", "account_age_days")  # one heavy-tailed, one bounded, one integer


def fraud_world() -> tuple[pd.DataFrame, pd.DataFrame]:
    """(reference sample, the rest) of the generator's transactions with their features, joined as Feast
    joins them (the day's customer and merchant snapshot)."""
    from datetime import date

    from pipelines.steps import ingest

    data = ingest.generate(ingest.GeneratorConfig(**WORLD, end=date(2026, 10, 1)))
    tx = data.transactions.assign(day=data.transactions["event_timestamp"].dt.floor("D"))
    cust = data.customers.drop(columns="created_timestamp").rename(columns={"event_timestamp": "day"})
    merch = data.merchants.drop(columns="created_timestamp").rename(columns={"event_timestamp": "day"})
    frame = tx.merge(cust, on=["customer_id", "day"]).merge(merch, on=["merchant_id", "day"])[list(MODEL_FEATURES)]
    order = np.random.default_rng(0).permutation(len(frame))
    return frame.iloc[order[:REFERENCE_ROWS]].reset_index(drop=True), frame.iloc[order[REFERENCE_ROWS:]]


def with_extreme_rows(window: pd.DataFrame, profile: ReferenceProfile, rows: int, far: bool) -> pd.DataFrame:
    """``window`` with its first ``rows`` rows extreme in every numerical feature: ``far`` puts them a
    thousand reference standard deviations above the reference's maximum (flagged as implausible), else at
    the maximum itself (plausible, so data quality has nothing to say)."""
    out = window.copy()
    for name, ref in profile.columns.items():
        if isinstance(ref, NumericalProfile) and rows:
            value = ref.high + (1_000 * ref.std if far else 0.0)
            out[name] = out[name].astype(np.float64)
            out.iloc[:rows, out.columns.get_loc(name)] = value
    return out


def robustness(trials: int = 300, window_rows: int = 2_000, extreme: int = 5) -> dict[str, dict[str, float]]:
    """Rates over ``trials`` windows per case, for the default policy and Evidently's exact formula."""
    reference, rest = fraud_world()
    policies = {"default (clipped)": DriftPolicy(), "Evidently formula (old)": DriftPolicy(clip_quantile=0.0)}
    profile = build_profile(reference)
    say(f"\nrobustness: generator data, reference {len(reference):,} rows, {trials} windows of {window_rows:,} "
        f"rows per case, {extreme} extreme rows where said; dataset drift at share >= {DriftPolicy().drift_share}")
    g = np.random.default_rng(7)
    picks = [g.choice(len(rest), window_rows, replace=False) for _ in range(trials)]
    results: dict[str, dict[str, float]] = {name: {} for name in policies}

    def rate(case: str, make: Callable[[pd.DataFrame], pd.DataFrame], hit: Callable) -> None:
        counts = dict.fromkeys(policies, 0)
        for pick in picks:
            window = make(rest.iloc[pick])
            for name, policy in policies.items():
                counts[name] += bool(hit(check_drift(profile, window, policy)))
        for name in policies:
            results[name][case] = counts[name] / trials
        say(f"  {case:<52} " + "  ".join(f"{n} {counts[n] / trials:6.1%}" for n in policies))

    def shifted(feature: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
        return lambda w: w.assign(**{feature: w[feature] + 0.5 * profile.columns[feature].std})

    def alarm(report) -> bool:
        return report.verdict == DRIFT

    rate("false alarms, same distribution", lambda w: w, alarm)
    rate(f"false alarms, + {extreme} far extreme rows", lambda w: with_extreme_rows(w, profile, extreme, True), alarm)
    rate(f"false alarms, + {extreme} rows at the reference max",
         lambda w: with_extreme_rows(w, profile, extreme, False), alarm)
    rate("false alarms, + 1 far extreme row", lambda w: with_extreme_rows(w, profile, 1, True), alarm)
    rate("any column drifted, same distribution", lambda w: w, lambda r: r.drifted_columns)
    rate(f"data quality flags the {extreme} far rows",
         lambda w: with_extreme_rows(w, profile, extreme, True), lambda r: r.implausible_rows >= extreme)
    rate("data quality flags something, same distribution", lambda w: w, lambda r: r.quality_issues)
    near = 0.12  # just above the 0.1 threshold: where clipping the tails could cost power
    rate(f"{near} std shift of amount caught",
         lambda w: w.assign(amount=w["amount"] + near * profile.columns["amount"].std),
         lambda r: r.columns["amount"].drifted)
    for feature in SHIFTED:
        rate(f"0.5 std shift of {feature} caught", shifted(feature), lambda r, f=feature: r.columns[f].drifted)
        rate(f"  the same + {extreme} far extreme rows",
             lambda w, f=feature: with_extreme_rows(shifted(f)(w), profile, extreme, True),
             lambda r, f=feature: r.columns[f].drifted)
    return results


def main(sizes: tuple[int, ...] = (100_000, 1_000_000), speed: bool = True, robust: bool = True) -> None:
    warnings.filterwarnings("ignore")
    clipped = DriftPolicy()
    policy = DriftPolicy(clip_quantile=0.0)  # Evidently's exact formula, so scores can be compared
    say(f"drift check: ours vs Evidently DataDriftPreset (num {policy.num_method} >= {policy.num_threshold}, "
        f"cat {policy.cat_method} >= {policy.cat_threshold}), same windows, one run")
    results = {}
    if speed:
        import evidently  # noqa: F401  - import time is not check time

        for rows in sizes:
            windows = list(WINDOWS)
            # Evidently at 1M rows takes minutes per window: one window there, every window below.
            evidently_windows = windows if rows <= 200_000 else ["broad"]
            results[rows] = run_size(rows, windows, evidently_windows, policy, clipped)
    if robust:
        robustness()
    if results:
        say("\nsummary")
    for rows, r in results.items():
        say(f"  {rows:>9,} rows: profile {r['profile']:.2f} s, check {r['ours']:.2f} s (clipped {r['clipped']:.2f} s), "
            f"Evidently {r['evidently']:.1f} s, speed-up {r['evidently'] / r['ours']:.0f}x "
            f"({r['evidently'] / r['clipped']:.0f}x clipped), agreement {r['agree']:.1%}")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args == ["robustness"]:
        main(speed=False)
    else:
        main(tuple(int(a) for a in args) or (100_000, 1_000_000))
