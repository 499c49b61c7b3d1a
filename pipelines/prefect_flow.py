"""The training pipeline as a Prefect flow: a few lines per step over ``pipelines.training``.

Data steps never cache (``NO_CACHE``): a rerun must read today's data. Retries only where a retry can
help (store reads, the training run); validation and registration are not retried, since bad data stays
bad and a registration must happen once.

No flow takes the settings as a parameter: the Prefect server stores and shows a flow run's parameters, and
the settings hold the stores' passwords. Each flow builds them from its worker's environment instead, where
the passwords already are (the chart's Secret), and masks them in the logs it sends to the server.

Lineage: the MLflow run of a training carries this flow run's id and name (``driftloop.prefect.*`` tags), and
the flow run shows the gate's decision as its artifact ``gate-decision``.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from driftloop.settings import Settings, load_settings, redact_logs
from pipelines import training
from pipelines.steps import tracking
from pipelines.training import TrainingConfig, TrainingResult

GATE_ARTIFACT = "gate-decision"  # the key of a training's gate decision (Prefect's Artifacts page)

features = task(training.features, name="features", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
validate = task(training.validate, name="validate", cache_policy=NO_CACHE)
train = task(training.train, name="train", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
evaluate = task(training.evaluate, name="evaluate", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
register = task(training.register, name="register", cache_policy=NO_CACHE)


def _worker_settings() -> Settings:
    """The settings of the process running the flow, from its environment."""
    settings = load_settings()
    redact_logs(settings)
    return settings


@flow(name="driftloop-training", validate_parameters=False)
def training_flow(config: TrainingConfig) -> TrainingResult:
    settings = _worker_settings()
    training_set = features(settings, config.as_of)
    report = validate(settings, training_set.uri, config.validation)
    origin = tracking.origin_tags("prefect", flow_run_id=flow_run.id, flow_run_name=flow_run.name)
    run_id = train(settings, training_set, config.params, origin)
    metrics = evaluate(settings, run_id)
    decision = register(settings, run_id, config.gate)
    create_markdown_artifact(training.gate_report(decision, settings.model_name), key=GATE_ARTIFACT,
                             description=f"{settings.model_name} v{decision.version}: {decision.alias}")
    return TrainingResult("prefect", training_set, report, run_id, metrics, decision)


def run_prefect(config: TrainingConfig) -> TrainingResult:
    """Run the flow in this process, on the settings of its environment; call with ``prefect_environment``
    already in ``os.environ``."""
    return training_flow(config)


@flow(name="driftloop-batch-scoring", validate_parameters=False)
def batch_scoring_flow(input_path: str, output_path: str) -> dict:
    """Score a Parquet file with the champion (``serving.batch``), for a schedule or a deployment."""
    from dataclasses import asdict
    from pathlib import Path

    from serving.batch import score_file

    scored = task(score_file, name="score", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
    return asdict(scored(_worker_settings(), Path(input_path), Path(output_path)))


RETRAINING = "driftloop-retraining"
RETRAINING_DEPLOYMENT = f"{RETRAINING}/{RETRAINING}"


@flow(name=RETRAINING, validate_parameters=False)
def retraining_flow() -> dict:
    """Retrain with the settings of the process serving the deployment (its environment), then gate."""
    decision = training_flow(TrainingConfig()).decision
    return {"version": decision.version, "alias": decision.alias, "reason": decision.reason}


def serve_retraining() -> None:
    """Register the retraining deployment on the Prefect server and run its flow runs, one at a time."""
    retraining_flow.serve(name=RETRAINING, limit=1, print_starting_message=False)
