"""The cluster profile against real servers: PostgreSQL (inference log, Feast registry, MLflow's store),
Redis (Feast's online store) and an MLflow tracking server that proxies artifacts; no fakes."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import psycopg
import pytest
import redis
from mlflow.tracking import MlflowClient

from driftloop.contracts import FEAST_FEATURES, MODEL_FEATURES
from driftloop.settings import Settings
from pipelines.steps import features, ingest
from serving.features import OnlineFeatures
from serving.inference_log import COLUMNS, InferenceLog, PostgresSink, SqliteSink, sink_for
from tests.helpers import AS_OF, TINY, create_database, free_port, run_cli, wait_for_http

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
                        postgres_dsn=postgres_dsn, redis_url="127.0.0.1:6379", state_dir=tmp_path, model_name="m")
    with psycopg.connect(postgres_dsn, autocommit=True) as db:
        db.execute("DROP TABLE IF EXISTS predictions")
        db.execute("DROP TABLE IF EXISTS labels")
    assert latest_window(settings, 10, "3").empty  # no log yet: an empty window, not an error
    log = InferenceLog(PostgresSink(postgres_dsn)).start()
    for i in range(300):
        log.record([(*record(i)[:-2], 0.9 if i % 3 == 0 else 0.1, 1.0)])
    log.record([("other", 999.0, "m", "4", "t-other", 1, 2, *record(0)[7:])])  # another version's prediction
    log.close()
    window = latest_window(settings, 100, "3")
    assert len(window) == 100 and window["ts"].iloc[0] == 300.0  # newest first, of version 3 only
    assert window["channel"].iloc[0] == "pos" and pd.isna(window["distance_km"].iloc[0])
    assert window["is_fraud"].isna().all()  # no labels yet
    assert latest_window(settings, 100, "4")["transaction_id"].tolist() == ["t-other"]
    labels = pd.DataFrame({"transaction_id": [f"t{i}" for i in range(300)], "is_fraud": [int(i % 3 == 0)
                                                                                        for i in range(300)]})
    labels.to_parquet(tmp_path / "labels.parquet")
    summary = ingest(settings, tmp_path / "labels.parquet")
    assert summary.rows == 300 and summary.matched == 300
    assert ingest(settings, tmp_path / "labels.parquet").matched == 300  # idempotent
    assert latest_window(settings, 100, "3")["is_fraud"].notna().all()  # the window carries its labels
    assert len(labelled_window(settings, since=100.0, until=200.0)) == 100
    metrics = performance(settings, min_labels=100)
    assert metrics is not None and metrics.auc == pytest.approx(1.0)


def redis_client(url: str) -> redis.Redis:
    host, port = url.split(",")[0].split(":")
    return redis.Redis(host=host, port=int(port), socket_timeout=5)


def latest_snapshot(data_dir: str, table: str, key: str, ids: list[int]) -> pd.DataFrame:
    """Each entity's newest row in the Parquet source, as of AS_OF: what materialization must load."""
    frame = pd.read_parquet(Path(data_dir) / f"{table}.parquet")
    frame = frame[frame["event_timestamp"] <= pd.Timestamp(AS_OF)].sort_values("event_timestamp")
    return frame.groupby(key).tail(1).set_index(key).loc[ids]


def test_feast_registry_in_postgres_and_online_store_in_redis(postgres_dsn, redis_url, tmp_path):
    """apply writes the SQL registry into PostgreSQL, materialize fills Redis, and the serving code's
    online lookup returns exactly each entity's latest snapshot from the Parquet sources."""
    registry = create_database(postgres_dsn, "feast").replace("postgresql://", "postgresql+psycopg://", 1)
    settings = Settings(profile="cluster", mlflow_tracking_uri="http://mlflow:5000", data_dir=str(tmp_path / "data"),
                        postgres_dsn=postgres_dsn, redis_url=redis_url, feast_registry=registry, state_dir=tmp_path)
    ingest.generate_to(TINY, settings.data_path)
    features.apply(settings)
    features.materialize(settings, end=AS_OF)

    with psycopg.connect(registry.replace("+psycopg", ""), autocommit=True) as db:
        services = [r[0] for r in db.execute("SELECT feature_service_name FROM feature_services")]
    assert services == [settings.feature_service]
    assert redis_client(redis_url).dbsize() > 0
    assert not (tmp_path / "feast").exists()  # nothing fell back to the local profile's files

    store = features.feature_store(settings)  # a new store: everything it knows comes from the servers
    online = OnlineFeatures.for_service(store, features.service(settings, store))
    customers, merchants = [1, 7, 200, TINY.customers], [1, 3, 20, TINY.merchants]
    values, found = online.lookup([{"customer_id": c, "merchant_id": m} for c, m in zip(customers, merchants,
                                                                                          strict=True)])
    assert found == [True] * 4
    expected = pd.concat([
        latest_snapshot(settings.data_path, "customers", "customer_id", customers).reset_index(drop=True),
        latest_snapshot(settings.data_path, "merchants", "merchant_id", merchants).reset_index(drop=True)], axis=1)
    for column in FEAST_FEATURES:
        want = expected[column.name].tolist()
        got = values[column.name]
        assert got == (pytest.approx(want, rel=1e-6) if isinstance(want[0], float) else want), column.name
    unknown, found = online.lookup([{"customer_id": TINY.customers + 1, "merchant_id": 3}])
    assert found == [False] and unknown["avg_amount_30d"] == [None]


