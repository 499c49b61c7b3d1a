"""The registered model is self-contained: MLflow's own tools score the README's raw request with it and
answer what our server answers (same version), with no knowledge of the encoding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pytest
from mlflow.models import Model, validate_serving_input
from mlflow.tracking import MlflowClient

from driftloop import contracts
from driftloop.contracts import FEATURES
from driftloop.settings import Settings
from pipelines.steps.train import TAG_DATASET, TAG_FEATURE_SERVICE, TAG_FINGERPRINT, serving_requirements
from tests.helpers import free_port, stop_group, wait_for_http
from tests.integration import test_serving
from tests.integration.test_serving import MODEL, Server

pytestmark = pytest.mark.integration

state = test_serving.state  # the same fixture: tiny data, features applied, v1 trained and champion

# The README's example row (Serving), as a client sends it: strings for categories, numbers for the rest.
README_ROW = {"amount": 120.5, "channel": "online", "hour_of_day": 3, "distance_km": 12.0, "account_age_days": 634,
              "txn_count_7d": 26, "avg_amount_30d": 58.9, "chargeback_rate_90d": 0.0146,
              "merchant_fraud_rate_30d": 0.0003, "merchant_category": "electronics"}
ROWS = {  # what the server scores as unknown: an unseen category, nulls (numbers and a category)
    "readme": README_ROW,
    "unseen category": {**README_ROW, "merchant_category": "crypto"},
    "null distance": {**README_ROW, "distance_km": None},
    "null hour and channel": {**README_ROW, "hour_of_day": None, "channel": None},
}
FLOAT32 = {"rel": 1e-6, "abs": 1e-7}  # the server answers in float32


@pytest.fixture(scope="module")
def server(state):
    server = Server(state)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def served(server) -> tuple[str, list[float]]:
    """The version our server serves and its answer for each of ``ROWS``."""
    response = server.predict(*ROWS.values())
    assert response.status_code == 200, response.text
    body = response.json()
    return body["model_version"], body["predictions"]


@pytest.fixture
def tracking(state, monkeypatch) -> dict[str, str]:
    """MLflow's variables for the module's store, set in this process and returned for child processes."""
    uri = Settings(state_dir=state).tracking_uri
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def test_the_registered_model_takes_the_raw_request(served, tracking):
    version, _ = served
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/{version}"))
    meta = Model.load(local)
    assert set(meta.flavors) == {"python_function"}
    inputs = {spec.name: spec.type.name for spec in meta.signature.inputs.inputs}
    assert inputs == {c.name: "string" if c.kind == "category" else "double" for c in FEATURES}
    example = json.loads((local / "input_example.json").read_text())  # raw rows: categories as names
    assert example["columns"] == list(contracts.MODEL_FEATURES)
    assert {row[1] for row in example["data"]} <= set(contracts.CHANNELS)
    # One implementation: the model carries the contracts module itself, byte for byte; and what loading
    # needs, not the project's lock.
    assert (local / "code" / "driftloop_contracts.py").read_bytes() == Path(contracts.__file__).read_bytes()
    assert (local / "requirements.txt").read_text().split() == serving_requirements()
    assert not (local / "uv.lock").exists()


def test_the_pyfunc_answers_the_readme_request_as_the_server_does(served, tracking):
    version, answers = served
    # MLflow's own serving path in this process: the JSON body parsed against the signature, then predict.
    predictions = validate_serving_input(f"models:/{MODEL}/{version}", {"instances": list(ROWS.values())})
    for case, pyfunc, ours in zip(ROWS, predictions.tolist(), answers, strict=True):
        assert pyfunc == pytest.approx(ours, **FLOAT32), case


def test_mlflow_models_serve_answers_the_readme_request_unchanged(served, tracking, tmp_path):
    version, answers = served
    port = free_port()
    log = tmp_path / "mlflow-serve.log"
    env = {**os.environ, **tracking,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # its workers run `mlflow`
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", f"models:/{MODEL}/{version}",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", proc, log, timeout=180)
        url = f"http://127.0.0.1:{port}/invocations"
        readme = httpx.post(url, json={"instances": [README_ROW]}, timeout=30)  # the README's body as it is
        assert readme.status_code == 200, readme.text
        assert readme.json()["predictions"][0] == pytest.approx(answers[0], **FLOAT32)
        every = httpx.post(url, json={"instances": list(ROWS.values())}, timeout=30)
        assert every.status_code == 200, every.text
        for case, theirs, ours in zip(ROWS, every.json()["predictions"], answers, strict=True):
            assert theirs == pytest.approx(ours, **FLOAT32), case
    finally:
        stop_group(proc)


ISOLATED = """
import json, sys
for name in ("driftloop", "pipelines", "serving", "monitoring"):
    sys.modules[name] = None  # this project cannot be imported: the model must carry what it needs
from mlflow.models import validate_serving_input
print(json.dumps(validate_serving_input(sys.argv[1], {"instances": json.loads(sys.argv[2])}).tolist()))
"""


def test_the_model_needs_nothing_from_this_project(served, tracking, tmp_path):
    version, answers = served
    result = subprocess.run(
        [sys.executable, "-c", ISOLATED, f"models:/{MODEL}/{version}", json.dumps(list(ROWS.values()))],
        env={**os.environ, **tracking}, cwd=tmp_path, capture_output=True, text=True, timeout=300,
        check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = json.loads(result.stdout.strip().splitlines()[-1])
    for case, theirs, ours in zip(ROWS, predictions, answers, strict=True):
        assert theirs == pytest.approx(ours, **FLOAT32), case


def test_a_training_run_records_its_dataset_and_a_readable_name(served, tracking):
    version, _ = served
    client = MlflowClient()
    run = client.get_run(client.get_model_version(MODEL, version).run_id)
    tags = run.data.tags
    assert run.info.run_name.startswith(f"train-{tags[TAG_FEATURE_SERVICE]}-")
    (dataset_input,) = run.inputs.dataset_inputs
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"
    dataset = dataset_input.dataset
    assert (dataset.name, dataset.digest) == (tags[TAG_FEATURE_SERVICE], tags[TAG_FINGERPRINT])
    assert json.loads(dataset.source)["uri"] == tags[TAG_DATASET]
    assert json.loads(dataset.profile)["num_rows"] == len(pd.read_parquet(tags[TAG_DATASET]))
