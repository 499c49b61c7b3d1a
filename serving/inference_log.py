"""The inference log: every prediction, recorded durably off the hot path.

Requests put records on a bounded in-memory queue (no I/O on the request path); one writer thread moves
them to the sink in batches, one transaction each. ``close()`` drains the queue; a record that arrives
after it (a request still in flight during shutdown) is written synchronously, so none is lost. If the
queue is full the record is dropped and counted (``dropped``), never blocking a request.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from driftloop.contracts import ENTITY_KEYS, MODEL_FEATURES, TRANSACTION_ID

log = logging.getLogger(__name__)

COLUMNS: tuple[str, ...] = ("request_id", "ts", "model_name", "model_version", TRANSACTION_ID, *ENTITY_KEYS,
                            *MODEL_FEATURES, "score", "entity_found")
TEXT_COLUMNS = {"request_id", "model_name", "model_version", TRANSACTION_ID, "channel", "merchant_category"}
Record = tuple  # values in COLUMNS order


class Sink(Protocol):
    def write(self, records: Sequence[Record]) -> None: ...
    def close(self) -> None: ...


class SqliteSink:
    """Local profile: one SQLite file (WAL) under the state dir; the drift monitor reads it."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        types = ", ".join(f"{c} {'TEXT' if c in TEXT_COLUMNS else 'REAL'}" for c in COLUMNS)
        self._db.execute(f"CREATE TABLE IF NOT EXISTS predictions ({types})")
        self._db.execute("CREATE INDEX IF NOT EXISTS predictions_ts ON predictions (ts)")
        self._insert = f"INSERT INTO predictions VALUES ({', '.join('?' * len(COLUMNS))})"  # noqa: S608 - constant names
        self._lock = threading.Lock()

    def write(self, records: Sequence[Record]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(self._insert, records)
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresSink:
    """Cluster profile: the ``predictions`` table in PostgreSQL (the same database as the Feast registry)."""

    def __init__(self, dsn: str, connect_timeout_s: int = 10) -> None:
        import psycopg

        self._db = psycopg.connect(dsn, connect_timeout=connect_timeout_s, autocommit=True)
        types = ", ".join(f"{c} {'TEXT' if c in TEXT_COLUMNS else 'DOUBLE PRECISION'}" for c in COLUMNS)
        self._db.execute(f"CREATE TABLE IF NOT EXISTS predictions ({types})")
        self._db.execute("CREATE INDEX IF NOT EXISTS predictions_ts ON predictions (ts)")
        self._insert = f"INSERT INTO predictions VALUES ({', '.join(['%s'] * len(COLUMNS))})"  # noqa: S608
        self._lock = threading.Lock()

    def write(self, records: Sequence[Record]) -> None:
        with self._lock, self._db.transaction(), self._db.cursor() as cursor:
            cursor.executemany(self._insert, records)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def sink_for(settings) -> Sink:
    """SQLite in the state dir (local profile) or PostgreSQL (cluster profile)."""
    if settings.profile == "cluster":
        return PostgresSink(settings.postgres_dsn)
    return SqliteSink(settings.inference_log_path)


class InferenceLog:
    def __init__(self, sink: Sink, max_queue: int = 100_000, batch: int = 1_000) -> None:
        self._sink = sink
        self._queue: queue.Queue[list[Record] | None] = queue.Queue(maxsize=max_queue)
        self._batch = batch
        self._closed = False
        self._gate = threading.Lock()  # orders "closed" against puts: every put lands before the sentinel
        self._sink_lock = threading.Lock()
        self.dropped = 0
        self.written = 0
        self._thread = threading.Thread(target=self._run, name="inference-log", daemon=True)

    def start(self) -> InferenceLog:
        self._thread.start()
        return self

    def depth(self) -> int:
        return self._queue.qsize()

    def record(self, records: list[Record]) -> None:
        """Hand records to the writer; never blocks (drops and counts when the queue is full)."""
        with self._gate:
            if not self._closed:
                try:
                    self._queue.put_nowait(records)
                except queue.Full:
                    self.dropped += len(records)
                return
        self._write(records)  # shutting down: write now rather than lose it

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = list(item)
            while len(batch) < self._batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._write(batch)
                    return
                batch.extend(more)
            self._write(batch)

    def _write(self, batch: list[Record]) -> None:
        try:
            with self._sink_lock:
                self._sink.write(batch)
                self.written += len(batch)
        except Exception:  # a broken sink must not kill the writer: count and go on
            log.exception("inference log: could not write %d records", len(batch))
            self.dropped += len(batch)

    def close(self, timeout: float = 30.0) -> None:
        """Drain what is queued, then switch to synchronous writes; idempotent."""
        with self._gate:
            if self._closed:
                return
            self._closed = True
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)
