"""Evidently dashboards: snapshots of real monitor checks, served by the Evidently UI, seen in a browser."""

import dataclasses
import importlib
import json
import os
import shutil
import struct
import subprocess
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from driftloop.contracts import MODEL_FEATURES
from driftloop.settings import Settings
from monitoring import dashboard
from monitoring.drift import DriftPolicy, build_profile, check_drift
from monitoring.monitor import CheckResult
from pipelines.steps import ingest
from tests.helpers import TINY, free_port

pytestmark = pytest.mark.integration

SCREENSHOT = Path("/tmp/driftloop-dashboard.png")  # a fixed place to look at after the run
POLICY = DriftPolicy(drift_share=0.3)  # the monitor's
START = datetime(2026, 10, 2, tzinfo=UTC)


def traffic(stream: int, drift: str = "none", rows: int = 2_000) -> pd.DataFrame:
    """Fresh transactions of the same customers and merchants with the features served (daily snapshots),
    and a made-up score that follows the amount, so a covariate shift moves the predictions too."""
    data = ingest.generate(dataclasses.replace(TINY, stream=stream, drift=drift, drift_days=0, rows=rows + 500))
    tx = data.transactions.assign(day=data.transactions["event_timestamp"].dt.floor("D"))
    cust = data.customers.drop(columns="created_timestamp").rename(columns={"event_timestamp": "day"})
    merch = data.merchants.drop(columns="created_timestamp").rename(columns={"event_timestamp": "day"})
    frame = tx.merge(cust, on=["customer_id", "day"]).merge(merch, on=["merchant_id", "day"]).head(rows)
    return frame.assign(score=1 / (1 + np.exp(4.5 - np.log1p(frame["amount"]))))


def result_of(report, version: str = "1", served_auc: float | None = None) -> dict:
    """What the monitor's check returns, with the drift report's details merged in."""
    result = CheckResult(
        window_id=f"{version}:{time.time():.6f}", model_version=version, rows=report.rows, verdict=report.verdict,
        drift_share=report.drift_share, drifted_columns=report.drifted_columns,
        prediction_drift=report.prediction.drifted if report.prediction else None,
        quality_issues=report.quality_issues, served_auc=served_auc, champion_auc=0.9,
        signal=report.verdict == "drift", reasons=())
    return {**result.as_dict(), "drift": report.to_dict()}


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    frame = traffic(1, rows=6_000)
    return frame.rename(columns={"score": "prediction"})  # as logged at training


@pytest.fixture(scope="module")
def profile(reference):
    return build_profile(reference, list(MODEL_FEATURES))


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(state_dir=tmp_path / "state")


