"""The registry's moves over MLflow's REST API (``registry_api``) against a real ``mlflow server``: `rollback` and
`promote --force` with no MLflow imported, the same registry state as MLflow's client leaves, MLflow's error
codes, and MLflow's credentials sent and never printed.

Moves need versions, not models: each test registers versions of one run (no training), under its own model
name on the module's one server.
"""

from __future__ import annotations

import base64
import json
import os
import re
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import certifi
import httpx
import pytest
from mlflow.exceptions import HTTP_STATUS_TO_ERROR_CODE, MlflowException
from mlflow.tracking import MlflowClient

from driftloop.settings import Settings
from pipelines.steps import tracking
from pipelines.steps.register import (
    CHALLENGER,
    CHAMPION,
    TAG_ORPHAN,
    TAG_PROMOTION,
    TAG_REGISTRATION,
    PromotionLock,
    current_champion,
    promote,
    rollback,
)
from pipelines.steps.registry_api import PLUGIN_AUTH, STATUS_CODES, RegistryApiError, RestRegistry, tls
from tests.helpers import free_port, mlflow_server, run_cli

pytestmark = pytest.mark.integration

HEAVY = {"mlflow", "pandas", "numpy", "sklearn", "xgboost", "feast", "evidently", "prefect"}
SECRET = "s3cret-Pa55word"  # long enough that the CLI's masking would find it anywhere
TOKEN = "t0ken-abcdef123456"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("registry-api")
    with mlflow_server(f"sqlite:///{folder / 'mlflow.db'}", folder / "artifacts") as url:
        yield url


@pytest.fixture(scope="module")
def experiment(server: str) -> str:
    return MlflowClient(server, server).create_experiment("registry-api")


def registered(url: str, experiment: str, name: str, count: int) -> str:
    """Model ``name`` with ``count`` versions of one run (no model in it: moves never load one)."""
    client = MlflowClient(url, url)
    run_id = client.create_run(experiment).info.run_id
    client.create_registered_model(name)
    for _ in range(count):
        client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id)
    return name


def cli_env(url: str, name: str, state: Path) -> dict[str, str]:
    return {"DRIFTLOOP_MLFLOW_TRACKING_URI": url, "DRIFTLOOP_MODEL_NAME": name, "DRIFTLOOP_STATE_DIR": str(state)}


