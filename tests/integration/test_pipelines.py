"""The training pipeline end to end on tiny data, through the CLI, with each engine."""

import json

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2
from mlflow.tracking import MlflowClient

from pipelines import training
from pipelines.kfp_pipeline import config_from_json, config_to_json
from tests.helpers import AS_OF, run_cli

pytestmark = pytest.mark.integration

AS_OF_ARG = ("--as-of", AS_OF.strftime("%Y-%m-%dT%H:%M:%S"))


def train(engine: str, *extra: str) -> dict:
    result = run_cli("train", "--engine", engine, *AS_OF_ARG, "--json", *extra, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_registered(settings, result: dict, version: str, alias: str) -> None:
    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    mv = client.get_model_version_by_alias(settings.model_name, alias)
    assert str(mv.version) == version == result["decision"]["version"]
    run = client.get_run(result["run_id"])
    assert run.data.tags["driftloop.feature_service"] == "fraud_model_v1"
    assert run.data.tags["driftloop.data_fingerprint"] == result["training_set"]["fingerprint"]
    assert run.data.tags["driftloop.gate.decision"] == alias
    assert run.data.metrics["eval_auc"] == pytest.approx(result["metrics"]["auc"])
    assert "eval_auc_channel_pos" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(result["run_id"])}
    assert {"reference", "evaluation.json", "gate.json"} <= artifacts
    assert mv.tags["gate.decision"] == alias


def test_local_engine_then_prefect_flow(settings):
    first = train("local")
    assert first["decision"]["promoted"] and first["metrics"]["auc"] > 0.75
    assert_registered(settings, first, "1", "champion")
    # the same data again, through Prefect: the same model, so it cannot beat the champion by the margin
    second = train("prefect")
    assert second["engine"] == "prefect"
    assert second["metrics"]["auc"] == pytest.approx(first["metrics"]["auc"])
    assert not second["decision"]["promoted"] and "margin" in second["decision"]["reason"]
    assert_registered(settings, second, "2", "challenger")
    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    assert client.get_model_version_by_alias(settings.model_name, "champion").version in (1, "1")


def test_kfp_pipeline_runs_with_kfp_local(settings):
    result = train("kfp")
    assert result["decision"]["promoted"]
    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    assert str(client.get_model_version_by_alias(settings.model_name, "champion").version) == "1"
    assert (settings.state / "kfp").is_dir()


def test_human_summary_is_short_and_readable(settings):
    result = run_cli("train", *AS_OF_ARG, "--n-estimators", "50")
    assert result.returncode == 0, result.stderr[-3000:]
    for words in ("holdout AUC", "slice AUC", "driftloop-fraud v1", "promoted to champion"):
        assert words in result.stdout
    assert len(result.stdout.splitlines()) < 25
    for step in training.STEPS:
        assert step in result.stderr  # progress, one line per step start and end


def test_compiled_pipeline_is_a_valid_kfp_v2_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("DRIFTLOOP_IMAGE", "registry.example/driftloop:1.2.3")
    result = run_cli("pipeline", "compile", "--out", str(tmp_path / "pipeline.yaml"))
    assert result.returncode == 0, result.stderr
    spec_dict, platform = yaml.safe_load_all((tmp_path / "pipeline.yaml").read_text())
    spec = json_format.ParseDict(spec_dict, pipeline_spec_pb2.PipelineSpec())  # rejects unknown fields
    json_format.ParseDict(platform, pipeline_spec_pb2.PlatformSpec())
    assert spec.pipeline_info.name == "driftloop-training"
    assert spec.schema_version == "2.1.0"
    executors = spec_dict["deploymentSpec"]["executors"]
    assert len(executors) == 5
    for executor in executors.values():
        container = executor["container"]
        assert container["image"] == "registry.example/driftloop:1.2.3"
        script = " ".join(container["command"] + container.get("args", []))
        assert "pip install" not in script  # kfp is in the image: no network at run time
        assert "run_step(" in script
    # On the cluster each component reads the chart's ConfigMap and Secret and mounts its state volume.
    for name, k8s in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].items():
        assert k8s["configMapAsEnv"][0]["configMapName"] == "driftloop-config", name
        assert {e["envVar"] for e in k8s["secretAsEnv"][0]["keyToEnv"]} == {"DRIFTLOOP_POSTGRES_DSN",
                                                                              "DRIFTLOOP_REDIS_URL"}
        assert k8s["pvcMount"][0]["mountPath"] == "/var/lib/driftloop"
        assert k8s["podMetadata"]["labels"]["app.kubernetes.io/part-of"] == "driftloop"
    tasks = spec_dict["root"]["dag"]["tasks"]
    assert set(tasks) == {f"{s}-component" for s in training.STEPS}
    assert all(not t.get("cachingOptions", {}).get("enableCache", False) for t in tasks.values())
    assert tasks["train-component"]["dependentTasks"] == ["features-component", "validate-component"]


def test_training_config_round_trips_through_json():
    config = training.TrainingConfig(as_of=AS_OF)
    assert config_from_json(config_to_json(config)) == config
