"""One drift policy for the monitor and `drift compare`; kinds as Evidently infers them; extreme rows go to data
quality and cannot fake drift."""

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from driftloop.contracts import MODEL_FEATURES
from driftloop.settings import Settings
from monitoring.cli import drift_app
from monitoring.drift import (
    CATEGORICAL,
    DRIFT,
    NO_DRIFT,
    NUMERICAL,
    DriftPolicy,
    build_profile,
    check_drift,
    clip_range,
    infer_kind,
    parse_kinds,
)

pytestmark = pytest.mark.unit

EXACT = DriftPolicy(clip_quantile=0.0)  # Evidently's formula: what the check did before clipping


def world(n: int, seed: int, shift: float = 0.0) -> pd.DataFrame:
    """Model features with plausible shapes: a heavy-tailed amount, a bounded rate, integers, categories."""
    g = np.random.default_rng(seed)
    amount = g.lognormal(4.0, 0.9, n)
    return pd.DataFrame({
        "amount": amount + shift * float(np.std(amount)),
        "channel": np.asarray(["pos", "online", "atm"], dtype=object)[g.choice(3, n, p=[0.6, 0.3, 0.1])],
        "hour_of_day": g.integers(0, 24, n),
        "distance_km": g.exponential(30.0, n),
        "account_age_days": g.exponential(700.0, n).astype(np.int64),
        "txn_count_7d": g.poisson(14.0, n),
        "avg_amount_30d": g.lognormal(4.0, 0.7, n).astype(np.float32),
        "chargeback_rate_90d": g.beta(1.0, 40.0, n).astype(np.float32),
        "merchant_fraud_rate_30d": g.beta(1.0, 80.0, n).astype(np.float32),
        "merchant_category": np.asarray(["grocery", "fuel", "travel"], dtype=object)[g.choice(3, n)],
    })


NUMBERS = [c for c in MODEL_FEATURES if c not in ("channel", "merchant_category")]


@pytest.fixture(scope="module")
def profile():
    return build_profile(world(5_000, seed=0))


def with_extreme(window: pd.DataFrame, rows: int, value: float = 1e9) -> pd.DataFrame:
    out = window.astype({c: np.float64 for c in NUMBERS})
    out.loc[: rows - 1, NUMBERS] = value
    return out


def test_one_extreme_row_is_data_quality_not_drift(profile):
    window = with_extreme(world(2_000, seed=1), rows=1)
    old = check_drift(profile, window, EXACT)
    assert set(old.drifted_columns) == set(NUMBERS) and old.verdict == DRIFT  # the fault this fixes
    report = check_drift(profile, window)
    assert report.verdict == NO_DRIFT and report.drifted_columns == ()
    assert report.implausible_rows == 1
    for name in NUMBERS:
        q = report.quality[name]
        assert q.impossible + q.extreme == 1, name
        assert any("impossible" in i or "extreme" in i for i in q.issues), (name, q.issues)
    # 1e9 is beyond every feature's contract range too: impossible, not merely extreme
    assert report.quality["amount"].impossible == 1 and "outside 0..50000" in report.quality["amount"].issues[0]


@pytest.mark.parametrize("value", [1e9, -1e9, np.inf])
def test_a_handful_of_extreme_rows_cannot_fake_drift(profile, value):
    report = check_drift(profile, with_extreme(world(2_000, seed=2), rows=10, value=value))
    assert report.verdict == NO_DRIFT and report.drifted_columns == ()
    assert report.implausible_rows == 10


def test_rows_at_the_edge_of_the_reference_are_plausible_and_bounded(profile):
    window = world(2_000, seed=3).astype({c: np.float64 for c in NUMBERS})
    for name in NUMBERS:
        window.loc[:9, name] = profile.columns[name].high  # the largest value training saw: plausible
    report = check_drift(profile, window)
    assert report.implausible_rows == 0 and report.quality_issues == {}
    assert report.verdict == NO_DRIFT


def test_a_real_shift_is_still_caught_with_extreme_rows(profile):
    report = check_drift(profile, with_extreme(world(2_000, seed=4, shift=0.5), rows=5))
    assert report.columns["amount"].drifted and report.columns["amount"].score > 0.3
    assert report.implausible_rows == 5


