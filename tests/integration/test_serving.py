"""The model server as a real process on a free port, against a real MLflow store and Feast online store."""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from driftloop.contracts import FEAST_FEATURES, MODEL_FEATURES
from driftloop.settings import Settings
from pipelines import training
from pipelines.steps import features
from pipelines.steps.train import TrainParams
from tests.helpers import AS_OF, free_port, trained_state, wait_for_http

pytestmark = pytest.mark.integration

MODEL = "driftloop-fraud"
REQUEST = {"amount": 120.5, "channel": "online", "hour_of_day": 3, "distance_km": 12.0}


class Server:
    def __init__(self, state: Path, *args: str) -> None:
        self.state = state
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "DRIFTLOOP_STATE_DIR": str(state)}
        env.pop("MLFLOW_TRACKING_URI", None)
        env.pop("MLFLOW_REGISTRY_URI", None)
        self.output = state / f"server-{self.port}.log"  # a file, not a pipe nobody reads: it would fill
        with self.output.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "serving", "--port", str(self.port), "--reload-interval", "0.5", *args],
                env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        self.client = httpx.Client(base_url=self.url, timeout=10)
        wait_for_http(f"{self.url}/v2/models/{MODEL}/ready", self.proc, self.output)

    def predict(self, *instances: dict, verb: str = "predict") -> httpx.Response:
        return self.client.post(f"/v1/models/{MODEL}:{verb}", json={"instances": list(instances)})

    def stop(self, sig: int = signal.SIGTERM) -> str:
        self.proc.send_signal(sig)
        self.proc.wait(timeout=60)
        self.client.close()
        return self.output.read_text()


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    """Data, applied and materialized features, and a champion: everything a server needs."""
    return trained_state(tmp_path_factory.mktemp("serving-state"))


@pytest.fixture(scope="module")
def server(state):
    server = Server(state)
    yield server
    server.stop()


def logged(state: Path) -> pd.DataFrame:
    with sqlite3.connect(state / "inference_log.db") as db:
        return pd.read_sql("SELECT * FROM predictions", db)


def offline_row(state: Path, customer_id: int, merchant_id: int) -> dict:
    """The Feast features of one entity pair, point-in-time at AS_OF: what training would have seen."""
    settings = Settings(state_dir=state)
    store = features.feature_store(settings)
    frame = store.get_historical_features(
        entity_df=pd.DataFrame({"customer_id": [customer_id], "merchant_id": [merchant_id],
                                "event_timestamp": [pd.Timestamp(AS_OF)]}),
        features=features.service(settings, store)).to_df()
    return {c.name: frame[c.name].iloc[0] for c in FEAST_FEATURES}


def test_v1_full_features_and_by_entity_give_the_training_vector(server, state):
    by_entity = server.predict({"customer_id": 7, "merchant_id": 3, **REQUEST, "transaction_id": "t-entity"})
    assert by_entity.status_code == 200, by_entity.text
    body = by_entity.json()
    assert body["model_version"] == "1" and body["entity_found"] == [True]
    offline = offline_row(state, 7, 3)
    full = server.predict({**REQUEST, **{k: (v.item() if hasattr(v, "item") else v) for k, v in offline.items()},
                           "transaction_id": "t-full"})
    assert full.status_code == 200, full.text
    assert full.json()["predictions"][0] == pytest.approx(body["predictions"][0], rel=1e-6)
    time.sleep(1.0)  # the writer thread flushes off the hot path
    rows = logged(state).set_index("transaction_id")
    for name in MODEL_FEATURES:
        a, b = rows.loc["t-entity", name], rows.loc["t-full", name]
        assert a == pytest.approx(b, rel=1e-6) if isinstance(a, float) else a == b, name


