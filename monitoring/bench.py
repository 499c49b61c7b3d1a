"""``make bench-drift``: our drift check vs plain Evidently ``DataDriftPreset``, same windows, one run.

A synthetic 20-column frame (14 numerical, 6 categorical, some nulls) gives a reference and current
windows: stable, subtle (shifts near the 0.1 threshold), covariate (8 columns) and broad (12 columns)
drift. At each size the reference profile is built once (timed on its own), then every window is checked
by ``check_drift`` and by a full Evidently report with the same methods and thresholds (Wasserstein and
Jensen-Shannon at 0.1, which is also what Evidently picks on its own for samples over 1,000 rows). Prints
the times, the speed-up and how many per-column verdicts agree. Evidently takes minutes at 1M rows, so
it runs one window there.
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

from monitoring.drift import CATEGORICAL, NUMERICAL, DriftPolicy, build_profile, check_drift, evidently_drift

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


def run_size(rows: int, windows: list[str], evidently_windows: list[str], policy: DriftPolicy) -> dict[str, float]:
    numerical = sum(k == NUMERICAL for k in COLUMN_KINDS.values())
    say(f"\n{rows:,} rows x {len(COLUMN_KINDS)} columns ({numerical} numerical, "
        f"{len(COLUMN_KINDS) - numerical} categorical); reference {rows:,} rows")
    reference = synthetic_frame(rows, seed=1)
    profile, t_profile = timed(lambda: build_profile(reference, COLUMN_KINDS))
    say(f"  our profile build (once per reference):  {t_profile:7.2f} s")
    ours_t, theirs_t, agree, total = [], [], 0, 0
    for i, window in enumerate(windows):
        current = synthetic_frame(rows, seed=100 + i, drift=WINDOWS[window])
        report, t_ours = timed(lambda current=current: check_drift(profile, current, policy))
        ours_t.append(t_ours)
        line = (f"  window {window:<10} ours {t_ours:6.2f} s  verdict {report.verdict:<9} "
                f"drifted {len(report.drifted_columns):>2}/20")
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
    say(f"  median check: ours {ours:.2f} s, Evidently DataDriftPreset {theirs_med:.2f} s "
        f"-> {theirs_med / ours:.0f}x faster ({theirs_med / (ours + t_profile):.0f}x counting the profile build)")
    say(f"  per-column verdicts agreeing with Evidently: {agree}/{total} ({agree / total:.1%})")
    return {"profile": t_profile, "ours": ours, "evidently": theirs_med, "agree": agree / total}


def main(sizes: tuple[int, ...] = (100_000, 1_000_000)) -> None:
    warnings.filterwarnings("ignore")
    policy = DriftPolicy()
    say(f"drift check: ours vs Evidently DataDriftPreset (num {policy.num_method} >= {policy.num_threshold}, "
        f"cat {policy.cat_method} >= {policy.cat_threshold}), same windows, one run")
    import evidently  # noqa: F401  - import time is not check time

    results = {}
    for rows in sizes:
        windows = list(WINDOWS)
        # Evidently at 1M rows takes minutes per window: one window there, every window below.
        evidently_windows = windows if rows <= 200_000 else ["broad"]
        results[rows] = run_size(rows, windows, evidently_windows, policy)
    say("\nsummary")
    for rows, r in results.items():
        say(f"  {rows:>9,} rows: profile {r['profile']:.2f} s, check {r['ours']:.2f} s, Evidently "
            f"{r['evidently']:.1f} s, speed-up {r['evidently'] / r['ours']:.0f}x, agreement {r['agree']:.1%}")


if __name__ == "__main__":
    main(tuple(int(a) for a in sys.argv[1:]) or (100_000, 1_000_000))
