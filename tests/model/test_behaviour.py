"""Behaviour of a tiny trained model: it learns, responds in the right direction, ignores what it must."""

import numpy as np
import pandas as pd
import pytest

from driftloop.contracts import LABEL, MODEL_FEATURES, to_model_frame
from pipelines.steps import ingest
from pipelines.steps.evaluate import compute
from pipelines.steps.train import TrainParams, fit, score, split_by_time
from tests.helpers import TINY

pytestmark = pytest.mark.model


def joined(data: ingest.GeneratedData) -> pd.DataFrame:
    """The same day-snapshot join that Feast performs (features as of the transaction's day)."""
    tx = data.transactions.assign(day=data.transactions["event_timestamp"].dt.floor("D"))
    cust = data.customers.drop(columns="created_timestamp").rename(columns={"event_timestamp": "day"})
    merch = data.merchants.drop(columns="created_timestamp").rename(columns={"event_timestamp": "day"})
    return tx.merge(cust, on=["customer_id", "day"]).merge(merch, on=["merchant_id", "day"])


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return joined(ingest.generate(TINY))


@pytest.fixture(scope="module")
def model(frame):
    train, _ = split_by_time(frame, 0.2)
    return fit(train, TrainParams(n_estimators=120))


def test_model_learns_something_real_but_not_everything(frame, model):
    _, holdout = split_by_time(frame, 0.2)
    metrics = compute(holdout[LABEL].to_numpy(), score(model, holdout), holdout["channel"])
    assert 0.75 < metrics.auc < 0.97
    assert set(metrics.slices) == {"pos", "online", "atm"}


def test_time_split_never_trains_on_the_future(frame):
    train, holdout = split_by_time(frame, 0.2)
    assert train["event_timestamp"].max() <= holdout["event_timestamp"].min()
    assert len(holdout) == pytest.approx(0.2 * len(frame), abs=1)


@pytest.mark.parametrize(("feature", "low", "high"), [
    ("chargeback_rate_90d", 0.0, 0.2),
    ("merchant_fraud_rate_30d", 0.001, 0.08),
])
def test_riskier_inputs_score_higher(frame, model, feature, low, high):
    rows = frame.sample(300, random_state=1)
    lo, hi = score(model, rows.assign(**{feature: low})), score(model, rows.assign(**{feature: high}))
    assert (hi >= lo).mean() > 0.9
    assert hi.mean() > lo.mean() * 1.5


def test_online_at_night_scores_higher_than_in_store_by_day(frame, model):
    rows = frame.sample(300, random_state=2)
    night = score(model, rows.assign(channel="online", hour_of_day=3))
    day = score(model, rows.assign(channel="pos", hour_of_day=14))
    assert night.mean() > day.mean()


def test_ids_and_label_timing_do_not_change_the_score(frame, model):
    rows = frame.sample(200, random_state=3)
    changed = rows.assign(transaction_id="other", customer_id=rows["customer_id"] + 10_000,
                          label_timestamp=rows["label_timestamp"] + pd.Timedelta(days=9), **{LABEL: 1 - rows[LABEL]})
    np.testing.assert_array_equal(score(model, rows), score(model, changed))


def test_column_order_and_extra_columns_do_not_matter(frame, model):
    rows = frame.sample(100, random_state=4)
    shuffled = rows[list(reversed(rows.columns))].assign(unrelated=1.0)
    np.testing.assert_array_equal(score(model, rows), score(model, shuffled))


def test_unseen_category_and_missing_values_still_score(frame, model):
    rows = frame.sample(50, random_state=5).assign(channel="crypto_kiosk", distance_km=np.nan)
    encoded = to_model_frame(rows)
    assert encoded["channel"].isna().all()
    assert list(encoded.columns) == list(MODEL_FEATURES)
    scores = score(model, rows)
    assert np.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()


def test_missing_feature_column_is_named(frame):
    with pytest.raises(KeyError, match="merchant_category"):
        to_model_frame(frame.drop(columns="merchant_category"))
