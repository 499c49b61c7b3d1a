"""Statistical behaviour of the drift check on the generator's data: false alarms, power, the generator's
own drifts, and agreement with a real Evidently report configured with the same methods and thresholds."""

import dataclasses
from collections import Counter
from datetime import date

import numpy as np
import pandas as pd
import pytest

from driftloop.contracts import MODEL_FEATURES
from monitoring.drift import (
    DRIFT,
    NO_CURRENT_VALUES,
    NO_DRIFT,
    DriftPolicy,
    build_profile,
    check_drift,
    evidently_drift,
)
from pipelines.steps import ingest

pytestmark = pytest.mark.model

CONFIG = ingest.GeneratorConfig(rows=60_000, customers=2_000, merchants=200, days=60, end=date(2026, 10, 1), seed=23)
REFERENCE_ROWS = 5_000  # what training logs as reference/reference.parquet


def features(data: ingest.GeneratedData) -> pd.DataFrame:
    """The model's features per transaction, joined as Feast does (the day's customer and merchant snapshot)."""
    tx = data.transactions.assign(day=data.transactions["event_timestamp"].dt.floor("D"))
    cust = data.customers.drop(columns="created_timestamp").rename(columns={"event_timestamp": "day"})
    merch = data.merchants.drop(columns="created_timestamp").rename(columns={"event_timestamp": "day"})
    joined = tx.merge(cust, on=["customer_id", "day"]).merge(merch, on=["merchant_id", "day"])
    return joined[list(MODEL_FEATURES)].reset_index(drop=True)


def drifted_sample(drift: str, rows: int, seed: int) -> pd.DataFrame:
    """A window from the same world (same seed, so the same customers and merchants) with ``drift`` on."""
    cfg = ingest.GeneratorConfig(rows=20_000, customers=CONFIG.customers, merchants=CONFIG.merchants,
                                 days=CONFIG.days, end=CONFIG.end, seed=CONFIG.seed, drift=drift, drift_days=0)
    return features(ingest.generate(cfg)).sample(rows, random_state=seed)


@pytest.fixture(scope="module")
def pool() -> tuple[pd.DataFrame, pd.DataFrame]:
    """(reference sample, the rest): the rest is where fresh same-distribution windows come from."""
    frame = features(ingest.generate(CONFIG))
    order = np.random.default_rng(0).permutation(len(frame))
    return frame.iloc[order[:REFERENCE_ROWS]], frame.iloc[order[REFERENCE_ROWS:]]


@pytest.fixture(scope="module")
def profile(pool):
    return build_profile(pool[0])


def windows(rest: pd.DataFrame, trials: int, seed: int):
    g = np.random.default_rng(seed)
    for _ in range(trials):
        size = int(g.integers(1_000, 5_001))
        yield rest.iloc[g.choice(len(rest), size, replace=False)]


def test_same_distribution_windows_rarely_alarm(pool, profile):
    trials = 400
    dataset_alarms, column_alarms = 0, Counter()
    for window in windows(pool[1], trials, seed=1):
        report = check_drift(profile, window)
        dataset_alarms += report.verdict == DRIFT
        column_alarms.update(report.drifted_columns)
        assert report.verdict in (DRIFT, NO_DRIFT)
    assert dataset_alarms <= 0.01 * trials
    assert max(column_alarms.values(), default=0) <= 0.05 * trials, column_alarms


@pytest.mark.parametrize("feature", ["amount", "merchant_fraud_rate_30d", "account_age_days"])
def test_half_a_standard_deviation_shift_is_detected(pool, profile, feature):
    trials, detected = 300, 0
    shift = 0.5 * profile.columns[feature].std
    for window in windows(pool[1], trials, seed=2):
        report = check_drift(profile, window.assign(**{feature: window[feature] + shift}))
        detected += report.columns[feature].drifted
    assert detected >= 0.95 * trials


def test_the_generators_covariate_drift_is_found_in_the_columns_it_moves(profile):
    report = check_drift(profile, drifted_sample("covariate", 3_000, seed=3))
    assert {"amount", "channel", "distance_km"} <= set(report.drifted_columns)
    assert report.columns["channel"].method == "jensenshannon"


def test_the_generators_quality_faults_show_in_data_quality(profile):
    report = check_drift(profile, drifted_sample("quality", 3_000, seed=4))
    amount, hour, channel = report.quality["amount"], report.quality["hour_of_day"], report.quality["channel"]
    assert amount.null_rate > amount.reference_null_rate + 0.05 and any("null rate" in i for i in amount.issues)
    assert amount.out_of_range_share > 0.01  # negative amounts
    assert hour.out_of_range_share > 0.01  # hour 27
    assert channel.unseen_categories == ("crypto_kiosk",) and channel.unseen_share > 0.02
    assert report.quality["merchant_category"].issues == ()


def test_verdicts_agree_with_a_real_evidently_report(pool):
    """Same methods and thresholds, varied windows: with Evidently's exact formula (no clipping) at least 95%
    of per-column verdicts agree (scores are in fact the same numbers, up to float32 rounding in the
    generator's float32 columns); the default, clipped policy agrees on at least 90% of them."""
    reference, rest = pool
    amount_std = float(np.std(reference["amount"]))
    stable = rest.sample(REFERENCE_ROWS, random_state=5)
    exact = DriftPolicy(clip_quantile=0.0)
    cases = [
        ("stable", stable, exact),
        ("amount +0.5 std", stable.assign(amount=stable["amount"] + 0.5 * amount_std), exact),
        ("amount +0.1 std", stable.assign(amount=stable["amount"] + 0.1 * amount_std), exact),
        ("covariate", drifted_sample("covariate", REFERENCE_ROWS, seed=6), exact),
        ("quality", drifted_sample("quality", REFERENCE_ROWS, seed=7), exact),
        ("covariate, psi", drifted_sample("covariate", REFERENCE_ROWS, seed=8),
         DriftPolicy(num_method="psi", cat_method="psi", clip_quantile=0.0)),
    ]
    agree = clipped_agree = total = 0
    for name, current, policy in cases:
        ours = check_drift(build_profile(reference), current, policy)
        clipped = check_drift(build_profile(reference), current, dataclasses.replace(policy, clip_quantile=0.005))
        theirs = evidently_drift(reference, current, list(MODEL_FEATURES), policy)
        assert set(theirs) == set(MODEL_FEATURES), name
        for column, result in theirs.items():
            mine = ours.columns[column]
            assert (mine.method, mine.threshold) == (result.method, result.threshold), (name, column)
            assert mine.score == pytest.approx(result.score, rel=1e-4, abs=1e-6), (name, column)
            agree += mine.drifted == result.drifted
            clipped_agree += clipped.columns[column].drifted == result.drifted
            total += 1
    assert agree >= 0.95 * total
    assert clipped_agree >= 0.9 * total, (clipped_agree, total)


def test_evidently_leaves_out_what_it_cannot_test_and_we_report_it(pool, profile):
    reference, rest = pool
    current = rest.sample(1_000, random_state=9).assign(distance_km=np.nan)
    theirs = evidently_drift(reference, current, ["amount", "distance_km"])
    assert set(theirs) == {"amount"}
    ours = check_drift(profile, current)
    assert ours.columns["distance_km"].status == NO_CURRENT_VALUES
    assert ours.quality["distance_km"].issues == ("all null",)
