"""The promotion gate on real models in a real MLflow store, and registrations racing each other."""

import dataclasses
import json
import subprocess
import sys

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from driftloop.contracts import LABEL
from pipelines import training
from pipelines.steps import tracking
from pipelines.steps import train as train_step
from pipelines.steps.features import TrainingSet
from pipelines.steps.train import TrainParams
from tests.helpers import AS_OF, run_cli

pytestmark = pytest.mark.integration

WEAK = TrainParams(n_estimators=3, max_depth=1, learning_rate=0.3)
STRONG = TrainParams(n_estimators=300)


def train_and_gate(settings, training_set: TrainingSet, params: TrainParams):
    run_id = training.train(settings, training_set, params)
    training.evaluate(settings, run_id)
    return training.register(settings, run_id)


def champion(settings) -> str:
    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    return str(client.get_model_version_by_alias(settings.model_name, "champion").version)


def test_gate_on_real_models(settings, tmp_path):
    training_set = training.features(settings, AS_OF)

    weak = train_and_gate(settings, training_set, WEAK)
    assert weak.promoted and champion(settings) == "1"

    better = train_and_gate(settings, training_set, STRONG)
    assert better.promoted and better.candidate["auc"] > weak.candidate["auc"]
    assert champion(settings) == "2"

    worse = train_and_gate(settings, training_set, dataclasses.replace(WEAK, n_estimators=10))
    assert not worse.promoted and "does not beat" in worse.reason and worse.alias == "challenger"
    assert champion(settings) == "2"

    same = train_and_gate(settings, training_set, STRONG)  # within the margin: no churn
    assert not same.promoted and "margin" in same.reason
    assert champion(settings) == "2"

    frame = pd.read_parquet(training_set.uri)
    shuffled_path = tmp_path / "shuffled.parquet"
    frame.assign(**{LABEL: frame[LABEL].sample(frac=1.0, random_state=0).to_numpy()}).to_parquet(shuffled_path)
    shuffled = train_and_gate(settings, dataclasses.replace(training_set, uri=str(shuffled_path)), STRONG)
    assert not shuffled.promoted and "below the floor" in shuffled.reason
    assert champion(settings) == "2"

    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    assert client.get_model_version(settings.model_name, "2").tags["driftloop.previous_champion"] == "1"
    gate = mlflow.artifacts.load_dict(f"{client.get_run(shuffled.run_id).info.artifact_uri}/gate.json")
    assert gate["alias"] == "challenger" and gate["champion_version"] == "2"
    assert client.get_run(shuffled.run_id).data.metrics["gate_promoted"] == 0.0
    assert client.get_model_version_by_alias(settings.model_name, "challenger").version in (5, "5")


REGISTER = """
import json, sys
from driftloop.settings import load_settings
from pipelines import training
decision = training.register(load_settings(), sys.argv[1])
print(json.dumps({"version": decision.version, "alias": decision.alias}))
"""


def test_concurrent_registrations_get_distinct_versions(settings):
    training_set = training.features(settings, AS_OF)
    tracking.configure(settings)
    run_ids = []
    for seed in range(4):
        run_id = train_step.train(training_set.uri, training_set.feature_service, training_set.fingerprint,
                                  dataclasses.replace(WEAK, seed=seed, n_estimators=5 + seed))
        training.evaluate(settings, run_id)
        run_ids.append(run_id)
    procs = [subprocess.Popen([sys.executable, "-c", REGISTER, run_id], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for run_id in run_ids]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-2000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert sorted(int(r["version"]) for r in results) == [1, 2, 3, 4]
    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    assert len(client.search_model_versions(f"name='{settings.model_name}'")) == 4
    assert champion(settings) in {r["version"] for r in results if r["alias"] == "champion"}


def test_rollback_puts_the_previous_champion_back(settings):
    training_set = training.features(settings, AS_OF)
    train_and_gate(settings, training_set, WEAK)
    train_and_gate(settings, training_set, STRONG)
    assert champion(settings) == "2"
    result = run_cli("rollback")
    assert result.returncode == 0, result.stderr
    assert "v2 -> v1" in result.stdout and champion(settings) == "1"
    again = run_cli("rollback")  # v1 was the first champion
    assert again.returncode == 1 and "nothing to roll back to" in again.stderr
    assert champion(settings) == "1"
