"""Evidently dashboards for the monitor: one project per model, one snapshot per check, the Evidently UI.

Every monitor check becomes one Evidently snapshot in a local workspace (``<state>/evidently``). The numbers
the dashboard plots (drift share, each feature's drift score, the prediction drift score, served AUC) are
our engine's, the ones the verdict came from: they travel into the snapshot as ``DriftloopValue`` metrics,
an Evidently custom metric that reads them from the report's additional data. Next to them the snapshot
carries pictures Evidently draws itself, on samples of at most 5,000 rows (window against reference), for
the snapshot's report page: the score's distribution, and the drift of each column the engine flagged.
Those samples make the pictures; they never make the verdict.

Evidently is imported inside the functions: it takes seconds to load and importing this module does nothing.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from driftloop.settings import Settings
from monitoring.drift import (
    CATEGORICAL,
    CONSTANT_REFERENCE,
    INSUFFICIENT_DATA,
    NUMERICAL,
    OK,
    CategoricalProfile,
    DriftPolicy,
    NumericalProfile,
    ReferenceProfile,
    build_profile,
    check_drift,
    feature_columns,
    resolve_kinds,
)

if TYPE_CHECKING:
    from evidently.ui.workspace import Project, Workspace

log = logging.getLogger(__name__)

SAMPLE_ROWS = 5_000  # the Evidently part runs on at most this many rows of each frame
PREDICTION = "score"  # the inference log's name for the prediction; the reference's "prediction" is renamed
CHECK_DATA = "driftloop_check"  # the additional dataset holding the check's numbers, one row
METRIC = "DriftloopValue"  # the custom metric's name, as panels refer to it
QUANTILES = (0.1, 0.5, 0.9)
UI_ENV = {"DO_NOT_TRACK": "1"}  # Evidently's telemetry switch: the UI sends no usage events

# Panel titles, also what the browser test looks for.
LATEST = "Latest check"
DRIFT_SHARE = "Dataset drift share"
FEATURE_DRIFT = "Feature drift scores"
PREDICTION_DISTRIBUTION = "Prediction distribution"
PREDICTION_DRIFT = "Prediction drift score"
PERFORMANCE = "Served AUC"
PANEL_TITLES = (LATEST, DRIFT_SHARE, FEATURE_DRIFT, PREDICTION_DISTRIBUTION, PREDICTION_DRIFT, PERFORMANCE)


def workspace_path(settings: Settings) -> Path:
    return settings.state / "evidently"


def workspace(settings: Settings) -> Workspace:
    """The local Evidently workspace under the state dir (created on first use)."""
    from evidently.ui.workspace import Workspace

    path = workspace_path(settings)
    path.mkdir(parents=True, exist_ok=True)
    return Workspace(str(path))


# --- the project and its dashboard -----------------------------------------------------------------------


def ensure_project(ws: Workspace, model_name: str) -> Project:
    """The model's project (found by name, else created) with our panels. Idempotent: panels are matched by
    title, ours are replaced in place (same ids) and panels a user added by hand are kept."""
    from evidently.sdk.models import DashboardModel, ProjectModel

    found = ws.search_project(model_name)
    project = found[0] if found else ws.add_project(ProjectModel(
        name=model_name, description=f"driftloop monitor checks of {model_name}: drift, predictions, served AUC"))
    current = ws.get_dashboard(project.id)
    by_title = {p.title: p for p in current.panels}
    ours = []
    for panel in _panels():
        old = by_title.get(panel.title)
        ours.append(panel.copy(update={"id": old.id}) if old is not None else panel)
    ours_titles = {p.title for p in ours}
    panels = ours + [p for p in current.panels if p.title not in ours_titles]
    # No tabs: the UI then shows every panel on the project's page, no extra click.
    wanted = DashboardModel(tabs=current.tabs, panels=panels)
    if wanted.dict() != current.dict():  # write only on change: the UI watches these files
        ws.save_dashboard(project.id, wanted)
    return project


def _panels() -> list:
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import counter_panel, line_plot_panel

    def value(key: str, legend: str, **labels: str) -> PanelMetric:
        return PanelMetric(metric=METRIC, metric_labels={"value": key, **labels}, legend=legend)

    def quantile(q: float) -> PanelMetric:
        return value(f"prediction_p{round(q * 100)}", f"p{round(q * 100)}")

    return [
        counter_panel(LATEST, [value("drift_share", "drift share"), value("drifted_columns", "drifted features"),
                               value("quality_issues", "columns with quality issues"), value("rows", "rows")],
                      description="the newest window; the verdict is the drift engine's", aggregation="last"),
        line_plot_panel(DRIFT_SHARE, [value("drift_share", "drift share"),
                                      value("drift_share_threshold", "threshold")],
                        description="drifted / tested features per window", size="half"),
        # One series per feature: the legend template fills in each series' column label.
        line_plot_panel(FEATURE_DRIFT, [value("drift_score", "{{column}}")],
                        description="per-feature drift score (Wasserstein / Jensen-Shannon)", size="half"),
        line_plot_panel(PREDICTION_DISTRIBUTION, [quantile(q) for q in QUANTILES],
                        description="quantiles of the served score in each window",
                        size="half"),
        line_plot_panel(PREDICTION_DRIFT, [value("prediction_drift_score", "prediction drift score")],
                        description="the score's drift against the training reference", size="half"),
        line_plot_panel(PERFORMANCE, [value("served_auc", "served AUC"), value("champion_auc", "champion holdout")],
                        description="AUC on labelled predictions: appears once labels exist", size="full"),
    ]


# --- one snapshot per check --------------------------------------------------------------------------------


@functools.cache
def _metric_classes() -> tuple[type, type]:
    """(``DriftloopValue``, ``DriftloopSummary``): Evidently custom metrics over the check's numbers.

    ``DriftloopValue`` is one number, read from the report's additional data; the number is not a field,
    because series are keyed by the metric's fields: ``value`` (which number) and ``column`` name a series.
    Its widget is left empty: ``DriftloopSummary`` draws them all as one table on the snapshot's page, its
    own value being 1 when the check raised a retraining signal. Defined on first use (Evidently loaded)."""
    from evidently.core.metric_types import SingleValueCalculation, SingleValueMetric
    from evidently.legacy.renderers.html_widgets import table_data

    class DriftloopValue(SingleValueMetric):
        value: str
        column: str | None = None

    class DriftloopValueCalculation(SingleValueCalculation[DriftloopValue]):
        def calculate(self, context, current_data, reference_data):
            row = context.additional_data[CHECK_DATA].as_dataframe()
            result = self.result(float(row[_key(self.metric.value, self.metric.column)].iloc[0]))
            result.widget = []
            return result

        def display_name(self) -> str:
            name = self.metric.value.replace("_", " ")
            return f"{name} of '{self.metric.column}'" if self.metric.column else name

    class DriftloopSummary(SingleValueMetric):
        verdict: str
        signal: bool = False

    class DriftloopSummaryCalculation(SingleValueCalculation[DriftloopSummary]):
        def calculate(self, context, current_data, reference_data):
            row = context.additional_data[CHECK_DATA].as_dataframe().iloc[0]
            lines = [[*k.split(":", 1), f"{v:.4g}"] if ":" in k else [k, "", f"{v:.4g}"] for k, v in row.items()]
            result = self.result(1.0 if self.metric.signal else 0.0)
            result.widget = [table_data(title=self.display_name(), column_names=["number", "feature", "value"],
                                        data=[[name.replace("_", " "), column, v] for name, column, v in lines])]
            return result

        def display_name(self) -> str:
            signal = "retraining signal" if self.metric.signal else "no signal"
            return f"Monitor check (drift engine): {self.metric.verdict}, {signal}"

    return DriftloopValue, DriftloopSummary


def _key(value: str, column: str | None) -> str:
    return f"{value}:{column}" if column else value


def check_values(result: Mapping[str, Any]) -> dict[tuple[str, str | None], float]:
    """The numbers the panels plot, keyed (value, column), in display order: from the check result and its
    ``drift`` part (``DriftReport.to_dict()``: per-feature and prediction scores), when it has one.
    Drift numbers of a window without a verdict (``insufficient_data``) are left out, not plotted as 0."""
    values: dict[tuple[str, str | None], float] = {}

    def put(key: str, number: Any, column: str | None = None) -> None:
        if number is not None and not (isinstance(number, float) and math.isnan(number)):
            values[(key, column)] = float(number)

    drift = result.get("drift") or {}
    put("rows", result.get("rows", drift.get("rows")))
    for q, number in (result.get("prediction_quantiles") or {}).items():
        put(f"prediction_p{round(float(q) * 100)}", number)
    put("served_auc", result.get("served_auc"))
    put("champion_auc", result.get("champion_auc"))
    if "quality_issues" in result:
        put("quality_issues", len(result["quality_issues"] or {}))
    elif drift:
        put("quality_issues", sum(1 for q in (drift.get("quality") or {}).values() if q.get("issues")))
    if result.get("verdict", drift.get("verdict")) != INSUFFICIENT_DATA:
        put("drift_share", result.get("drift_share", drift.get("drift_share")))
        put("drifted_columns", len(result.get("drifted_columns", drift.get("drifted_columns", ()))))
        put("drift_share_threshold", drift.get("drift_share_threshold"))
        for name, col in (drift.get("columns") or {}).items():
            if col.get("status") in JUDGED:
                put("drift_score", col.get("score"), name)
        prediction = drift.get("prediction") or {}
        if prediction.get("status") in JUDGED:
            put("prediction_drift_score", prediction.get("score"))
    return dict(sorted(values.items(), key=lambda kv: _ORDER.index(kv[0][0])))


JUDGED = (OK, CONSTANT_REFERENCE)  # column statuses whose score counts towards the verdict
# The snapshot's metric order is the order of the counters and legends in the UI.
_ORDER = ("drift_share", "drifted_columns", "quality_issues", "rows", "drift_share_threshold",
          *(f"prediction_p{round(q * 100)}" for q in QUANTILES), "prediction_drift_score", "served_auc",
          "champion_auc", "drift_score")


def with_drift(result: Mapping[str, Any], window: pd.DataFrame, reference: pd.DataFrame | None) -> dict[str, Any]:
    """``result`` with the score's quantiles over the window, and a ``drift`` part: its own, else the engine
    run here on the window against the reference sample (an approximation of the monitor's profile)."""
    out = dict(result)
    if out.get("prediction_quantiles") is None and window is not None and PREDICTION in window.columns:
        scores = pd.to_numeric(window[PREDICTION], errors="coerce").to_numpy(np.float64, na_value=np.nan)
        scores = scores[np.isfinite(scores)]
        if scores.size:
            out["prediction_quantiles"] = dict(zip(QUANTILES, np.quantile(scores, QUANTILES).tolist(), strict=True))
    if out.get("drift") is None and reference is not None and window is not None and len(window):
        columns = feature_columns(reference, window)
        if columns:
            profile = build_profile(reference.rename(columns={"prediction": PREDICTION}), columns)
            out["drift"] = check_drift(profile, window, _policy(result)).to_dict()
    return out


def record_check(settings: Settings, window: pd.DataFrame, reference: pd.DataFrame | None,
                 result_dict: Mapping[str, Any], timestamp: datetime | float | None = None) -> str:
    """Add one snapshot for one monitor check to the model's project; return the snapshot id.

    ``result_dict``: ``CheckResult.as_dict()``, best with ``"drift": DriftReport.to_dict()`` merged in (the
    per-feature scores). ``reference``: a sample of the training reference (``reference_from_profile``), or
    None (no drift pictures, and no per-feature scores unless the result has them). ``timestamp``: the
    check's time (datetime or epoch seconds; default now), the dashboards' x axis."""
    from evidently import Report

    result = with_drift(result_dict, window, reference)
    values = check_values(result)
    when = _naive_utc(timestamp)
    name = f"{settings.model_name} v{result.get('model_version', '?')} {when:%Y-%m-%d %H:%M:%S}"
    metadata = {k: str(result[k]) for k in ("window_id", "model_version", "verdict", "signal")
                if result.get(k) is not None}
    # Tags let a panel be narrowed to one verdict or one model version.
    tags = [str(result[k]) if k == "verdict" else f"v{result[k]}" for k in ("verdict", "model_version")
            if result.get(k) is not None]
    value_metric, summary_metric = _metric_classes()
    summary = summary_metric(verdict=str(result.get("verdict", "unknown")), signal=bool(result.get("signal")))
    engine = [summary, *(value_metric(value=v, column=c) for v, c in values)]
    check_row = pd.DataFrame({_key(v, c): [n] for (v, c), n in values.items()} or {"rows": [0.0]})
    current, ref, visual = _visual_part(window, reference, result)
    try:
        snapshot = Report([*engine, *visual]).run(current if current is not None else check_row, ref,
                                                  additional_data={CHECK_DATA: check_row},
                                                  timestamp=when, metadata=metadata, tags=tags, name=name)
    except Exception:  # the pictures are a bonus: never lose the check's numbers to them
        log.warning("Evidently could not draw the samples; recording the check's numbers only", exc_info=True)
        snapshot = Report(engine).run(check_row, None, additional_data={CHECK_DATA: check_row},
                                      timestamp=when, metadata=metadata, tags=tags, name=name)
    # Each widget is stored twice, in the page's list and in its metric's result; the page's copy is the
    # one the UI shows, so dropping the other halves every snapshot on disk and in the UI's memory.
    for metric_result in snapshot.metric_results.values():
        metric_result.widget = []
    ws = _writer(settings)
    project = ensure_project(ws, settings.model_name)
    return str(ws.add_run(project.id, snapshot).id)


def _writer(settings: Settings) -> Workspace:
    """The workspace for writing, without Evidently's dataset services: ``Workspace()`` builds those by
    loading every stored snapshot, a cost that grows with each check. Projects, dashboards and runs go
    through ``Workspace.state`` alone, so that is all this one sets up."""
    from evidently.ui.storage.local.base import LocalState
    from evidently.ui.workspace import Workspace

    path = workspace_path(settings)
    path.mkdir(parents=True, exist_ok=True)
    ws = Workspace.__new__(Workspace)
    ws.path, ws.state = str(path), LocalState(str(path))
    return ws


def _naive_utc(timestamp: datetime | float | None) -> datetime:
    # Evidently compares snapshot times with naive datetimes (its own default is datetime.now()).
    if timestamp is None:
        when = datetime.now(UTC)
    elif isinstance(timestamp, datetime):
        when = timestamp if timestamp.tzinfo else timestamp.replace(tzinfo=UTC)
    else:
        when = datetime.fromtimestamp(float(timestamp), UTC)
    return when.astimezone(UTC).replace(tzinfo=None)


def _visual_part(window: pd.DataFrame, reference: pd.DataFrame | None,
                 result: Mapping[str, Any]) -> tuple[Any, Any, list]:
    """(current dataset, reference dataset, metrics) of the pictures Evidently draws itself, on samples: the
    score's distribution (its median, window against reference), and a drift picture for each feature the
    engine found drifted and for the score when it drifted. Only drifted columns: a picture weighs ~35 kB
    and every snapshot is kept. Columns without values are left out; both datasets get the same columns."""
    from evidently.metrics import QuantileValue, ValueDrift

    if window is None or not len(window):
        return None, None, []
    cur = _sample(window)
    ref = _sample(reference.rename(columns={"prediction": PREDICTION})) if reference is not None else None
    kinds = resolve_kinds(cur, feature_columns(ref if ref is not None else cur, cur))
    if PREDICTION in cur.columns:
        kinds[PREDICTION] = NUMERICAL
    usable = [c for c, k in kinds.items() if _has_values(cur[c], k)
              and (ref is None or (c in ref.columns and _has_values(ref[c], k)))]
    drift = result.get("drift") or {}
    drifted = [c for c, d in (drift.get("columns") or {}).items() if d.get("drifted")]
    if (drift.get("prediction") or {}).get("drifted"):
        drifted.append(PREDICTION)
    policy = _policy(result)
    metrics: list = [QuantileValue(column=PREDICTION, quantile=0.5)] if PREDICTION in usable else []
    if ref is not None:
        metrics += [ValueDrift(column=c, method=policy.method(kinds[c])[0], threshold=policy.method(kinds[c])[1])
                    for c in drifted if c in usable]
    used = {m.column: kinds[m.column] for m in metrics}
    if not used:
        return None, None, []
    return _dataset(cur, used), _dataset(ref, used) if ref is not None else None, metrics


def _dataset(frame: pd.DataFrame, kinds: Mapping[str, str]) -> Any:
    from evidently import DataDefinition, Dataset

    definition = DataDefinition(numerical_columns=[c for c, k in kinds.items() if k == NUMERICAL],
                                categorical_columns=[c for c, k in kinds.items() if k == CATEGORICAL])
    return Dataset.from_pandas(_typed(frame, kinds), data_definition=definition)


def _policy(result: Mapping[str, Any]) -> DriftPolicy:
    data = (result.get("drift") or {}).get("policy")
    return DriftPolicy(**data) if data else DriftPolicy()


def _sample(frame: pd.DataFrame, rows: int = SAMPLE_ROWS) -> pd.DataFrame:
    return frame.sample(rows, random_state=0) if len(frame) > rows else frame


def _has_values(series: pd.Series, kind: str) -> bool:
    if kind == NUMERICAL:
        return bool(np.isfinite(pd.to_numeric(series, errors="coerce").to_numpy(np.float64, na_value=np.nan)).any())
    return bool(series.notna().any())


def _typed(frame: pd.DataFrame, kinds: Mapping[str, str]) -> pd.DataFrame:
    # The inference log comes out of SQLite: numbers may arrive as objects, categories as anything.
    out = {}
    for c, k in kinds.items():
        if k == NUMERICAL:
            values = pd.to_numeric(frame[c], errors="coerce").astype(np.float64)
            out[c] = values.where(np.isfinite(values))
        else:
            out[c] = frame[c].astype("string").astype(object).where(frame[c].notna(), None)
    return pd.DataFrame(out, index=frame.index).reset_index(drop=True)


def reference_from_profile(profile: ReferenceProfile, rows: int = SAMPLE_ROWS, seed: int = 0) -> pd.DataFrame:
    """A reference sample rebuilt from the drift profile the monitor already holds: each column's
    marginal distribution (quantiles, category shares, null rate), columns shuffled independently.
    Enough for per-column drift widgets; joint distributions are not kept."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    profiles = dict(profile.columns)
    if profile.prediction is not None:
        profiles[PREDICTION] = profile.prediction
    for name, p in profiles.items():
        nulls = round(rows * p.null_rate)
        present = rows - nulls
        if isinstance(p, NumericalProfile):
            if p.sample.size:
                # Evenly spaced quantiles of the sorted sample: the marginal, deterministically.
                picked = p.sample[((2 * np.arange(present) + 1) * p.sample.size) // (2 * present)] if present else []
            else:
                picked, nulls = [], rows
            column = np.r_[np.asarray(picked, dtype=np.float64), np.full(nulls, np.nan)]
        elif isinstance(p, CategoricalProfile):
            counts = p.counts.astype(np.float64)
            if counts.sum() and present:
                share = counts / counts.sum() * present
                whole = np.floor(share).astype(np.int64)
                whole[np.argsort(whole - share)[: present - whole.sum()]] += 1  # largest remainders
                column = np.r_[np.repeat(np.asarray(p.categories, dtype=object), whole),
                               np.full(rows - whole.sum(), None, dtype=object)]
            else:
                column = np.full(rows, None, dtype=object)
        out[name] = rng.permutation(column)
    return pd.DataFrame(out)


# --- the UI ------------------------------------------------------------------------------------------------


def ui_command(settings: Settings, host: str = "127.0.0.1", port: int = 8000) -> list[str]:
    """The command line that serves the Evidently UI on the workspace (``evidently ui``)."""
    return [sys.executable, "-m", "evidently.cli", "ui", "--workspace", str(workspace_path(settings)),
            "--host", host, "--port", str(port)]
