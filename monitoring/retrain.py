"""Retraining trigger with guardrails.

A retraining starts only when:
- a signal (drift, or a performance drop) was seen in at least ``k`` of the last ``n`` windows;
- the last retraining that ran to its end started more than ``cooldown_s`` ago;
- no other retraining holds the claim (single flight). The claim is a lease of ``lease_s`` seconds that a
  heartbeat thread renews while the retraining runs: when its worker dies the lease runs out and the next
  check takes the claim over;
- its idempotency key (the windows with a signal) was not used by a run that finished, done or failed:
  alerts about the same windows map to the same key, so a storm of them starts one retraining. A run that
  never finished (killed, so its lease expired; or interrupted) leaves its windows to be retried, at most
  ``max_attempts`` times in all.

The state has one interface and two stores, picked by ``state_for`` as the inference log picks its sink:
SQLite (WAL; claims in ``BEGIN IMMEDIATE``) in the state dir for the local profile, PostgreSQL (claims under a
table lock) for the cluster profile, whose state dir is a shared volume where SQLite is unsafe. The SQL is the
common subset of both. The retraining itself is injected (``run``): the Prefect flow locally.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from driftloop.settings import Settings

log = logging.getLogger(__name__)

# How a run ended. Only a finished run (done or failed) uses up its windows' key and starts the cooldown.
RUNNING, DONE, FAILED = "running", "done", "failed"
ABANDONED = "abandoned"  # its lease expired: the worker was killed or stalled; the windows are retried
INTERRUPTED = "interrupted"  # stopped by KeyboardInterrupt or SystemExit; the windows are retried


@dataclass(frozen=True)
class TriggerPolicy:
    k: int = 2  # windows with a signal ...
    n: int = 3  # ... among the last n
    cooldown_s: float = 3_600.0  # between the starts of retrainings that ran to their end
    lease_s: float = 60.0  # a claim not renewed for this long belongs to a dead worker; renewed every lease_s / 3
    max_attempts: int = 3  # a set of windows whose retraining is killed this often is given up (an OOM loop)

    def __post_init__(self) -> None:
        if self.lease_s <= 0 or self.max_attempts < 1:
            raise ValueError("TriggerPolicy needs lease_s > 0 and max_attempts >= 1")


@dataclass(frozen=True)
class Decision:
    start: bool
    reason: str
    key: str | None = None
    outcome: str = "started"  # started | too_few_signals | already_done | running | cooldown | given_up
    attempt: str | None = None  # the claim's id, when started


def window_key(windows: Sequence[str]) -> str:
    """The idempotency key of a set of windows (order does not matter)."""
    return hashlib.sha256(",".join(sorted(windows)).encode()).hexdigest()[:16]


def schema(real: str) -> list[str]:
    """The tables, created idempotently; ``real`` is the store's double-precision type."""
    return [
        f"CREATE TABLE IF NOT EXISTS retrain_windows (id TEXT PRIMARY KEY, ts {real} NOT NULL, "
        "signal INTEGER NOT NULL, reason TEXT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS retrain_windows_ts ON retrain_windows (ts)",
        # One row per attempt; ``expires`` is the lease, ``holder`` says which host and process held it.
        f"CREATE TABLE IF NOT EXISTS retrain_runs (id TEXT PRIMARY KEY, key TEXT NOT NULL, started {real} NOT NULL, "
        f"expires {real} NOT NULL, finished {real}, status TEXT NOT NULL, detail TEXT NOT NULL, holder TEXT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS retrain_runs_key ON retrain_runs (key)",
        # The claim's lock already makes claims one at a time; this makes two running rows impossible anyway.
        # Created last: its presence says the whole schema is there.
        "CREATE UNIQUE INDEX IF NOT EXISTS retrain_one_running ON retrain_runs (status) WHERE status = 'running'",
    ]


