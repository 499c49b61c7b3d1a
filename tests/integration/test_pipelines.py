"""The training pipeline end to end on tiny data, through the CLI, with each engine."""

import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2
from mlflow.tracking import MlflowClient

from pipelines import training
from pipelines.kfp_pipeline import config_from_json, config_to_json
from tests.helpers import AS_OF, run_cli

pytestmark = pytest.mark.integration

GATE_ARTIFACT = "gate-decision"  # what a user looks for in Prefect (not imported: Prefect stays out of this process)
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


def assert_lineage(settings, result: dict, engine: str) -> dict[str, str]:
    """The run says what ran it and on which data, under a readable name; returns its orchestrator's tags."""
    run = MlflowClient(settings.tracking_uri).get_run(result["run_id"])
    assert run.data.tags["driftloop.engine"] == engine
    assert re.fullmatch(r"train-fraud_model_v1-\d{8}-\d{6}", run.info.run_name)
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "fraud_model_v1"
    assert dataset_input.dataset.digest == result["training_set"]["fingerprint"]
    return {k.removeprefix(f"driftloop.{engine}."): v for k, v in run.data.tags.items()
            if k.startswith(("driftloop.local.", "driftloop.prefect.", "driftloop.kfp."))}


PREFECT_RUNS = """
import asyncio, json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

async def read(key):
    async with get_client() as client:
        flows = {f.id: f.name for f in await client.read_flows()}
        runs = await client.read_flow_runs()
        artifacts = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    print(json.dumps({
        "flow_runs": [{"flow": flows.get(r.flow_id), "id": str(r.id), "name": r.name} for r in runs],
        "artifacts": [{"flow_run_id": str(a.flow_run_id), "type": a.type, "description": a.description,
                       "data": a.data} for a in artifacts],
    }))

asyncio.run(read(sys.argv[1]))
"""


def prefect_runs(settings) -> dict:
    """The flow runs and ``GATE_ARTIFACT`` artifacts the Prefect API serves, as `driftloop ui` would show them
    (read in another process: Prefect fixes its settings, PREFECT_HOME among them, when first imported)."""
    env = {**os.environ, **training.prefect_environment(settings)}
    result = subprocess.run([sys.executable, "-c", PREFECT_RUNS, GATE_ARTIFACT],
                            capture_output=True, text=True, timeout=300, env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_local_engine_then_prefect_flow(settings):
    first = train("local")
    assert first["decision"]["promoted"] and first["metrics"]["auc"] > 0.75
    assert_registered(settings, first, "1", "champion")
    assert assert_lineage(settings, first, "local") == {}  # no orchestrator, no orchestrator's run
    # the same data again, through Prefect: the same model, so it cannot beat the champion by the margin
    second = train("prefect")
    assert second["engine"] == "prefect"
    assert second["metrics"]["auc"] == pytest.approx(first["metrics"]["auc"])
    assert not second["decision"]["promoted"] and "margin" in second["decision"]["reason"]
    assert_registered(settings, second, "2", "challenger")
    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    assert client.get_model_version_by_alias(settings.model_name, "champion").version in (1, "1")

    # the MLflow run names its flow run, and the flow run shows the gate's decision
    origin = assert_lineage(settings, second, "prefect")
    prefect = prefect_runs(settings)
    (flow_run,) = [r for r in prefect["flow_runs"] if r["flow"] == "driftloop-training"]
    assert origin == {"flow_run_id": flow_run["id"], "flow_run_name": flow_run["name"]}
    (artifact,) = prefect["artifacts"]
    assert artifact["flow_run_id"] == flow_run["id"] and artifact["type"] == "markdown"
    assert artifact["description"] == f"{settings.model_name} v2: challenger"
    report, decision = artifact["data"], second["decision"]
    assert report.startswith(f"## {settings.model_name} v2: kept as challenger")
    assert all(f"- {check}" in report for check in decision["failed_checks"]) and "margin" in report
    assert f"| AUC | {decision['candidate']['auc']:.4f} | {decision['champion']['auc']:.4f} |" in report
    assert "| | candidate v2 | champion v1 |" in report
    for name, auc in second["metrics"]["slices"].items():
        assert f"| AUC, channel {name} | {auc:.4f} | " in report


def test_kfp_pipeline_runs_with_kfp_local_and_prints_the_same_short_summary(settings):
    """One kfp.local run (the slowest engine), read twice: what the user sees, then what it left in MLflow."""
    result = run_cli("train", "--engine", "kfp", *AS_OF_ARG, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) <= 30, "\n".join(lines)
    for words in ("trained with engine=kfp", "holdout AUC", "slice AUC", "driftloop-fraud v1", "promoted to champion"):
        assert words in result.stdout
    for noise in ("Executor", "executor_input", "Warning", "Streamed logs"):
        assert noise not in result.stdout + result.stderr
    for step in training.STEPS:
        assert step in result.stderr  # a progress line per step, as with the local engine
    assert (settings.state / "kfp" / "last-run.log").stat().st_size > 0  # the whole of kfp.local's log, kept

    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    champion = client.get_model_version_by_alias(settings.model_name, "champion")
    assert str(champion.version) == "1"
    run = client.get_run(champion.run_id)
    registered = {"run_id": champion.run_id,
                  "training_set": {"fingerprint": run.data.tags["driftloop.data_fingerprint"]}}
    # the MLflow run names the kfp.local run: a random number, and the name of the run's folder
    origin = assert_lineage(settings, registered, "kfp")
    assert set(origin) == {"run_id", "run_name"} and origin["run_id"].isdigit()
    assert origin["run_name"].startswith("driftloop-training-")
    assert (settings.state / "kfp" / origin["run_name"] / "train-component").is_dir()


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
        assert {e["envVar"] for e in k8s["secretAsEnv"][0]["keyToEnv"]} == {
            "DRIFTLOOP_POSTGRES_DSN", "DRIFTLOOP_REDIS_URL", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
        assert k8s["pvcMount"][0]["mountPath"] == "/var/lib/driftloop"
        assert k8s["podMetadata"]["labels"]["app.kubernetes.io/part-of"] == "driftloop"
    tasks = spec_dict["root"]["dag"]["tasks"]
    assert set(tasks) == {f"{s}-component" for s in training.STEPS}
    assert all(not t.get("cachingOptions", {}).get("enableCache", False) for t in tasks.values())
    assert tasks["train-component"]["dependentTasks"] == ["features-component", "validate-component"]


def test_training_config_round_trips_through_json():
    config = training.TrainingConfig(as_of=AS_OF)
    assert config_from_json(config_to_json(config)) == config
