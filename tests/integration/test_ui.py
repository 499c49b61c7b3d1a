"""``driftloop ui`` serves the MLflow UI on the local store, with the registered model and its aliases."""

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from pipelines import training
from tests.helpers import AS_OF, free_port

pytestmark = pytest.mark.integration


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read()


def test_ui_shows_runs_and_the_registered_model_with_aliases(settings):
    result = training.run_local(settings, training.TrainingConfig(as_of=AS_OF))
    port = free_port()
    evidently = free_port()
    server = subprocess.Popen([sys.executable, "-m", "driftloop", "ui", "--mlflow-port", str(port),
                               "--evidently-port", str(evidently), "--prefect-port", str(free_port())],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                get(f"{base}/health")
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                assert time.monotonic() < deadline, "the UI did not start in 120 s"
                time.sleep(0.5)
        assert b"<html" in get(f"{base}/").lower()
        model = json.loads(get(f"{base}/ajax-api/2.0/mlflow/registered-models/get?name={settings.model_name}"))
        aliases = {a["alias"]: a["version"] for a in model["registered_model"]["aliases"]}
        assert aliases == {"champion": result.decision.version}
        runs = json.loads(get(f"{base}/ajax-api/2.0/mlflow/runs/get?run_id={result.run_id}"))
        assert runs["run"]["info"]["status"] == "FINISHED"
        deadline = time.monotonic() + 60
        while True:  # the Evidently UI, beside it
            try:
                assert b"<html" in get(f"http://127.0.0.1:{evidently}/").lower()
                break
            except OSError:
                assert time.monotonic() < deadline, "the Evidently UI did not start in 60 s"
                time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=60)
