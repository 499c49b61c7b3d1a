"""The monitor: drift and performance checks on windows of the inference log, and the retraining trigger.

One check reads the latest ``window_rows`` logged predictions, compares them with the champion's reference
profile (built once per champion version from the sample logged at training, cached in the state dir),
scores the labelled ones, records the window's signal and, when the guardrails allow, retrains.
Data-quality issues are reported, never a reason to retrain: a model trained on broken data is no fix.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict, dataclass, field

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from driftloop.contracts import MODEL_FEATURES
from driftloop.settings import Settings
from monitoring.drift import DriftPolicy, ReferenceProfile, build_profile, check_drift
from monitoring.labels import performance
from monitoring.retrain import Decision, RetrainState, TriggerPolicy, maybe_retrain
from pipelines.steps.register import CHAMPION


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
    """The newest ``rows`` logged predictions (local profile: the SQLite inference log)."""
    if not settings.inference_log_path.exists():
        return pd.DataFrame(columns=["ts", "model_version", "score", *MODEL_FEATURES])
    with closing(sqlite3.connect(settings.inference_log_path, timeout=30)) as db:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'predictions'").fetchone():
            return pd.DataFrame(columns=["ts", "model_version", "score", *MODEL_FEATURES])
        return pd.read_sql("SELECT * FROM predictions ORDER BY ts DESC LIMIT ?", db, params=(rows,))


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
    state = RetrainState(settings.state / "monitor" / "retrain.db")
    insufficient = report.verdict == "insufficient_data" and served is None
    if not insufficient:
        state.record_window(window_id, bool(reasons), "; ".join(reasons))
    decision = None
    if retrain is not None and reasons:
        decision = maybe_retrain(state, policy.trigger, retrain)
    return CheckResult(
        window_id=window_id, model_version=version, rows=len(window), verdict=report.verdict,
        drift_share=report.drift_share, drifted_columns=report.drifted_columns,
        prediction_drift=report.prediction.drifted if report.prediction else None,
        quality_issues=report.quality_issues, served_auc=served, champion_auc=champion_auc,
        signal=bool(reasons), reasons=tuple(reasons), retraining=decision,
    )


def retrain_locally(settings: Settings) -> Callable[[], str]:
    """Retraining as a user runs it: the Prefect flow, in its own process, through the promotion gate."""

    def run() -> str:
        result = subprocess.run([sys.executable, "-m", "driftloop", "train", "--engine", "prefect", "--json"],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise MonitorError(f"retraining failed: {result.stderr.strip().splitlines()[-1:]}")
        decision = json.loads(result.stdout.strip().splitlines()[-1])["decision"]
        return f"v{decision['version']} {decision['alias']}: {decision['reason']}"

    del settings  # the child process builds the same settings from the same environment
    return run


def run_forever(settings: Settings, client: MlflowClient, policy: MonitorPolicy, interval_s: float,
                checks: int | None, report: Callable[[CheckResult], None]) -> None:
    """Check every ``interval_s`` seconds (``checks`` times, or until interrupted)."""
    done = 0
    while checks is None or done < checks:
        report(check(settings, client, policy, retrain_locally(settings)))
        done += 1
        if checks is None or done < checks:
            time.sleep(interval_s)

