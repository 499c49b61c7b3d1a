"""Validate: a training set must meet the data contract before anything is trained on it."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from driftloop.contracts import FEATURES, LABEL, TIMESTAMP


class DataValidationError(ValueError):
    """The training set breaks the contract; ``problems`` lists every broken rule."""

    def __init__(self, uri: str, problems: list[str]) -> None:
        self.problems = problems
        listed = "\n  - ".join(problems)
        super().__init__(f"training set {uri} failed validation:\n  - {listed}")


@dataclass(frozen=True)
class ValidationPolicy:
    min_rows: int = 500
    min_positives: int = 20
    min_label_rate: float = 0.005
    max_label_rate: float = 0.5
    null_slack: float = 0.02  # tolerated null rate above each column's contract


@dataclass(frozen=True)
class ValidationReport:
    rows: int
    label_rate: float
    null_rates: dict[str, float] = field(default_factory=dict)


def read_frame(uri: str) -> pd.DataFrame:
    try:
        return pd.read_parquet(uri)
    except FileNotFoundError as err:
        raise DataValidationError(uri, ["the file does not exist"]) from err
    except Exception as err:
        raise DataValidationError(uri, [f"the file is not readable Parquet ({type(err).__name__}: {err})"]) from err


def check(frame: pd.DataFrame, policy: ValidationPolicy = ValidationPolicy()) -> list[str]:
    """Every broken rule, as a sentence that names the column and the numbers."""
    problems: list[str] = []
    missing = [c.name for c in FEATURES if c.name not in frame.columns]
    missing += [c for c in (LABEL, TIMESTAMP) if c not in frame.columns]
    if missing:
        return [f"missing columns: {', '.join(missing)}"]
    n = len(frame)
    if n < policy.min_rows:
        problems.append(f"only {n} rows; at least {policy.min_rows} are needed")
    if n == 0:
        return problems
    for col in FEATURES:
        values = frame[col.name]
        null_rate = float(values.isna().mean())
        if null_rate > col.max_null_rate + policy.null_slack:
            problems.append(f"{col.name}: {null_rate:.1%} nulls, contract allows {col.max_null_rate:.0%}")
        present = values.dropna()
        if col.kind == "category":
            unseen = sorted(set(present.astype(str)) - set(col.categories))
            if unseen:
                problems.append(f"{col.name}: unknown categories {unseen[:5]}; known: {list(col.categories)}")
            continue
        numeric = pd.to_numeric(present, errors="coerce")
        if numeric.isna().any():
            problems.append(f"{col.name}: {int(numeric.isna().sum())} non-numeric values")
        out = numeric[(numeric < col.low) | (numeric > col.high)]
        if len(out):
            problems.append(
                f"{col.name}: {len(out)} values outside [{col.low:g}, {col.high:g}] (e.g. {out.iloc[0]:g})"
            )
    labels = frame[LABEL]
    if labels.isna().any() or not labels.isin([0, 1]).all():
        problems.append(f"{LABEL}: labels must be 0 or 1")
        return problems
    positives = int(labels.sum())
    rate = positives / n
    if positives == 0 or positives == n:
        problems.append(f"{LABEL}: only one class present ({positives} positives of {n})")
    elif positives < policy.min_positives:
        problems.append(f"{LABEL}: only {positives} positives; at least {policy.min_positives} are needed")
    elif not policy.min_label_rate <= rate <= policy.max_label_rate:
        problems.append(
            f"{LABEL}: positive rate {rate:.2%} outside [{policy.min_label_rate:.1%}, {policy.max_label_rate:.0%}]"
        )
    return problems


def validate_training_set(uri: str, policy: ValidationPolicy = ValidationPolicy()) -> ValidationReport:
    """Read and check the training set; raise ``DataValidationError`` listing every problem."""
    frame = read_frame(uri)
    problems = check(frame, policy)
    if problems:
        raise DataValidationError(uri, problems)
    return ValidationReport(
        rows=len(frame),
        label_rate=round(float(frame[LABEL].mean()), 4),
        null_rates={c.name: round(float(frame[c.name].isna().mean()), 4) for c in FEATURES},
    )