class ClusterServer:
    """``driftloop serve`` in the cluster profile, as a real process on a free port."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.log = log
        with log.open("w") as out:  # a file, not a pipe nobody reads: it would fill
            self.proc = subprocess.Popen([sys.executable, "-m", "driftloop", "serve", "--port", str(self.port)],
                                         env=env, stdout=out, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)

    def wait_ready(self, model: str, timeout: float = 120) -> None:
        wait_for_http(f"http://127.0.0.1:{self.port}/v2/models/{model}/ready", self.proc, self.log, timeout)

    def stop(self) -> str:
        """SIGTERM: the server answers what is in flight and flushes the inference log, then exits."""
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.log.read_text()


def test_the_cluster_loop_through_the_cli(postgres_dsn, redis_url, mlflow_url, mlflow_artifacts_dir, tmp_path):
    """data, features, train, serve and monitor, each a `driftloop` process in the cluster profile: the
    champion is registered on the MLflow server with its artifacts uploaded through it, the server finds
    the entity in Redis and logs the prediction to PostgreSQL, and the monitor checks that log."""
    dsn = create_database(postgres_dsn, "loop")
    env = {
        "DRIFTLOOP_PROFILE": "cluster",
        "DRIFTLOOP_MLFLOW_TRACKING_URI": mlflow_url,
        "DRIFTLOOP_POSTGRES_DSN": dsn,
        "DRIFTLOOP_REDIS_URL": f"{redis_url},db=1",  # a database of its own: the other test's keys are in 0
        "DRIFTLOOP_DATA_DIR": str(tmp_path / "data"),
        "DRIFTLOOP_FEAST_REGISTRY": create_database(postgres_dsn, "loop_feast").replace(
            "postgresql://", "postgresql+psycopg://", 1),
        "DRIFTLOOP_STATE_DIR": str(tmp_path / "state"),
    }
    # data that ends today, so `features materialize` (up to now) loads every entity's snapshot
    for args in (("data", "generate", "--rows", str(TINY.rows), "--customers", str(TINY.customers),
                  "--merchants", str(TINY.merchants), "--days", str(TINY.days), "--seed", str(TINY.seed)),
                 ("features", "apply"), ("features", "materialize")):
        done = run_cli(*args, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    assert redis_client(redis_url).info("keyspace").get("db1", {}).get("keys", 0) > 0

    done = run_cli("train", "--n-estimators", "30", "--json", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["decision"]["promoted"], result["decision"]
    name = Settings().model_name
    client = MlflowClient(mlflow_url, mlflow_url)
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == str(result["decision"]["version"]) and champion.run_id == result["run_id"]
    run = client.get_run(result["run_id"]).info
    assert run.artifact_uri.startswith("mlflow-artifacts:")  # uploaded through the server, which stores them
    experiment = mlflow_artifacts_dir / run.experiment_id
    assert (experiment / run.run_id / "artifacts" / "evaluation.json").is_file()
    assert list(experiment.glob("models/*/artifacts/MLmodel")), "the logged model was not uploaded"

    server = ClusterServer(env, tmp_path / "serve.log")
    try:
        server.wait_ready(name)
        tx = pd.read_parquet(tmp_path / "data" / "transactions.parquet").tail(300)
        instances = [{"customer_id": int(r.customer_id), "merchant_id": int(r.merchant_id), "amount": float(r.amount),
                      "channel": r.channel, "hour_of_day": int(r.hour_of_day),
                      "distance_km": None if pd.isna(r.distance_km) else float(r.distance_km),
                      "transaction_id": r.transaction_id} for r in tx.itertuples()]
        one = server.client.post(f"/v1/models/{name}:predict", json={"instances": [
            {"customer_id": 7, "merchant_id": 3, "amount": 42.0, "channel": "pos", "hour_of_day": 12,
             "distance_km": None, "transaction_id": "t-cluster"}]})
        assert one.status_code == 200, one.text
        body = one.json()
        assert body["entity_found"] == [True] and body["model_version"] == champion.version
        assert 0.0 <= body["predictions"][0] <= 1.0
        batch = server.client.post(f"/v1/models/{name}:predict", json={"instances": instances})
        assert batch.status_code == 200, batch.text
        assert all(batch.json()["entity_found"])
    finally:
        output = server.stop()
    assert server.proc.returncode == 0, output[-3000:]

    with psycopg.connect(dsn) as db:
        row = db.execute("SELECT model_name, model_version, customer_id, entity_found, score FROM predictions "
                         "WHERE transaction_id = 't-cluster'").fetchone()
        assert row == (name, champion.version, 7.0, 1.0, pytest.approx(body["predictions"][0], rel=1e-6))
        assert db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 1 + len(instances)

    done = run_cli("monitor", "check", "--json", "--window-rows", str(1 + len(instances)), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    check = json.loads(done.stdout)
    assert check["rows"] == 1 + len(instances) and check["model_version"] == champion.version
    assert check["verdict"] in {"drift", "no_drift"}  # enough rows for a verdict, whichever it is


def test_inference_log_reconnects_when_postgres_drops_its_connection(postgres_dsn):
    """A PostgreSQL restart breaks the writer's connection: it reconnects and retries, losing nothing."""
    postgres_dsn = create_database(postgres_dsn, "reconnect")  # its own table: the module shares the server
    log = InferenceLog(PostgresSink(postgres_dsn)).start()
    for i in range(300):
        log.record([record(i)])
    deadline = time.monotonic() + 30
    while log.written < 300 and time.monotonic() < deadline:
        time.sleep(0.05)
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        killed = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                               "WHERE pid <> pg_backend_pid() AND datname = current_database()").fetchone()[0]
    assert killed >= 1
    for i in range(300, 600):
        log.record([record(i)])
    log.close()
    assert (log.dropped, log.healthy) == (0, True)
    with psycopg.connect(postgres_dsn) as db:
        assert db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 600
