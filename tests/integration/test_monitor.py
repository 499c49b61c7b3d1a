"""The monitor on a real inference log and MLflow store: drift, performance, the retraining trigger."""

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from driftloop.contracts import LABEL, MODEL_FEATURES
from driftloop.settings import Settings
from monitoring.monitor import MonitorPolicy, check
from monitoring.retrain import TriggerPolicy
from pipelines import training
from pipelines.steps import features, ingest
from pipelines.steps.train import TrainParams
from serving.inference_log import InferenceLog, SqliteSink
from tests.helpers import AS_OF, TINY, run_cli

pytestmark = pytest.mark.integration


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("DRIFTLOOP_STATE_DIR", str(tmp_path))
    settings = Settings(state_dir=tmp_path)
    ingest.generate_to(TINY, settings.data_path)
    features.apply(settings)
    training.run_local(settings, training.TrainingConfig(as_of=AS_OF, params=TrainParams(n_estimators=60)))
    return settings


def traffic(stream: int, drift: str = "none", rows: int = 2_500) -> pd.DataFrame:
    """New transactions of the same customers and merchants, with the features the server would have used."""
    data = ingest.generate(dataclasses.replace(TINY, stream=stream, drift=drift, drift_days=0, rows=rows))
    tx = data.transactions.assign(day=data.transactions["event_timestamp"].dt.floor("D"))
    cust = data.customers.drop(columns="created_timestamp").rename(columns={"event_timestamp": "day"})
    merch = data.merchants.drop(columns="created_timestamp").rename(columns={"event_timestamp": "day"})
    return tx.merge(cust, on=["customer_id", "day"]).merge(merch, on=["merchant_id", "day"])


def serve(settings: Settings, frame: pd.DataFrame, score: np.ndarray | None = None, version: str = "1") -> None:
    log = InferenceLog(SqliteSink(settings.inference_log_path)).start()
    now = time.time()
    scores = score if score is not None else np.full(len(frame), 0.05)
    for i, row in enumerate(frame.itertuples(index=False)):
        values = [getattr(row, f) for f in MODEL_FEATURES]
        values = [None if isinstance(v, float) and np.isnan(v) else v for v in values]
        log.record([(f"req-{row.transaction_id}", now + i * 1e-4, "driftloop-fraud", version, row.transaction_id,
                     row.customer_id, row.merchant_id, *values, float(scores[i]), 1.0)])
    log.close()


def client_of(settings: Settings) -> MlflowClient:
    return MlflowClient(settings.tracking_uri, settings.tracking_uri)


def test_same_distribution_is_quiet_and_drift_triggers_one_retraining(state):
    policy = MonitorPolicy(window_rows=2_000, trigger=TriggerPolicy(k=2, n=3, cooldown_s=3_600))
    runs = []
    serve(state, traffic(stream=21))
    quiet = check(state, client_of(state), policy, retrain=lambda: runs.append(1) or "ran")
    assert quiet.verdict == "no_drift" and not quiet.signal and quiet.retraining is None

    serve(state, traffic(stream=22, drift="covariate"))
    first = check(state, client_of(state), policy, retrain=lambda: runs.append(1) or "ran")
    assert first.verdict == "drift" and "amount" in first.drifted_columns
    assert first.retraining is not None and not first.retraining.start  # 1 signal of the last 2 windows
    again = check(state, client_of(state), policy, retrain=lambda: runs.append(1) or "ran")  # same window
    assert not again.retraining.start

    serve(state, traffic(stream=23, drift="covariate"))
    second = check(state, client_of(state), policy, retrain=lambda: runs.append(1) or "ran")
    assert second.retraining.start and runs == [1]

    serve(state, traffic(stream=24, drift="covariate"))
    third = check(state, client_of(state), policy, retrain=lambda: runs.append(1) or "ran")
    assert not third.retraining.start and "cooldown" in third.retraining.reason
    assert runs == [1]


def test_quality_faults_are_reported_not_retrained_on(state):
    serve(state, traffic(stream=31, drift="quality"))
    result = check(state, client_of(state), MonitorPolicy(), retrain=lambda: pytest.fail("must not retrain"))
    assert "amount" in result.quality_issues and "channel" in result.quality_issues
    assert any("crypto_kiosk" in issue or "unseen" in issue for issue in result.quality_issues["channel"])


