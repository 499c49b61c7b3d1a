"""The inference log: every prediction, recorded durably off the hot path.

Requests put records on an in-memory queue (no I/O on the request path); one writer thread moves them to
the sink in batches, one transaction each, as soon as they are queued (no timer: an idle writer takes the
first record at once, a busy one takes everything that arrived during its last write). ``close()`` drains
the queue; a record that arrives after it (a request still in flight during shutdown) is written
synchronously, so a SIGTERM loses none.

The queue holds at most ``max_rows`` records, counted from when a request hands them over until their
batch is committed (the batch being written or retried included). A record beyond that is dropped and
counted (``dropped``), never blocking a request. So a SIGKILL, or any crash, loses at most ``max_rows``
answered predictions that were not counted as dropped: 10,000 by default (``driftloop serve
--log-queue``). A committed record survives a SIGKILL (SQLite in WAL mode, PostgreSQL).
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
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
    # Errors that say "the store is away" (a restart, a lock, a dropped connection): the batch is retried.
    # Any other error is the batch's own (a value the store refuses): that batch alone is dropped.
    transient: tuple[type[Exception], ...]

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

    transient = (sqlite3.OperationalError,)  # "database is locked", a full or unreachable disk

    def write(self, records: Sequence[Record]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(self._insert, records)
                self._db.execute("COMMIT")
            except BaseException:
                # never leave the connection inside a failed transaction: every later write would fail too
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresSink:
    """Cluster profile: the ``predictions`` table in PostgreSQL (the same database as the Feast registry)."""

    def __init__(self, dsn: str, connect_timeout_s: int = 10) -> None:
        import psycopg

        self._dsn, self._timeout = dsn, connect_timeout_s
        self.transient = (psycopg.OperationalError, psycopg.InterfaceError)
        self._insert = f"INSERT INTO predictions VALUES ({', '.join(['%s'] * len(COLUMNS))})"  # noqa: S608
        self._lock = threading.Lock()
        self._db = self._connect()

    def _connect(self):
        import psycopg

        db = psycopg.connect(self._dsn, connect_timeout=self._timeout, autocommit=True)
        # On the cluster the table's owner made it before the first champion (the bootstrap, as role
        # driftloop); the predictor's role may only insert into it, and PostgreSQL refuses it any DDL, even
        # an IF NOT EXISTS whose table exists.
        if db.execute("SELECT to_regclass('predictions')").fetchone()[0] is None:
            create_postgres_table(db)
        return db

    def write(self, records: Sequence[Record]) -> None:
        import psycopg

        with self._lock:
            if self._db.closed or self._db.broken:  # the server restarted or the network dropped: reconnect
                self._db = self._connect()
            try:
                with self._db.transaction(), self._db.cursor() as cursor:
                    cursor.executemany(self._insert, records)
            except (psycopg.DataError, psycopg.IntegrityError, TypeError, ValueError):
                raise  # the batch's own fault: the connection is fine
            except Exception as error:
                # Whatever state a failure mid-restart leaves the connection in (a real cluster showed states
                # psycopg does not mark broken), the next write starts on a fresh one, and this one is retried.
                self._db.close()
                raise psycopg.OperationalError(f"writing to PostgreSQL failed: {error!r}") from error

    def close(self) -> None:
        with self._lock:
            self._db.close()


def create_postgres_table(db) -> None:
    """The ``predictions`` table and its time index in PostgreSQL, by a role that may create them."""
    types = ", ".join(f"{c} {'TEXT' if c in TEXT_COLUMNS else 'DOUBLE PRECISION'}" for c in COLUMNS)
    db.execute(f"CREATE TABLE IF NOT EXISTS predictions ({types})")
    db.execute("CREATE INDEX IF NOT EXISTS predictions_ts ON predictions (ts)")


def sink_for(settings) -> Sink:
    """SQLite in the state dir (local profile) or PostgreSQL (cluster profile)."""
    if settings.profile == "cluster":
        return PostgresSink(settings.postgres_dsn)
    return SqliteSink(settings.inference_log_path)


class InferenceLog:
    """Records go to a bounded queue (never blocking a request); one thread writes them in batches. While the
    store is away (``sink.transient`` errors) a batch is retried with backoff, for up to ``retry_s``, as the
    queue keeps taking records up to ``max_rows``; a batch the store refuses for its contents is dropped alone
    and counted. At most ``max_rows`` records are unwritten at any time: what a SIGKILL can lose."""

    def __init__(self, sink: Sink, max_rows: int = 10_000, batch: int = 1_000, retry_s: float = 300.0) -> None:
        self._sink = sink
        self._retry_s = retry_s
        self.healthy = True  # the last write succeeded (readiness and /metrics show it)
        self.max_rows = max_rows
        self._queue: queue.SimpleQueue[list[Record] | None] = queue.SimpleQueue()
        self._pending = 0  # records handed over and not yet committed or dropped
        self._batch = batch
        self._closed = False
        self._gate = threading.Lock()  # orders "closed" against puts; guards the counts
        self._sink_lock = threading.Lock()
        self.dropped = 0
        self.written = 0
        self._thread = threading.Thread(target=self._run, name="inference-log", daemon=True)

    def start(self) -> InferenceLog:
        self._thread.start()
        return self

    def depth(self) -> int:
        """Records answered but not yet written (what a SIGKILL would lose now)."""
        return self._pending

    def record(self, records: list[Record]) -> None:
        """Hand records to the writer; never blocks (drops and counts beyond ``max_rows`` unwritten)."""
        with self._gate:
            if not self._closed:
                if self._pending + len(records) > self.max_rows:
                    self.dropped += len(records)
                else:
                    self._pending += len(records)
                    self._queue.put(records)
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
                    self._flush(batch)
                    return
                batch.extend(more)
            self._flush(batch)

    def _flush(self, batch: list[Record]) -> None:
        self._write(batch)
        with self._gate:
            self._pending -= len(batch)

    def _drop(self, n: int) -> None:
        with self._gate:
            self.dropped += n

    def _write(self, batch: list[Record]) -> None:
        started, delay = time.monotonic(), 0.2
        while True:
            try:
                with self._sink_lock:
                    self._sink.write(batch)
                    self.written += len(batch)
                if not self.healthy:
                    log.warning("inference log: writing again after %.0f s", time.monotonic() - started)
                self.healthy = True
                return
            except self._sink.transient as error:
                # shutting down: a few seconds at most, the pod's grace period is short
                budget = min(self._retry_s, 10.0) if self._closed else self._retry_s
                if self.healthy:
                    log.warning("inference log: the store is away (%s); retrying", type(error).__name__)
                self.healthy = False
                if time.monotonic() - started + delay > budget:
                    log.error("inference log: dropped %d records after %.0f s of retries", len(batch),
                              time.monotonic() - started)
                    self._drop(len(batch))
                    return
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
            except Exception:  # this batch's own fault (a value the store refuses): drop it alone, go on
                log.exception("inference log: could not write %d records", len(batch))
                self._drop(len(batch))
                return

    def close(self, timeout: float = 30.0) -> None:
        """Drain what is queued, then switch to synchronous writes; idempotent."""
        with self._gate:
            if self._closed:
                return
            self._closed = True
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)
