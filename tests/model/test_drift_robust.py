"""A handful of extreme rows cannot fake drift or hide it, on the generator's data in the monitor's 2,000-row
windows: the same windows and rows ``make bench-drift`` measures (``monitoring.bench.robustness``)."""

from collections import Counter

import numpy as np
import pytest

from monitoring.bench import SHIFTED, fraud_world, with_extreme_rows
from monitoring.drift import DRIFT, DriftPolicy, build_profile, check_drift

pytestmark = pytest.mark.model

TRIALS, ROWS, EXTREME = 300, 2_000, 5


@pytest.fixture(scope="module")
def world():
    reference, rest = fraud_world()
    return build_profile(reference), rest


def windows(rest, seed: int):
    g = np.random.default_rng(seed)
    for _ in range(TRIALS):
        yield rest.iloc[g.choice(len(rest), ROWS, replace=False)]


@pytest.mark.parametrize("far", [True, False], ids=["far beyond the reference", "at the reference max"])
def test_extreme_rows_in_same_distribution_windows_rarely_alarm(world, far):
    profile, rest = world
    alarms, columns, flagged = 0, Counter(), 0
    for window in windows(rest, seed=11):
        report = check_drift(profile, with_extreme_rows(window, profile, EXTREME, far))
        alarms += report.verdict == DRIFT
        columns.update(report.drifted_columns)
        flagged += report.implausible_rows >= EXTREME
    assert alarms <= 0.01 * TRIALS
    assert max(columns.values(), default=0) <= 0.05 * TRIALS, columns
    # Far rows are data quality's, every time; rows at the reference's maximum are plausible.
    assert flagged == (TRIALS if far else 0)


def test_without_clipping_one_row_is_enough_to_alarm(world):
    """The fault the clipping fixes, measured on the same data."""
    profile, rest = world
    window = with_extreme_rows(next(windows(rest, seed=12)), profile, 1, True)
    assert check_drift(profile, window, DriftPolicy(clip_quantile=0)).verdict == DRIFT
    assert check_drift(profile, window).verdict != DRIFT


@pytest.mark.parametrize("feature", SHIFTED)
def test_half_a_standard_deviation_shift_is_caught_despite_extreme_rows(world, feature):
    profile, rest = world
    shift = 0.5 * profile.columns[feature].std
    detected = 0
    for window in windows(rest, seed=13):
        shifted = window.assign(**{feature: window[feature] + shift})
        detected += check_drift(profile, with_extreme_rows(shifted, profile, EXTREME, True)).columns[feature].drifted
    assert detected >= 0.95 * TRIALS
