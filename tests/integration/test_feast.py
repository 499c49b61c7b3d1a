"""Feast against the real (file + SQLite) stores: the FeatureService, point-in-time joins, online reads."""

import pandas as pd
import pytest

from driftloop.contracts import FEAST_FEATURES, LABEL_TIMESTAMP
from driftloop.settings import Settings
from pipelines.steps import features, ingest
from tests.helpers import AS_OF, TINY

pytestmark = pytest.mark.integration


def test_the_feature_service_holds_the_model_features(settings):
    store = features.feature_store(settings)
    service = features.service(settings, store)
    names = [f.name for projection in service.feature_view_projections for f in projection.features]
    assert names == [c.name for c in FEAST_FEATURES]


def test_training_set_is_a_point_in_time_join_of_arrived_labels(settings):
    training_set = features.build_training_set(settings, as_of=AS_OF)
    frame = pd.read_parquet(training_set.uri)
    data = ingest.generate(TINY)
    arrived = data.transactions[data.transactions[LABEL_TIMESTAMP] <= AS_OF]
    assert len(frame) == len(arrived) < len(data.transactions)  # late labels are left out
    # each row carries its customer's snapshot from the day of the transaction, never a later one
    row = frame.sample(1, random_state=0).iloc[0]
    day = row["event_timestamp"].floor("D")
    snap = data.customers[(data.customers["customer_id"] == row["customer_id"])
                          & (data.customers["event_timestamp"] == day)].iloc[0]
    assert row["avg_amount_30d"] == pytest.approx(snap["avg_amount_30d"])
    assert row["account_age_days"] == snap["account_age_days"]
    # the same data gives the same file
    assert features.build_training_set(settings, as_of=AS_OF).fingerprint == training_set.fingerprint


def test_online_store_serves_the_latest_snapshot(feast_state):
    settings = Settings(state_dir=feast_state)  # the materialized online store lives there
    store = features.feature_store(settings)
    online = store.get_online_features(features=features.service(settings, store),
                                       entity_rows=[{"customer_id": 7, "merchant_id": 3}]).to_dict()
    data = ingest.generate(TINY)
    latest = data.customers[data.customers["customer_id"] == 7].iloc[-1]
    assert online["avg_amount_30d"][0] == pytest.approx(latest["avg_amount_30d"], rel=1e-6)
    assert online["merchant_category"][0] in {"grocery", "fuel", "fashion", "electronics", "travel", "gaming"}


def test_missing_data_says_which_command_to_run(tmp_path):
    settings = Settings(state_dir=tmp_path)
    with pytest.raises(features.FeatureStoreError, match="driftloop data generate"):
        features.build_training_set(settings)


def test_unregistered_feature_service_says_which_command_to_run(tmp_path):
    settings = Settings(state_dir=tmp_path)
    ingest.write(ingest.generate(ingest.GeneratorConfig(rows=100, customers=10, merchants=5, days=3)),
                 settings.data_path)
    with pytest.raises(features.FeatureStoreError, match="driftloop features apply"):
        features.materialize(settings)
