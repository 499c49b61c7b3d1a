"""Known bad paths through the real CLI: exit code 1 and exactly one ``error:`` line that says what to do."""

import dataclasses
import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from driftloop.settings import Settings
from pipelines.steps import ingest
from tests.helpers import TINY, free_port, run_cli

pytestmark = pytest.mark.integration

SMALL = dataclasses.replace(TINY, rows=3_000, customers=200, merchants=30, days=30)


def one_error(result: subprocess.CompletedProcess, *words: str) -> str:
    """The single ``error:`` line of a failed command, checked to contain ``words``."""
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


@contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A real HTTP server that is not the model server, on a free loopback port; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def json_handler(status: int, body: object) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


class QuietFiles(SimpleHTTPRequestHandler):  # python -m http.server: POST answers 501 with an HTML page
    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("handler", [
    QuietFiles,
    json_handler(404, {"detail": "Not Found"}),
    json_handler(200, {"status": "ok"}),
    json_handler(200, {"predictions": "none"}),
], ids=["html-501", "json-404", "json-200-other-shape", "json-200-bad-predictions"])
def test_predict_against_a_server_that_is_not_the_model_server(tmp_path, handler):
    with http_server(handler) as url:
        result = run_cli("predict", "--url", url, env={"DRIFTLOOP_STATE_DIR": str(tmp_path)})
    one_error(result, url, "not a driftloop model server", "driftloop serve", "--url")


def test_predict_with_nothing_listening(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    one_error(run_cli("predict", "--url", url, env={"DRIFTLOOP_STATE_DIR": str(tmp_path)}), url, "driftloop serve")


@pytest.mark.parametrize("command", [
    ("monitor", "check"), ("monitor", "run", "--checks", "1"), ("rollback",), ("promote", "1"),
    ("serve", "--port", "0"), ("batch", "score", "IN", "OUT"),
], ids=lambda c: " ".join(c[:2]))
def test_an_empty_state_names_the_registry_it_looked_in(tmp_path, command):
    state = tmp_path / "elsewhere"  # as a command run from another directory: a state dir with nothing in it
    batch_input = tmp_path / "in.parquet"
    pd.DataFrame({"customer_id": [1], "merchant_id": [1], "amount": [3.0], "channel": ["pos"],
                  "hour_of_day": [3]}).to_parquet(batch_input)
    args = [str(batch_input) if a == "IN" else str(tmp_path / "out.parquet") if a == "OUT" else a for a in command]
    result = run_cli(*args, env={"DRIFTLOOP_STATE_DIR": str(state)}, timeout=120)
    line = one_error(result, "driftloop-fraud", "driftloop train", "DRIFTLOOP_STATE_DIR")
    assert f"the registry at {Settings(state_dir=state).tracking_uri}" in line
    assert not (state / "mlflow.db").exists()  # looking did not create an empty store


def test_a_scheduled_check_before_the_first_champion_exits_0(tmp_path):
    """The chart's monitor CronJob can fire while a fresh cluster's bootstrap trains: no Failed pod for that."""
    state = tmp_path / "fresh"
    result = run_cli("monitor", "check", "--no-champion-ok", env={"DRIFTLOOP_STATE_DIR": str(state)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr.lower()
    assert result.stdout.startswith("nothing to do yet: no driftloop-fraud@champion in the registry at "), result.stdout
    assert not (state / "mlflow.db").exists()


def data_dir(tmp_path: Path) -> dict[str, str]:
    settings = Settings(state_dir=tmp_path)
    ingest.write(ingest.generate(SMALL), settings.data_path)
    return {"DRIFTLOOP_STATE_DIR": str(tmp_path)}


@pytest.mark.parametrize("command", [("train",), ("features", "materialize")], ids=" ".join)
def test_a_corrupt_feature_source(tmp_path, command):
    env = data_dir(tmp_path)
    path = tmp_path / "data" / "customers.parquet"
    path.write_bytes(path.read_bytes()[:200])  # truncated
    one_error(run_cli(*command, env=env), str(path), "driftloop data generate")


@pytest.mark.parametrize("command", [("train",), ("features", "materialize")], ids=" ".join)
def test_a_feature_source_without_a_column(tmp_path, command):
    env = data_dir(tmp_path)
    path = tmp_path / "data" / "merchants.parquet"
    pd.read_parquet(path).drop(columns="merchant_category").to_parquet(path)
    one_error(run_cli(*command, env=env), str(path), "merchant_category", "driftloop data generate")


def test_a_garbage_transactions_file(tmp_path):
    env = data_dir(tmp_path)
    path = tmp_path / "data" / "transactions.parquet"
    path.write_bytes(b"PAR1 not really")
    one_error(run_cli("train", env=env), str(path), "driftloop data generate")


@pytest.mark.parametrize("content", [b"not parquet at all", b"PAR1\x00\x01", b""], ids=["text", "truncated", "empty"])
def test_labels_and_drift_with_a_file_that_is_not_parquet(tmp_path, content):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(content)
    env = {"DRIFTLOOP_STATE_DIR": str(tmp_path / "state")}
    one_error(run_cli("labels", "ingest", str(bad), env=env), "bad.parquet")
    good = tmp_path / "good.parquet"
    pd.DataFrame({"x": [1.0, 2.0]}).to_parquet(good)
    one_error(run_cli("drift", "compare", str(good), str(bad), env=env), "bad.parquet")


@pytest.mark.parametrize("which", ["mlflow", "evidently", "prefect"])
def test_ui_with_a_port_taken_names_the_port_and_its_option(tmp_path, which):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {name: port if name == which else free_port() for name in ("mlflow", "evidently", "prefect")}
        result = run_cli("ui", *(a for name, p in ports.items() for a in (f"--{name}-port", str(p))),
                         env={"DRIFTLOOP_STATE_DIR": str(tmp_path)}, timeout=60)
    one_error(result, f"port {port}", f"--{which}-port")
    assert "http://" not in result.stdout  # no URL that would show someone else's server
