"""Hardening of the model server, as real processes on real HTTP: client input is never a 500, a fault is a
counted 500, per-request storage and request heads are bounded, idle and slow connections are closed while
others are served, a body over the limit is a 413 for urllib too, a SIGKILL loses at most the log's bound,
the server listens on loopback unless told, and a champion that cannot be loaded is visible and survived."""

from __future__ import annotations

import json
import random
import re
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from mlflow.tracking import MlflowClient

from driftloop.settings import Settings
from pipelines import training
from pipelines.steps.register import TAG_PREVIOUS
from pipelines.steps.train import TrainParams
from serving.model import earlier_champions
from tests.helpers import AS_OF, free_port, stop_group, trained_state, wait_for_http
from tests.integration.test_serving import GOOD, MODEL, Server, logged
from tests.unit.test_hardening_serving_parts import binary_body, encode, v1_bodies, v2_bodies

pytestmark = pytest.mark.integration

V1 = f"/v1/models/{MODEL}:predict"
V2 = f"/v2/models/{MODEL}/infer"
READY = f"/v2/models/{MODEL}/ready"


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    """Data, features and a champion of this module's own (its last test adds a broken version)."""
    return trained_state(tmp_path_factory.mktemp("hardening-state"))


@pytest.fixture(scope="module")
def server(state):
    server = Server(state)
    yield server
    server.stop()


