"""The retraining guardrails on both real stores (SQLite file, PostgreSQL server), the same cases on each:
k of n windows, cooldown, idempotency, single flight under concurrent claims, the alert storm, and the lease
(a killed worker's claim is taken over and its windows retried; a live worker's claim is renewed)."""

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from driftloop.settings import Settings
from monitoring.retrain import (
    PostgresRetrainState,
    RetrainState,
    SqliteRetrainState,
    TriggerPolicy,
    maybe_retrain,
    state_for,
    window_key,
)
from tests.helpers import create_database

pytestmark = pytest.mark.integration

POLICY = TriggerPolicy(k=2, n=3, cooldown_s=600, lease_s=60)

# Builds the state in a child process from the same location string the tests use.
OPEN = """
import sys, time
from pathlib import Path
from monitoring.retrain import PostgresRetrainState, SqliteRetrainState, TriggerPolicy, maybe_retrain
where = sys.argv[1]
state = PostgresRetrainState(where) if where.startswith("postgresql://") else SqliteRetrainState(Path(where))
"""


class Clock:
    def __init__(self):
        self.now = 1_000.0

    def __call__(self):
        return self.now


def open_state(where: str, clock=None) -> RetrainState:
    if where.startswith("postgresql://"):
        return PostgresRetrainState(where, clock)
    return SqliteRetrainState(Path(where), clock)


