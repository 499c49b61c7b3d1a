"""The dashboard's plain parts: which numbers a snapshot carries, the rebuilt reference sample, the UI command."""

import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from driftloop.settings import Settings
from monitoring import dashboard
from monitoring.drift import CATEGORICAL, NUMERICAL, DriftPolicy, build_profile, check_drift

pytestmark = pytest.mark.unit

KINDS = {"x": NUMERICAL, "n": NUMERICAL, "c": CATEGORICAL}


def frame(n: int, seed: int, shift: float = 0.0) -> pd.DataFrame:
    g = np.random.default_rng(seed)
    x = g.normal(shift, 1.0, n)
    x[g.random(n) < 0.1] = np.nan
    return pd.DataFrame({"x": x, "n": g.integers(0, 50, n),
                         "c": np.asarray(["a", "b", "c"], dtype=object)[g.choice(3, n, p=(0.5, 0.3, 0.2))],
                         "prediction": g.beta(1, 20, n)})


def test_check_values_carries_the_engines_numbers_in_display_order():
    profile = build_profile(frame(3_000, 0), KINDS)
    report = check_drift(profile, frame(1_000, 1, shift=1.0).rename(columns={"prediction": "score"}))
    result = {"rows": 1_000, "verdict": report.verdict, "drift_share": report.drift_share,
              "drifted_columns": report.drifted_columns, "quality_issues": {}, "served_auc": 0.8,
              "champion_auc": None, "prediction_quantiles": {0.1: 0.01, 0.5: 0.03, 0.9: 0.1},
              "drift": report.to_dict()}
    values = dashboard.check_values(result)
    assert values[("drift_share", None)] == report.drift_share
    assert values[("drift_score", "x")] == report.columns["x"].score > 0.1
    assert values[("prediction_p50", None)] == 0.03 and values[("served_auc", None)] == 0.8
    assert ("champion_auc", None) not in values  # None is no point, not a zero
    keys = [k for k, _ in values]
    assert keys.index("drift_share") < keys.index("rows") < keys.index("served_auc") < keys.index("drift_score")


def test_windows_without_a_verdict_plot_no_drift_numbers():
    profile = build_profile(frame(3_000, 0), KINDS)
    report = check_drift(profile, frame(50, 1))
    assert report.verdict == "insufficient_data"
    values = dashboard.check_values({"rows": 50, "verdict": report.verdict, "drift_share": 0.0,
                                     "drifted_columns": (), "drift": report.to_dict()})
    assert values == {("rows", None): 50.0, ("quality_issues", None): 0.0}


def test_with_drift_fills_in_quantiles_and_scores_from_the_reference_sample():
    reference, window = frame(3_000, 0), frame(1_000, 1, shift=1.0).rename(columns={"prediction": "score"})
    out = dashboard.with_drift({"rows": 1_000}, window, reference)
    assert out["drift"]["columns"]["x"]["drifted"] and not out["drift"]["columns"]["c"]["drifted"]
    assert out["drift"]["prediction"]["score"] is not None  # the reference's "prediction" is the score
    assert out["prediction_quantiles"][0.5] == pytest.approx(float(np.median(window["score"])))
    assert dashboard.with_drift({"drift": {"verdict": "x"}}, window, reference)["drift"] == {"verdict": "x"}
    assert "drift" not in dashboard.with_drift({}, window, None)


def test_reference_from_profile_keeps_each_columns_marginal():
    reference = frame(20_000, 0)
    profile = build_profile(reference, KINDS)
    sample = dashboard.reference_from_profile(profile, rows=4_000)
    assert list(sample.columns) == ["x", "n", "c", "score"] and len(sample) == 4_000
    assert sample["x"].isna().mean() == pytest.approx(reference["x"].isna().mean(), abs=0.001)
    shares = sample["c"].value_counts(normalize=True)
    assert shares.to_dict() == pytest.approx(reference["c"].value_counts(normalize=True).to_dict(), abs=0.001)
    # The engine sees the same distribution in the rebuilt sample as in the reference it came from.
    report = check_drift(build_profile(sample.rename(columns={"score": "prediction"}), KINDS), reference,
                         DriftPolicy())
    assert report.verdict == "no_drift" and max(c.score for c in report.columns.values()) < 0.02
    assert dashboard.reference_from_profile(build_profile(pd.DataFrame({"x": [np.nan] * 5}), {"x": NUMERICAL}),
                                            rows=10)["x"].isna().all()  # a column without values stays empty


def test_timestamps_become_naive_utc():
    when = datetime(2026, 10, 2, 12, tzinfo=timezone(timedelta(hours=2)))
    assert dashboard._naive_utc(when) == datetime(2026, 10, 2, 10)
    assert dashboard._naive_utc(when.timestamp()) == datetime(2026, 10, 2, 10)
    assert dashboard._naive_utc(datetime(2026, 10, 2, 10)) == datetime(2026, 10, 2, 10)  # naive is UTC
    assert dashboard._naive_utc(None) <= datetime.now(UTC).replace(tzinfo=None)


def test_ui_command_serves_the_state_dirs_workspace(tmp_path):
    settings = Settings(state_dir=tmp_path)
    command = dashboard.ui_command(settings, "0.0.0.0", 9000)
    assert command[1:4] == ["-m", "evidently.cli", "ui"]
    assert command[command.index("--workspace") + 1] == str(tmp_path.resolve() / "evidently")
    assert command[command.index("--port") + 1] == "9000" and dashboard.UI_ENV == {"DO_NOT_TRACK": "1"}
    assert not (tmp_path / "evidently").exists()


def test_importing_the_module_loads_no_evidently():
    code = "import sys, monitoring.dashboard; print('evidently' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
