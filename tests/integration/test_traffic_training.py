"""Training on the traffic: served predictions joined with their late labels become training rows, point in
time (a label counts once it has arrived), through Feast's offline store, locally and on PostgreSQL."""

import functools
import json
import math
import re
import time
from datetime import UTC, datetime, timedelta

import pandas as pd
import psycopg
import pytest

from driftloop.contracts import LABEL, LABEL_TIMESTAMP, MODEL_FEATURES, REQUEST_FEATURES, TIMESTAMP, TRANSACTION_ID
from driftloop.settings import Settings
from monitoring.labels import ingest as ingest_labels
from monitoring.store import LABELLED_AT, LogStore
from pipelines import training
from pipelines.steps import features, ingest, tracking
from pipelines.steps import train as train_step
from serving.inference_log import COLUMNS, sink_for
from tests.helpers import AS_OF, TINY, create_database, run_cli

pytestmark = pytest.mark.integration

DAY = datetime(2026, 9, 30, tzinfo=UTC)  # inside the tiny data's range: the offline store has features then
REQUEST = {"amount": 42.0, "channel": "pos", "hour_of_day": 10.0, "distance_km": 3.0}


def prediction(settings: Settings, tid: str | None, at: datetime, customer: float | None = 7, merchant: float = 3,
               model: str | None = None, **request: object) -> tuple:
    """One logged prediction, as the server records it. Its Feast features are nonsense on purpose: a
    training row must take them from the offline store as of its time, never from the log."""
    row = {"request_id": f"r-{tid}-{at.timestamp()}", "ts": at.timestamp(), "model_name": model or settings.model_name,
           "model_version": "1", TRANSACTION_ID: tid, "customer_id": customer, "merchant_id": merchant,
           **{name: -1.0 for name in MODEL_FEATURES}, "merchant_category": "nowhere", **REQUEST, **request,
           "score": 0.1, "entity_found": 1.0}
    return tuple(row[c] for c in COLUMNS)


def serve(settings: Settings, records: list[tuple]) -> None:
    sink = sink_for(settings)  # the server's own writer: SQLite locally, PostgreSQL on a cluster
    sink.write(records)
    sink.close()


def label(settings: Settings, tmp_path, labels: dict[str, int], arrived: datetime) -> None:
    path = tmp_path / f"labels-{arrived.timestamp()}.parquet"
    pd.DataFrame({TRANSACTION_ID: list(labels), LABEL: list(labels.values())}).to_parquet(path)
    ingest_labels(settings, path, arrived=arrived)


def traffic_of(training_set: features.TrainingSet | str) -> pd.DataFrame:
    """A training set's rows from the traffic, by transaction id."""
    frame = pd.read_parquet(training_set if isinstance(training_set, str) else training_set.uri)
    return frame[frame[features.SOURCE] == features.TRAFFIC].set_index(TRANSACTION_ID)


@functools.cache
def tiny() -> ingest.GeneratedData:
    """The shared Feast store's data (``feast_state``), as generated."""
    return ingest.generate(TINY)


def generated_rows(as_of: datetime) -> int:
    tx = tiny().transactions
    return int((tx[LABEL_TIMESTAMP] <= pd.Timestamp(as_of)).sum())


