"""Reading the inference log and keeping labels: SQLite (local profile) or PostgreSQL (cluster profile).

The server writes ``predictions`` (``serving.inference_log``); the monitor reads windows of it and keeps
``labels`` beside it. The SQL is the common subset of both, with the driver's placeholder.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import pandas as pd

from driftloop.contracts import LABEL, TRANSACTION_ID
from driftloop.settings import Settings

VERSION_INDEX = "predictions_model_version_ts"


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

    def frame(self, sql: str, params: Iterable = ()) -> pd.DataFrame:
        """Run a query (``{p}`` marks each parameter); an empty frame when there is no log yet."""
        with self.connect() as db:
            if not self.has(db, "predictions"):
                return pd.DataFrame()
            self._labels_table(db)
            cursor = db.execute(sql.format(p=self.p), tuple(params))
            return pd.DataFrame(cursor.fetchall(), columns=[d[0] for d in cursor.description])

    def window(self, model_name: str, version: str, rows: int) -> pd.DataFrame:
        """The newest ``rows`` predictions of one model version, with their label (null until it arrives).
        An index on (model, version, ts) makes this one range scan however long the log grows; the first
        call creates it."""
        with self.connect() as db:
            if not self.has(db, "predictions"):
                return pd.DataFrame()
            self._labels_table(db)
            if not self.has(db, VERSION_INDEX):  # looked up first: PostgreSQL locks the table for CREATE INDEX
                db.execute(f"CREATE INDEX IF NOT EXISTS {VERSION_INDEX} ON predictions (model_name, model_version, ts)")
            cursor = db.execute(
                f"SELECT p.*, l.{LABEL} FROM predictions p LEFT JOIN labels l ON p.{TRANSACTION_ID} = "  # noqa: S608
                f"l.{TRANSACTION_ID} WHERE p.model_name = {self.p} AND p.model_version = {self.p} "
                f"ORDER BY p.ts DESC LIMIT {self.p}", (model_name, version, rows))
            return pd.DataFrame(cursor.fetchall(), columns=[d[0] for d in cursor.description])

    @staticmethod
    def _labels_table(db: Any) -> None:
        db.execute(f"CREATE TABLE IF NOT EXISTS labels ({TRANSACTION_ID} TEXT PRIMARY KEY, {LABEL} INTEGER)")
