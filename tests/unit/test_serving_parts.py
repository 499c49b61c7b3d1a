"""Serving's plain helpers, without a server: payload parsing, micro-batching, the log, the feature cache."""

import asyncio
import sqlite3
import threading
import time

import numpy as np
import pytest
from kserve.errors import InvalidInput

from driftloop.contracts import MODEL_FEATURES
from serving import payload
from serving.batcher import MicroBatcher
from serving.fastpath import Tensor
from serving.features import OnlineFeatures, View
from serving.inference_log import COLUMNS, InferenceLog, SqliteSink

pytestmark = pytest.mark.unit

FULL = {"amount": 10.0, "channel": "atm", "hour_of_day": 4, "distance_km": None, "account_age_days": 9,
        "txn_count_7d": 1, "avg_amount_30d": 5.5, "chargeback_rate_90d": 0.0, "merchant_fraud_rate_30d": 0.1,
        "merchant_category": "fuel"}


def test_full_row_encodes_like_training():
    import pandas as pd

    from driftloop.contracts import to_model_frame

    rows = payload.from_instances({"instances": [FULL]}, 10)
    assert rows.lookup == [False]
    expected = to_model_frame(pd.DataFrame([FULL])).to_numpy(dtype=np.float32)
    np.testing.assert_array_equal(payload.to_matrix(rows), expected)


def test_entity_rows_need_a_lookup_and_unseen_categories_are_unknown():
    rows = payload.from_instances({"instances": [
        {"customer_id": 1, "merchant_id": 2, "amount": 1.0, "channel": "crypto", "hour_of_day": 1}]}, 10)
    assert rows.lookup == [True] and rows.entity(0) == (1, 2)
    matrix = payload.to_matrix(rows)
    assert np.isnan(matrix[0, MODEL_FEATURES.index("channel")])
    assert np.isnan(matrix[0, MODEL_FEATURES.index("distance_km")])  # absent optional feature


def test_v2_tensors_parse_to_the_same_rows():
    tensors = [Tensor(name, [2], "BYTES" if isinstance(v, str) else "FP64", [v, v]) for name, v in FULL.items()
               if v is not None]
    rows = payload.from_tensors(tensors, 10)
    assert rows.n == 2 and rows.lookup == [False, False]
    assert rows.columns["merchant_category"] == ["fuel", "fuel"]


@pytest.mark.parametrize("body", [None, [], {"instances": None}, {"instances": [1]}, {"instances": []}])
def test_malformed_bodies_raise_invalid_input(body):
    with pytest.raises(InvalidInput):
        payload.from_instances(body, 10)


def test_micro_batcher_scores_concurrent_requests_together():
    calls = []

    def score(x):
        calls.append(len(x))
        return x[:, 0] * 2, "v1"

    async def run():
        batcher = MicroBatcher(score, max_batch=4)
        xs = [np.full((1, 1), i, dtype=np.float32) for i in range(6)]
        return await asyncio.gather(*(batcher.submit(x) for x in xs))

    results = asyncio.run(run())
    assert [float(r[0][0]) for r in results] == [0, 2, 4, 6, 8, 10]
    assert calls == [4, 2]  # no timer: one turn of the loop collects what arrived, capped at max_batch


def test_micro_batcher_fails_every_waiter_on_error():
    async def run():
        batcher = MicroBatcher(lambda x: (_ for _ in ()).throw(RuntimeError("boom")))
        return await asyncio.gather(*(batcher.submit(np.zeros((1, 1))) for _ in range(3)), return_exceptions=True)

    assert all(isinstance(r, RuntimeError) for r in asyncio.run(run()))


def record(i: int) -> tuple:
    return (f"r{i}", 1.0, "m", "1", None, 1, 2, *([0.0] * len(MODEL_FEATURES)), 0.5, 1.0)


