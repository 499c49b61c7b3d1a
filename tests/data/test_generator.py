"""The generated data's contract, column by column, and the drifts it can inject."""

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from driftloop.contracts import CHANNELS, FEAST_FEATURES, LABEL, LABEL_TIMESTAMP, MERCHANT_CATEGORIES, REQUEST_FEATURES
from pipelines.steps import ingest
from pipelines.steps.features import fingerprint
from pipelines.steps.validate import check
from tests.helpers import TINY

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def data() -> ingest.GeneratedData:
    return ingest.generate(TINY)


def test_same_seed_gives_the_same_data_and_another_seed_does_not(data):
    again = ingest.generate(TINY)
    other = ingest.generate(dataclasses.replace(TINY, seed=12))
    for name in ingest.FILES:
        assert fingerprint(getattr(again, name)) == fingerprint(getattr(data, name))
    assert fingerprint(other.transactions) != fingerprint(data.transactions)


def test_written_files_are_byte_identical_across_runs(tmp_path):
    a = ingest.write(ingest.generate(TINY), tmp_path / "a")
    b = ingest.write(ingest.generate(TINY), tmp_path / "b")
    for name in ingest.FILES:
        assert Path(a[name]).read_bytes() == Path(b[name]).read_bytes()
    assert not list((tmp_path / "a").glob("*.tmp"))


def test_request_columns_meet_their_contract(data):
    tx = data.transactions
    for col in REQUEST_FEATURES:
        values = tx[col.name]
        assert values.isna().mean() <= col.max_null_rate, col.name
        present = values.dropna()
        if col.kind == "category":
            assert set(present) <= set(col.categories), col.name
        else:
            assert present.between(col.low, col.high).all(), col.name


def test_feature_tables_meet_their_contract(data):
    for col in FEAST_FEATURES:
        table = data.customers if col.source == "customer_stats" else data.merchants
        values = table[col.name]
        assert values.notna().all(), col.name
        if col.kind == "category":
            assert set(values) <= set(col.categories)
        else:
            assert values.between(col.low, col.high).all(), col.name


def test_keys_timestamps_and_labels(data):
    tx = data.transactions
    assert tx["transaction_id"].is_unique
    assert str(tx["event_timestamp"].dt.tz) == "UTC"
    assert tx["event_timestamp"].is_monotonic_increasing
    assert (tx[LABEL_TIMESTAMP] > tx["event_timestamp"]).all()  # the label always arrives later
    assert set(tx[LABEL].unique()) == {0, 1}
    assert 0.02 < tx[LABEL].mean() < 0.15
    assert set(tx["customer_id"]) <= set(data.customers["customer_id"])
    assert set(tx["merchant_id"]) <= set(data.merchants["merchant_id"])
    # one snapshot per entity per day
    assert not data.customers.duplicated(["customer_id", "event_timestamp"]).any()


def test_the_label_depends_on_the_features(data):
    tx = data.transactions
    assert tx.loc[tx["channel"] == "online", LABEL].mean() > tx.loc[tx["channel"] == "pos", LABEL].mean()


def _last_week(frame: pd.DataFrame) -> pd.Series:
    """The drift window: the last 7 days before the generator's end date."""
    return frame["event_timestamp"] >= pd.Timestamp(TINY.end, tz="UTC") - pd.Timedelta(days=7)


def test_covariate_drift_moves_inputs_only_in_the_drift_window(data):
    drifted = ingest.generate(dataclasses.replace(TINY, drift="covariate", drift_days=7)).transactions
    recent = _last_week(drifted)
    assert drifted.loc[recent, "amount"].median() > 1.5 * data.transactions.loc[recent, "amount"].median()
    assert (drifted.loc[recent, "channel"] == "online").mean() > 0.5
    assert np.allclose(drifted.loc[~recent, "amount"], data.transactions.loc[~recent, "amount"])


def test_concept_drift_changes_the_label_not_the_inputs(data):
    drifted = ingest.generate(dataclasses.replace(TINY, drift="concept", drift_days=0)).transactions
    pd.testing.assert_series_equal(drifted["amount"], data.transactions["amount"])
    online, pos = (drifted.loc[drifted["channel"] == c, LABEL].mean() for c in ("online", "pos"))
    assert online < pos  # the channel effect flipped


def test_quality_faults_break_the_contract(data):
    faulty = ingest.generate(dataclasses.replace(TINY, drift="quality", drift_days=7)).transactions
    recent = _last_week(faulty)
    assert faulty.loc[recent, "amount"].isna().mean() > 0.05
    assert (faulty["amount"] < 0).any()
    assert (faulty["hour_of_day"] > 23).any()
    assert not set(faulty["channel"].dropna()) <= set(CHANNELS)
    assert set(MERCHANT_CATEGORIES)  # merchant categories stay valid: faults are in the request


def test_unknown_drift_is_refused():
    with pytest.raises(ValueError, match="unknown drift"):
        ingest.GeneratorConfig(drift="sideways")


def test_validation_of_a_joined_frame_catches_the_quality_faults(data):
    faulty = ingest.generate(dataclasses.replace(TINY, drift="quality", drift_days=0))
    frame = faulty.transactions.assign(account_age_days=10, txn_count_7d=1, avg_amount_30d=50.0,
                                       chargeback_rate_90d=0.01, merchant_fraud_rate_30d=0.01,
                                       merchant_category="grocery")
    problems = " | ".join(check(frame))
    assert "amount" in problems and "nulls" in problems
    assert "hour_of_day" in problems and "outside" in problems
    assert "crypto_kiosk" in problems
