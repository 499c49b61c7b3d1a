"""The drift check engine on small hand-made frames: exact scores, edge cases, the profile file, the CLI."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from scipy.spatial import distance
from typer.testing import CliRunner

from monitoring.cli import drift_app
from monitoring.drift import (
    CATEGORICAL,
    CONSTANT_REFERENCE,
    DRIFT,
    INSUFFICIENT_DATA,
    NO_CURRENT_VALUES,
    NO_DRIFT,
    NO_REFERENCE_VALUES,
    NUMERICAL,
    OK,
    DriftPolicy,
    ReferenceProfile,
    build_profile,
    check_drift,
    feature_columns,
    wasserstein_sorted,
)

pytestmark = pytest.mark.unit

KINDS = {"x": NUMERICAL, "n": NUMERICAL, "c": CATEGORICAL}
EXACT = DriftPolicy(clip_quantile=0.0)  # Evidently's formulas exactly: no clipping to the reference's quantiles


def frame(n: int, seed: int, shift: float = 0.0, c_shares=(0.5, 0.3, 0.2)) -> pd.DataFrame:
    g = np.random.default_rng(seed)
    return pd.DataFrame({
        "x": g.normal(shift, 1.0, n),
        "n": g.integers(0, 50, n),
        "c": np.asarray(["a", "b", "c"], dtype=object)[g.choice(3, n, p=c_shares)],
        "prediction": g.beta(1, 20, n),
    })


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    return frame(3_000, seed=0)


@pytest.fixture(scope="module")
def profile(reference) -> ReferenceProfile:
    return build_profile(reference, KINDS)


def test_wasserstein_matches_scipy_with_ties_and_unequal_sizes():
    g = np.random.default_rng(1)
    for n, m in [(1, 1), (7, 300), (500, 20), (2_000, 2_000)]:
        a, b = np.round(g.normal(size=n), 1), np.round(g.normal(0.3, 2, size=m), 1)  # rounding makes ties
        assert wasserstein_sorted(np.sort(a), np.sort(b)) == pytest.approx(stats.wasserstein_distance(a, b), abs=1e-12)


def test_scores_are_the_reference_formulas(reference, profile):
    current = frame(2_000, seed=1, shift=0.3, c_shares=(0.3, 0.3, 0.4))
    report = check_drift(profile, current, EXACT)
    x = report.columns["x"]
    expected = stats.wasserstein_distance(reference["x"], current["x"]) / np.std(reference["x"])
    assert (x.method, x.threshold, x.status) == ("wasserstein", 0.1, OK)
    assert x.score == pytest.approx(expected, rel=1e-12) and x.drifted
    c = report.columns["c"]
    ref_p = reference["c"].value_counts(normalize=True).sort_index()
    cur_p = current["c"].value_counts(normalize=True).sort_index()
    assert c.method == "jensenshannon"
    assert c.score == pytest.approx(distance.jensenshannon(ref_p, cur_p), rel=1e-12) and c.drifted
    assert not report.columns["n"].drifted
    assert report.drifted_columns == ("x", "c")
    assert report.verdict == DRIFT and report.drift_share == pytest.approx(2 / 3)


def test_same_distribution_is_no_drift(profile):
    report = check_drift(profile, frame(2_000, seed=2))
    assert report.verdict == NO_DRIFT
    assert report.drifted_columns == ()
    assert all(c.score is not None and c.score < 0.1 for c in report.columns.values())
    assert report.quality_issues == {}


def test_drift_share_threshold_is_a_parameter(profile):
    current = frame(2_000, seed=3, shift=0.5)  # only x drifts: share 1/3
    assert check_drift(profile, current, DriftPolicy(drift_share=0.5)).verdict == NO_DRIFT
    assert check_drift(profile, current, DriftPolicy(drift_share=0.3)).verdict == DRIFT


def test_small_windows_are_insufficient_data_and_claim_no_drift(profile):
    report = check_drift(profile, frame(50, seed=4, shift=3.0, c_shares=(0.1, 0.1, 0.8)))
    assert report.verdict == INSUFFICIENT_DATA
    assert report.drifted_columns == ()
    assert all(not c.drifted and c.status == INSUFFICIENT_DATA for c in report.columns.values())
    assert report.columns["x"].score > 1  # still computed, for information
    # min_rows is what stands between 50 rows of noise and a verdict.
    assert check_drift(profile, frame(50, seed=4), DriftPolicy(min_rows=10)).verdict != INSUFFICIENT_DATA


def test_prediction_drift_reads_score_or_prediction(profile):
    current = frame(2_000, seed=5).rename(columns={"prediction": "score"})
    current["score"] = current["score"] * 3
    report = check_drift(profile, current)
    assert report.prediction is not None and report.prediction.drifted
    assert report.prediction.column == "prediction"
    assert "prediction" not in report.columns and report.verdict == NO_DRIFT  # not a feature
    assert check_drift(profile, current.drop(columns="score")).prediction is None


def test_all_null_constant_and_unseen_columns_are_reported_not_crashed():
    g = np.random.default_rng(6)
    n = 1_000
    ref = pd.DataFrame({"x": g.normal(size=n), "const": 5.0, "null_ref": np.nan,
                        "c": g.choice(["a", "b"], n), "cat_null": g.choice(["a", "b"], n)})
    kinds = {"x": NUMERICAL, "const": NUMERICAL, "null_ref": NUMERICAL, "c": CATEGORICAL, "cat_null": CATEGORICAL}
    profile = build_profile(ref, kinds)
    cur = pd.DataFrame({
        "x": np.where(g.uniform(size=n) < 0.3, np.nan, g.normal(size=n)),  # null rate 0 -> 30%
        "const": 5.0, "null_ref": g.normal(size=n),
        "c": np.where(g.uniform(size=n) < 0.1, "zzz", g.choice(["a", "b"], n)),
        "cat_null": None,
    })
    report = check_drift(profile, cur)
    cols, quality = report.columns, report.quality
    assert (cols["const"].status, cols["const"].score, cols["const"].drifted) == (CONSTANT_REFERENCE, 0.0, False)
    assert cols["null_ref"].status == NO_REFERENCE_VALUES and cols["null_ref"].score is None
    assert cols["cat_null"].status == NO_CURRENT_VALUES and cols["cat_null"].score is None
    assert quality["cat_null"].null_rate == 1.0 and quality["cat_null"].issues == ("all null",)
    assert quality["x"].null_rate == pytest.approx(0.3, abs=0.05) and quality["x"].reference_null_rate == 0.0
    assert "null rate" in quality["x"].issues[0]
    assert not cols["x"].drifted  # the test drops nulls: only the quality section sees them
    assert quality["c"].unseen_categories == ("zzz",)
    assert quality["c"].unseen_share == pytest.approx(0.1, abs=0.03)
    assert report.verdict in (DRIFT, NO_DRIFT)
    # A constant column that moves is drift (Evidently's std floor), and out of range.
    moved = check_drift(profile, cur.assign(const=6.0))
    assert moved.columns["const"].drifted and moved.quality["const"].out_of_range_share == 1.0


def test_non_finite_values_are_out_of_range_not_tested(profile):
    current = frame(1_000, seed=7)
    current.loc[:49, "x"] = np.inf
    report = check_drift(profile, current)
    assert report.columns["x"].values == 950
    assert report.quality["x"].out_of_range_share == pytest.approx(0.05, abs=0.005)
    assert report.quality["x"].issues


def test_profile_round_trips_through_json(reference, profile):
    again = ReferenceProfile.from_json(profile.to_json())
    current = frame(1_500, seed=8, shift=0.2)
    assert check_drift(again, current).to_dict() == check_drift(profile, current).to_dict()
    with pytest.raises(ValueError, match="not a drift profile"):
        ReferenceProfile.from_json('{"format": 99}')
    with pytest.raises(ValueError, match="not a drift profile"):
        ReferenceProfile.from_json("not json")


def test_large_references_are_summarised_by_quantiles_with_a_tiny_error():
    g = np.random.default_rng(9)
    ref, cur = pd.DataFrame({"x": g.lognormal(size=50_000)}), pd.DataFrame({"x": g.lognormal(0.1, size=20_000)})
    small = build_profile(ref, {"x": NUMERICAL}, max_sample=5_000)
    assert small.columns["x"].sample.size == 5_000 and not small.columns["x"].exact
    exact = stats.wasserstein_distance(ref["x"], cur["x"]) / np.std(ref["x"])
    assert check_drift(small, cur, EXACT).columns["x"].score == pytest.approx(exact, abs=2e-3)


@pytest.mark.parametrize(("num", "cat"), [("psi", "psi"), ("jensenshannon", "jensenshannon")])
def test_other_methods_run_and_flag_a_big_shift(profile, num, cat):
    report = check_drift(profile, frame(2_000, seed=10, shift=1.0, c_shares=(0.2, 0.2, 0.6)),
                         DriftPolicy(num_method=num, cat_method=cat))
    assert report.columns["x"].method == num and report.columns["x"].drifted
    assert report.columns["c"].method == cat and report.columns["c"].drifted


def test_bad_policy_and_missing_columns_fail_clearly(profile):
    with pytest.raises(ValueError, match="num_method"):
        DriftPolicy(num_method="ks")
    with pytest.raises(ValueError, match="drift_share"):
        DriftPolicy(drift_share=0)
    with pytest.raises(ValueError, match="no column"):
        check_drift(profile, frame(500, seed=11).drop(columns="c"))
    with pytest.raises(ValueError, match="no column"):
        build_profile(frame(100, seed=11), ["nope"])


def test_default_columns_are_the_model_features_or_all_plain_columns():
    from driftloop.contracts import MODEL_FEATURES

    model_frame = pd.DataFrame({name: [1.0] for name in (*MODEL_FEATURES, "prediction", "event_timestamp")})
    assert feature_columns(model_frame) == list(MODEL_FEATURES)
    other = pd.DataFrame({"a": [1.0], "b": ["x"], "score": [0.1], "ts": [1.0]})
    assert feature_columns(other) == ["a", "b"]
    assert feature_columns(other, other[["b"]]) == ["b"]


# --- the CLI ---------------------------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory, reference):
    d = tmp_path_factory.mktemp("drift-cli")
    reference.to_parquet(d / "ref.parquet")
    frame(2_000, seed=12, shift=0.5, c_shares=(0.2, 0.2, 0.6)).to_parquet(d / "cur.parquet")
    frame(2_000, seed=13).to_parquet(d / "same.parquet")
    (d / "not.parquet").write_text("hello")
    pd.DataFrame({"other": [1.0, 2.0]}).to_parquet(d / "other.parquet")
    return d


def test_cli_json_has_every_column_score_threshold_and_verdict(files):
    result = runner.invoke(drift_app, ["compare", str(files / "ref.parquet"), str(files / "cur.parquet"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["verdict"] == DRIFT and set(data["drifted_columns"]) == {"x", "c"}
    assert set(data["columns"]) == {"x", "n", "c"}
    for column in data["columns"].values():
        assert {"method", "score", "threshold", "drifted", "status"} <= set(column)
    assert data["columns"]["x"]["method"] == "wasserstein" and data["columns"]["c"]["method"] == "jensenshannon"
    assert {"null_rate", "reference_null_rate", "out_of_range_share", "unseen_categories", "issues"} <= set(
        data["quality"]["x"])
    assert data["prediction"]["column"] == "prediction"
    assert data["drift_share_threshold"] == 0.3  # the settings' policy, the monitor's


def test_cli_human_output_and_options(files):
    result = runner.invoke(drift_app, ["compare", str(files / "ref.parquet"), str(files / "same.parquet")])
    assert result.exit_code == 0, result.output
    assert "dataset: no_drift" in result.stdout and "wasserstein" in result.stdout
    result = runner.invoke(drift_app, ["compare", str(files / "ref.parquet"), str(files / "cur.parquet"),
                                       "--columns", "x,n", "--min-rows", "5000", "--json"])
    data = json.loads(result.stdout)
    assert set(data["columns"]) == {"x", "n"} and data["verdict"] == INSUFFICIENT_DATA


def test_cli_accepts_a_saved_profile(files, profile):
    path = files / "profile.json"
    path.write_text(profile.to_json())
    result = runner.invoke(drift_app, ["compare", str(path), str(files / "cur.parquet"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["verdict"] == DRIFT


@pytest.mark.parametrize(("args", "message"), [
    (["missing.parquet", "cur.parquet"], "reference file not found"),
    (["ref.parquet", "missing.parquet"], "current file not found"),
    (["not.parquet", "cur.parquet"], "not a readable Parquet file"),
    (["ref.parquet", "other.parquet"], "no columns in common"),
    (["ref.parquet", "cur.parquet", "--columns", "x,nope"], "--columns: nope"),
])
def test_cli_bad_input_is_one_error_line_and_exit_1(files, args, message):
    paths = [str(files / a) if a.endswith(".parquet") else a for a in args]
    result = runner.invoke(drift_app, ["compare", *paths])
    assert result.exit_code == 1
    assert result.stderr.startswith("error:") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""
