import json

import pytest

from driftloop.settings import Settings, SettingsError, load_settings
from tests.helpers import run_cli

pytestmark = pytest.mark.unit


def test_local_profile_puts_every_store_under_the_state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DRIFTLOOP_STATE_DIR", str(tmp_path))
    s = load_settings()
    assert s.profile == "local"
    assert s.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert s.artifact_root == (tmp_path / "mlartifacts").as_uri()
    feast = s.feast_variables()
    assert feast["DRIFTLOOP_FEAST_REGISTRY"] == str(tmp_path / "feast" / "registry.db")
    assert feast["DRIFTLOOP_FEAST_ONLINE"] == str(tmp_path / "feast" / "online.db")
    assert feast["DRIFTLOOP_DATA_DIR"] == str(tmp_path / "data")
    assert s.feature_store_yaml.name == "feature_store.yaml"


def test_cluster_profile_names_every_missing_variable(monkeypatch):
    monkeypatch.setenv("DRIFTLOOP_PROFILE", "cluster")
    monkeypatch.setenv("DRIFTLOOP_REDIS_URL", "redis:6379")
    with pytest.raises(SettingsError) as err:
        load_settings()
    for name in ("DRIFTLOOP_MLFLOW_TRACKING_URI", "DRIFTLOOP_POSTGRES_DSN", "DRIFTLOOP_DATA_DIR"):
        assert name in str(err.value)
    assert "DRIFTLOOP_REDIS_URL" not in str(err.value)


def test_cluster_profile_uses_servers_and_hides_passwords():
    s = Settings(profile="cluster", mlflow_tracking_uri="http://mlflow:5000", data_dir="/data",
                 postgres_dsn="postgresql://feast:s3cret@postgres:5432/feast", redis_url="redis:6379,password=pw")
    feast = s.feast_variables()
    assert feast["DRIFTLOOP_FEAST_REGISTRY"] == "postgresql+psycopg://feast:s3cret@postgres:5432/feast"
    assert feast["DRIFTLOOP_FEAST_ONLINE"] == "redis:6379,password=pw"
    assert s.artifact_root is None  # the tracking server's proxied store
    assert s.feature_store_yaml.name == "feature_store.cluster.yaml"
    shown = json.dumps(s.locations())
    assert "s3cret" not in shown and "password=pw" not in shown


def test_invalid_value_is_a_settings_error(monkeypatch):
    monkeypatch.setenv("DRIFTLOOP_PROFILE", "laptop")
    with pytest.raises(SettingsError, match="profile"):
        load_settings()


def test_cli_config_json_prints_resolved_locations(tmp_path):
    result = run_cli("config", "--json", env={"DRIFTLOOP_STATE_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["profile"] == "local"
    assert shown["mlflow_tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert shown["feast_online_store"] == f"sqlite: {tmp_path / 'feast' / 'online.db'}"
    assert not (tmp_path / "mlflow.db").exists()  # printing settings creates nothing


def test_cli_config_fails_clearly_on_incomplete_cluster_settings():
    result = run_cli("config", env={"DRIFTLOOP_PROFILE": "cluster"})
    assert result.returncode == 1
    assert "DRIFTLOOP_MLFLOW_TRACKING_URI" in result.stderr
    assert "Traceback" not in result.stderr
