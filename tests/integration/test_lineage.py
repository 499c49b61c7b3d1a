"""Lineage a user can follow, without a training: the tags that say what ran a run, on a real MLflow store; the
gate's decision as a person reads it; the KFP run's placeholders in the compiled pipeline. Each engine's
end-to-end run is checked for the same in ``test_pipelines.py``."""

import mlflow
import pytest
import yaml
from kfp import compiler, dsl

from driftloop.settings import Settings
from pipelines.kfp_pipeline import build_pipeline
from pipelines.steps import tracking
from pipelines.steps.register import Decision
from pipelines.training import gate_report

pytestmark = pytest.mark.integration


def test_origin_tags_name_the_engine_and_the_orchestrators_run():
    assert tracking.origin_tags("local") == {"driftloop.engine": "local"}
    assert tracking.origin_tags("prefect", flow_run_id="0b9e", flow_run_name="calm-fox", other=None) == {
        "driftloop.engine": "prefect", "driftloop.prefect.flow_run_id": "0b9e",
        "driftloop.prefect.flow_run_name": "calm-fox"}


def test_a_finished_run_gets_its_origin(tmp_path):
    client = tracking.configure(Settings(state_dir=tmp_path))
    with mlflow.start_run() as run:
        mlflow.set_tag("driftloop.stage", "train")
    tracking.tag_run(client, run.info.run_id, tracking.origin_tags("kfp", run_id="64148996", run_name="x-1"))
    tracking.tag_run(client, run.info.run_id, {})
    tags = client.get_run(run.info.run_id).data.tags
    assert {k: v for k, v in tags.items() if k.startswith("driftloop.")} == {
        "driftloop.stage": "train", "driftloop.engine": "kfp", "driftloop.kfp.run_id": "64148996",
        "driftloop.kfp.run_name": "x-1"}


def test_the_gate_report_shows_the_verdict_the_reasons_and_both_aucs_per_slice():
    kept = Decision(run_id="abc123", promoted=False, alias="challenger", reason="two; checks", version="2",
                    candidate={"auc": 0.8101, "average_precision": 0.4, "auc_channel_pos": 0.7012,
                               "auc_channel_online": 0.85},
                    champion={"auc": 0.8202, "average_precision": 0.41, "auc_channel_pos": 0.7555},
                    champion_version="1", failed_checks=["AUC 0.8101 does not beat", "slice pos regresses"])
    report = gate_report(kept, "driftloop-fraud")
    assert report.startswith("## driftloop-fraud v2: kept as challenger")
    assert "- AUC 0.8101 does not beat\n- slice pos regresses" in report
    assert "| | candidate v2 | champion v1 |" in report
    assert "| AUC | 0.8101 | 0.8202 |" in report
    assert "| AUC, channel pos | 0.7012 | 0.7555 |" in report
    assert "| AUC, channel online | 0.8500 | n/a |" in report  # a slice too small on the champion's side
    assert "`abc123`" in report

    first = Decision(run_id="def456", promoted=True, alias="champion", version="1",
                     reason="no champion yet and AUC 0.8101 clears the floor 0.7000", candidate={"auc": 0.8101})
    report = gate_report(first, "driftloop-fraud")
    assert report.startswith("## driftloop-fraud v1: promoted to champion")
    assert "Why: no champion yet and AUC 0.8101 clears the floor 0.7000" in report
    assert "| | candidate v1 |" in report and "champion v" not in report


def test_the_train_component_gets_the_pipeline_runs_id_and_name(tmp_path):
    path = tmp_path / "pipeline.yaml"
    compiler.Compiler().compile(build_pipeline("registry.example/driftloop:1.2.3"), str(path))
    spec = yaml.safe_load(path.read_text())
    inputs = spec["root"]["dag"]["tasks"]["train-component"]["inputs"]["parameters"]
    assert inputs["kfp_run_id"]["runtimeValue"]["constant"] == dsl.PIPELINE_JOB_ID_PLACEHOLDER
    assert inputs["kfp_run_name"]["runtimeValue"]["constant"] == dsl.PIPELINE_JOB_NAME_PLACEHOLDER