@pytest.fixture(params=["sqlite", "postgres"])
def where(request, tmp_path) -> str:
    """Where a fresh, empty state lives: a SQLite file, or a new database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "monitor" / "retrain.db")
    return create_database(request.getfixturevalue("postgres_dsn"), f"retrain_{uuid.uuid4().hex[:12]}")


def statuses(state: RetrainState) -> list[str]:
    return [r[3] for r in state.retrainings()]



def two_signals(where):
    """A fresh state on a fake clock with a signal in two windows: enough, under POLICY, to retrain."""
    clock = Clock()
    state = open_state(where, clock)
    for w in ("w1", "w2"):
        state.record_window(w, True)
    return clock, state

def test_k_of_n_windows(where):
    state = open_state(where, Clock())
    state.record_window("w1", True)
    assert state.claim(POLICY).outcome == "too_few_signals"
    state.record_window("w2", False)
    assert "1 of the last 2" in state.claim(POLICY).reason
    state.record_window("w2", True)  # the same window again: stored once, its first verdict stands
    assert "1 of the last 2" in state.claim(POLICY).reason
    state.record_window("w3", True)
    decision = state.claim(POLICY)
    assert decision.start and decision.key == window_key(["w3", "w1"])


def test_only_the_champions_own_windows_count(where):
    """Signals of a replaced champion never retrain its successor: the monitor scopes by version."""
    state = open_state(where, Clock())
    for w in ("1:a", "1:b"):
        state.record_window(w, True)
    state.record_window("2:c", False)
    decision = state.claim(POLICY, scope="2:")
    assert not decision.start and decision.outcome == "too_few_signals", decision
    state.record_window("2:d", True)
    assert not state.claim(POLICY, scope="2:").start  # one of v2's windows signals: k = 2 needs two
    state.record_window("2:e", True)
    decision = state.claim(POLICY, scope="2:")
    assert decision.start and decision.key == window_key(["2:d", "2:e"]), decision


def test_cooldown_and_single_flight(where):
    clock, state = two_signals(where)
    first = state.claim(POLICY)
    assert first.start
    state.record_window("w3", True)  # new windows, new key: but one is already running
    running = state.claim(POLICY)
    assert not running.start and running.outcome == "running" and "still running" in running.reason
    clock.now += 30
    state.finish(first.attempt, "done", "v2")
    cooldown = state.claim(POLICY)
    assert cooldown.outcome == "cooldown" and "570 s left" in cooldown.reason
    clock.now += 600
    assert state.claim(POLICY).start


def test_the_same_windows_never_retrain_twice(where):
    clock, state = two_signals(where)
    runs = []
    assert maybe_retrain(state, POLICY, lambda: runs.append(1) or "v2").start
    clock.now += 10_000
    again = maybe_retrain(state, POLICY, lambda: runs.append(1) or "v3")
    assert not again.start and again.outcome == "already_done"
    assert runs == [1]
    assert statuses(state) == ["done"]


def test_a_failed_retraining_is_recorded_and_uses_up_its_windows(where):
    clock, state = two_signals(where)

    def boom():
        raise RuntimeError("the flow run crashed")

    with pytest.raises(RuntimeError):
        maybe_retrain(state, POLICY, boom)
    assert statuses(state) == ["failed"] and "crashed" in state.retrainings()[0][4]
    clock.now += 10_000
    assert state.claim(POLICY).outcome == "already_done"  # it ran to its end: a failure is an outcome


def test_an_expired_claim_is_taken_over_and_its_windows_retried(where):
    clock, state = two_signals(where)
    killed = state.claim(POLICY)  # its worker dies: nothing renews or finishes it
    assert killed.start
    clock.now += 59
    assert state.claim(POLICY).outcome == "running"
    clock.now += 2  # the lease ran out; the killed run started no cooldown
    retry = state.claim(POLICY)
    assert retry.start and retry.key == killed.key and "attempt 2" in retry.reason
    assert statuses(state) == ["abandoned", "running"]
    assert not state.renew(killed.attempt, 60)  # the dead worker, were it only stalled, finds its claim gone
    assert state.renew(retry.attempt, 60)


def test_an_interrupted_retraining_frees_the_claim_and_is_retried_at_once(where):
    clock, state = two_signals(where)

    def stopped():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        maybe_retrain(state, POLICY, stopped)
    assert statuses(state) == ["interrupted"]
    clock.now += 1  # well within the lease and the cooldown
    assert maybe_retrain(state, POLICY, lambda: "v2").start
    assert statuses(state) == ["interrupted", "done"]


def test_windows_killed_max_attempts_times_are_given_up(where):
    clock = Clock()
    state = open_state(where, clock)
    policy = TriggerPolicy(k=2, n=3, cooldown_s=600, lease_s=60, max_attempts=2)
    for w in ("w1", "w2"):
        state.record_window(w, True)
    for _ in range(2):
        assert state.claim(policy).start
        clock.now += 61
    given_up = state.claim(policy)
    assert given_up.outcome == "given_up" and "2 attempts" in given_up.reason
    state.record_window("w3", True)  # new windows: a new key, a fresh start
    assert state.claim(policy).start


def test_concurrent_claims_exactly_one_wins(where):
    open_state(where).record_window("w1", True)
    open_state(where).record_window("w2", True)
    policy = TriggerPolicy(k=2, n=3)
    procs = [subprocess.Popen([sys.executable, "-c", OPEN + CLAIM, where], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(6)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "READY"
    threads, won, barrier = 16, [], threading.Barrier(16 + 1)

    def claim():
        state = open_state(where)
        barrier.wait()
        won.append(state.claim(policy).start)

    workers = [threading.Thread(target=claim) for _ in range(threads)]
    for t in workers:
        t.start()
    for proc in procs:  # processes too: the claim is taken in the database, not in memory
        proc.stdin.write("go\n")
        proc.stdin.flush()
    barrier.wait()
    for t in workers:
        t.join()
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert len(won) == threads and all(o.strip() in ("WON", "LOST") for o in outputs)  # every claim answered
    assert sum(won) + outputs.count("WON\n") == 1
    assert statuses(open_state(where)) == ["running"]


CLAIM = """
print("READY", flush=True)
sys.stdin.readline()
print("WON" if state.claim(TriggerPolicy(k=2, n=3)).start else "LOST")
"""


STORM = """
decision = maybe_retrain(state, TriggerPolicy(k=2, n=3), lambda: time.sleep(0.5) or "ran")
print("STARTED" if decision.start else "SKIPPED")
"""


def test_a_storm_of_100_alerts_starts_exactly_one_retraining(where):
    state = open_state(where)
    for w in ("w1", "w2", "w3"):
        state.record_window(w, True)
    policy = TriggerPolicy(k=2, n=3)

    def alert(_):
        return maybe_retrain(open_state(where), policy, lambda: time.sleep(0.5) or "ran").start

    procs = [subprocess.Popen([sys.executable, "-c", OPEN + STORM, where], stdout=subprocess.PIPE, text=True)
             for _ in range(10)]
    # 90 alerts from 30 threads at a time: PostgreSQL's 100 connections are shared with the session's servers.
    with ThreadPoolExecutor(30) as pool:
        started = sum(pool.map(alert, range(90)))
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(o.strip() in ("STARTED", "SKIPPED") for o in outputs)
    assert started + outputs.count("STARTED\n") == 1
    assert statuses(state) == ["done"]


WORKER = """
def run():
    print("RUNNING", flush=True)
    time.sleep(600)
    return "never"
