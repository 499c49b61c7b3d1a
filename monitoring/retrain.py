"""Retraining trigger with guardrails.

A retraining starts only when:
- a signal (drift, or a performance drop) was seen in at least ``k`` of the last ``n`` windows;
- the last retraining started more than ``cooldown_s`` ago;
- no other retraining is running (single flight; a run's claim expires after ``lease_s``, so one that
  was killed midway does not block the next forever);
- its idempotency key was never used: alerts about the same windows map to the same key, so a storm of
  them starts one retraining.

State lives in a small SQLite file; claims are taken inside ``BEGIN IMMEDIATE`` transactions, so
concurrent processes agree. The retraining itself is injected (``run``): the Prefect flow locally.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TriggerPolicy:
    k: int = 2  # windows with a signal ...
    n: int = 3  # ... among the last n
    cooldown_s: float = 3_600.0
    lease_s: float = 3_600.0  # a running retraining older than this is considered dead


@dataclass(frozen=True)
class Decision:
    start: bool
    reason: str
    key: str | None = None
    outcome: str = "started"  # started | too_few_signals | already_done | running | cooldown


SCHEMA = """
CREATE TABLE IF NOT EXISTS windows (id TEXT PRIMARY KEY, ts REAL, signal INTEGER, reason TEXT);
CREATE TABLE IF NOT EXISTS retrainings (key TEXT PRIMARY KEY, started REAL, finished REAL, status TEXT,
                                        detail TEXT);
"""


class RetrainState:
    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._clock = clock
        with self._connect() as db:
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def record_window(self, window_id: str, signal: bool, reason: str = "") -> None:
        """Remember a checked window (idempotent: the same window id is stored once)."""
        with self._connect() as db:
            db.execute("INSERT OR IGNORE INTO windows VALUES (?, ?, ?, ?)",
                       (window_id, self._clock(), int(signal), reason))

    def claim(self, policy: TriggerPolicy) -> Decision:
        """Decide, and if the answer is yes, take the single-flight claim in the same transaction."""
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            recent = db.execute("SELECT id, signal FROM windows ORDER BY ts DESC, id DESC LIMIT ?",
                                (policy.n,)).fetchall()
            signals = [w for w, s in recent if s]
            if len(signals) < policy.k:
                return self._done(db, Decision(False, f"signal in {len(signals)} of the last {len(recent)} "
                                                      f"windows; {policy.k} of {policy.n} needed",
                                               outcome="too_few_signals"))
            key = hashlib.sha256(",".join(sorted(signals)).encode()).hexdigest()[:16]
            now = self._clock()
            if db.execute("SELECT 1 FROM retrainings WHERE key = ?", (key,)).fetchone():
                return self._done(db, Decision(False, f"already retrained for these windows (key {key})", key,
                                               "already_done"))
            running = db.execute("SELECT key FROM retrainings WHERE status = 'running' AND started > ?",
                                 (now - policy.lease_s,)).fetchone()
            if running:
                return self._done(db, Decision(False, f"retraining {running[0]} is still running", key, "running"))
            last = db.execute("SELECT MAX(started) FROM retrainings").fetchone()[0]
            if last is not None and now - last < policy.cooldown_s:
                wait = policy.cooldown_s - (now - last)
                return self._done(db, Decision(False, f"cooldown: {wait:.0f} s left", key, "cooldown"))
            db.execute("INSERT INTO retrainings VALUES (?, ?, NULL, 'running', '')", (key, now))
            return self._done(db, Decision(True, f"signal in {len(signals)} of the last {len(recent)} windows",
                                           key))
        except BaseException:
            db.execute("ROLLBACK")
            db.close()
            raise

    @staticmethod
    def _done(db: sqlite3.Connection, decision: Decision) -> Decision:
        db.execute("COMMIT")
        db.close()
        return decision

    def finish(self, key: str, status: str, detail: str = "") -> None:
        with self._connect() as db:
            db.execute("UPDATE retrainings SET finished = ?, status = ?, detail = ? WHERE key = ?",
                       (self._clock(), status, detail[:2000], key))

    def retrainings(self) -> list[tuple]:
        with self._connect() as db:
            return db.execute("SELECT key, started, finished, status, detail FROM retrainings "
                              "ORDER BY started").fetchall()


def maybe_retrain(state: RetrainState, policy: TriggerPolicy, run: Callable[[], str]) -> Decision:
    """Claim and run one retraining if the guardrails allow it; record how it ended."""
    decision = state.claim(policy)
    if not decision.start:
        return decision
    try:
        detail = run()
    except BaseException as error:
        state.finish(decision.key, "failed", f"{type(error).__name__}: {error}")
        raise
    state.finish(decision.key, "done", detail)
    return Decision(True, f"{decision.reason}; {detail}", decision.key)