def test_a_label_counts_from_when_it_arrived(settings, tmp_path):
    at = DAY + timedelta(hours=10)
    serve(settings, [prediction(settings, "t-early", at, customer=7),
                     prediction(settings, "t-late", at + timedelta(hours=1), customer=8)])
    label(settings, tmp_path, {"t-early": 1}, arrived=AS_OF - timedelta(hours=6))
    label(settings, tmp_path, {"t-late": 0}, arrived=AS_OF + timedelta(days=1))  # after the training's as_of

    before = features.build_training_set(settings, as_of=AS_OF)
    traffic = traffic_of(before)
    assert list(traffic.index) == ["t-early"]
    assert before.rows_by_source == {"generated": generated_rows(AS_OF), "traffic": 1}
    assert before.rows == sum(before.rows_by_source.values())
    row = traffic.loc["t-early"]
    assert row[TIMESTAMP] == pd.Timestamp(at) and row[LABEL_TIMESTAMP] == pd.Timestamp(AS_OF - timedelta(hours=6))
    assert row[LABEL] == 1 and row["amount"] == 42.0 and row["channel"] == "pos"
    # the customer's features as of the prediction: that day's snapshot from the offline store, not the log's
    customers = tiny().customers
    snapshot = customers[(customers["customer_id"] == 7) & (customers[TIMESTAMP] == pd.Timestamp(DAY))].iloc[0]
    assert row["avg_amount_30d"] == pytest.approx(snapshot["avg_amount_30d"])
    assert row["account_age_days"] == snapshot["account_age_days"]

    later = AS_OF + timedelta(days=2)
    assert sorted(traffic_of(features.build_training_set(settings, as_of=later)).index) == ["t-early", "t-late"]
    # a label ingested again unchanged keeps its first arrival; a changed one arrives anew
    label(settings, tmp_path, {"t-early": 1, "t-late": 1}, arrived=later)
    again = traffic_of(features.build_training_set(settings, as_of=AS_OF))
    assert list(again.index) == ["t-early"] and again.loc["t-early", LABEL] == 1
    relabelled = traffic_of(features.build_training_set(settings, as_of=later))
    assert relabelled.loc["t-late", LABEL_TIMESTAMP] == pd.Timestamp(later) and relabelled.loc["t-late", LABEL] == 1


def test_duplicate_implausible_and_unknown_rows_are_left_out_and_counted(settings, tmp_path):
    at = DAY + timedelta(hours=8)
    tick = iter(range(1, 1_000))

    def when() -> datetime:
        return at + timedelta(minutes=next(tick))

    generated_id = tiny().transactions[TRANSACTION_ID].iloc[100]
    records = [prediction(settings, f"t-good-{i}", when(), customer=10 + i, amount=10.0 + i) for i in range(5)]
    records += [
        prediction(settings, "t-twice", when(), amount=11.0),  # scored twice: its first prediction counts
        prediction(settings, "t-twice", when(), amount=999.0),
        prediction(settings, generated_id, when()),  # the generated data holds it already
        prediction(settings, "t-negative", when(), amount=-5.0),
        prediction(settings, "t-huge", when(), amount=1e9),
        prediction(settings, "t-infinite", when(), amount=math.inf),
        prediction(settings, "t-no-amount", when(), amount=None),
        prediction(settings, "t-hour", when(), hour_of_day=27.0),
        prediction(settings, "t-half-hour", when(), hour_of_day=3.5),
        prediction(settings, "t-channel", when(), channel="teleport"),
        prediction(settings, "t-no-distance", when(), distance_km=None),  # unknown distance: the contract allows it
        prediction(settings, "t-keyless", when(), customer=None),
        prediction(settings, "t-stranger", when(), customer=TINY.customers + 1),  # no features in the store
        prediction(settings, "t-other-model", when(), model="another-model"),
        prediction(settings, "t-unlabelled", when()),
        prediction(settings, "t-replayed", AS_OF - timedelta(hours=1)),  # sent after its label arrived
    ]
    serve(settings, records)
    ids = {r[COLUMNS.index(TRANSACTION_ID)] for r in records} - {"t-unlabelled"}
    label(settings, tmp_path, dict.fromkeys(ids, 0), arrived=AS_OF - timedelta(hours=2))

    built = features.build_training_set(settings, as_of=AS_OF)
    traffic = traffic_of(built)
    assert sorted(traffic.index) == sorted([*(f"t-good-{i}" for i in range(5)), "t-twice", "t-no-distance"])
    assert traffic.loc["t-twice", "amount"] == 11.0 and pd.isna(traffic.loc["t-no-distance", "distance_km"])
    assert built.left_out == {"duplicate": 2, "implausible": 7, "no_features": 2}
    assert built.rows_by_source == {"generated": generated_rows(AS_OF), "traffic": 7}
    frame = pd.read_parquet(built.uri)
    assert (frame[TRANSACTION_ID] == generated_id).sum() == 1  # once, as generated
    assert frame.loc[frame[TRANSACTION_ID] == generated_id, features.SOURCE].item() == features.GENERATED

    # the bound takes the newest labelled predictions, then leaves out what it must
    newest = features.build_training_set(Settings(traffic_rows_max=3), as_of=AS_OF)
    assert list(traffic_of(newest).index) == ["t-no-distance"]
    assert newest.left_out == {"duplicate": 0, "implausible": 0, "no_features": 2}
    assert features.build_training_set(Settings(traffic_rows_max=0), as_of=AS_OF).rows_by_source["traffic"] == 0


