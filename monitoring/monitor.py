"""The monitor: drift and performance checks on windows of the inference log, and the retraining trigger.

A window is one model version's traffic: the latest ``window_rows`` predictions the current champion made
(the log's rows carry ``model_version``). One check compares them with that champion's reference profile
(built once per champion version from the sample logged at training, cached in the state dir), scores the
labelled ones against the same champion's holdout AUC, records the window's signal and, when the
guardrails allow, retrains. After a promotion the new champion has no window yet: the check says it is
waiting (``N of M rows of vX``) and judges nothing, rather than judge the old version's traffic.
Data-quality issues are reported, never a reason to retrain: a model trained on broken data is no fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import httpx
import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from driftloop.contracts import LABEL, MODEL_FEATURES
from driftloop.settings import Settings
from monitoring.drift import DriftPolicy, ReferenceProfile, build_profile, check_drift
from monitoring.retrain import Decision, TriggerPolicy, maybe_retrain, state_for
from monitoring.store import LogStore
from pipelines.steps.evaluate import Metrics, compute
from pipelines.steps.register import CHAMPION

log = logging.getLogger(__name__)


WAITING = "waiting"  # the champion has fewer than window_rows logged predictions: nothing is judged yet


class MonitorError(RuntimeError):
    """The monitor cannot run; the message says what is missing."""


@dataclass(frozen=True)
class MonitorPolicy:
    window_rows: int = 2_000  # the champion's latest N logged predictions form a window
    # None: the settings' policy (DRIFTLOOP_DRIFT_*), the one `driftloop drift compare` uses.
    drift: DriftPolicy | None = None
    trigger: TriggerPolicy = field(default_factory=TriggerPolicy)
    auc_drop: float = 0.05  # a performance signal when served AUC < the champion's holdout AUC - this
    min_labels: int = 200
    dashboards: bool = True  # one Evidently snapshot per check (``driftloop ui`` shows them)


@dataclass(frozen=True)
class CheckResult:
    window_id: str
    model_version: str  # the champion's: every row of the window is its prediction
    rows: int
    verdict: str  # drift | no_drift | insufficient_data | waiting (fewer than window_size rows of this version)
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
    window_size: int = 0  # the rows a full window has (the policy's window_rows)
    labelled_rows: int = 0  # of the window's rows, those with a label (served AUC is theirs)
    implausible_rows: int = 0  # rows with a non-finite, impossible or extreme value (data quality)

    @property
    def status(self) -> str:
        """One line on what the window is: ``waiting: N of M rows of vX`` or ``N rows of vX``."""
        if self.verdict == WAITING:
            return f"waiting: {self.rows:,} of {self.window_size:,} rows of v{self.model_version}"
        return f"{self.rows:,} rows of v{self.model_version}"

    def as_dict(self) -> dict:
        return {**asdict(self), "status": self.status}


def champion_profile(settings: Settings, client: MlflowClient,
                     kinds: tuple[tuple[str, str], ...] = ()) -> tuple[str, ReferenceProfile, float | None]:
    """(version, reference profile, holdout AUC) of the current champion; the profile is cached on disk, one
    per version and set of kind overrides (``DriftPolicy.kinds``)."""
    try:
        mv = client.get_model_version_by_alias(settings.model_name, CHAMPION)
    except Exception as error:
        raise MonitorError(f"no champion for {settings.model_name}: train one with `driftloop train`") from error
    version = str(mv.version)
    run = client.get_run(mv.run_id)
    auc = run.data.metrics.get("eval_auc")
    suffix = f"-kinds-{hashlib.sha256(repr(kinds).encode()).hexdigest()[:12]}" if kinds else ""
    cache = settings.state / "monitor" / f"profile-{settings.model_name}-v{version}{suffix}.json"
    if cache.exists():
        return version, ReferenceProfile.from_json(cache.read_text()), auc
    path = mlflow.artifacts.download_artifacts(f"{run.info.artifact_uri}/reference/reference.parquet")
    profile = build_profile(pd.read_parquet(path), list(MODEL_FEATURES), kinds=kinds)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(profile.to_json())
    tmp.replace(cache)
    return version, profile, auc


def latest_window(settings: Settings, rows: int, version: str) -> pd.DataFrame:
    """The newest ``rows`` predictions ``version`` of the model made, with their labels where they have
    arrived (SQLite locally, PostgreSQL on a cluster)."""
    frame = LogStore(settings).window(settings.model_name, version, rows)
    if not len(frame.columns):
        return pd.DataFrame(columns=["ts", "model_version", "score", LABEL, *MODEL_FEATURES])
    return frame


def served_performance(window: pd.DataFrame, min_labels: int) -> tuple[Metrics | None, int]:
    """(metrics, labelled rows) of the window's labelled predictions; no metrics when fewer than
    ``min_labels`` or one class only. The window is one version's, so the metrics are that version's."""
    labels = pd.to_numeric(window[LABEL], errors="coerce").to_numpy(np.float64, na_value=np.nan)
    scores = pd.to_numeric(window["score"], errors="coerce").to_numpy(np.float64, na_value=np.nan)
    labelled = np.isfinite(labels) & np.isfinite(scores)
    count = int(labelled.sum())
    if count < min_labels or np.unique(labels[labelled]).size < 2:
        return None, count
    channel = window["channel"][labelled].fillna("unknown") if "channel" in window.columns else None
    return compute(labels[labelled].astype(np.int64), scores[labelled], channel), count


def check(settings: Settings, client: MlflowClient, policy: MonitorPolicy,
          retrain: Callable[[], str] | None = None) -> CheckResult:
    """One check of the champion's latest window; with ``retrain``, start a retraining when the guardrails
    allow. Until the champion has ``window_rows`` logged predictions the verdict is ``waiting``: nothing is
    judged or recorded, and nothing can start a retraining."""
    drift_policy = policy.drift or DriftPolicy.from_settings(settings)
    version, profile, champion_auc = champion_profile(settings, client, drift_policy.kinds)
    window = latest_window(settings, policy.window_rows, version)
    if len(window) < policy.window_rows:
        return CheckResult(
            window_id=f"{version}:{WAITING}", model_version=version, rows=len(window), verdict=WAITING,
            drift_share=0.0, drifted_columns=(), prediction_drift=None, quality_issues={}, served_auc=None,
            champion_auc=champion_auc, signal=False, reasons=(), window_size=policy.window_rows)
    report = check_drift(profile, window, drift_policy)
    metrics, labelled = served_performance(window, policy.min_labels)
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
        decision = maybe_retrain(state, policy.trigger, retrain, scope=f"{version}:")  # this champion's windows
    result = CheckResult(
        window_id=window_id, model_version=version, rows=len(window), verdict=report.verdict,
        drift_share=report.drift_share, drifted_columns=report.drifted_columns,
        prediction_drift=report.prediction.drifted if report.prediction else None,
        quality_issues=report.quality_issues, served_auc=served, champion_auc=champion_auc,
        signal=bool(reasons), reasons=tuple(reasons), retraining=decision,
        column_scores={name: c.score for name, c in report.columns.items()},
        window_size=policy.window_rows, labelled_rows=labelled, implausible_rows=report.implausible_rows,
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
        self.last_check.labels(model).set(time.time())
        self.checks.labels(model, result.verdict).inc()
        if result.verdict == WAITING:  # nothing was judged: the last window's numbers stay
            return
        self.drift_share.labels(model).set(result.drift_share)
        for feature, score in result.column_scores.items():
            if score is not None:
                self.feature_score.labels(model, feature).set(score)
        if result.served_auc is not None:
            self.served_auc.labels(model).set(result.served_auc)
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