def get(url: str, data: dict | None = None):
    body = json.dumps(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def chromium_binary() -> str:
    """Debian's Chromium (or DRIFTLOOP_CHROMIUM): missing is a failure, never a skip."""
    found = os.environ.get("DRIFTLOOP_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(found).is_file():
        pytest.fail(f"Chromium not found ({found}): apt-get install chromium (CI installs it)", pytrace=False)
    return found


def chromium(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    # Reduced motion and compositing before the capture: charts are drawn, not caught mid-animation.
    command = [chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'chromium'}", "--force-prefers-reduced-motion",
               "--run-all-compositor-stages-before-draw", "--virtual-time-budget=20000", *args, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_dashboard_shows_the_checks_in_the_evidently_ui(settings, reference, profile, tmp_path):
    chromium_binary()  # fail fast, before the real work
    importlib.import_module("evidently")  # once per process, seconds: not part of a check's cost
    sample = dashboard.reference_from_profile(profile)
    drifts = ("none", "none", "covariate", "covariate", "covariate")
    for k, drift in enumerate(drifts):
        window = traffic(10 + k, drift)
        report = check_drift(profile, window, POLICY)
        assert report.verdict == ("drift" if drift == "covariate" else "no_drift")
        served = 0.86 - 0.05 * k if k >= 2 else None  # labels arrive for the later windows only
        dashboard.record_check(settings, window, sample, result_of(report, served_auc=served),
                               START + timedelta(hours=k))

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(dashboard.ui_command(settings, "127.0.0.1", port), env={**os.environ,
                              **dashboard.UI_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                assert get(f"{base}/api/version")["application"] == "Evidently UI"
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                assert time.monotonic() < deadline, "the Evidently UI did not start in 60 s"
                time.sleep(0.3)

        # The JSON API: the project, its five snapshots, our panels, and the data behind them.
        projects = [p for p in get(f"{base}/api/projects") if p["name"] == settings.model_name]
        assert len(projects) == 1
        pid = projects[0]["id"]
        snapshots = get(f"{base}/api/projects/{pid}/snapshots")
        assert len(snapshots) == len(drifts)
        assert sorted(s["metadata"]["verdict"] for s in snapshots) == ["drift"] * 3 + ["no_drift"] * 2
        assert all(set(s["tags"]) == {s["metadata"]["verdict"], "v1"} for s in snapshots)
        panels = get(f"{base}/api/v2/dashboards/{pid}")["panels"]
        assert [p["title"] for p in panels] == list(dashboard.PANEL_TITLES)
        scores = get(f"{base}/api/v2/snapshots/{pid}/data_series_batch", {"series_filter": [
            {"metric": f"evidently:metric_v2:{dashboard.METRIC}", "metric_labels": {"value": "drift_score"},
             "tags": [], "metadata": {}}]})
        assert {s["params"]["column"] for s in scores["series"]} == set(MODEL_FEATURES)
        amount = next(s["values"] for s in scores["series"] if s["params"]["column"] == "amount")
        assert amount[1] < POLICY.num_threshold <= amount[2]  # the covariate shift starts at the third check

        # The browser: the dashboard page rendered with data (legends come from the series, marks are points).
        url = f"{base}/projects/{pid}"
        dom = chromium(tmp_path, url, "--window-size=1400,1000", "--dump-dom")
        assert dom.returncode == 0, dom.stderr[-2000:]
        html = dom.stdout
        assert settings.model_name in html
        for title in dashboard.PANEL_TITLES:
            assert title in html, title
        for legend in ("distance_km", "merchant_category", "p50", "served AUC", "prediction drift score"):
            assert legend in html, legend
        assert html.count("MuiMarkElement-root") >= len(drifts) * len(MODEL_FEATURES)

        shot = tmp_path / "dashboard.png"
        result = chromium(tmp_path, url, "--window-size=1400,2000", f"--screenshot={shot}")
        assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
        png = shot.read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (1400, 2000)
        assert len(png) > 120_000  # with data ~180 kB; the same dashboard without snapshots (titles only) ~75 kB
        shutil.copyfile(shot, SCREENSHOT)
    finally:
        server.terminate()
        server.wait(timeout=30)


def snapshot_values(settings: Settings) -> list[dict]:
    """Each stored snapshot's metrics as {(type, value or column): number}, oldest first."""
    ws = dashboard.workspace(settings)
    project = ws.search_project(settings.model_name)[0]
    runs = [ws.get_run(project.id, sid) for sid in ws.list_runs(project.id)]
    out = []
    for run in sorted(runs, key=lambda r: r.timestamp):
        values = {}
        for result in run.metric_results.values():
            params = result.metric_value_location.metric.params
            kind = params["type"].rsplit(":", 1)[-1]
            values[(kind, params.get("value"), params.get("column"))] = getattr(result, "value", None)
        out.append(values)
    return out


def test_project_creation_is_idempotent_and_keeps_panels_added_by_hand(settings):
    from evidently.sdk.panels import text_panel

    ws = dashboard.workspace(settings)
    first = dashboard.ensure_project(ws, settings.model_name)
    before = ws.get_dashboard(first.id)
    again = dashboard.ensure_project(dashboard.workspace(settings), settings.model_name)
    assert again.id == first.id and len(ws.list_projects()) == 1
    assert ws.get_dashboard(first.id).dict() == before.dict()  # same panels, same ids: nothing rewritten
    assert [p.title for p in before.panels] == list(dashboard.PANEL_TITLES)

    ws.save_dashboard(first.id, before.copy(update={"panels": [*before.panels, text_panel("notes")]}))
    dashboard.ensure_project(ws, settings.model_name)
    assert [p.title for p in ws.get_dashboard(first.id).panels] == [*dashboard.PANEL_TITLES, "notes"]
    other = dashboard.ensure_project(ws, "another-model")
    assert other.id != first.id and len(ws.list_projects()) == 2


def test_all_null_and_constant_columns_and_empty_windows_are_recorded_not_crashed(settings, profile, caplog):
    window = traffic(30)
    window["amount"] = np.nan  # all null (numerical)
    window["channel"] = None  # all null (categorical)
    window["hour_of_day"] = 3  # constant
    window["merchant_category"] = "fuel"  # constant category
    window["score"] = 0.5  # constant prediction
    sample = dashboard.reference_from_profile(profile)
    report = check_drift(profile, window, POLICY)
    importlib.import_module("evidently")
    dashboard.record_check(settings, window, sample, result_of(report), START)
    # As the inference log hands it over (objects out of SQLite), without a reference and without details.
    plain = {k: v for k, v in result_of(report).items() if k != "drift"}
    dashboard.record_check(settings, window.astype(object), None, plain, START + timedelta(hours=1))
    empty = check_drift(profile, window.head(0), POLICY)
    dashboard.record_check(settings, window.head(0), sample, result_of(empty), START + timedelta(hours=2))
    assert "recording the check's numbers only" not in caplog.text  # no fallback: Evidently coped

    full, bare, nothing = snapshot_values(settings)
    value = ("DriftloopValue",)
    assert full[(*value, "drift_score", "hour_of_day")] > POLICY.num_threshold  # constant now: drifted
    assert (*value, "drift_score", "amount") not in full  # nothing to test, so nothing plotted
    assert full[(*value, "quality_issues", None)] >= 2
    assert full[(*value, "prediction_p50", None)] == 0.5
    assert ("ValueDrift", None, "hour_of_day") in full  # the drifted column's picture, drawn by Evidently
    assert ("ValueDrift", None, "amount") not in full
    assert bare[(*value, "drift_share", None)] == report.drift_share
    assert not any(k[1] == "drift_score" for k in bare)  # no details, no reference: no per-feature scores
    assert nothing[(*value, "rows", None)] == 0
    assert (*value, "drift_share", None) not in nothing  # insufficient data: no share to plot
