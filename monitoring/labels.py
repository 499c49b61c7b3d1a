"""Late labels: ground truth arrives after the prediction; joined to the inference log by transaction id.

``ingest`` records labels (idempotent: a transaction's label is stored once, the latest wins);
``performance`` scores a window of logged predictions against the labels that have arrived.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from driftloop.contracts import LABEL, TRANSACTION_ID
from driftloop.settings import Settings
from monitoring.store import LogStore
from pipelines.steps.evaluate import Metrics, compute


class LabelError(ValueError):
    """The label file cannot be used; the message names the problem."""


@dataclass(frozen=True)
class IngestSummary:
    rows: int
    matched: int  # labels whose transaction was served and logged


def read_labels(path: Path) -> pd.DataFrame:
    """A Parquet or CSV file with ``transaction_id`` and ``is_fraud`` (0/1)."""
    if not path.exists():
        raise LabelError(f"no label file at {path}")
    try:
        frame = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    except Exception as error:
        raise LabelError(f"cannot read {path} ({type(error).__name__}: {error}); expected Parquet or CSV") from error
    missing = [c for c in (TRANSACTION_ID, LABEL) if c not in frame.columns]
    if missing:
        raise LabelError(f"{path} lacks columns {missing}")
    if frame[LABEL].isna().any() or not frame[LABEL].isin([0, 1]).all():
        raise LabelError(f"{path}: {LABEL} must be 0 or 1 in every row")
    if frame[TRANSACTION_ID].isna().any():
        raise LabelError(f"{path}: {TRANSACTION_ID} is empty in some rows")
    return frame[[TRANSACTION_ID, LABEL]].astype({TRANSACTION_ID: str, LABEL: int}).drop_duplicates(
        TRANSACTION_ID, keep="last")


def ingest(settings: Settings, path: Path) -> IngestSummary:
    """Store the labels (all or none: one transaction) and say how many match logged predictions."""
    frame = read_labels(path)
    matched = LogStore(settings).upsert_labels(list(frame.itertuples(index=False, name=None)))
    return IngestSummary(len(frame), matched)


def labelled_window(settings: Settings, since: float | None = None, until: float | None = None) -> pd.DataFrame:
    """Logged predictions in ``[since, until)`` (epoch seconds) that have a label."""
    frame = LogStore(settings).frame(
        f"SELECT p.ts, p.score, p.channel, l.{LABEL} FROM predictions p JOIN labels l "  # noqa: S608
        f"ON p.{TRANSACTION_ID} = l.{TRANSACTION_ID} WHERE p.ts >= {{p}} AND p.ts < {{p}}",
        (since or 0.0, until if until is not None else 1e18))
    return frame if len(frame.columns) else pd.DataFrame(columns=["ts", "score", "channel", LABEL])


def performance(settings: Settings, since: float | None = None, until: float | None = None,
                min_labels: int = 100) -> Metrics | None:
    """Metrics of the window's labelled predictions; None when too few labels or one class only."""
    frame = labelled_window(settings, since, until)
    if len(frame) < min_labels or frame[LABEL].nunique() < 2:
        return None
    return compute(frame[LABEL].to_numpy(), frame["score"].to_numpy(), frame["channel"].fillna("unknown"))
