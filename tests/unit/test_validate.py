"""Validation names every broken rule; bad files fail with a clear message."""

import numpy as np
import pandas as pd
import pytest

from driftloop.contracts import FEATURES, LABEL, TIMESTAMP
from pipelines.steps.validate import DataValidationError, ValidationPolicy, check, validate_training_set

pytestmark = pytest.mark.unit


def good_frame(n: int = 1000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    data = {}
    for col in FEATURES:
        if col.kind == "category":
            data[col.name] = rng.choice(col.categories, n)
        else:
            data[col.name] = rng.uniform(col.low, col.high, n)
    data[LABEL] = (rng.uniform(size=n) < 0.1).astype(int)
    data[TIMESTAMP] = pd.date_range("2026-01-01", periods=n, freq="min", tz="UTC")
    return pd.DataFrame(data)


def test_a_good_frame_passes(tmp_path):
    path = tmp_path / "ok.parquet"
    good_frame().to_parquet(path)
    report = validate_training_set(str(path))
    assert report.rows == 1000 and 0.05 < report.label_rate < 0.15


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (lambda f: f.drop(columns=["amount"]), "missing columns: amount"),
        (lambda f: f.head(100), "only 100 rows"),
        (lambda f: f.assign(**{LABEL: 0}), "only one class"),
        (lambda f: f.assign(**{LABEL: 1}), "only one class"),
        (lambda f: f.assign(**{LABEL: np.where(np.arange(len(f)) < 5, 1, 0)}), "only 5 positives"),
        (lambda f: f.assign(**{LABEL: 2}), "labels must be 0 or 1"),
        (lambda f: f.assign(amount=np.where(np.arange(len(f)) % 5 == 0, np.nan, f["amount"])), "amount: 20.0% nulls"),
        (lambda f: f.assign(hour_of_day=np.where(np.arange(len(f)) == 3, 30, f["hour_of_day"])),
         "hour_of_day: 1 values outside"),
        (lambda f: f.assign(chargeback_rate_90d=-0.5), "chargeback_rate_90d: 1000 values outside"),
        (lambda f: f.assign(channel="teleport"), "unknown categories ['teleport']"),
        (lambda f: f.assign(amount="lots"), "amount: 1000 non-numeric"),
    ],
)
def test_each_broken_rule_is_named(breakage, expected):
    problems = check(breakage(good_frame()), ValidationPolicy())
    assert any(expected in p for p in problems), problems


def test_an_empty_frame_fails():
    assert check(good_frame().head(0)) == ["only 0 rows; at least 500 are needed"]


def test_missing_and_corrupt_files_fail_clearly(tmp_path):
    with pytest.raises(DataValidationError, match="does not exist"):
        validate_training_set(str(tmp_path / "nope.parquet"))
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataValidationError, match="not readable Parquet"):
        validate_training_set(str(corrupt))
