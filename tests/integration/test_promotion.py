"""Promotion against a real MLflow server: racing trainings, a registration killed mid-way, `promote`
and `rollback` from any version to any version."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from driftloop.settings import Settings
from pipelines import training
from pipelines.steps.register import (
    CHALLENGER,
    CHAMPION,
    TAG_ORPHAN,
    TAG_PREVIOUS,
    TAG_PROMOTION,
    TAG_REGISTRATION,
    PromotionLock,
    RegistryError,
    promote,
    rollback,
)
from pipelines.steps.train import TAG_MODEL_URI, TrainParams
from tests.helpers import AS_OF, create_database, run_cli

pytestmark = pytest.mark.integration

WEAK = TrainParams(n_estimators=3, max_depth=1, learning_rate=0.3)
# Racers of clearly different strength: whichever order they reach the registry in, a worse one must never
# replace a better one promoted before it.
RACERS = [dataclasses.replace(WEAK, n_estimators=n, max_depth=d, seed=s)
          for s, (n, d) in enumerate([(12, 1), (40, 2), (120, 3), (300, 5)])]

# A training's last step in a process of its own; it waits at a barrier (a line on stdin) so that all
# racers reach the registry together, as trainings started at once do.
RACER = """
import json, sys
from driftloop.settings import load_settings
from pipelines import training
from pipelines.steps import tracking
settings = load_settings()
tracking.configure(settings)
print("ready", flush=True)
sys.stdin.readline()
decision = training.register(settings, sys.argv[1])
print(json.dumps({"version": decision.version, "promoted": decision.promoted,
                  "champion_version": decision.champion_version}), flush=True)
"""


def trained(settings: Settings, params: TrainParams) -> str:
    run_id = training.train(settings, training.features(settings, AS_OF), params)
    training.evaluate(settings, run_id)
    return run_id


def auc_of(client: MlflowClient, name: str, version: str) -> float:
    return float(client.get_model_version(name, version).tags["eval.auc"])


def history(client: MlflowClient, name: str) -> list[str]:
    """The champion and the champions before it, newest first, as `driftloop rollback` would walk them."""
    chain = [str(client.get_model_version_by_alias(name, CHAMPION).version)]
    while previous := client.get_model_version(name, chain[-1]).tags.get(TAG_PREVIOUS):
        assert previous not in chain, f"the history loops: {chain} -> {previous}"
        chain.append(previous)
    return chain


def race(env: dict[str, str], run_ids: list[str]) -> list[dict]:
    procs = [subprocess.Popen([sys.executable, "-c", RACER, run_id], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, **env}) for run_id in run_ids]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", proc.communicate()[1][-2000:]
    for proc in procs:  # go: all at once
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.fixture
def server_settings(settings, mlflow_url, monkeypatch, request) -> Settings:
    """The test's own experiment and model on the session's MLflow server (local profile, own state dir)."""
    name = f"race-{request.node.name.split('[')[-1].rstrip(']')}"
    for key, value in {"DRIFTLOOP_MLFLOW_TRACKING_URI": mlflow_url, "DRIFTLOOP_EXPERIMENT": name,
                       "DRIFTLOOP_MODEL_NAME": name}.items():
        monkeypatch.setenv(key, value)
    return Settings()


def cluster_env(settings: Settings, postgres_dsn: str) -> dict[str, str]:
    """The cluster profile for the registering processes: the promotion lock lives in PostgreSQL."""
    return {"DRIFTLOOP_PROFILE": "cluster", "DRIFTLOOP_POSTGRES_DSN": create_database(postgres_dsn, "promotion"),
            "DRIFTLOOP_REDIS_URL": "127.0.0.1:6379", "DRIFTLOOP_DATA_DIR": settings.data_path}


@pytest.mark.parametrize("profile", ["local", "cluster"])
def test_racing_trainings_never_replace_a_better_champion(server_settings, postgres_dsn, profile):
    settings = server_settings
    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    first = training.register(settings, trained(settings, WEAK))
    assert first.promoted
    run_ids = [trained(settings, params) for params in RACERS]

    results = race(cluster_env(settings, postgres_dsn) if profile == "cluster" else {}, run_ids)

    name = settings.model_name
    chain = history(client, name)
    promoted = {r["version"] for r in results if r["promoted"]}
    # Every promotion is in the champion's history, once, in the order it happened ...
    assert set(chain) == promoted | {first.version}, (chain, results)
    assert chain[-1] == first.version
    # ... each was gated against the champion it replaced ...
    for r in results:
        if r["promoted"]:
            assert client.get_model_version(name, r["version"]).tags[TAG_PREVIOUS] == r["champion_version"]
    # ... so no champion is worse than one promoted before it (all share one holdout).
    oldest_first = chain[::-1]
    aucs = [auc_of(client, name, v) for v in oldest_first]
    assert all(b > a for a, b in itertools.pairwise(aucs)), list(zip(oldest_first, aucs, strict=True))
    best = max(auc_of(client, name, r["version"]) for r in results)
    assert aucs[-1] >= best - 0.002  # the margin: a later racer within it does not churn the champion
    # Rolling back, again and again, walks that history back to the first champion.
    lock = PromotionLock.for_settings(settings)
    for was, now in itertools.pairwise(chain):
        move = rollback(client, name, lock=lock, by="test")
        assert (move.was, move.now) == (was, now)


# A fault point the test installs in the registering process: it dies by SIGKILL the moment the registry
# store has written (the version's row, or the alias), whichever store the settings name.
KILLED = """
import os, signal, sys
from mlflow.store.model_registry.rest_store import RestStore
from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore
from driftloop.settings import load_settings
from pipelines import training