maybe_retrain(state, TriggerPolicy(k=2, n=3, lease_s=float(sys.argv[2])), run)
"""


def test_a_killed_worker_is_taken_over_after_its_lease_and_the_windows_retried(where):
    lease = 2.0
    policy = TriggerPolicy(k=2, n=3, cooldown_s=3_600, lease_s=lease)
    state = open_state(where)
    for w in ("w1", "w2"):
        state.record_window(w, True)
    worker = subprocess.Popen([sys.executable, "-c", OPEN + WORKER, where, str(lease)], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        assert worker.stdout.readline().strip() == "RUNNING"
        time.sleep(lease * 1.5)  # the heartbeat keeps it past its first lease
        assert state.claim(policy).outcome == "running"
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
    killed_at = time.monotonic()
    while not (decision := state.claim(policy)).start:
        assert decision.outcome == "running", decision.reason
        assert time.monotonic() - killed_at < lease + 5, "the dead worker's claim was not taken over"
        time.sleep(0.1)
    assert decision.key == window_key(["w1", "w2"])  # the same windows, retried despite the cooldown
    assert statuses(state) == ["abandoned", "running"]
    state.finish(decision.attempt, "done", "v2")
    assert state.claim(policy).outcome == "already_done"


def test_renewal_keeps_a_long_running_claim(where):
    lease = 2.0
    policy = TriggerPolicy(k=2, n=3, lease_s=lease)
    state = open_state(where)
    for w in ("w1", "w2"):
        state.record_window(w, True)
    started, results = threading.Event(), []

    def run():
        started.set()
        time.sleep(lease * 3)
        return "v2"

    worker = threading.Thread(target=lambda: results.append(maybe_retrain(open_state(where), policy, run)))
    worker.start()
    assert started.wait(30)
    outcomes = set()
    while worker.is_alive():
        outcomes.add(state.claim(policy).outcome)
        time.sleep(0.2)
    worker.join()
    assert outcomes <= {"running", "already_done"} and "running" in outcomes  # never taken over
    assert results[0].start and statuses(state) == ["done"]


def test_tables_are_created_once_by_concurrent_monitors(where):
    errors = []

    def create():
        try:
            open_state(where)
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert open_state(where).retrainings() == []


def test_the_profile_picks_the_store(postgres_dsn, tmp_path):
    local = state_for(Settings(state_dir=tmp_path))
    assert isinstance(local, SqliteRetrainState) and local.path == tmp_path / "monitor" / "retrain.db"
    dsn = create_database(postgres_dsn, "retrain_profile")
    cluster = Settings(profile="cluster", mlflow_tracking_uri="http://mlflow:5000", data_dir=str(tmp_path),
                       postgres_dsn=dsn, redis_url="127.0.0.1:6379", state_dir=tmp_path / "shared")
    state = state_for(cluster)
    assert isinstance(state, PostgresRetrainState)
    state.record_window("w1", True, "drift")
    with psycopg.connect(dsn) as db:
        assert db.execute("SELECT id, signal, reason FROM retrain_windows").fetchall() == [("w1", 1, "drift")]
    assert not (tmp_path / "shared").exists()  # nothing on the shared volume
