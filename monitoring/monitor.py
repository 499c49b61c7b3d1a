"""The monitor: drift and performance checks on windows of the inference log, and the retraining trigger.

One check reads the latest ``window_rows`` logged predictions, compares them with the champion's reference
profile (built once per champion version from the sample logged at training, cached in the state dir),
scores the labelled ones, records the window's signal and, when the guardrails allow, retrains.
Data-quality issues are reported, never a reason to retrain: a model trained on broken data is no fix.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import httpx
import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from driftloop.contracts import MODEL_FEATURES
from driftloop.settings import Settings
from monitoring.drift import DriftPolicy, ReferenceProfile, build_profile, check_drift
from monitoring.labels import performance
from monitoring.retrain import Decision, TriggerPolicy, maybe_retrain, state_for
from monitoring.store import LogStore
from pipelines.steps.register import CHAMPION

log = logging.getLogger(__name__)


class MonitorError(RuntimeError):
    """The monitor cannot run; the message says what is missing."""


@dataclass(frozen=True)
class MonitorPolicy:
    window_rows: int = 2_000  # the latest N logged predictions form a window
    # A window drifts when a third of the features do: with ten features, one drifting column is noise
    # (online values are the newest snapshots, training saw every day's), four are a changed world.
    drift: DriftPolicy = field(default_factory=lambda: DriftPolicy(drift_share=0.3))
    trigger: TriggerPolicy = field(default_factory=TriggerPolicy)
    auc_drop: float = 0.05  # a performance signal when served AUC < the champion's holdout AUC - this
    min_labels: int = 200
    dashboards: bool = True  # one Evidently snapshot per check (``driftloop ui`` shows them)


@dataclass(frozen=True)
class CheckResult:
    window_id: str
    model_version: str
    rows: int
    verdict: str  # drift | no_drift | insufficient_data
    drift_share: float
    drifted_columns: tuple[str, ...]
    prediction_drift: bool | None
    quality_issues: dict[str, tuple[str, ...]]
    served_auc: float | None
    champion_auc: float | None
    signal: bool
    reasons: tuple[str, ...]
    column_scores: dict[str, float | None] = field(default_factory=dict)  # drift score per feature
    retraining: Decision | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def champion_profile(settings: Settings, client: MlflowClient) -> tuple[str, ReferenceProfile, float | None]:
    """(version, reference profile, holdout AUC) of the current champion; the profile is cached on disk."""
    try:
        mv = client.get_model_version_by_alias(settings.model_name, CHAMPION)
    except Exception as error:
        raise MonitorError(f"no champion for {settings.model_name}: train one with `driftloop train`") from error
    version = str(mv.version)
    run = client.get_run(mv.run_id)
    auc = run.data.metrics.get("eval_auc")
    cache = settings.state / "monitor" / f"profile-{settings.model_name}-v{version}.json"
    if cache.exists():
        return version, ReferenceProfile.from_json(cache.read_text()), auc
    path = mlflow.artifacts.download_artifacts(f"{run.info.artifact_uri}/reference/reference.parquet")
    profile = build_profile(pd.read_parquet(path), list(MODEL_FEATURES))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(profile.to_json())
    tmp.replace(cache)
    return version, profile, auc


def latest_window(settings: Settings, rows: int) -> pd.DataFrame:
    """The newest ``rows`` logged predictions (SQLite locally, PostgreSQL on a cluster)."""
    frame = LogStore(settings).frame("SELECT * FROM predictions ORDER BY ts DESC LIMIT {p}", (rows,))
    if not len(frame.columns):
        return pd.DataFrame(columns=["ts", "model_version", "score", *MODEL_FEATURES])
    return frame


def check(settings: Settings, client: MlflowClient, policy: MonitorPolicy,
          retrain: Callable[[], str] | None = None) -> CheckResult:
    """One check of the latest window; with ``retrain``, start a retraining when the guardrails allow."""
    version, profile, champion_auc = champion_profile(settings, client)
    window = latest_window(settings, policy.window_rows)
    report = check_drift(profile, window, policy.drift)
    served = None
    if len(window):
        since, until = float(window["ts"].min()), float(window["ts"].max()) + 1e-6
        metrics = performance(settings, since, until, policy.min_labels)
        served = metrics.auc if metrics else None
    reasons = []
    if report.verdict == "drift":
        reasons.append(f"drift in {len(report.drifted_columns)} of {len(report.columns)} columns "
                       f"({', '.join(report.drifted_columns)})")
    if served is not None and champion_auc is not None and served < champion_auc - policy.auc_drop:
        reasons.append(f"served AUC {served:.3f} fell below the champion's {champion_auc:.3f} - {policy.auc_drop}")
    window_id = (f"{version}:{window['ts'].min():.6f}-{window['ts'].max():.6f}:{len(window)}" if len(window)
                 else f"{version}:empty")
    state = state_for(settings)  # SQLite in the state dir locally, PostgreSQL on a cluster
    insufficient = report.verdict == "insufficient_data" and served is None
    if not insufficient:
        state.record_window(window_id, bool(reasons), "; ".join(reasons))
    decision = None
    if retrain is not None and reasons:
        decision = maybe_retrain(state, policy.trigger, retrain)
    result = CheckResult(
        window_id=window_id, model_version=version, rows=len(window), verdict=report.verdict,
        drift_share=report.drift_share, drifted_columns=report.drifted_columns,
        prediction_drift=report.prediction.drifted if report.prediction else None,
        quality_issues=report.quality_issues, served_auc=served, champion_auc=champion_auc,
        signal=bool(reasons), reasons=tuple(reasons), retraining=decision,
        column_scores={name: c.score for name, c in report.columns.items()},
    )
    if policy.dashboards:
        try:  # the dashboard is a view of the check: failing to record it must never fail the check
            from monitoring.dashboard import record_check, reference_from_profile

            record_check(settings, window, reference_from_profile(profile),
                         {**result.as_dict(), "drift": report.to_dict()}, time.time())
        except Exception:
            log.warning("could not record the check on the Evidently dashboard", exc_info=True)
    return result


def retrain_locally() -> Callable[[], str]:
    """Retraining as a user runs it: the Prefect flow, in its own process, through the promotion gate."""

    def run() -> str:
        result = subprocess.run([sys.executable, "-m", "driftloop", "train", "--engine", "prefect", "--json"],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise MonitorError(f"retraining failed: {result.stderr.strip().splitlines()[-1:]}")
        decision = json.loads(result.stdout.strip().splitlines()[-1])["decision"]
        return f"v{decision['version']} {decision['alias']}: {decision['reason']}"

    return run  # the child process builds the same settings from the same environment


class MonitorMetrics:
    """Prometheus metrics of the monitor (``driftloop monitor run --metrics-port``)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.drift_share = Gauge("driftloop_monitor_drift_share", "share of drifted features in the last window",
                                 ["model"], registry=registry)
        self.feature_score = Gauge("driftloop_monitor_feature_drift_score", "drift score per feature, last window",
                                   ["model", "feature"], registry=registry)
        self.served_auc = Gauge("driftloop_monitor_served_auc", "AUC of labelled served predictions, last window",
                                ["model"], registry=registry)
        self.last_check = Gauge("driftloop_monitor_last_check_timestamp_seconds", "when the last check ran",
                                ["model"], registry=registry)
        self.checks = Counter("driftloop_monitor_checks", "checks by verdict", ["model", "verdict"],
                              registry=registry)
        self.retrainings = Counter("driftloop_monitor_retrainings", "retraining decisions by outcome",
                                   ["model", "outcome"], registry=registry)

    def observe(self, model: str, result: CheckResult) -> None:
        self.drift_share.labels(model).set(result.drift_share)
        for feature, score in result.column_scores.items():
            if score is not None:
                self.feature_score.labels(model, feature).set(score)
        if result.served_auc is not None:
            self.served_auc.labels(model).set(result.served_auc)
        self.last_check.labels(model).set(time.time())
        self.checks.labels(model, result.verdict).inc()
        if result.retraining is not None:
            self.retrainings.labels(model, result.retraining.outcome).inc()