def drifted_traffic(settings: Settings, rows: int = 400) -> pd.DataFrame:
    """A day of traffic from the shifted world (bigger, more online, more distant payments, fraud changed),
    logged as served, with its labels."""
    tx = ingest.generate(ingest.GeneratorConfig(rows=rows, customers=TINY.customers, merchants=TINY.merchants,
                                                days=2, end=TINY.end, seed=TINY.seed, stream=5, drift="shift",
                                                drift_days=0)).transactions

    def request(row: dict) -> dict:  # as the payload parser hands them to the log: floats, strings, None
        return {c.name: None if pd.isna(row[c.name]) else row[c.name] if c.kind == "category" else float(row[c.name])
                for c in REQUEST_FEATURES}

    serve(settings, [prediction(settings, r[TRANSACTION_ID], r[TIMESTAMP].to_pydatetime(),
                                customer=int(r["customer_id"]), merchant=int(r["merchant_id"]), **request(r))
                     for r in tx.to_dict("records")])
    return tx


def test_a_retraining_after_drifted_labelled_traffic_trains_on_it(settings, tmp_path):
    tx = drifted_traffic(settings)
    labels = dict(zip(tx[TRANSACTION_ID], tx[LABEL].astype(int), strict=True))
    label(settings, tmp_path, labels, arrived=AS_OF - timedelta(hours=12))
    done = run_cli("train", "--as-of", AS_OF.strftime("%Y-%m-%dT%H:%M:%S"), "--n-estimators", "30",
                   env={"COLUMNS": "200"})
    assert done.returncode == 0, done.stderr[-3000:]
    generated = generated_rows(AS_OF)
    assert re.search(rf"rows by source\s+│ {generated:,} generated \+ {len(tx)} traffic", done.stdout), done.stdout

    client = tracking.configure(settings)
    [run] = client.search_runs([client.get_experiment_by_name(settings.experiment).experiment_id])
    metrics, tags = run.data.metrics, run.data.tags
    assert (metrics["rows_generated"], metrics["rows_traffic"]) == (generated, len(tx))
    assert metrics["train_rows"] + metrics["holdout_rows"] == generated + len(tx)
    assert json.loads(tags[train_step.TAG_ROWS_BY_SOURCE]) == {"generated": generated, "traffic": len(tx)}
    # the source is bookkeeping: not in the run's dataset, not a model input
    schema = json.loads(run.inputs.dataset_inputs[0].dataset.schema)["mlflow_colspec"]
    assert features.SOURCE not in {c["name"] for c in schema} and LABEL in {c["name"] for c in schema}
    assert train_step.load_booster(tags[train_step.TAG_MODEL_URI]).num_features() == len(MODEL_FEATURES)
    assert (features.SOURCE, (features.GENERATED, features.TRAFFIC)) == (train_step.SOURCE, train_step.SOURCES)

    # the traffic rows carry the request as it was logged, and the label that arrived for it
    traffic = traffic_of(tags[train_step.TAG_DATASET])
    assert len(traffic) == len(tx)
    expected = tx.set_index(TRANSACTION_ID).loc[traffic.index]
    for column in (*(c.name for c in REQUEST_FEATURES), LABEL):
        pd.testing.assert_series_equal(traffic[column], expected[column], check_dtype=False)
    # ... from the shifted world: the model's training set holds what the traffic is like now
    assert (traffic["channel"] == "online").mean() > 0.5 > online_share()

    summary = training.summary_of_run(settings, {"run_id": run.info.run_id}, engine="kfp")  # read back from MLflow
    assert summary["training_set"]["rows_by_source"] == {"generated": generated, "traffic": len(tx)}


def online_share() -> float:
    return float((tiny().transactions["channel"] == "online").mean())


