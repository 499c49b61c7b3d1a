"""The cluster profile's stores against real servers: the inference log in PostgreSQL."""

import psycopg
import pytest

from driftloop.contracts import MODEL_FEATURES
from driftloop.settings import Settings
from serving.inference_log import COLUMNS, InferenceLog, PostgresSink, SqliteSink, sink_for

pytestmark = pytest.mark.integration


def record(i: int) -> tuple:
    return (f"r{i}", 1.0 + i, "m", "3", f"t{i}", 1, 2, 5.0, "pos", 3.0, None, *([1.0] * (len(MODEL_FEATURES) - 4)),
            0.25, 1.0)


def test_inference_log_in_postgres_keeps_every_record(postgres_dsn):
    log = InferenceLog(PostgresSink(postgres_dsn)).start()
    for i in range(1_000):
        log.record([record(i)])
    log.close()
    log.record([record(1_000)])  # after close: written synchronously
    with psycopg.connect(postgres_dsn) as db:
        assert db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 1_001
        names = [r[0] for r in db.execute("SELECT column_name FROM information_schema.columns "
                                          "WHERE table_name = 'predictions' ORDER BY ordinal_position")]
        assert names == list(COLUMNS)
        row = db.execute("SELECT channel, distance_km, score FROM predictions WHERE request_id = 'r7'").fetchone()
        assert row == ("pos", None, 0.25)


def test_the_profile_picks_the_sink(postgres_dsn, tmp_path):
    assert isinstance(sink_for(Settings(state_dir=tmp_path)), SqliteSink)
    cluster = Settings(profile="cluster", mlflow_tracking_uri="http://mlflow:5000", data_dir=str(tmp_path),
                       postgres_dsn=postgres_dsn, redis_url="127.0.0.1:6379")
    sink = sink_for(cluster)
    assert isinstance(sink, PostgresSink)
    sink.close()


def test_monitor_reads_windows_and_keeps_labels_in_postgres(postgres_dsn, tmp_path):
    import pandas as pd

    from monitoring.labels import ingest, labelled_window, performance
    from monitoring.monitor import latest_window

    settings = Settings(profile="cluster", mlflow_tracking_uri="http://mlflow:5000", data_dir=str(tmp_path),
                        postgres_dsn=postgres_dsn, redis_url="127.0.0.1:6379", state_dir=tmp_path)
    with psycopg.connect(postgres_dsn, autocommit=True) as db:
        db.execute("DROP TABLE IF EXISTS predictions")
        db.execute("DROP TABLE IF EXISTS labels")
    assert latest_window(settings, 10).empty  # no log yet: an empty window, not an error
    log = InferenceLog(PostgresSink(postgres_dsn)).start()
    for i in range(300):
        log.record([(*record(i)[:-2], 0.9 if i % 3 == 0 else 0.1, 1.0)])
    log.close()
    window = latest_window(settings, 100)
    assert len(window) == 100 and window["ts"].iloc[0] == 300.0  # newest first
    assert window["channel"].iloc[0] == "pos" and pd.isna(window["distance_km"].iloc[0])
    labels = pd.DataFrame({"transaction_id": [f"t{i}" for i in range(300)], "is_fraud": [int(i % 3 == 0)
                                                                                        for i in range(300)]})
    labels.to_parquet(tmp_path / "labels.parquet")
    summary = ingest(settings, tmp_path / "labels.parquet")
    assert summary.rows == 300 and summary.matched == 300
    assert ingest(settings, tmp_path / "labels.parquet").matched == 300  # idempotent
    assert len(labelled_window(settings, since=100.0, until=200.0)) == 100
    metrics = performance(settings, min_labels=100)
    assert metrics is not None and metrics.auc == pytest.approx(1.0)