def test_v2_infer_and_metadata(server):
    inputs = [{"name": "customer_id", "shape": [2], "datatype": "INT64", "data": [7, 8]},
              {"name": "merchant_id", "shape": [2], "datatype": "INT64", "data": [3, 4]},
              {"name": "amount", "shape": [2], "datatype": "FP32", "data": [120.5, 3.0]},
              {"name": "channel", "shape": [2], "datatype": "BYTES", "data": ["online", "pos"]},
              {"name": "hour_of_day", "shape": [2, 1], "datatype": "INT64", "data": [3, 14]}]
    response = server.client.post(f"/v2/models/{MODEL}/infer", json={"id": "req-1", "inputs": inputs})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == "1" and body["id"] == "req-1"
    (output,) = body["outputs"]
    assert output["name"] == "fraud_probability" and output["shape"] == [2]
    assert all(0 <= p <= 1 for p in output["data"])
    meta = server.client.get(f"/v2/models/{MODEL}").json()
    names = {i["name"]: i["datatype"] for i in meta["inputs"]}
    assert names["amount"] == "FP32" and names["channel"] == "BYTES" and names["customer_id"] == "INT64"
    assert set(MODEL_FEATURES) <= set(names)
    assert server.client.get("/v1/models").json() == {"models": [MODEL]}
    assert server.client.get("/v2/health/live").status_code == 200
    assert server.client.get(f"/v1/models/{MODEL}").json()["ready"] is True


def test_explain_contributions_add_up_to_the_prediction(server):
    response = server.predict({"customer_id": 7, "merchant_id": 3, **REQUEST}, verb="explain")
    assert response.status_code == 200, response.text
    body = response.json()
    (contrib,) = body["explanations"]
    assert set(contrib) == {*MODEL_FEATURES, "bias"}
    logit = sum(contrib.values())
    assert 1 / (1 + math.exp(-logit)) == pytest.approx(body["predictions"][0], rel=1e-4)


def test_missing_entity_is_scored_with_unknown_features(server):
    response = server.predict({"customer_id": 999_999, "merchant_id": 3, **REQUEST})
    assert response.status_code == 200
    body = response.json()
    assert body["entity_found"] == [False] and 0 <= body["predictions"][0] <= 1


JSON = {"content-type": "application/json"}
FEAST_ROW = {"account_age_days": 10, "txn_count_7d": 2, "avg_amount_30d": 50.0, "chargeback_rate_90d": 0.01,
             "merchant_fraud_rate_30d": 0.01, "merchant_category": "grocery"}
GOOD = {"customer_id": 7, "merchant_id": 3, **REQUEST}
BAD_V1 = [
    ("invalid json", b'{"instances": [', JSON, "Unrecognized request format"),
    ("not json content type", b'{"instances": []}', {"content-type": "text/plain"}, "must be JSON"),
    ("json array body", b"[1, 2]", JSON, '"instances" list'),
    ("no instances key", b'{"inputs": []}', JSON, '"instances"'),
    ("instances not a list", b'{"instances": {"a": 1}}', JSON, "instances"),
    ("empty instances", b'{"instances": []}', JSON, "no instances"),
    ("instance not an object", b'{"instances": [[1, 2, 3]]}', JSON, "must be an object"),
    ("extra field", {"instances": [{**GOOD, "colour": "red"}]}, None, "unknown fields ['colour']"),
    ("extra top-level field", {"instances": [GOOD], "debug": True}, None, "unknown top-level fields"),
    ("missing request feature", {"instances": [{k: v for k, v in GOOD.items() if k != "amount"}]}, None,
     "missing request features ['amount']"),
    ("missing entity key", {"instances": [{k: v for k, v in GOOD.items() if k != "merchant_id"}]}, None,
     "missing ['merchant_id']"),
    ("partial feast features", {"instances": [{**REQUEST, "account_age_days": 3}]}, None, "incomplete features"),
    ("string for a number", {"instances": [{**GOOD, "amount": "12"}]}, None, "amount must be a number"),
    ("bool for a number", {"instances": [{**GOOD, "hour_of_day": True}]}, None, "hour_of_day must be a number"),
    ("number for a category", {"instances": [{**GOOD, "channel": 3}]}, None, "channel must be a string"),
    ("negative entity id", {"instances": [{**GOOD, "customer_id": -1}]}, None, "non-negative integer"),
    ("float entity id", {"instances": [{**GOOD, "customer_id": 1.5}]}, None, "non-negative integer"),
    ("NaN literal", b'{"instances": [{"amount": NaN}]}', JSON, "Unrecognized request format"),
    ("Infinity literal", b'{"instances": [{"amount": Infinity}]}', JSON, "Unrecognized request format"),
    ("overflowing number", b'{"instances": [{"customer_id": 7, "merchant_id": 3, "amount": 1e999, '
     b'"channel": "pos", "hour_of_day": 1}]}', JSON, ""),
    ("too many instances", {"instances": [GOOD] * 1_001}, None, "too many instances"),
]
BAD_V2 = [
    ("v2 shape/data mismatch", [{"name": "amount", "shape": [2], "datatype": "FP32", "data": [1.0]}],
     "does not match"),
    ("v2 unknown input", [{"name": "colour", "shape": [1], "datatype": "BYTES", "data": ["red"]}], "unknown input"),
    ("v2 ragged inputs", [{"name": "amount", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]},
                          {"name": "hour_of_day", "shape": [1], "datatype": "INT64", "data": [1]}], "rows"),
    ("v2 wrong datatype", [{"name": "channel", "shape": [1], "datatype": "FP32", "data": [1.0]}], "BYTES"),
    ("v2 bad shape", [{"name": "amount", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}], "shape"),
    ("v2 no inputs", [], "no inputs"),
]