def notify(url: str, result: CheckResult, timeout_s: float = 5.0) -> bool:
    """POST the decision to a webhook; a failing webhook is logged, never fatal to monitoring."""
    try:
        httpx.post(url, json={"event": "driftloop.monitor.check", **result.as_dict()}, timeout=timeout_s)
    except httpx.HTTPError as error:
        log.warning("webhook %s failed: %s", url, error)
        return False
    return True


def retrain_with_deployment(timeout_s: float = 3_600.0) -> Callable[[], str]:
    """Retraining on a cluster: a run of the ``driftloop-retraining`` deployment, waited for."""

    def run() -> str:
        from prefect.deployments import run_deployment

        from pipelines.prefect_flow import RETRAINING_DEPLOYMENT

        flow_run = run_deployment(RETRAINING_DEPLOYMENT, timeout=timeout_s, as_subflow=False)
        state = flow_run.state
        if state is None or not state.is_completed():
            raise MonitorError(f"retraining flow run {flow_run.name} ended {state.name if state else 'unknown'}")
        return f"flow run {flow_run.name} completed"

    return run


def retrain_for(settings: Settings) -> Callable[[], str]:
    return retrain_with_deployment() if settings.retrain == "deployment" else retrain_locally()


def run_forever(settings: Settings, client: MlflowClient, policy: MonitorPolicy, interval_s: float,
                checks: int | None, report: Callable[[CheckResult], None], metrics: MonitorMetrics | None = None,
                webhook: str | None = None) -> None:
    """Check every ``interval_s`` seconds (``checks`` times, or until interrupted)."""
    done = 0
    while checks is None or done < checks:
        result = check(settings, client, policy, retrain_for(settings))
        report(result)
        if metrics is not None:
            metrics.observe(settings.model_name, result)
        if webhook and (result.signal or result.retraining is not None):
            notify(webhook, result)
        done += 1
        if checks is None or done < checks:
            time.sleep(interval_s)

