"""Retraining guardrails: the parts that need no server. The guardrails themselves run on both real stores
in tests/integration/test_retrain_state.py."""

import sqlite3
import time

import pytest

from monitoring.retrain import Heartbeat, SqliteRetrainState, TriggerPolicy, window_key

pytestmark = pytest.mark.unit


def test_the_key_names_a_set_of_windows():
    assert window_key(["w2", "w1"]) == window_key(["w1", "w2"]) != window_key(["w1", "w3"])


@pytest.mark.parametrize("bad", [{"lease_s": 0}, {"max_attempts": 0}])
def test_a_policy_needs_a_lease_and_an_attempt(bad):
    with pytest.raises(ValueError, match="lease_s"):
        TriggerPolicy(**bad)


def test_a_state_file_of_the_earlier_layout_is_adopted(tmp_path):
    path = tmp_path / "retrain.db"
    with sqlite3.connect(path) as db:
        db.executescript("""
            CREATE TABLE windows (id TEXT PRIMARY KEY, ts REAL, signal INTEGER, reason TEXT);
            CREATE TABLE retrainings (key TEXT PRIMARY KEY, started REAL, finished REAL, status TEXT, detail TEXT);
        """)
        db.executemany("INSERT INTO windows VALUES (?, ?, ?, ?)", [("w1", 1.0, 1, "drift"), ("w2", 2.0, 1, "drift")])
        db.execute("INSERT INTO retrainings VALUES (?, 1.0, NULL, 'running', '')", (window_key(["w1", "w2"]),))
    db.close()
    state = SqliteRetrainState(path, lambda: 10.0)
    assert [r[3] for r in state.retrainings()] == ["abandoned"]  # a run of the old layout never finished
    decision = state.claim(TriggerPolicy(k=2, n=3, cooldown_s=0))
    assert decision.start and decision.key == window_key(["w1", "w2"])  # its windows came along, and are retried
    with sqlite3.connect(path) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    db.close()
    assert tables == {"retrain_windows", "retrain_runs"}
    SqliteRetrainState(path)  # opening again changes nothing


class Clock:
    def __init__(self):
        self.now = 1_000.0

    def __call__(self):
        return self.now


def test_the_heartbeat_stops_when_its_claim_was_taken_over(tmp_path):
    clock = Clock()
    state = SqliteRetrainState(tmp_path / "retrain.db", clock)
    for w in ("w1", "w2"):
        state.record_window(w, True)
    policy = TriggerPolicy(k=2, n=3, lease_s=0.15)
    first = state.claim(policy)
    clock.now += 1  # expired before its first beat: the next claim takes over
    assert state.claim(policy).start
    with Heartbeat(state, first.attempt, policy.lease_s) as beat:
        deadline = time.monotonic() + 10
        while not beat.lost and time.monotonic() < deadline:
            time.sleep(0.05)
    assert beat.lost
