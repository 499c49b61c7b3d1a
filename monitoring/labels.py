"""Late labels: ground truth arrives after the prediction; joined to the inference log by transaction id.

``ingest`` records labels and when they arrived (idempotent: a transaction's label is stored once, the latest
wins, and keeps its first arrival time until its value changes);
``performance`` scores a window of logged predictions against the labels that have arrived.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from driftloop.contracts import LABEL, TRANSACTION_ID
from driftloop.settings import Settings
from monitoring.store import LABELLED_AT, LogStore
from pipelines.steps.evaluate import Metrics, compute


class LabelError(ValueError):
    """The label file cannot be used; the message names the problem."""


@dataclass(frozen=True)
class IngestSummary:
    rows: int
    matched: int  # labels whose transaction was served and logged


CHUNK_ROWS = 50_000  # labels read, checked and sent at a time: memory stays flat whatever the file's size


def label_chunks(path: Path, chunk_rows: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """A Parquet or CSV file with ``transaction_id`` and ``is_fraud`` (0/1), ``chunk_rows`` rows at a time.

    Ids are read as text, so a CSV id ``000123`` stays ``000123``. Each chunk is checked (rows are counted
    from 1, after a CSV's header) and holds each id once, its last label in the chunk.
    """
    if not path.exists():
        raise LabelError(f"no label file at {path}")
    chunks = _csv_chunks(path, chunk_rows) if path.suffix == ".csv" else _parquet_chunks(path, chunk_rows)
    first_row = 1
    while True:
        try:
            frame = next(chunks)
        except StopIteration:
            return
        except LabelError:
            raise
        except Exception as error:  # whatever the reader says about a file it cannot parse
            raise LabelError(f"cannot read {path} ({type(error).__name__}: {error}); expected Parquet or CSV"
                             ) from error
        yield _checked(frame, path, first_row)
        first_row += len(frame)


def _csv_chunks(path: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    _require_columns(path, pd.read_csv(path, nrows=0).columns)
    # Only an empty field is missing: "NA" or "null" could be someone's transaction id.
    yield from pd.read_csv(path, usecols=[TRANSACTION_ID, LABEL], dtype={TRANSACTION_ID: str}, chunksize=chunk_rows,
                           keep_default_na=False, na_values={TRANSACTION_ID: [""], LABEL: [""]})


def _parquet_chunks(path: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    _require_columns(path, file.schema_arrow.names)
    for batch in file.iter_batches(batch_size=chunk_rows, columns=[TRANSACTION_ID, LABEL]):
        yield batch.to_pandas()


def _require_columns(path: Path, columns: Iterable[str]) -> None:
    missing = [c for c in (TRANSACTION_ID, LABEL) if c not in set(columns)]
    if missing:
        raise LabelError(f"{path} lacks columns {missing}")


def _checked(frame: pd.DataFrame, path: Path, first_row: int) -> pd.DataFrame:
    labels = pd.to_numeric(frame[LABEL], errors="coerce")
    bad = ~labels.isin([0, 1]).to_numpy()
    if bad.any():
        at = int(bad.argmax())
        raise LabelError(f"{path}: {LABEL} must be 0 or 1 in every row (row {first_row + at:,} has "
                         f"{str(frame[LABEL].iloc[at])!r})")
    empty = frame[TRANSACTION_ID].isna().to_numpy()
    if empty.any():
        raise LabelError(f"{path}: {TRANSACTION_ID} is empty in some rows (the first: row "
                         f"{first_row + int(empty.argmax()):,})")
    return pd.DataFrame({TRANSACTION_ID: frame[TRANSACTION_ID].astype(str), LABEL: labels.astype(int)}
                        ).drop_duplicates(TRANSACTION_ID, keep="last")


def ingest(settings: Settings, path: Path, chunk_rows: int = CHUNK_ROWS,
           arrived: datetime | None = None) -> IngestSummary:
    """Store the labels (all or none: one transaction) and say how many match logged predictions.

    The file goes through in chunks into a temporary table (PostgreSQL: ``COPY``), where a later label for an
    id replaces an earlier one; one statement then moves them into ``labels``. No statement carries more
    than a row's parameters, so any number of labels fits. A new or changed label arrived at ``arrived``
    (default now): a training set as of an earlier time does not use it; a label sent again unchanged
    keeps the time it first arrived.
    """
    arrived_s = (arrived or datetime.now(UTC)).timestamp()
    store = LogStore(settings)
    with store.connect() as db:
        store._labels_table(db)  # the store's own schema
        temporary = " ON COMMIT DROP" if store.postgres else ""
        db.execute(f"CREATE TEMP TABLE labels_incoming ({TRANSACTION_ID} TEXT PRIMARY KEY, {LABEL} INTEGER){temporary}")
        db.execute(f"CREATE TEMP TABLE labels_chunk ({TRANSACTION_ID} TEXT, {LABEL} INTEGER){temporary}")
        for frame in label_chunks(path, chunk_rows):
            rows = list(zip(frame[TRANSACTION_ID].tolist(), frame[LABEL].tolist(), strict=True))
            if store.postgres:
                copy_in = f"COPY labels_chunk ({TRANSACTION_ID}, {LABEL}) FROM STDIN"
                with db.cursor() as cursor, cursor.copy(copy_in) as copy:
                    for row in rows:
                        copy.write_row(row)
            else:
                db.executemany("INSERT INTO labels_chunk VALUES (?, ?)", rows)
            # "WHERE true": SQLite would read ON CONFLICT as a join's ON without it.
            db.execute(f"INSERT INTO labels_incoming SELECT {TRANSACTION_ID}, {LABEL} FROM labels_chunk WHERE true "  # noqa: S608
                       f"ON CONFLICT ({TRANSACTION_ID}) DO UPDATE SET {LABEL} = excluded.{LABEL}")
            db.execute("DELETE FROM labels_chunk")
        # In id order, so two ingests at once lock shared rows in the same order and cannot deadlock. A row
        # whose label is unchanged is left as it is: it keeps its arrival time (and PostgreSQL writes nothing).
        db.execute(f"INSERT INTO labels ({TRANSACTION_ID}, {LABEL}, {LABELLED_AT}) "  # noqa: S608
                   f"SELECT {TRANSACTION_ID}, {LABEL}, {store.p} FROM labels_incoming WHERE true "
                   f"ORDER BY {TRANSACTION_ID} ON CONFLICT ({TRANSACTION_ID}) DO UPDATE SET {LABEL} = "
                   f"excluded.{LABEL}, {LABELLED_AT} = excluded.{LABELLED_AT} WHERE labels.{LABEL} <> "
                   f"excluded.{LABEL} OR labels.{LABELLED_AT} IS NULL", (arrived_s,))
        stored = db.execute("SELECT COUNT(*) FROM labels_incoming").fetchone()[0]
        matched = db.execute(f"SELECT COUNT(*) FROM labels_incoming WHERE {TRANSACTION_ID} IN "  # noqa: S608
                             f"(SELECT {TRANSACTION_ID} FROM predictions)").fetchone()[0] \
            if store.has(db, "predictions") else 0
    return IngestSummary(stored, matched)


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