@pytest.mark.parametrize(("case", "body", "headers", "expected"), BAD_V1, ids=[c[0] for c in BAD_V1])
def test_bad_v1_input_gets_a_4xx_naming_the_problem(server, case, body, headers, expected):
    url = f"/v1/models/{MODEL}:predict"
    if isinstance(body, bytes):
        response = server.client.post(url, content=body, headers=headers)
    else:
        response = server.client.post(url, json=body)
    assert 400 <= response.status_code < 500, (case, response.status_code, response.text)
    assert expected in response.json()["error"], response.text


@pytest.mark.parametrize(("case", "inputs", "expected"), BAD_V2, ids=[c[0] for c in BAD_V2])
def test_bad_v2_input_gets_a_4xx_naming_the_problem(server, case, inputs, expected):
    response = server.client.post(f"/v2/models/{MODEL}/infer", json={"inputs": inputs})
    assert 400 <= response.status_code < 500, (case, response.status_code, response.text)
    assert expected in response.text


def test_oversized_body_and_unknown_model(server):
    big = server.client.post(f"/v1/models/{MODEL}:predict", content=b"x" * (2 << 20), headers=JSON)
    assert big.status_code == 413 and "limit" in big.json()["error"]
    missing = server.client.post("/v1/models/nope:predict", json={"instances": [GOOD]})
    assert missing.status_code == 404 and "nope" in missing.text
    missing_v2 = server.client.post("/v2/models/nope/infer", json={"inputs": []})
    assert missing_v2.status_code == 404


def test_server_stays_healthy_and_counts_by_status(server):
    assert server.predict(GOOD).status_code == 200
    metrics = server.client.get("/metrics").text
    assert 'driftloop_requests_total{protocol="v1",status="400"}' in metrics
    assert 'driftloop_requests_total{protocol="v1",status="413"}' in metrics
    for name in ("driftloop_request_seconds_bucket", "driftloop_batch_rows_bucket",
                 "driftloop_feature_lookup_seconds_bucket", 'driftloop_model_version{model="driftloop-fraud"} 1.0',
                 "driftloop_inference_log_queue_depth", "driftloop_inference_log_dropped_total 0.0"):
        assert name in metrics, name