def dying(real):
    def write(*args, **kwargs):
        real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    return write

for store in (RestStore, SqlAlchemyStore):
    setattr(store, sys.argv[2], dying(getattr(store, sys.argv[2])))
training.register(load_settings(), sys.argv[1])
"""


def versions(client: MlflowClient, name: str) -> dict[str, object]:
    return {str(v.version): v for v in client.search_model_versions(f"name = '{name}'")}


@pytest.mark.parametrize("moment", ["create_model_version", "set_registered_model_alias"])
def test_a_registration_killed_midway_is_cleaned_up_by_the_next(settings, moment):
    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    name = settings.model_name
    first = training.register(settings, trained(settings, WEAK))
    killed_run = trained(settings, RACERS[1])  # better: it would have been promoted
    proc = subprocess.run([sys.executable, "-c", KILLED, killed_run, moment], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]

    left = client.get_model_version(name, "2")
    assert left.tags[TAG_REGISTRATION] == "pending"
    if moment == "create_model_version":  # the alias never moved: the champion is as it was
        assert left.aliases == [] and str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
    else:  # the alias had moved: v2 serves, only its marker is left to clear
        assert left.aliases == [CHAMPION]

    nxt = training.register(settings, trained(settings, RACERS[3]))
    left_now = versions(client, name)
    assert all(TAG_REGISTRATION not in v.tags for v in left_now.values())
    if moment == "create_model_version":
        assert nxt.orphans_removed == ["2"] and sorted(left_now) == ["1", "3"]
        assert "killed" in client.get_run(killed_run).data.tags[TAG_ORPHAN]
        assert nxt.promoted and nxt.champion_version == first.version
    else:
        assert nxt.orphans_removed == [] and sorted(left_now) == ["1", "2", "3"]
        assert nxt.champion_version == "2"  # judged against the champion the killed run had made
    assert history(client, name)[-1] == first.version


def cli_error(*args: str) -> str:
    result = run_cli(*args)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "error:" in result.stderr, result.stderr
    return " ".join(result.stderr.split())  # rich folds long lines


def cli_ok(*args: str) -> str:
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_promote_and_rollback_from_any_version_to_any_version(settings):
    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    name = settings.model_name
    lock = PromotionLock.for_settings(settings)
    champion = lambda: str(client.get_model_version_by_alias(name, CHAMPION).version)  # noqa: E731
    assert training.register(settings, trained(settings, WEAK)).promoted  # v1
    assert training.register(settings, trained(settings, RACERS[0])).promoted  # v2: AUC 0.848 on this data
    weaker = training.register(settings, trained(settings, RACERS[3]))  # v3: 0.838, deep trees overfit
    assert not weaker.promoted and weaker.alias == CHALLENGER and champion() == "2"

    # Through the CLI: the gate's refusal names the failed check; --force needs a reason and records it.
    refused = cli_error("promote", "3")
    assert "gate refuses" in refused and "does not beat the champion" in refused and "--force" in refused
    assert "--reason" in cli_error("promote", "3", "--force")
    assert champion() == "2"
    assert "v2 -> v3" in cli_ok("promote", "3", "--force", "--reason", "canary for the new merchant feed")
    v3 = client.get_model_version(name, "3")
    record = json.loads(v3.tags[TAG_PROMOTION])
    assert record["forced"] and record["why"] == "canary for the new merchant feed" and record["over"] == "2"
    assert record["by"] and record["at"]
    assert v3.tags[TAG_PREVIOUS] == "2" and CHALLENGER not in v3.aliases
    assert "v3 -> v2" in cli_ok("rollback")  # undoes the forced promotion
    assert "v2 -> v1" in cli_ok("rollback", "1")  # back to an older champion: the history rewinds ...
    assert "no version 42 (versions: 1, 2, 3)" in cli_error("promote", "42")
    # A version registered by hand from a run that was never evaluated: the gate has nothing to judge.
    unevaluated = training.train(settings, training.features(settings, AS_OF), WEAK)
    bare = client.create_model_version(name, client.get_run(unevaluated).data.tags[TAG_MODEL_URI],
                                       run_id=unevaluated)
    assert "has no evaluation metrics" in cli_error("promote", str(bare.version))

    # The same steps in-process: every move from any version to any version.
    with pytest.raises(RegistryError, match="nothing to roll back to"):  # ... v1 was the first champion
        rollback(client, name, lock=lock)
    assert promote(client, name, "2", lock=lock, by="test").was == "1"  # the gate passes v2 against v1
    assert rollback(client, name, "3", lock=lock).was == "2"  # sideways, to one never before v2 ...
    assert rollback(client, name, lock=lock).now == "2"  # ... so a plain rollback undoes it
    with pytest.raises(RegistryError, match="no version 42"):
        rollback(client, name, "42", lock=lock)
    with pytest.raises(RegistryError, match="already the champion"):
        promote(client, name, "2", lock=lock, by="test")
    move = promote(client, name, str(bare.version), lock=lock, by="test", force_reason="hotfix")
    assert (move.was, champion()) == ("2", str(bare.version))