class RetrainState(ABC):
    """Windows' signals and retraining runs, with the claim. Each call is one short transaction."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock

    @abstractmethod
    def _transaction(self, claim: bool = False) -> AbstractContextManager[Any]:
        """A connection (``execute`` with ``?`` parameters) in one transaction, committed on success;
        ``claim``: serialised against every other claim."""

    def _now(self, db: Any) -> float:
        return self._clock() if self._clock is not None else time.time()

    def record_window(self, window_id: str, signal: bool, reason: str = "") -> None:
        """Remember a checked window (idempotent: the same window id is stored once)."""
        with self._transaction() as db:
            db.execute("INSERT INTO retrain_windows VALUES (?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                       (window_id, self._now(db), int(signal), reason))

    def claim(self, policy: TriggerPolicy, scope: str = "") -> Decision:
        """Decide, and if the answer is yes, take the single-flight claim in the same transaction. ``scope``:
        count only windows whose id starts with it (the monitor passes ``"<version>:"``, so the windows of a
        champion that was replaced never count towards retraining its successor)."""
        with self._transaction(claim=True) as db:
            recent = db.execute("SELECT id, signal FROM retrain_windows WHERE substr(id, 1, ?) = ? "
                                "ORDER BY ts DESC, id DESC LIMIT ?", (len(scope), scope, policy.n)).fetchall()
            signals = [w for w, s in recent if s]
            if len(signals) < policy.k:
                return Decision(False, f"signal in {len(signals)} of the last {len(recent)} windows; "
                                       f"{policy.k} of {policy.n} needed", outcome="too_few_signals")
            key = window_key(signals)
            now = self._now(db)
            db.execute("UPDATE retrain_runs SET status = ?, finished = expires, detail = ? "
                       "WHERE status = ? AND expires <= ?",
                       (ABANDONED, "lease expired: the worker died or stalled", RUNNING, now))
            finished = db.execute("SELECT status FROM retrain_runs WHERE key = ? AND status IN (?, ?)",
                                  (key, DONE, FAILED)).fetchone()
            if finished:
                return Decision(False, f"already retrained for these windows (key {key}, {finished[0]})", key,
                                "already_done")
            running = db.execute("SELECT key, holder, expires FROM retrain_runs WHERE status = ?",
                                 (RUNNING,)).fetchone()
            if running:
                return Decision(False, f"retraining {running[0]} is still running ({running[1]}, lease "
                                       f"{running[2] - now:.0f} s left)", key, "running")
            tried = db.execute("SELECT COUNT(*) FROM retrain_runs WHERE key = ?", (key,)).fetchone()[0]
            if tried >= policy.max_attempts:
                return Decision(False, f"gave up on these windows (key {key}): {tried} attempts were killed or "
                                       "interrupted", key, "given_up")
            last = db.execute("SELECT MAX(started) FROM retrain_runs WHERE status IN (?, ?)",
                              (DONE, FAILED)).fetchone()[0]
            if last is not None and now - last < policy.cooldown_s:
                wait = policy.cooldown_s - (now - last)
                return Decision(False, f"cooldown: {wait:.0f} s left", key, "cooldown")
            attempt = uuid.uuid4().hex
            db.execute("INSERT INTO retrain_runs VALUES (?, ?, ?, ?, NULL, ?, '', ?)",
                       (attempt, key, now, now + policy.lease_s, RUNNING, f"{socket.gethostname()}:{os.getpid()}"))
            retry = f" (attempt {tried + 1}: the last one never finished)" if tried else ""
            return Decision(True, f"signal in {len(signals)} of the last {len(recent)} windows{retry}", key,
                            attempt=attempt)

    def renew(self, attempt: str, lease_s: float) -> bool:
        """Extend a running claim's lease; False when it is no longer running (expired and taken over)."""
        with self._transaction() as db:
            return db.execute("UPDATE retrain_runs SET expires = ? WHERE id = ? AND status = ?",
                              (self._now(db) + lease_s, attempt, RUNNING)).rowcount == 1

    def finish(self, attempt: str, status: str, detail: str = "") -> None:
        """Record how a run ended; this releases the claim."""
        with self._transaction() as db:
            db.execute("UPDATE retrain_runs SET finished = ?, status = ?, detail = ? WHERE id = ?",
                       (self._now(db), status, detail[:2000], attempt))

    def retrainings(self) -> list[tuple]:
        """Every attempt as (key, started, finished, status, detail), oldest first."""
        with self._transaction() as db:
            return [tuple(r) for r in db.execute("SELECT key, started, finished, status, detail FROM retrain_runs "
                                                 "ORDER BY started, id").fetchall()]