def test_performance_drop_from_late_labels_is_a_signal(state):
    frame = traffic(stream=41, drift="concept")
    serve(state, frame, score=np.where(frame["channel"] == "online", 0.6, 0.02))  # the old pattern, now wrong
    frame[["transaction_id", LABEL]].to_parquet(state.state / "labels.parquet")
    assert run_cli("labels", "ingest", str(state.state / "labels.parquet")).returncode == 0
    result = check(state, client_of(state), MonitorPolicy(), retrain=None)
    assert result.served_auc is not None and result.served_auc < result.champion_auc - 0.05
    assert result.signal and any("served AUC" in r for r in result.reasons)


def test_small_window_waits_and_a_full_small_one_is_insufficient_data(state):
    serve(state, traffic(stream=51).head(50))
    result = check(state, client_of(state), MonitorPolicy(), retrain=lambda: pytest.fail("must not retrain"))
    assert result.verdict == "waiting" and not result.signal
    assert result.status == "waiting: 50 of 2,000 rows of v1"
    result = check(state, client_of(state), MonitorPolicy(window_rows=50), retrain=lambda: pytest.fail("no"))
    assert result.verdict == "insufficient_data" and not result.signal


def test_cli_check_retrains_through_the_prefect_flow_and_the_gate(state):
    serve(state, traffic(stream=61, drift="covariate"))
    result = run_cli("monitor", "check", "--retrain", "--k", "1", "--n", "1", "--json", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    body = json.loads(result.stdout.strip().splitlines()[-1])
    assert body["verdict"] == "drift" and body["retraining"]["start"]
    versions = client_of(state).search_model_versions("name='driftloop-fraud'")
    assert len(versions) == 2  # the retrained model was registered; the gate chose its alias
    human = run_cli("monitor", "check")
    assert human.returncode == 0 and "drift check" in human.stdout


def test_run_exports_metrics_and_calls_the_webhook(state):
    import http.server
    import threading

    from prometheus_client import CollectorRegistry, generate_latest

    from monitoring.monitor import MonitorMetrics, run_forever

    received = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    hook = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    serve(state, traffic(stream=71, drift="covariate"))
    registry = CollectorRegistry()
    results = []
    try:
        run_forever(state, client_of(state), MonitorPolicy(trigger=TriggerPolicy(k=3, n=3)), 0.0, 2,
                    results.append, MonitorMetrics(registry), f"http://127.0.0.1:{hook.server_port}/hook")
    finally:
        hook.shutdown()
    assert len(results) == 2 and all(r.verdict == "drift" for r in results)
    text = generate_latest(registry).decode()
    assert 'driftloop_monitor_checks_total{model="driftloop-fraud",verdict="drift"} 2.0' in text
    assert 'driftloop_monitor_retrainings_total{model="driftloop-fraud",outcome="too_few_signals"} 2.0' in text
    assert 'driftloop_monitor_feature_drift_score{feature="amount",model="driftloop-fraud"}' in text
    assert "driftloop_monitor_last_check_timestamp_seconds" in text
    assert len(received) == 2 and received[0]["event"] == "driftloop.monitor.check"
    assert received[0]["verdict"] == "drift" and "amount" in received[0]["drifted_columns"]


def test_on_a_cluster_retraining_runs_the_prefect_deployment(state, tmp_path_factory):
    import os
    import subprocess
    import sys
    import urllib.request

    from tests.helpers import free_port

    prefect_home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(prefect_home), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "DRIFTLOOP_RETRAIN": "deployment"}
    with (prefect_home / "server.log").open("w") as log:
        server = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server",
                                   "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
    worker = None
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{api}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the Prefect server did not start"
                time.sleep(0.5)
        with (prefect_home / "serve.log").open("w") as log:
            worker = subprocess.Popen([sys.executable, "-m", "driftloop", "pipeline", "serve"], env=env,
                                      stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{api}/deployments/name/driftloop-retraining/driftloop-retraining",
                                       timeout=2)
                break
            except OSError:
                assert worker.poll() is None, (prefect_home / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the deployment was not registered"
                time.sleep(0.5)
        serve(state, traffic(stream=81, drift="covariate"))
        result = run_cli("monitor", "check", "--retrain", "--k", "1", "--n", "1", "--json", env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        body = json.loads(result.stdout.strip().splitlines()[-1])
        assert body["retraining"]["start"] and "completed" in body["retraining"]["reason"]
        assert len(client_of(state).search_model_versions("name='driftloop-fraud'")) == 2
    finally:
        for proc in (worker, server):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
