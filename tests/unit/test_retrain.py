"""Retraining guardrails: k of n windows, cooldown, single flight, idempotency, and the alert storm."""

import subprocess
import sys
import threading

import pytest

from monitoring.retrain import RetrainState, TriggerPolicy, maybe_retrain

pytestmark = pytest.mark.unit

POLICY = TriggerPolicy(k=2, n=3, cooldown_s=600, lease_s=60)


class Clock:
    def __init__(self):
        self.now = 1_000.0

    def __call__(self):
        return self.now


def test_k_of_n_windows(tmp_path):
    state = RetrainState(tmp_path / "m.db", Clock())
    state.record_window("w1", True)
    assert not state.claim(POLICY).start
    state.record_window("w2", False)
    assert "1 of the last 2" in state.claim(POLICY).reason
    state.record_window("w3", True)
    assert state.claim(POLICY).start


def test_cooldown_single_flight_and_lease(tmp_path):
    clock = Clock()
    state = RetrainState(tmp_path / "m.db", clock)
    for w in ("w1", "w2"):
        state.record_window(w, True)
    first = state.claim(POLICY)
    assert first.start
    state.record_window("w3", True)  # new windows, new key: but one is already running
    assert "still running" in state.claim(POLICY).reason
    clock.now += 61  # the running one's lease expired (killed midway); now the cooldown holds
    assert "cooldown" in state.claim(POLICY).reason
    clock.now += 600
    assert state.claim(POLICY).start


def test_the_same_windows_never_retrain_twice(tmp_path):
    clock = Clock()
    state = RetrainState(tmp_path / "m.db", clock)
    for w in ("w1", "w2"):
        state.record_window(w, True)
    runs = []
    assert maybe_retrain(state, POLICY, lambda: runs.append(1) or "v2").start
    clock.now += 10_000
    again = maybe_retrain(state, POLICY, lambda: runs.append(1) or "v3")
    assert not again.start and "already retrained" in again.reason
    assert runs == [1]
    assert [r[3] for r in state.retrainings()] == ["done"]


def test_a_failed_retraining_is_recorded(tmp_path):
    state = RetrainState(tmp_path / "m.db", Clock())
    for w in ("w1", "w2"):
        state.record_window(w, True)

    def boom():
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        maybe_retrain(state, POLICY, boom)
    assert state.retrainings()[0][3] == "failed"


STORM = """
import sys, time
from pathlib import Path
from monitoring.retrain import RetrainState, TriggerPolicy, maybe_retrain
state = RetrainState(Path(sys.argv[1]))
decision = maybe_retrain(state, TriggerPolicy(k=2, n=3), lambda: time.sleep(0.5) or "ran")
print("STARTED" if decision.start else "SKIPPED")
"""


def test_a_storm_of_100_alerts_starts_exactly_one_retraining(tmp_path):
    path = tmp_path / "m.db"
    state = RetrainState(path)
    for w in ("w1", "w2", "w3"):
        state.record_window(w, True)
    started = []
    policy = TriggerPolicy(k=2, n=3)

    def alert():
        decision = maybe_retrain(RetrainState(path), policy, lambda: "ran")
        if decision.start:
            started.append(decision.key)

    threads = [threading.Thread(target=alert) for _ in range(90)]
    procs = [subprocess.Popen([sys.executable, "-c", STORM, str(path)], stdout=subprocess.PIPE, text=True)
             for _ in range(10)]  # other processes too: the claim is taken in the database, not in memory
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    total = len(started) + sum("STARTED" in o for o in outputs)
    assert total == 1
    assert len(state.retrainings()) == 1