def test_old_labels_are_migrated_in_place(settings, tmp_path):
    store = LogStore(settings)
    with store.connect() as db:  # a store from before labels had an arrival time
        db.execute(f"CREATE TABLE labels ({TRANSACTION_ID} TEXT PRIMARY KEY, {LABEL} INTEGER)")
        db.execute("INSERT INTO labels VALUES ('t-old', 1)")
    started = time.time()
    serve(settings, [prediction(settings, "t-old", datetime.fromtimestamp(started - 3_600, UTC))])
    # its arrival is unknown: it is known to be there from the migration on, not before
    assert store.labelled_traffic(settings.model_name, started - 1, 10).empty
    with store.connect() as db:
        [(labelled_at,)] = db.execute(f"SELECT {LABELLED_AT} FROM labels WHERE {TRANSACTION_ID} = 't-old'").fetchall()
    assert started <= labelled_at <= time.time()  # stamped at the migration: the earliest it is known to be there
    now = datetime.now(UTC) + timedelta(seconds=1)
    assert list(store.labelled_traffic(settings.model_name, now.timestamp(), 10)[TRANSACTION_ID]) == ["t-old"]
    label(settings, tmp_path, {"t-old": 1, "t-new": 0}, arrived=now)  # unchanged: keeps its time
    with store.connect() as db:
        assert dict(db.execute(f"SELECT {TRANSACTION_ID}, {LABELLED_AT} FROM labels").fetchall()) == \
            {"t-old": labelled_at, "t-new": now.timestamp()}


def test_the_cluster_profile_trains_on_its_traffic_in_postgres(feast_state, postgres_dsn, redis_url, tmp_path):
    """The same on the cluster profile: the log and the labels in PostgreSQL (an old labels table migrated),
    the Feast registry in PostgreSQL, the offline store on the shared data."""
    dsn = create_database(postgres_dsn, "traffic_training")
    with psycopg.connect(dsn, autocommit=True) as db:
        db.execute(f"CREATE TABLE labels ({TRANSACTION_ID} TEXT PRIMARY KEY, {LABEL} INTEGER)")
        db.execute("INSERT INTO labels VALUES ('t-old', 1)")
    registry = create_database(postgres_dsn, "traffic_training_feast").replace("postgresql://", "postgresql+psycopg://")
    settings = Settings(profile="cluster", mlflow_tracking_uri="http://mlflow:5000", postgres_dsn=dsn,
                        redis_url=redis_url, feast_registry=registry, data_dir=str(feast_state / "data"),
                        state_dir=tmp_path)
    features.apply(settings)
    tx = drifted_traffic(settings, rows=200)
    at = DAY + timedelta(hours=20)
    serve(settings, [prediction(settings, "t-old", at), prediction(settings, "t-negative", at, amount=-1.0),
                     prediction(settings, tx[TRANSACTION_ID].iloc[0], at + timedelta(hours=1))])  # scored again
    labels = {**dict(zip(tx[TRANSACTION_ID], tx[LABEL], strict=True)), "t-negative": 0}
    label(settings, tmp_path, labels, arrived=AS_OF - timedelta(hours=12))
    with psycopg.connect(dsn) as db:  # migrated by the first ingest: the old label known from then on
        [(migrated,)] = db.execute(f"SELECT {LABELLED_AT} FROM labels WHERE {TRANSACTION_ID} = 't-old'").fetchall()
        assert db.execute(f"SELECT COUNT(*) FROM labels WHERE {LABELLED_AT} IS NULL").fetchone()[0] == 0

    built = features.build_training_set(settings, as_of=AS_OF)
    old = int(migrated <= AS_OF.timestamp())  # the migration ran now: after AS_OF, unless this clock is behind
    assert built.rows_by_source == {"generated": generated_rows(AS_OF), "traffic": len(tx) + old}
    assert built.left_out == {"duplicate": 1, "implausible": 1, "no_features": 0}
    traffic = traffic_of(built).drop(index="t-old", errors="ignore")
    expected = tx.set_index(TRANSACTION_ID).loc[traffic.index]
    assert traffic["amount"].tolist() == pytest.approx(expected["amount"].tolist())
    assert (traffic[LABEL_TIMESTAMP] == pd.Timestamp(AS_OF - timedelta(hours=12))).all()
    later = datetime.fromtimestamp(migrated + 1, UTC)
    assert "t-old" in traffic_of(features.build_training_set(settings, as_of=later)).index