def cli_ok(env: dict[str, str], *args: str) -> str:
    result = run_cli(*args, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def cli_error(env: dict[str, str], *args: str) -> str:
    """The one line a known failure prints, after checking that it is one ``error:`` line and exit code 1."""
    result = run_cli(*args, env=env, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr[-2000:]
    return lines[0]


def champion(url: str, name: str) -> str:
    return str(MlflowClient(url, url).get_model_version_by_alias(name, CHAMPION).version)


def test_the_cli_moves_the_champion_over_rest_without_importing_mlflow(server, experiment, tmp_path):
    name = registered(server, experiment, "cli", 3)
    env = cli_env(server, name, tmp_path)
    assert "has no champion to roll back" in cli_error(env, "rollback")
    assert "v1" in cli_ok(env, "promote", "1", "--force", "--reason", "first")
    assert "v1 -> v2" in cli_ok(env, "promote", "2", "--force", "--reason", "canary")
    assert "v2 is already the champion" in cli_error(env, "promote", "2", "--force", "--reason", "again")
    assert "no version 42 (versions: 1, 2, 3)" in cli_error(env, "promote", "42", "--force", "--reason", "x")

    traced = subprocess.run([sys.executable, "-X", "importtime", "-m", "driftloop", "rollback"], capture_output=True,
                            text=True, timeout=120, env={**os.environ, **env}, check=False)
    assert traced.returncode == 0 and "v2 -> v1" in traced.stdout, traced.stderr[-2000:]
    loaded = {line.rpartition("|")[2].strip().split(".")[0] for line in traced.stderr.splitlines()
              if line.startswith("import time:")}
    assert "httpx" in loaded and not loaded & HEAVY, sorted(loaded & HEAVY)

    assert champion(server, name) == "1"
    versions = {v: MlflowClient(server, server).get_model_version(name, v) for v in ("1", "2")}
    assert versions["2"].tags["driftloop.rolled_back"] == "true"
    assert json.loads(versions["1"].tags[TAG_PROMOTION])["action"] == "rollback"
    assert "nothing to roll back to" in cli_error(env, "rollback")
    assert "no version 42" in cli_error(env, "rollback", "42")
    assert champion(server, name) == "1"
    # A model the registry does not have: the line names the registry it asked.
    assert f"no nobody in the registry at {server}" in cli_error(cli_env(server, "nobody", tmp_path), "rollback")


def _moves(client, url: str, name: str, lock: PromotionLock, orphan_run: str) -> list[tuple]:
    """The same moves, whichever client: sideways, back, forced, and killed registrations' leftovers."""
    mlflow_client = MlflowClient(url, url)
    # What killed registrations leave (written with MLflow's client: registering is the training's job): v4
    # pending with no alias (to delete), v5 pending with an alias (only its marker to clear).
    for _ in range(2):
        mlflow_client.create_model_version(name, f"runs:/{orphan_run}/model", run_id=orphan_run,
                                           tags={TAG_REGISTRATION: "pending"})
    mlflow_client.set_registered_model_alias(name, CHALLENGER, "5")
    moves = [promote(client, name, "1", lock=lock, by="test", force_reason="first"),
             promote(client, name, "3", lock=lock, by="test", force_reason="canary"),
             rollback(client, name, lock=lock, by="test", why="the canary misbehaves"),
             rollback(client, name, "2", lock=lock, by="test"),
             rollback(client, name, lock=lock, by="test"),
             promote(client, name, "5", lock=lock, by="test", force_reason="the challenger")]
    return [(m.was, m.now, m.reason) for m in moves]


def _state(url: str, name: str) -> dict[str, tuple]:
    """Every version's aliases and tags, read with MLflow's client; a promotion record without who and when."""
    state = {}
    for version in MlflowClient(url, url).search_model_versions(f"name = '{name}'"):
        full = MlflowClient(url, url).get_model_version(name, version.version)
        tags = dict(full.tags)
        if TAG_PROMOTION in tags:
            tags[TAG_PROMOTION] = {k: v for k, v in json.loads(tags[TAG_PROMOTION]).items() if k not in ("at", "by")}
        state[str(full.version)] = (sorted(full.aliases), tags)
    return state


def test_rest_and_mlflows_client_leave_the_same_registry(server, experiment, tmp_path):
    lock = PromotionLock("same-state", lock_dir=tmp_path)
    results = {}
    for kind in ("rest", "mlflow"):
        name = registered(server, experiment, f"same-{kind}", 3)
        orphan_run = MlflowClient(server, server).create_run(experiment).info.run_id
        client = RestRegistry(server) if kind == "rest" else MlflowClient(server, server)
        moves = _moves(client, server, name, lock, orphan_run)
        orphan_tag = MlflowClient(server, server).get_run(orphan_run).data.tags.get(TAG_ORPHAN, "")
        results[kind] = (moves, _state(server, name), orphan_tag)
    rest, mlflow = results["rest"], results["mlflow"]
    assert rest == mlflow
    moves, state, orphan_tag = rest
    assert [(was, now) for was, now, _ in moves] == [(None, "1"), ("1", "3"), ("3", "1"), ("1", "2"), ("2", "1"),
                                                     ("1", "5")]
    assert sorted(state) == ["1", "2", "3", "5"] and "v4 deleted" in orphan_tag  # v4: a killed registration's
    assert state["5"][0] == [CHAMPION] and TAG_REGISTRATION not in state["5"][1]  # challenger no more

    # Both clients read a version alike: the fields the moves use.
    name = "same-rest"
    ours, theirs = RestRegistry(server).get_model_version(name, "5"), MlflowClient(server, server).get_model_version(
        name, "5")
    assert (ours.version, ours.run_id, ours.tags, ours.aliases) == (
        str(theirs.version), theirs.run_id, theirs.tags, theirs.aliases)


def test_errors_carry_mlflows_codes(server, experiment):
    name = registered(server, experiment, "errors", 1)
    ours, theirs = RestRegistry(server), MlflowClient(server, server)
    calls = {"no such version": lambda c: c.get_model_version(name, "42"),
             "no such alias": lambda c: c.get_model_version_by_alias(name, CHAMPION),
             "no such model": lambda c: c.get_model_version_by_alias("no-such-model", CHAMPION),
             "delete no such version": lambda c: c.delete_model_version(name, "42"),
             "tag no such run": lambda c: c.set_tag("0" * 32, "key", "value")}
    for what, call in calls.items():
        with pytest.raises(RegistryApiError) as rest_error:
            call(ours)
        with pytest.raises(MlflowException) as mlflow_error:
            call(theirs)
        assert rest_error.value.error_code == mlflow_error.value.error_code, what
        assert rest_error.value.status == mlflow_error.value.get_http_status_code(), what
    assert rest_error.value.error_code == "RESOURCE_DOES_NOT_EXIST" and "not found" in str(rest_error.value)
    assert current_champion(ours, name) is None

    # Not MLflow's API at all (a wrong path): MLflow's code for a bare 404, never "no champion".
    with pytest.raises(RegistryApiError) as wrong:
        current_champion(RestRegistry(f"{server}/not-mlflow"), name)
    assert (wrong.value.error_code, wrong.value.status) == ("ENDPOINT_NOT_FOUND", 404)
    assert STATUS_CODES == HTTP_STATUS_TO_ERROR_CODE  # the table for bodies that are not MLflow's: MLflow's own

    nobody = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RegistryApiError, match=re.escape(f"{nobody} did not answer GET model-versions/get")) as down:
        RestRegistry(nobody, retries=1, timeout_s=2).get_model_version(name, "1")
    assert down.value.error_code == "TEMPORARILY_UNAVAILABLE"


@contextmanager
def auth_proxy(upstream: str, user: str, password: str) -> Iterator[tuple[str, list[str]]]:
    """MLflow's basic-auth app in miniature (its own needs Flask-WTF): relays to ``upstream`` what carries
    ``user``/``password`` or ``TOKEN``, answers 401 otherwise (``/health`` is open); yields its URL and the
    Authorization headers it saw."""
    seen: list[str] = []
    accepted = {"Basic " + base64.b64encode(f"{user}:{password}".encode()).decode(), f"Bearer {TOKEN}"}

    class Relay(BaseHTTPRequestHandler):
        def _relay(self) -> None:
            sent = self.headers.get("Authorization", "")
            seen.append(sent)
            if self.path != "/health" and sent not in accepted:
                body = b"You are not authenticated. Please see the docs on how to authenticate."
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
            else:
                answer = httpx.request(self.command, f"{upstream}{self.path}", timeout=30,
                                       content=self.rfile.read(int(self.headers.get("Content-Length") or 0)),
                                       headers={"Content-Type": self.headers.get("Content-Type", "")})
                body = answer.content
                self.send_response(answer.status_code)
                self.send_header("Content-Type", answer.headers.get("Content-Type", "application/json"))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_DELETE = _relay

        def log_message(self, *args: object) -> None:
            pass

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Relay)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{proxy.server_port}", seen
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_mlflows_credentials_are_sent_and_never_printed(server, experiment, tmp_path):
    name = registered(server, experiment, "auth", 3)
    with auth_proxy(server, "admin", SECRET) as (url, seen):
        basic = {**cli_env(url, name, tmp_path), "MLFLOW_TRACKING_USERNAME": "admin",
                 "MLFLOW_TRACKING_PASSWORD": SECRET}
        assert "v1" in cli_ok(basic, "promote", "1", "--force", "--reason", "behind auth")
        assert "Basic " + base64.b64encode(f"admin:{SECRET}".encode()).decode() in seen
        seen.clear()
        assert "v1 -> v2" in cli_ok({**cli_env(url, name, tmp_path), "MLFLOW_TRACKING_TOKEN": TOKEN},
                                    "promote", "2", "--force", "--reason", "with a token")
        assert f"Bearer {TOKEN}" in seen
        in_uri = url.replace("http://", f"http://admin:{SECRET}@")  # a pair in the URI is Basic auth too
        assert "v2 -> v1" in cli_ok(cli_env(in_uri, name, tmp_path), "rollback")
        assert champion(server, name) == "1"

        wrong = f"wrong-{SECRET}"
        for env in ({**basic, "MLFLOW_TRACKING_PASSWORD": wrong},
                    cli_env(url.replace("http://", f"http://admin:{wrong}@"), name, tmp_path)):
            result = run_cli("rollback", env=env, timeout=120)
            assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
            assert "401 UNAUTHENTICATED" in result.stderr and "MLFLOW_TRACKING_USERNAME" in result.stderr
            assert SECRET not in result.stdout + result.stderr
        assert champion(server, name) == "1"