def v2_inputs(n: int = 1, **columns) -> list[dict]:
    values = {"customer_id": [7] * n, "merchant_id": [3] * n, "amount": [120.5] * n, "channel": ["online"] * n,
              "hour_of_day": [3] * n, **columns}
    types = {"channel": "BYTES", "amount": "FP32"}
    return [{"name": k, "shape": [len(v)], "datatype": types.get(k, "INT64"), "data": v} for k, v in values.items()]


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from a /metrics page (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}{re.escape('{' + want + '}') if labels else ''} (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def assert_4xx_json(response: httpx.Response, case: object) -> None:
    assert 400 <= response.status_code < 500, (case, response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json"), (case, response.text[:300])
    assert response.json()["error"], case


# 3. every 5xx counted; client input never one ---------------------------------------------------------
def test_generated_strange_payloads_never_get_a_5xx(server):
    rng = random.Random(7)
    sent = 0
    for body in v1_bodies(rng, 300):
        for verb in ("predict", "explain"):
            response = server.client.post(f"/v1/models/{MODEL}:{verb}", content=json.dumps(encode(body)).encode(),
                                          headers={"content-type": "application/json"})
            assert response.status_code < 500, (body, response.text[:300])
            sent += 1
    for body in v2_bodies(rng, 300):
        response = server.client.post(V2, content=json.dumps(encode(body)).encode(),
                                      headers={"content-type": "application/json"})
        assert response.status_code < 500, (body, response.text[:300])
        if isinstance(body, dict) and isinstance(body.get("inputs"), list):
            raw = binary_body(body, rng)
            if raw is not None:
                response = server.client.post(V2, content=raw[0], headers={
                    "content-type": "application/octet-stream", "inference-header-content-length": str(raw[1])})
                assert response.status_code < 500, (raw, response.text[:300])
                sent += 1
        sent += 1
    for raw in (b"", b"null", b"[]", b"{}", b"NaN", b"[" * 5_000, b"\xff\xfe", b'{"instances": [{"amount": 1e999}]}',
                "{\"instances\": [{\"channel\": \"\ud800\"}]}".encode("utf-8", "surrogatepass")):
        for path in (V1, V2, f"/v1/models/{MODEL}:explain"):
            response = server.client.post(path, content=raw, headers={"content-type": "application/json"})
            assert_4xx_json(response, (path, raw[:40]))
            sent += 1
    assert sent > 1_000
    assert 'status="5' not in "\n".join(line for line in server.client.get("/metrics").text.splitlines()
                                        if line.startswith("driftloop_requests_total"))


def test_the_inputs_that_answered_500_get_a_400_naming_the_problem(server):
    entity = {**GOOD, "customer_id": 2**63}
    for verb in ("predict", "explain"):  # the fast path and KServe's route
        response = server.client.post(f"/v1/models/{MODEL}:{verb}", json={"instances": [entity]})
        assert_4xx_json(response, verb)
        assert "customer_id must be a non-negative integer up to 9223372036854775807" in response.json()["error"]
    for path, body in ((V1, {"instances": [GOOD]}), (V2, {"inputs": v2_inputs()})):
        response = server.client.post(path, json=body, headers={"x-request-id": b"\xff\xfe"})
        assert_4xx_json(response, path)
        assert "X-Request-Id header is not UTF-8" in response.json()["error"]
    shaped = [{**tensor, "shape": [True]} for tensor in v2_inputs()]
    response = server.client.post(V2, json={"inputs": shaped})
    assert_4xx_json(response, "shape [true]")
    assert "shape must be a list of non-negative integers" in response.json()["error"]
    inputs = v2_inputs()
    channel = struct.pack("<I", 2) + b"\xff\xfe"
    inputs[3] = {"name": "channel", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}
    head = json.dumps({"inputs": inputs}).encode()
    response = server.client.post(V2, content=head + channel, headers={
        "content-type": "application/octet-stream", "inference-header-content-length": str(len(head))})
    assert_4xx_json(response, "binary utf-8")
    assert "channel is not UTF-8 text" in response.json()["error"]
    good = struct.pack("<I", 6) + b"online"
    inputs[3]["parameters"] = {"binary_data_size": len(good)}
    head = json.dumps({"inputs": inputs}).encode()
    response = server.client.post(V2, content=head + good, headers={
        "content-type": "application/octet-stream", "inference-header-content-length": str(len(head))})
    assert response.status_code == 200, response.text  # the binary extension is served, by our parser
    plain = server.client.post(V2, json={"inputs": v2_inputs()}).json()
    assert response.json()["outputs"] == plain["outputs"]


def test_a_server_fault_is_a_500_with_a_json_error_and_counted(server, state):
    """The online store loses its table (as when Redis is away): a by-entity request is the server's
    fault. On the fast path and on KServe's route alike it is answered in JSON and counted."""
    before = server.client.get("/metrics").text
    online = sqlite3.connect(state / "feast" / "online.db", isolation_level=None)
    online.execute("ALTER TABLE driftloop_customer_stats RENAME TO away")
    try:
        predicted = server.predict({**GOOD, "customer_id": 11})  # not cached yet
        explained = server.predict({**GOOD, "customer_id": 12}, verb="explain")
    finally:
        online.execute("ALTER TABLE away RENAME TO driftloop_customer_stats")
        online.close()
    for response in (predicted, explained):
        assert response.status_code == 500, response.text
        assert response.json()["error"].startswith("internal error (OperationalError)")
    after = server.client.get("/metrics").text
    requests = "driftloop_requests_total"
    assert metric(after, requests, protocol="v1", status="500") - metric(before, requests, protocol="v1",
                                                                          status="500") == 2
    assert server.predict({**GOOD, "customer_id": 13}).status_code == 200  # and the server goes on
    # a 5xx that KServe's own route answers is counted with its code too
    unsupported = server.client.post(f"/v2/models/{MODEL}/versions/1/infer", json={"inputs": v2_inputs()})
    assert unsupported.status_code == 501
    assert metric(server.client.get("/metrics").text, requests, protocol="v2", status="501") >= 1


# 2. bounded per-request storage and heads --------------------------------------------------------------
def test_request_ids_are_bounded_and_stored_as_sent(server, state):
    long_id = "x" * 274_000
    response = server.client.post(V2, json={"id": long_id, "inputs": v2_inputs(1_000)})
    assert_4xx_json(response, "long id")
    assert 'the v2 "id" is 274,000 characters; the limit is 128' in response.json()["error"]
    response = server.client.post(V1, json={"instances": [GOOD]}, headers={"x-request-id": "y" * 129})
    assert "the X-Request-Id header is 129 characters; the limit is 128" in response.json()["error"]
    response = server.client.post(V2, json={"id": "i" * 128, "inputs": v2_inputs(3)})
    assert response.status_code == 200 and response.json()["id"] == "i" * 128
    header = server.client.post(V1, json={"instances": [GOOD]}, headers={"x-request-id": "h" * 128})
    assert header.json()["request_id"] == "h" * 128
    deadline = time.monotonic() + 30
    while len(ids := [i for i in logged(state)["request_id"] if i[0] in "hix" and len(set(i)) == 1]) < 4:
        assert time.monotonic() < deadline, "records not written"  # the writer flushes off the hot path
        time.sleep(0.2)
    assert sorted(ids) == ["h" * 128] + ["i" * 128] * 3  # and nothing of the refused requests


def test_request_heads_are_bounded(server):
    assert server.client.get("/v2/health/live", headers={"x-fill": "a" * 15_000}).status_code == 200
    for headers in ({"x-big": "a" * 8_000_000}, {f"x-h{i}": "v" * 100 for i in range(300)}):
        response = server.client.get("/v2/health/live", headers=headers)
        assert response.status_code == 431, response.text[:200]
        assert "over the limit of 16384 bytes" in response.json()["error"]
    assert metric(server.client.get("/metrics").text, "driftloop_requests_total", protocol="other",
                  status="431") >= 2


# 4. a body over the limit is a 413 for urllib ----------------------------------------------------------
def test_a_body_over_the_limit_gets_its_413_with_urllib(server):
    """urllib writes the whole body before it reads, and asks to close the connection: the server used to
    close with the body unread, and the kernel answered the rest with a reset (15 of 20 tries)."""
    bodies = [b"x" * (2 << 20)] * 20 + [iter([b"x" * 65_536] * 40)]  # the last one chunked (no length)
    for i, body in enumerate(bodies):
        request = urllib.request.Request(f"{server.url}{V1}", data=body, headers={"content-type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 413, i
        assert "over the limit of 1048576 bytes" in json.loads(refused.value.read())["error"]


def read_to_close(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65_536):
        chunks.append(chunk)
    return b"".join(chunks)


# 2. idle and slow connections, 13. --host ----------------------------------------------------------------
def test_idle_and_slow_connections_are_closed_while_other_clients_are_served(state):
    strict = Server(state, "--host", "0.0.0.0", "--request-timeout", "1", "--keep-alive-timeout", "1")
    idle = []
    try:
        idle = [socket.create_connection(("127.0.0.1", strict.port)) for _ in range(200)]
        slow_head = socket.create_connection(("127.0.0.1", strict.port))
        slow_head.sendall(b"POST /v1/models/driftloop-fraud:predict HTTP/1.1\r\nHost: x\r\n")
        slow_body = socket.create_connection(("127.0.0.1", strict.port))
        slow_body.sendall(b"POST /v1/models/driftloop-fraud:predict HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"instances\"")
        with httpx.Client(base_url=strict.url, timeout=10) as client:  # a real client, meanwhile
            statuses = {client.post(V1, json={"instances": [GOOD]}).status_code for _ in range(50)}
        assert statuses == {200}
        for sock in (*idle, slow_head, slow_body):
            sock.settimeout(60)
        assert [sock.recv(1) for sock in idle] == [b""] * 200  # closed by the server, with nothing sent
        assert read_to_close(slow_head).startswith(b"HTTP/1.1 408")
        answer = read_to_close(slow_body)  # head and body may come in two segments
        assert answer.startswith(b"HTTP/1.1 408") and b"request body not received within 1 s" in answer
        metrics = strict.client.get("/metrics").text
        assert metric(metrics, "driftloop_connections_closed_total", reason="idle") >= 200
        assert metric(metrics, "driftloop_requests_total", protocol="v1", status="408") == 1
        # --host 0.0.0.0 listens on every address: 127.0.0.2 is another address of this machine
        socket.create_connection(("127.0.0.2", strict.port), timeout=5).close()
    finally:
        for sock in idle:
            sock.close()
        strict.stop()


def test_the_server_listens_on_loopback_unless_told(server):
    assert server.client.get("/v2/health/live").status_code == 200
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", server.port), timeout=5)


def test_monitor_metrics_listen_on_loopback_unless_told(state):
    for host, reachable in ((None, False), ("0.0.0.0", True)):
        port = free_port()
        log = state / f"monitor-{port}.log"
        args = ["--metrics-host", host] if host else []
        with log.open("w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "driftloop", "monitor", "run", "--metrics-port", str(port),
                                     "--checks", "2", "--interval", "600", *args],
                                    env={**_env(state)}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_http(f"http://127.0.0.1:{port}/metrics", proc, log, timeout=120)
            if reachable:
                socket.create_connection(("127.0.0.2", port), timeout=5).close()
            else:
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection(("127.0.0.2", port), timeout=5)
        finally:
            stop_group(proc)


def _env(state: Path) -> dict[str, str]:
    import os

    env = {**os.environ, "DRIFTLOOP_STATE_DIR": str(state)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MLFLOW_REGISTRY_URI", None)
    return env


# 6. SIGKILL loses at most the log's bound; 1. readiness shows the log ----------------------------------------
def test_a_sigkill_loses_at_most_the_log_queue_bound(state):
    """With the store away (a lock held on the SQLite file) nothing is written: the server keeps answering,
    holds at most --log-queue predictions, drops and counts the rest, and says so in its readiness answer.
    A SIGKILL then loses exactly the held ones: never more than the bound."""
    bound = 100
    killed = Server(state, "--log-queue", str(bound))
    holder = sqlite3.connect(state / "inference_log.db", isolation_level=None, timeout=60)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        answered = sum(killed.predict({**GOOD, "transaction_id": f"kill-{i}"}).status_code == 200
                       for i in range(300))
        deadline = time.monotonic() + 60
        while (ready := killed.client.get(READY)).json()["inference_log"]["healthy"]:
            assert time.monotonic() < deadline, "the log never reported the store away"
            time.sleep(0.5)
        assert ready.status_code == 200 and ready.json()["ready"] is True  # serving goes on
        metrics = killed.client.get("/metrics").text
        held = metric(metrics, "driftloop_inference_log_queue_depth")
        dropped = metric(metrics, "driftloop_inference_log_dropped_total")
        assert metric(metrics, "driftloop_inference_log_queue_limit") == bound
        killed.stop(signal.SIGKILL)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    rows = logged(state)
    written = int(rows["transaction_id"].str.startswith("kill-", na=False).sum())
    lost = answered - written - dropped
    assert answered == 300 and held == bound and dropped == answered - bound
    assert written == 0 and lost == held <= bound


# 5. a broken champion ------------------------------------------------------------------------------------------
def test_earlier_champions_walk_the_chain_then_the_gate_promoted_newest_first(tmp_path):
    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    client = MlflowClient(uri, uri)
    client.create_registered_model("m")
    tags = {1: {"gate.decision": "champion"}, 2: {"gate.decision": "challenger"},
            3: {"gate.decision": "champion", TAG_PREVIOUS: "1"},
            4: {"gate.decision": "champion", TAG_PREVIOUS: "3", "driftloop.rolled_back": "true"},
            5: {"gate.decision": "champion", TAG_PREVIOUS: "3"}, 6: {"gate.decision": "champion", TAG_PREVIOUS: "5"},
            7: {"gate.decision": "challenger", "driftloop.promotion": "{}"},  # promoted by hand
            8: {"gate.decision": "champion", "driftloop.registration": "pending"},  # a registration under way
            9: {"gate.decision": "challenger"}}
    for version in sorted(tags):
        client.create_model_version("m", str(tmp_path / f"v{version}"), tags=tags[version])
    assert earlier_champions(client, "m", "6") == ["5", "3", "1"]
    assert earlier_champions(client, "m", "9") == ["7", "6", "5", "3", "1"]  # no chain: promoted, newest first
    assert earlier_champions(client, "m", "1") == []


def test_a_broken_champion_is_visible_and_a_new_replica_serves_the_last_good_version(server, state):
    """Last in this module: it adds a version. The champion alias moves to a version whose model file is
    corrupt: the running server keeps its version, a new one starts on the last good one, both say which
    version is broken (metrics, readiness) and the log says which one is served and why."""
    settings = Settings(state_dir=state)
    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    result = training.run_local(settings, training.TrainingConfig(
        as_of=AS_OF, params=TrainParams(n_estimators=20), gate=training.GatePolicy(margin=1.0)))
    broken = result.decision.version
    assert not result.decision.promoted  # a challenger: no chain of previous champions to follow
    folder = Path(urlparse(client.get_model_version_download_uri(MODEL, broken)).path)
    for model_file in folder.rglob("model.*"):  # the booster file, wherever the model format keeps it
        model_file.write_bytes(b"not a model")
    client.set_registered_model_alias(MODEL, "champion", broken)
    try:
        deadline = time.monotonic() + 60
        while metric(server.client.get("/metrics").text, "driftloop_model_champion_broken",
                     model=MODEL, version=broken) != 1:
            assert time.monotonic() < deadline, "the running server never reported the broken champion"
            time.sleep(0.3)
        assert server.predict(GOOD).json()["model_version"] == "1"
        detail = server.client.get(READY).json()
        assert detail["model_version"] == "1" and detail["champion"]["version"] == broken
        assert detail["champion"]["loaded"] is False and "Error" in detail["champion"]["error"]

        fresh = Server(state)  # a new replica, while the champion is broken
        try:
            assert fresh.predict(GOOD).json()["model_version"] == "1"
            assert fresh.client.get(READY).json()["champion"]["version"] == broken
            metrics = fresh.client.get("/metrics").text
            assert metric(metrics, "driftloop_model_load_failures_total", model=MODEL, version=broken) >= 1
            assert metric(metrics, "driftloop_model_version", model=MODEL) == 1
        finally:
            output = fresh.stop()
        assert f"{MODEL} v{broken}, the champion, cannot be loaded" in output
        assert "serving v1, the newest earlier champion that loads" in output
    finally:
        client.set_registered_model_alias(MODEL, "champion", "1")
    deadline = time.monotonic() + 60
    while metric(server.client.get("/metrics").text, "driftloop_model_champion_broken", model=MODEL, version=broken):
        assert time.monotonic() < deadline, "the broken gauge stayed after the rollback"
        time.sleep(0.3)
    assert "champion" not in server.client.get(READY).json()
