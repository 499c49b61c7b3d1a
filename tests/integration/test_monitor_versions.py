"""Monitoring per model version: after a promotion the monitor waits for the new champion's own window, then
judges that version's traffic against that version's reference and holdout AUC, and the loop settles."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from driftloop.contracts import LABEL
from monitoring.labels import ingest as ingest_labels
from monitoring.monitor import MonitorPolicy, check
from monitoring.retrain import TriggerPolicy
from monitoring.store import LogStore
from pipelines import training
from pipelines.steps import ingest, tracking
from pipelines.steps.train import TrainParams, load_booster, score
from tests.helpers import AS_OF, TINY, run_cli
from tests.integration import test_monitor
from tests.integration.test_monitor import client_of, serve, traffic

pytestmark = pytest.mark.integration

state = test_monitor.state  # the same fixture: tiny data, features applied, v1 trained and champion

WORLD = "shift"  # bigger, more online, more distant payments, and fraud changes its habits


def served_by(settings, version: str, frame: pd.DataFrame) -> np.ndarray:
    """Log ``frame`` as ``version`` of the model scored it (the real model), and its late labels."""
    tracking.configure(settings)
    scores = score(load_booster(f"models:/{settings.model_name}/{version}"), frame)
    serve(settings, frame, scores, version=version)
    path = settings.state / f"labels-{version}-{frame['transaction_id'].iloc[0]}.parquet"
    frame[["transaction_id", LABEL]].to_parquet(path)
    ingest_labels(settings, path)
    return scores


def never() -> str:
    pytest.fail("the loop must settle: no retraining")


def test_a_new_champion_is_judged_on_its_own_traffic_and_the_loop_settles(state):
    client = client_of(state)
    # k=1 of n=1 and no cooldown: any signal would retrain at once, so "no retraining" means "no signal".
    policy = MonitorPolicy(window_rows=2_000, trigger=TriggerPolicy(k=1, n=1, cooldown_s=0))

    # v1 meets the shifted world: drift; the retraining (on that world, through the gate) promotes v2.
    served_by(state, "1", traffic(stream=91, drift=WORLD))
    decisions = []

    def retrain() -> str:
        ingest.generate_to(dataclasses.replace(TINY, drift=WORLD, drift_days=0), state.data_path)
        result = training.run_local(state, training.TrainingConfig(as_of=AS_OF, params=TrainParams(n_estimators=60)))
        decisions.append(result.decision)
        return f"v{result.decision.version} {result.decision.alias}"

    first = check(state, client, policy, retrain)
    assert first.model_version == "1" and first.verdict == "drift" and first.retraining.start
    assert [(d.version, d.alias) for d in decisions] == [("2", "champion")], decisions[0].reason

    # The first predictions of v2: the log's newest 2,000 rows are mostly v1's, which v2 is not judged on.
    early = traffic(stream=92, drift=WORLD, rows=300)
    served_by(state, "2", early)
    newest = LogStore(state).frame("SELECT model_version FROM predictions ORDER BY ts DESC LIMIT 2000")
    assert newest["model_version"].value_counts().to_dict() == {"1": 2_000 - len(early), "2": len(early)}
    waiting = check(state, client, policy, never)
    assert (waiting.model_version, waiting.verdict, waiting.rows) == ("2", "waiting", len(early))
    assert waiting.status == f"waiting: {len(early)} of 2,000 rows of v2"
    assert not waiting.signal and waiting.retraining is None
    human = run_cli("monitor", "check")
    assert human.returncode == 0, human.stderr[-2000:]
    assert f"waiting: {len(early)} of 2,000 rows of v2" in human.stdout

    # v2's own window from the same world: no drift, its served AUC against its own holdout AUC, no signal.
    full = traffic(stream=93, drift=WORLD)
    scores = served_by(state, "2", full)
    settled = check(state, client, policy, never)
    assert (settled.model_version, settled.rows, settled.verdict) == ("2", 2_000, "no_drift"), settled.reasons
    assert settled.labelled_rows == 2_000  # v2's rows only: none of v1's labelled predictions
    newest_v2 = slice(len(full) - 2_000, None)  # the window is the newest 2,000 rows v2 logged
    assert settled.served_auc == pytest.approx(roc_auc_score(full[LABEL].to_numpy()[newest_v2], scores[newest_v2]))
    assert settled.champion_auc is not None and settled.served_auc >= settled.champion_auc - 0.05
    assert not settled.signal and settled.retraining is None

    # The next cooldown: another window of v2's traffic, still nothing to retrain for.
    served_by(state, "2", traffic(stream=94, drift=WORLD))
    again = check(state, client, policy, never)
    assert again.verdict == "no_drift" and not again.signal and again.retraining is None

    # The CLI takes the same drift options as `drift compare`; a kind override gets a profile of its own, and
    # the log's float copies of an integer column match the reference's integer categories.
    forced = run_cli("monitor", "check", "--json", "--kind", "hour_of_day=categorical", "--drift-share", "0.5")
    assert forced.returncode == 0, forced.stderr[-2000:]
    body = pd.read_json(forced.stdout.strip().splitlines()[-1], typ="series")
    assert body["model_version"] == "2" and body["verdict"] == "no_drift"
    assert body["column_scores"]["hour_of_day"] < 0.1
    assert len(list((state.state / "monitor").glob("profile-*-v2-kinds-*.json"))) == 1