def test_inference_log_writes_everything_and_after_close(tmp_path):
    log = InferenceLog(SqliteSink(tmp_path / "log.db"), max_rows=10_000).start()
    threads = [threading.Thread(target=lambda k=k: [log.record([record(k * 1000 + i)]) for i in range(500)])
               for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    log.record([record(99_999)])  # in flight during shutdown: written synchronously
    with sqlite3.connect(tmp_path / "log.db") as db:
        assert db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 2_001
        assert [c[1] for c in db.execute("PRAGMA table_info(predictions)")] == list(COLUMNS)
    assert log.dropped == 0 and log.written == 2_001


def test_inference_log_counts_what_it_sheds(tmp_path):
    log = InferenceLog(SqliteSink(tmp_path / "log.db"), max_rows=2)  # writer not started: the queue fills
    for i in range(5):
        log.record([record(i)])
    assert log.depth() == 2 and log.dropped == 3


class FakeStore:
    """Stands in for Feast's online store in this unit test only (the integration tests use Feast)."""

    def __init__(self):
        self.calls = 0

    def get_online_features(self, features, entity_rows):
        self.calls += 1
        key = next(iter(entity_rows[0]))
        names = [f.split(":")[1] for f in features]
        values = {n: [None if row[key] == 404 else row[key] * 10 for row in entity_rows] for n in names}

        class Response:
            def to_dict(self):
                return values

        return Response()


def test_online_features_cache_for_the_staleness_bound_and_batch_misses():
    now = [0.0]
    store = FakeStore()
    views = [View("customer_stats", "customer_id", ("a",)), View("merchant_stats", "merchant_id", ("b",))]
    online = OnlineFeatures(store, views, max_staleness_s=5.0, clock=lambda: now[0])
    values, found = online.lookup([{"customer_id": 1, "merchant_id": 2}, {"customer_id": 404, "merchant_id": 2}])
    assert values == {"a": [10, None], "b": [20, 20]} and found == [True, False]
    assert store.calls == 2  # one read per view for the whole batch
    online.lookup([{"customer_id": 1, "merchant_id": 2}])
    assert store.calls == 2  # cached
    now[0] = 6.0
    online.lookup([{"customer_id": 1, "merchant_id": 2}])
    assert store.calls == 4  # older than the bound: read again


class RegistryWithoutChampionYet:
    """A registry whose ``@champion`` appears after ``missing`` lookups (a fresh cluster's bootstrap)."""

    def __init__(self, missing: int) -> None:
        self.missing, self.calls = missing, 0

    def get_model_version_by_alias(self, name: str, alias: str):
        from mlflow.exceptions import MlflowException

        self.calls += 1
        if self.calls <= self.missing:
            raise MlflowException(f"alias {alias} not found", error_code="RESOURCE_DOES_NOT_EXIST")
        return object()


def test_the_server_waits_for_a_first_champion_then_goes_on():
    from serving.model import wait_for_champion

    registry = RegistryWithoutChampionYet(missing=3)
    wait_for_champion(registry, "m", timeout_s=10, poll_s=0.01)
    assert registry.calls == 4


def test_without_a_wait_a_missing_champion_fails_at_once():
    from mlflow.exceptions import MlflowException

    from serving.model import wait_for_champion

    registry = RegistryWithoutChampionYet(missing=100)
    with pytest.raises(MlflowException, match="not found"):
        wait_for_champion(registry, "m", timeout_s=0)
    assert registry.calls == 1


def test_a_batch_the_log_refuses_is_dropped_alone_and_later_writes_go_on(tmp_path):
    """A value SQLite cannot store (2^64 - 1) fails its own batch only: the connection is not left inside a
    failed transaction, and every later record is written."""
    log = InferenceLog(SqliteSink(tmp_path / "log.db"))
    log._write([(*record(1)[:5], 2**64 - 1, *record(1)[6:])])
    for i in range(100):
        log._write([record(i)])
    assert (log.dropped, log.written, log.healthy) == (1, 100, True)
    with sqlite3.connect(tmp_path / "log.db") as db:
        assert db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 100


def test_a_lock_held_on_the_log_file_delays_writes_but_loses_none(tmp_path):
    path = tmp_path / "log.db"
    log = InferenceLog(SqliteSink(path), retry_s=60).start()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process holding the file: longer than SQLite's 5 s busy wait
    for i in range(300):
        log.record([record(i)])
    time.sleep(6.5)
    assert log.healthy is False and log.dropped == 0
    holder.execute("COMMIT")
    holder.close()
    log.close()
    assert (log.dropped, log.written, log.healthy) == (0, 300, True)