def test_impossible_and_non_finite_values_are_counted():
    reference = pd.DataFrame({"amount": np.linspace(1.0, 100.0, 1_000), "other": np.linspace(-5.0, 5.0, 1_000)})
    profile = build_profile(reference, ["amount", "other"])
    window = reference.copy()
    window.loc[:2, "amount"] = -10.0  # a negative amount breaks the contract
    window.loc[3, "amount"] = np.inf
    window.loc[4, "other"] = 30.0  # no contract: beyond [min, max] widened by one range width (-15..15)
    window.loc[5, "other"] = 14.0  # outside the reference's range, inside the plausible one
    window.loc[6, "amount"] = np.nan  # a null is a null, not implausible
    report = check_drift(profile, window)
    amount, other = report.quality["amount"], report.quality["other"]
    assert (amount.impossible, amount.non_finite, amount.extreme) == (3, 1, 0)
    assert (other.impossible, other.non_finite, other.extreme) == (0, 0, 1)
    assert (other.plausible_low, other.plausible_high) == (-15.0, 15.0)
    assert report.implausible_rows == 5
    assert any("3 impossible values" in i for i in amount.issues)
    assert any("1 non-finite value" in i for i in amount.issues)
    assert any("1 extreme value" in i for i in other.issues)
    tolerant = check_drift(profile, window, DriftPolicy(implausible_share=0.01))
    assert tolerant.quality["other"].issues == ()


def test_clipping_bounds_and_its_exceptions():
    g = np.random.default_rng(5)
    profile = build_profile(pd.DataFrame({"x": g.normal(size=4_000), "const": 1.0,
                                          "mostly_zero": np.where(g.uniform(size=4_000) < 0.997, 0.0, 5.0)}))
    low, high = clip_range(profile.columns["x"], 0.005)
    assert low == pytest.approx(-2.576, abs=0.15) and high == pytest.approx(2.576, abs=0.15)
    assert clip_range(profile.columns["x"], 0.0) is None
    assert clip_range(profile.columns["const"], 0.005) is None  # constant: any change stays drift
    assert clip_range(profile.columns["mostly_zero"], 0.005) == (0.0, 5.0)  # quantiles meet: the full range
    moved = check_drift(profile, pd.DataFrame({"x": g.normal(size=1_000), "const": 2.0, "mostly_zero": 0.0}))
    assert moved.columns["const"].drifted


def test_kinds_are_inferred_as_evidently_does():
    g = np.random.default_rng(6)
    frame = pd.DataFrame({"few_ints": g.integers(0, 10, 500), "many_ints": g.integers(0, 11, 500),
                          "floats": np.round(g.uniform(size=500), 0), "text": g.choice(["a", "b"], 500),
                          "flag": g.uniform(size=500) < 0.5})
    assert frame["many_ints"].nunique() == 11
    assert {c: infer_kind(c, frame[c]) for c in frame} == {
        "few_ints": CATEGORICAL, "many_ints": NUMERICAL, "floats": NUMERICAL, "text": CATEGORICAL,
        "flag": CATEGORICAL}
    # A contract integer read back from the inference log as floats keeps its kind.
    assert infer_kind("hour_of_day", pd.Series(g.integers(0, 5, 100).astype(np.float64))) == CATEGORICAL
    assert infer_kind("hour_of_day", pd.Series(g.integers(0, 24, 500).astype(np.float64))) == NUMERICAL
    assert infer_kind("channel", pd.Series([None] * 5)) == CATEGORICAL


def test_a_small_integer_column_matches_its_float_copy_from_the_log_and_kinds_can_be_overridden():
    g = np.random.default_rng(7)
    reference = pd.DataFrame({"level": g.integers(1, 6, 3_000), "x": g.normal(size=3_000)})
    profile = build_profile(reference)
    assert profile.columns["level"].kind == CATEGORICAL
    assert set(profile.columns["level"].categories) == {"1", "2", "3", "4", "5"}
    logged = pd.DataFrame({"level": g.integers(1, 6, 2_000).astype(np.float64), "x": g.normal(size=2_000)})
    report = check_drift(profile, logged)
    assert report.quality["level"].unseen_share == 0.0 and not report.columns["level"].drifted
    forced = build_profile(reference, kinds={"level": NUMERICAL, "x": NUMERICAL})
    assert forced.columns["level"].kind == NUMERICAL
    assert check_drift(forced, logged, DriftPolicy(kinds={"level": NUMERICAL})).columns["level"].method == "wasserstein"