def test_only_a_tracking_server_without_an_auth_plugin_gets_the_rest_client(server, tmp_path, monkeypatch):
    for name in PLUGIN_AUTH:
        monkeypatch.delenv(name, raising=False)
    embedded = Settings(state_dir=tmp_path, mlflow_tracking_uri=None)
    assert tracking.rest_registry(embedded) is None  # no server to ask: MLflow's client
    served = Settings(state_dir=tmp_path, mlflow_tracking_uri=server, mlflow_timeout_s=3)
    assert isinstance(tracking.rest_registry(served), RestRegistry)
    monkeypatch.setenv("MLFLOW_TRACKING_AUTH", "my_auth_plugin")  # a scheme only MLflow's client speaks
    assert tracking.rest_registry(served) is None


def test_tls_follows_mlflows_variables(tmp_path):
    assert tls({}) is True
    assert tls({"MLFLOW_TRACKING_INSECURE_TLS": "true"}) is False
    pinned = tls({"MLFLOW_TRACKING_SERVER_CERT_PATH": certifi.where()})
    assert isinstance(pinned, ssl.SSLContext) and pinned.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(RegistryApiError, match="both set"):
        tls({"MLFLOW_TRACKING_INSECURE_TLS": "1", "MLFLOW_TRACKING_SERVER_CERT_PATH": certifi.where()})