class SqliteRetrainState(RetrainState):
    """Local profile: one SQLite file (WAL) in the state dir; every transaction is ``BEGIN IMMEDIATE``."""

    def __init__(self, path: Path, clock: Callable[[], float] | None = None) -> None:
        super().__init__(clock)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        db = sqlite3.connect(path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")  # persistent, and not allowed inside a transaction
        finally:
            db.close()
        with self._transaction() as db:
            for statement in schema("REAL"):
                db.execute(statement)
            _adopt_legacy_tables(db)

    @contextmanager
    def _transaction(self, claim: bool = False) -> Iterator[sqlite3.Connection]:
        # Writers take the lock up front: a deferred transaction that later writes can fail at once
        # with "database is locked" instead of waiting its turn.
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()


def _adopt_legacy_tables(db: sqlite3.Connection) -> None:
    """Move a state file of the earlier layout (``windows``, ``retrainings`` keyed by key) over, once."""
    if not db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'retrainings'").fetchone():
        return
    db.execute("INSERT OR IGNORE INTO retrain_windows SELECT id, ts, signal, COALESCE(reason, '') FROM windows")
    db.execute("INSERT OR IGNORE INTO retrain_runs SELECT 'legacy-' || key, key, started, started, "
               "COALESCE(finished, started), CASE status WHEN 'running' THEN ? ELSE status END, "
               "COALESCE(detail, ''), '' FROM retrainings", (ABANDONED,))
    db.execute("DROP TABLE retrainings")
    db.execute("DROP TABLE windows")


class _Postgres:
    """A psycopg connection that takes the ``?`` placeholders of the shared SQL."""

    def __init__(self, db: Any) -> None:
        self._db = db

    def execute(self, sql: str, params: Sequence = ()) -> Any:
        return self._db.execute(sql.replace("?", "%s"), params)


class PostgresRetrainState(RetrainState):
    """Cluster profile: tables ``retrain_windows`` and ``retrain_runs`` in PostgreSQL (the inference log's
    database). Claims hold ``LOCK TABLE retrain_runs IN EXCLUSIVE MODE``, which readers pass and claims wait
    for. Without an injected clock, time is the database's, so the pods' clocks need not agree."""

    SCHEMA_LOCK = 0x6472_6966_746C_7274  # advisory lock id: concurrent CREATE ... IF NOT EXISTS can still collide

    def __init__(self, dsn: str, clock: Callable[[], float] | None = None, connect_timeout_s: int = 10,
                 lock_timeout_s: int = 30) -> None:
        super().__init__(clock)
        self._dsn = dsn
        self._connect_timeout_s = connect_timeout_s
        self._lock_timeout_s = lock_timeout_s
        with self._transaction() as db:
            if db.execute("SELECT to_regclass('retrain_one_running')").fetchone()[0] is None:
                db.execute("SELECT pg_advisory_xact_lock(?)", (self.SCHEMA_LOCK,))
                for statement in schema("DOUBLE PRECISION"):
                    db.execute(statement)

    @contextmanager
    def _transaction(self, claim: bool = False) -> Iterator[_Postgres]:
        import psycopg

        with (psycopg.connect(self._dsn, connect_timeout=self._connect_timeout_s, autocommit=True) as db,
              db.transaction()):
            # Neither a held lock nor a stuck statement may hang the monitor.
            db.execute(f"SET LOCAL lock_timeout = '{int(self._lock_timeout_s)}s'")
            db.execute(f"SET LOCAL statement_timeout = '{int(self._lock_timeout_s) * 2}s'")
            if claim:
                db.execute("LOCK TABLE retrain_runs IN EXCLUSIVE MODE")
            yield _Postgres(db)

    def _now(self, db: Any) -> float:
        if self._clock is not None:
            return self._clock()
        return db.execute("SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8").fetchone()[0]


def state_for(settings: Settings) -> RetrainState:
    """SQLite in the state dir (local profile) or PostgreSQL (cluster profile)."""
    if settings.profile == "cluster":
        return PostgresRetrainState(settings.postgres_dsn or "")
    return SqliteRetrainState(settings.state / "monitor" / "retrain.db")


class Heartbeat:
    """Renews a claim's lease every ``lease_s / 3`` seconds from a daemon thread, while in its ``with``."""

    def __init__(self, state: RetrainState, attempt: str, lease_s: float) -> None:
        self._state, self._attempt, self._lease_s = state, attempt, lease_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="retrain-heartbeat", daemon=True)
        self.lost = False  # the lease ran out and another check took the claim over

    def _beat(self) -> None:
        while not self._stop.wait(self._lease_s / 3):
            try:
                if not self._state.renew(self._attempt, self._lease_s):
                    self.lost = True
                    log.error("retraining %s lost its claim: its lease expired and another check took over",
                              self._attempt)
                    return
            except Exception:  # the store is unreachable for now: try again; the lease says how long we may
                log.warning("could not renew the retraining claim %s", self._attempt, exc_info=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def maybe_retrain(state: RetrainState, policy: TriggerPolicy, run: Callable[[], str], scope: str = "") -> Decision:
    """Claim and run one retraining if the guardrails allow it (counting the windows ``scope`` names),
    renewing the claim while it runs; record how it ended. A killed process records nothing: its lease
    expires and the windows are retried."""
    decision = state.claim(policy, scope)
    if not decision.start or decision.attempt is None:
        return decision
    try:
        with Heartbeat(state, decision.attempt, policy.lease_s):
            detail = run()
    except Exception as error:
        state.finish(decision.attempt, FAILED, f"{type(error).__name__}: {error}")
        raise
    except BaseException as error:  # KeyboardInterrupt, SystemExit: stopped, not failed; free the claim now
        state.finish(decision.attempt, INTERRUPTED, type(error).__name__)
        raise
    state.finish(decision.attempt, DONE, detail)
    return Decision(True, f"{decision.reason}; {detail}", decision.key, attempt=decision.attempt)