def test_one_policy_from_the_settings(monkeypatch):
    assert DriftPolicy.from_settings(Settings()) == DriftPolicy()  # the settings' defaults are the policy's
    monkeypatch.setenv("DRIFTLOOP_DRIFT_SHARE", "0.5")
    monkeypatch.setenv("DRIFTLOOP_DRIFT_CLIP_QUANTILE", "0")
    monkeypatch.setenv("DRIFTLOOP_DRIFT_KINDS", '{"hour_of_day": "categorical"}')
    policy = DriftPolicy.from_settings(Settings(), num_threshold=0.2, min_rows=None,
                                       kinds={"txn_count_7d": "categorical"})
    assert (policy.drift_share, policy.clip_quantile, policy.num_threshold, policy.min_rows) == (0.5, 0.0, 0.2, 200)
    assert policy.kinds == (("hour_of_day", CATEGORICAL), ("txn_count_7d", CATEGORICAL))
    assert DriftPolicy(**json.loads(json.dumps(check_drift(
        build_profile(world(300, seed=8)), world(300, seed=9), policy).to_dict()["policy"]))) == policy
    with pytest.raises(ValueError, match="COLUMN="):
        parse_kinds(["hour_of_day:categorical"])
    with pytest.raises(ValueError, match="unknown kind"):
        DriftPolicy(kinds={"x": "text"})


# --- the CLI ---------------------------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("drift-policy-cli")
    world(5_000, seed=10).to_parquet(d / "ref.parquet")
    with_extreme(world(2_000, seed=11), rows=1).to_parquet(d / "one-bad-row.parquet")
    world(2_000, seed=12, shift=0.5).to_parquet(d / "shifted.parquet")
    return d


def compare(files, *args: str, env: dict[str, str] | None = None):
    return runner.invoke(drift_app, ["compare", str(files / "ref.parquet"), *args], env=env)


def test_cli_compare_reports_the_bad_row_as_quality(files):
    result = compare(files, str(files / "one-bad-row.parquet"))
    assert result.exit_code == 0, result.output
    assert "dataset: no_drift" in result.stdout
    assert "1 row(s) with implausible values" in result.stdout and "impossible value" in result.stdout
    old = compare(files, str(files / "one-bad-row.parquet"), "--clip-quantile", "0", "--json")
    assert json.loads(old.stdout)["verdict"] == DRIFT


def test_cli_compare_takes_the_policy_from_settings_and_options(files):
    shifted = str(files / "shifted.parquet")
    data = json.loads(compare(files, shifted, "--json").stdout)
    assert data["drift_share_threshold"] == 0.3 and data["drifted_columns"] == ["amount"]
    assert data["verdict"] == NO_DRIFT  # 1 of 10 columns
    data = json.loads(compare(files, shifted, "--json", env={"DRIFTLOOP_DRIFT_SHARE": "0.1"}).stdout)
    assert data["verdict"] == DRIFT and data["policy"]["drift_share"] == 0.1
    data = json.loads(compare(files, shifted, "--json", "--drift-share", "0.05", "--num-threshold", "5",
                              "--kind", "hour_of_day=categorical").stdout)
    assert data["policy"]["drift_share"] == 0.05 and data["policy"]["num_threshold"] == 5.0
    assert data["columns"]["hour_of_day"]["kind"] == CATEGORICAL and data["drifted_columns"] == []


@pytest.mark.parametrize(("args", "message"), [
    (["--kind", "hour_of_day"], "--kind 'hour_of_day': give COLUMN=numerical or COLUMN=categorical"),
    (["--kind", "nope=categorical"], "--kind: nope not in both files"),
    (["--num-threshold", "0"], "thresholds must be > 0"),
])
def test_cli_compare_bad_policy_is_one_error_line(files, args, message):
    result = compare(files, str(files / "shifted.parquet"), *args)
    assert result.exit_code == 1
    assert result.stderr.startswith("error:") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