def test_hot_reload_without_a_failed_request(server, state):
    settings = Settings(state_dir=state)
    stop = threading.Event()
    statuses: list[int] = []
    versions: set[str] = set()

    def load() -> None:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            while not stop.is_set():
                r = client.post(f"/v1/models/{MODEL}:predict", json={"instances": [GOOD]})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    versions.add(r.json()["model_version"])

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        result = training.run_local(settings, training.TrainingConfig(
            as_of=AS_OF, params=TrainParams(n_estimators=200), gate=training.GatePolicy(margin=-1.0)))
        assert result.decision.promoted
        deadline = time.monotonic() + 30
        while result.decision.version not in versions:
            assert time.monotonic() < deadline, "the server did not switch to the new champion"
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert set(statuses) == {200}, "a request failed during the swap"
    assert versions == {"1", result.decision.version}
    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    client.set_registered_model_alias(MODEL, "champion", "1")  # leave the champion as the module found it
    deadline = time.monotonic() + 30
    while server.predict(GOOD).json()["model_version"] != "1":
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_records_logged_equal_requests_answered_through_a_sigterm(state):
    server = Server(state)
    before = len(logged(state))
    answered = 0
    lock = threading.Lock()

    client = httpx.Client(timeout=10)  # one client: a client per request costs ~40 ms of CPU (its TLS context)

    def fire(i: int) -> None:
        nonlocal answered
        try:
            r = client.post(f"{server.url}/v1/models/{MODEL}:predict",
                            json={"instances": [{**GOOD, "transaction_id": f"sigterm-{i}"}]})
        except httpx.HTTPError:
            return  # refused once the server stopped listening: never answered, never logged
        if r.status_code == 200:
            with lock:
                answered += 1

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(fire, i) for i in range(3_000)]
        time.sleep(1.0)
        output = server.stop(signal.SIGTERM)
        for f in futures:
            f.result()
    client.close()
    assert server.proc.returncode is not None
    after = logged(state)
    records = after.iloc[before:]
    assert answered > 0, output[-2000:]
    assert len(records[records["transaction_id"].str.startswith("sigterm-", na=False)]) == answered
    # and the log is still readable by the next server
    again = Server(state)
    try:
        assert again.predict(GOOD).status_code == 200
    finally:
        again.stop()


def test_batch_scoring_matches_the_server(server, state, tmp_path):
    from tests.helpers import run_cli

    rows = pd.DataFrame({"customer_id": [7, 8, 9], "merchant_id": [3, 4, 5], "amount": [120.5, 3.0, 999.0],
                         "channel": ["online", "pos", "atm"], "hour_of_day": [3, 14, 23],
                         "distance_km": [12.0, None, 4000.0]})
    rows.to_parquet(tmp_path / "in.parquet")
    env = {"DRIFTLOOP_STATE_DIR": str(state)}
    result = run_cli("batch", "score", str(tmp_path / "in.parquet"), str(tmp_path / "out.parquet"), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    out = pd.read_parquet(tmp_path / "out.parquet")
    plain = [{k: (None if v != v else (v.item() if hasattr(v, "item") else v)) for k, v in r.items()}
             for r in rows.to_dict("records")]
    online = server.predict(*plain)
    assert out["fraud_probability"].tolist() == pytest.approx(online.json()["predictions"], rel=1e-6)
    assert set(out["model_version"]) == {online.json()["model_version"]}

    # with event times: point-in-time features, the same as a full-feature request with offline values
    timed = rows.head(1).assign(event_timestamp=[pd.Timestamp(AS_OF)])
    timed.to_parquet(tmp_path / "timed.parquet")
    result = run_cli("batch", "score", str(tmp_path / "timed.parquet"), str(tmp_path / "timed-out.parquet"),
                     "--engine", "prefect", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "point-in-time" in result.stdout
    offline = offline_row(state, 7, 3)
    full = server.predict({**{k: v for k, v in plain[0].items() if k not in ("customer_id", "merchant_id")},
                           **{k: (v.item() if hasattr(v, "item") else v) for k, v in offline.items()}})
    scored = pd.read_parquet(tmp_path / "timed-out.parquet")["fraud_probability"].iloc[0]
    assert scored == pytest.approx(full.json()["predictions"][0], rel=1e-6)

    rows.drop(columns="channel").to_parquet(tmp_path / "bad.parquet")
    bad = run_cli("batch", "score", str(tmp_path / "bad.parquet"), str(tmp_path / "x.parquet"), env=env)
    assert bad.returncode == 1 and "lacks columns ['channel']" in bad.stderr
    assert not (tmp_path / "x.parquet").exists()
