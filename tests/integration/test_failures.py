"""Bad input and failures: a clear message, a non-zero exit, no version registered, no alias moved."""

import dataclasses
import socket
import time

import pytest
from mlflow.tracking import MlflowClient

from driftloop.settings import Settings
from pipelines import training
from pipelines.steps import evaluate as evaluate_step
from pipelines.steps import features, ingest
from pipelines.steps import register as register_step
from tests.helpers import AS_OF, TINY, run_cli

pytestmark = pytest.mark.integration

SMALL = dataclasses.replace(TINY, rows=3_000, customers=200, merchants=30, days=30)
AS_OF_ARG = ("--as-of", AS_OF.strftime("%Y-%m-%dT%H:%M:%S"))


def versions(settings: Settings) -> list[str]:
    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    return sorted(str(v.version) for v in client.search_model_versions(f"name='{settings.model_name}'"))


def prepared(tmp_path, cfg=SMALL, transactions=None) -> tuple[Settings, dict[str, str]]:
    """A state dir of its own with generated data (optionally altered) and applied definitions."""
    settings = Settings(state_dir=tmp_path)
    data = ingest.generate(cfg)
    if transactions is not None:
        data = dataclasses.replace(data, transactions=transactions(data.transactions))
    ingest.write(data, settings.data_path)
    features.apply(settings)
    return settings, {"DRIFTLOOP_STATE_DIR": str(tmp_path)}


def test_no_data_says_generate_first(tmp_path):
    result = run_cli("train", env={"DRIFTLOOP_STATE_DIR": str(tmp_path)})
    assert result.returncode == 1
    assert "driftloop data generate" in result.stderr and "Traceback" not in result.stderr


def test_corrupt_data_file(tmp_path):
    settings, env = prepared(tmp_path)
    (tmp_path / "data" / "transactions.parquet").write_bytes(b"PAR1 garbage")
    result = run_cli("train", *AS_OF_ARG, env=env)
    assert result.returncode == 1
    assert "transactions.parquet" in result.stderr and "Traceback" not in result.stderr
    assert versions(settings) == []


def test_schema_violations_stop_training_before_any_registration(tmp_path):
    settings, env = prepared(tmp_path, dataclasses.replace(SMALL, drift="quality", drift_days=0))
    result = run_cli("train", *AS_OF_ARG, env=env)
    assert result.returncode == 1
    assert "failed validation" in result.stderr
    assert "amount" in result.stderr and "crypto_kiosk" in result.stderr
    assert versions(settings) == []


def test_missing_column_is_named(tmp_path):
    settings, env = prepared(tmp_path, transactions=lambda tx: tx.drop(columns="channel"))
    result = run_cli("train", *AS_OF_ARG, env=env)
    assert result.returncode == 1 and "lacks columns channel" in result.stderr
    assert versions(settings) == []


def test_one_class_training_set(tmp_path):
    settings, env = prepared(tmp_path, transactions=lambda tx: tx.assign(is_fraud=0))
    result = run_cli("train", *AS_OF_ARG, env=env)
    assert result.returncode == 1 and "only one class" in result.stderr
    assert versions(settings) == []


def test_empty_training_set(tmp_path):
    settings, env = prepared(tmp_path)
    result = run_cli("train", "--as-of", "2020-01-01T00:00:00", env=env)  # no label had arrived then
    assert result.returncode == 1 and "only 0 rows" in result.stderr
    assert versions(settings) == []


def test_unreachable_tracking_server_fails_fast(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    prepared(tmp_path)
    result = run_cli("train", *AS_OF_ARG, env={"DRIFTLOOP_STATE_DIR": str(tmp_path),
                                               "DRIFTLOOP_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"},
                     timeout=120)  # MLflow's own retries would take minutes: the preflight check answers first
    assert result.returncode == 1
    assert "unreachable" in result.stderr and "DRIFTLOOP_MLFLOW_TRACKING_URI" in result.stderr


def _champion_then(settings: Settings, monkeypatch, target, attribute):
    config = training.TrainingConfig(as_of=AS_OF)
    first = training.run_local(settings, config)
    assert first.decision.alias == "champion"

    def boom(*args, **kwargs):
        raise RuntimeError("crash")

    monkeypatch.setattr(target, attribute, boom)
    with pytest.raises(RuntimeError, match="crash"):
        training.run_local(settings, dataclasses.replace(
            config, params=dataclasses.replace(config.params, n_estimators=400)))
    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    assert str(client.get_model_version_by_alias(settings.model_name, "champion").version) == first.decision.version
    return client


def test_crash_in_evaluation_leaves_the_registry_as_it_was(settings, monkeypatch):
    _champion_then(settings, monkeypatch, evaluate_step, "compute")
    assert versions(settings) == ["1"]


def test_crash_in_the_gate_leaves_the_registry_as_it_was(settings, monkeypatch):
    _champion_then(settings, monkeypatch, register_step, "decide")
    assert versions(settings) == ["1"]


def test_failed_alias_update_removes_the_new_version(settings, monkeypatch):
    _champion_then(settings, monkeypatch, MlflowClient, "set_registered_model_alias")
    assert versions(settings) == ["1"]


def test_bad_cli_arguments_exit_non_zero():
    result = run_cli("train", "--engine", "airflow")
    assert result.returncode == 2 and "airflow" in result.stderr
    result = run_cli("data", "generate", "--rows", "0")
    assert result.returncode == 2


def test_unknown_generator_drift_is_refused(tmp_path):
    result = run_cli("data", "generate", "--drift", "sideways", env={"DRIFTLOOP_STATE_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert not (tmp_path / "data").exists()





def test_a_training_killed_midway_moves_no_alias(settings):
    import signal
    import subprocess
    import sys

    first = training.run_local(settings, training.TrainingConfig(as_of=AS_OF))
    proc = subprocess.Popen([sys.executable, "-m", "driftloop", "train", *AS_OF_ARG, "--n-estimators", "3000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # progress lines: kill it once training has started
        if "train" in line and "start" in line:
            time.sleep(1.0)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    assert str(client.get_model_version_by_alias(settings.model_name, "champion").version) == first.decision.version
    assert versions(settings) == ["1"]
