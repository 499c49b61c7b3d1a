"""Reading the inference log and keeping labels: SQLite (local profile) or PostgreSQL (cluster profile).

The server writes ``predictions`` (``serving.inference_log``); the monitor reads windows of it and keeps
``labels`` beside it. The SQL is the common subset of both, with the driver's placeholder.

A label records when it arrived (``labelled_at``, epoch seconds UTC), so that a training set as of a time uses
only the labels known then. A store made before that column existed is migrated on first use: its labels
are stamped with the migration time, the earliest time they are known to have arrived (stamping them
earlier could put a label into a training set as of a time before it came). A label without a time (one
that an older ``ingest`` wrote during an upgrade) is never trained on until it is ingested again.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import pandas as pd

from driftloop.contracts import ENTITY_KEYS, LABEL, REQUEST_FEATURES, TRANSACTION_ID
from driftloop.settings import Settings

VERSION_INDEX = "predictions_model_version_ts"
LABELLED_AT = "labelled_at"  # when a label arrived: epoch seconds, UTC
TRAFFIC_COLUMNS = (TRANSACTION_ID, "ts", *ENTITY_KEYS, *(c.name for c in REQUEST_FEATURES), LABEL, LABELLED_AT,
                   "repeats")


class LogStore:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.postgres = settings.profile == "cluster"
        self.p = "%s" if self.postgres else "?"

    @contextmanager
    def connect(self) -> Iterator[Any]:
        """A connection in one transaction: committed on success, rolled back on error."""
        if self.postgres:
            import psycopg

            with psycopg.connect(self.settings.postgres_dsn, connect_timeout=10) as db:
                yield db
            return
        self.settings.inference_log_path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.settings.inference_log_path, timeout=30)
        try:
            with db:
                yield db
        finally:
            db.close()

    def has(self, db: Any, table: str) -> bool:
        if self.postgres:
            return db.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is not None
        return db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (table,)).fetchone() is not None

    def has_log(self, db: Any) -> bool:
        """Whether the inference log has its table yet. On PostgreSQL a missing one is created here (empty, so
        still False): this reader runs as the platform's role, which owns the table; the predictor's role may
        only write into it (the bootstrap's first training is the first reader)."""
        if self.has(db, "predictions"):
            return True
        if self.postgres:
            from serving.inference_log import create_postgres_table

            create_postgres_table(db)
        return False

    def frame(self, sql: str, params: Iterable = ()) -> pd.DataFrame:
        """Run a query (``{p}`` marks each parameter); an empty frame when there is no log yet."""
        with self.connect() as db:
            if not self.has_log(db):
                return pd.DataFrame()
            self._labels_table(db)
            cursor = db.execute(sql.format(p=self.p), tuple(params))
            return pd.DataFrame(cursor.fetchall(), columns=[d[0] for d in cursor.description])

    def window(self, model_name: str, version: str, rows: int) -> pd.DataFrame:
        """The newest ``rows`` predictions of one model version, with their label (null until it arrives).
        An index on (model, version, ts) makes this one range scan however long the log grows; the first
        call creates it."""
        with self.connect() as db:
            if not self.has_log(db):
                return pd.DataFrame()
            self._labels_table(db)
            if not self.has(db, VERSION_INDEX):  # looked up first: PostgreSQL locks the table for CREATE INDEX
                db.execute(f"CREATE INDEX IF NOT EXISTS {VERSION_INDEX} ON predictions (model_name, model_version, ts)")
            cursor = db.execute(
                f"SELECT p.*, l.{LABEL} FROM predictions p LEFT JOIN labels l ON p.{TRANSACTION_ID} = "  # noqa: S608
                f"l.{TRANSACTION_ID} WHERE p.model_name = {self.p} AND p.model_version = {self.p} "
                f"ORDER BY p.ts DESC LIMIT {self.p}", (model_name, version, rows))
            return pd.DataFrame(cursor.fetchall(), columns=[d[0] for d in cursor.description])

    def labelled_traffic(self, model_name: str, as_of: float, rows: int) -> pd.DataFrame:
        """Training rows from the traffic: ``model_name``'s logged predictions made by ``as_of`` (epoch seconds)
        whose label had arrived by then, as served (``TRAFFIC_COLUMNS``), the newest ``rows``.

        One row per transaction, its first prediction; ``repeats`` counts its later ones, left out. A
        prediction made after its transaction's label arrived is no record of the transaction the label is
        about (a replayed id): it is not used. No log: an empty frame.
        """
        served = ", ".join(f"p.{c}" for c in (TRANSACTION_ID, "ts", *ENTITY_KEYS, *(f.name for f in REQUEST_FEATURES)))
        frame = self.frame(
            f"SELECT {', '.join(TRAFFIC_COLUMNS[:-1])}, scored - 1 AS repeats FROM ("  # noqa: S608 - constant names
            f"SELECT {served}, l.{LABEL}, l.{LABELLED_AT}, "
            f"ROW_NUMBER() OVER (PARTITION BY p.{TRANSACTION_ID} ORDER BY p.ts, p.request_id) AS nth, "
            f"COUNT(*) OVER (PARTITION BY p.{TRANSACTION_ID}) AS scored "
            f"FROM predictions p JOIN labels l ON p.{TRANSACTION_ID} = l.{TRANSACTION_ID} "
            f"WHERE p.model_name = {{p}} AND p.ts <= {{p}} AND l.{LABELLED_AT} <= {{p}} AND p.ts <= l.{LABELLED_AT}"
            f") served WHERE nth = 1 ORDER BY ts DESC, {TRANSACTION_ID} LIMIT {{p}}",
            (model_name, as_of, as_of, rows))
        return frame if len(frame.columns) else pd.DataFrame(columns=list(TRAFFIC_COLUMNS))

    def _labels_table(self, db: Any) -> None:
        """Create ``labels`` or migrate one made before ``labelled_at`` (see the module's docstring)."""
        db.execute(f"CREATE TABLE IF NOT EXISTS labels ({TRANSACTION_ID} TEXT PRIMARY KEY, {LABEL} INTEGER, "
                   f"{LABELLED_AT} DOUBLE PRECISION)")  # SQLite reads DOUBLE PRECISION as REAL
        if self._has_column(db, "labels", LABELLED_AT):
            return
        try:  # PostgreSQL: IF NOT EXISTS, for a migration that another process finished while this one waited
            db.execute(f"ALTER TABLE labels ADD COLUMN {'IF NOT EXISTS ' if self.postgres else ''}"
                       f"{LABELLED_AT} DOUBLE PRECISION")
        except sqlite3.OperationalError:
            if self._has_column(db, "labels", LABELLED_AT):  # another process migrated it first
                return
            raise
        db.execute(f"UPDATE labels SET {LABELLED_AT} = {self.p} WHERE {LABELLED_AT} IS NULL",  # noqa: S608
                   (time.time(),))

    def _has_column(self, db: Any, table: str, column: str) -> bool:
        if self.postgres:
            return db.execute("SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = %s "
                              "AND NOT attisdropped", (table, column)).fetchone() is not None
        return any(row[1] == column for row in db.execute(f"PRAGMA table_info({table})"))
