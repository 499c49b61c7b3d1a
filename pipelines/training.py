"""The training pipeline: its five steps bound to settings, and the in-process (``local``) engine.

Each function here takes settings plus ids/URIs and returns ids/URIs or small records, so the same
function is a CLI command, a Prefect task and a KFP component body. The Prefect flow and the KFP
pipeline call exactly these.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from driftloop.settings import Settings, redact_error
from pipelines.steps import evaluate as evaluate_step
from pipelines.steps import features as features_step
from pipelines.steps import register as register_step
from pipelines.steps import tracking
from pipelines.steps import train as train_step
from pipelines.steps import validate as validate_step
from pipelines.steps.evaluate import SLICE_COLUMN, Metrics
from pipelines.steps.features import TrainingSet
from pipelines.steps.register import Decision, GatePolicy
from pipelines.steps.train import TrainParams
from pipelines.steps.validate import ValidationPolicy, ValidationReport

STEPS = ("features", "validate", "train", "evaluate", "register")


@dataclass(frozen=True)
class TrainingConfig:
    """Everything a training run takes besides where the stores are."""

    params: TrainParams = field(default_factory=TrainParams)
    gate: GatePolicy = field(default_factory=GatePolicy)
    validation: ValidationPolicy = field(default_factory=ValidationPolicy)
    as_of: datetime | None = None  # labels that arrived by then; default now


@dataclass
class TrainingResult:
    engine: str
    training_set: TrainingSet
    validation: ValidationReport
    run_id: str
    metrics: Metrics
    decision: Decision
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


@contextmanager
def masked_errors(settings: Settings) -> Iterator[None]:
    """A step's error leaves with its passwords masked: Prefect records its text as the task's state and a
    KFP component prints it to the pod's log, and a store's client may quote the URL it could not reach."""
    try:
        yield
    except Exception as error:
        redact_error(error, settings)
        raise  # the same error, its type and traceback kept


def features(settings: Settings, as_of: datetime | None = None) -> TrainingSet:
    with masked_errors(settings):
        return features_step.build_training_set(settings, as_of=as_of)


def validate(settings: Settings, dataset_uri: str, policy: ValidationPolicy = ValidationPolicy()) -> ValidationReport:
    del settings  # validation needs no store; the argument keeps every step's signature alike
    return validate_step.validate_training_set(dataset_uri, policy)


def train(settings: Settings, training_set: TrainingSet, params: TrainParams = TrainParams(),
          origin: Mapping[str, str] | None = None) -> str:
    """Train; ``origin`` (``tracking.origin_tags``: the engine, the orchestrator's run) goes on the run as tags."""
    with masked_errors(settings):
        client = tracking.configure(settings)
        run_id = train_step.train(training_set.uri, training_set.feature_service, training_set.fingerprint, params)
        tracking.tag_run(client, run_id, origin or {})
        return run_id


def evaluate(settings: Settings, run_id: str) -> Metrics:
    with masked_errors(settings):
        tracking.configure(settings)
        return evaluate_step.evaluate(run_id)


def register(settings: Settings, run_id: str, gate: GatePolicy = GatePolicy()) -> Decision:
    with masked_errors(settings):
        client = tracking.configure(settings)
        lock = register_step.PromotionLock.for_settings(settings)
        return register_step.register(client, run_id, settings.model_name, gate, lock=lock)


def summary_of_run(settings: Settings, decision: dict, engine: str) -> dict:
    """A finished run's result, read back from MLflow: for engines whose steps ran elsewhere."""
    import mlflow

    tracking.configure(settings)
    run = mlflow.get_run(decision["run_id"])
    tags, metrics = run.data.tags, run.data.metrics
    return {
        "engine": engine,
        "training_set": {"uri": tags[train_step.TAG_DATASET], "fingerprint": tags[train_step.TAG_FINGERPRINT],
                         "feature_service": tags[train_step.TAG_FEATURE_SERVICE],
                         "rows": int(metrics["train_rows"] + metrics["holdout_rows"]),
                         "rows_by_source": {s: int(metrics.get(f"rows_{s}", 0)) for s in train_step.SOURCES}},
        "run_id": decision["run_id"],
        "metrics": mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/evaluation.json"),
        "decision": decision,
    }


Progress = Callable[[str, str], None]  # (step, "start" | "done: …")


def run_local(settings: Settings, config: TrainingConfig = TrainingConfig(),
              progress: Progress | None = None) -> TrainingResult:
    """Run the five steps in this process, in order; each step's wall time is recorded."""
    say = progress or (lambda step, what: None)
    seconds: dict[str, float] = {}

    def timed(step: str, fn: Callable, *args):
        say(step, "start")
        t0 = time.perf_counter()
        out = fn(*args)
        seconds[step] = round(time.perf_counter() - t0, 2)
        say(step, f"done in {seconds[step]:.1f}s")
        return out

    tracking.configure(settings)  # fail fast on an unreachable store, before any work
    training_set = timed("features", features, settings, config.as_of)
    report = timed("validate", validate, settings, training_set.uri, config.validation)
    run_id = timed("train", train, settings, training_set, config.params, tracking.origin_tags("local"))
    metrics = timed("evaluate", evaluate, settings, run_id)
    decision = timed("register", register, settings, run_id, config.gate)
    return TrainingResult("local", training_set, report, run_id, metrics, decision, seconds)


def gate_report(decision: Decision, model_name: str) -> str:
    """The gate's decision as Markdown, for a person: the verdict, why, and the AUCs it compared, overall and
    per slice (the champion's re-scored on the candidate's holdout; no column when there was none)."""
    verdict = "promoted to champion" if decision.promoted else f"kept as {decision.alias}"
    columns = {f"candidate v{decision.version}": decision.candidate}
    if decision.champion is not None:
        columns[f"champion v{decision.champion_version}"] = decision.champion
    slice_prefix = f"auc_{SLICE_COLUMN}_"
    slices = sorted({key for metrics in columns.values() for key in metrics if key.startswith(slice_prefix)})
    rows = [("AUC", "auc"), ("PR-AUC", "average_precision"),
            *((f"AUC, {SLICE_COLUMN} {key.removeprefix(slice_prefix)}", key) for key in slices)]

    def cell(metrics: dict[str, float], key: str) -> str:
        return f"{metrics[key]:.4f}" if key in metrics else "n/a"

    lines = [f"## {model_name} v{decision.version}: {verdict}", ""]
    if decision.failed_checks:
        lines += ["Failed checks:", *(f"- {check}" for check in decision.failed_checks)]
    else:
        lines.append(f"Why: {decision.reason}")
    lines += ["", f"| | {' | '.join(columns)} |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {label} | {' | '.join(cell(metrics, key) for metrics in columns.values())} |" for label, key in rows]
    if decision.orphans_removed:
        lines += ["", f"Removed versions that killed registrations had left: {', '.join(decision.orphans_removed)}."]
    lines += ["", f"MLflow run `{decision.run_id}` (its artifact `gate.json` holds the whole decision)."]
    return "\n".join(lines)


def prefect_environment(settings: Settings) -> dict[str, str]:
    """Prefect's own settings: local home under the state dir, no telemetry, quiet logs.

    An explicit ``PREFECT_API_URL`` (a cluster's server) wins; otherwise Prefect starts its
    ephemeral local server.
    """
    env = {
        "PREFECT_HOME": str(Path(settings.state) / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    }
    return {k: v for k, v in env.items() if k not in os.environ or k == "PREFECT_LOGGING_LEVEL"}
