"""Late labels at scale: more labels in one file than a statement may carry parameters (65,535), on SQLite
and on a real PostgreSQL, read in chunks; ids keep their leading zeros."""

import pandas as pd
import pytest

from driftloop.contracts import MODEL_FEATURES
from driftloop.settings import Settings
from monitoring.labels import LabelError, ingest, labelled_window, performance
from monitoring.store import LogStore
from serving.inference_log import InferenceLog, sink_for
from tests.helpers import create_database, run_cli

pytestmark = pytest.mark.integration

LABELS = 70_001
SERVED = range(0, LABELS, 35)  # every 35th transaction was served and logged: 2,001 of them


def tid(i: int) -> str:
    return f"{i:06d}"  # 000123: an id that a number would lose


def is_fraud(i: int) -> int:
    return int(i % 10 == 0)


@pytest.fixture(params=["local", "cluster"])
def env(request, tmp_path) -> dict[str, str]:
    """A profile's variables: SQLite in the state dir, or a database of its own on the session PostgreSQL."""
    env = {"DRIFTLOOP_STATE_DIR": str(tmp_path)}
    if request.param == "cluster":
        dsn = create_database(request.getfixturevalue("postgres_dsn"), "labels_at_scale")
        env |= {"DRIFTLOOP_PROFILE": "cluster", "DRIFTLOOP_POSTGRES_DSN": dsn, "DRIFTLOOP_REDIS_URL": "127.0.0.1:6379",
                "DRIFTLOOP_MLFLOW_TRACKING_URI": "http://mlflow:5000", "DRIFTLOOP_DATA_DIR": str(tmp_path / "data")}
    return env


def serve(settings: Settings) -> None:
    log = InferenceLog(sink_for(settings)).start()
    for i in SERVED:
        log.record([(f"r{i}", float(i), "m", "1", tid(i), 1, 2, 5.0, "pos", 3.0, None,
                     *([1.0] * (len(MODEL_FEATURES) - 4)), 0.9 if is_fraud(i) else 0.1, 1.0)])
    log.close()


def stored(settings: Settings) -> dict[str, int]:
    store = LogStore(settings)
    with store.connect() as db:
        return dict(db.execute("SELECT transaction_id, is_fraud FROM labels").fetchall())


def test_seventy_thousand_labels_in_one_file(env, tmp_path, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    serve(settings)
    rows = [(tid(i), 1 - is_fraud(i) if i == 7 else is_fraud(i)) for i in range(LABELS)]
    rows.append((tid(7), is_fraud(7)))  # relabelled in the file's second chunk: the later label wins
    labels = tmp_path / "labels.csv"
    pd.DataFrame(rows, columns=["transaction_id", "is_fraud"]).to_csv(labels, index=False)
    assert labels.read_text().splitlines()[124] == "000123,0"

    result = run_cli("labels", "ingest", str(labels), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{LABELS:,} ({len(SERVED):,} match logged predictions)" in result.stdout

    kept = stored(settings)
    assert len(kept) == LABELS and kept["000123"] == 0 and kept["070000"] == 1 and kept[tid(7)] == is_fraud(7)
    assert "123" not in kept
    assert len(labelled_window(settings)) == len(SERVED)
    metrics = performance(settings)
    assert metrics is not None and metrics.auc == pytest.approx(1.0)

    # All or none, whatever the size: a bad label in the last of many chunks stores nothing of the file.
    bad = tmp_path / "relabel.csv"
    pd.DataFrame([(tid(i), 0) for i in range(LABELS)] + [(tid(LABELS), 2)],
                 columns=["transaction_id", "is_fraud"]).to_csv(bad, index=False)
    with pytest.raises(LabelError, match=f"row {LABELS + 1:,} has '2'"):
        ingest(settings, bad, chunk_rows=5_000)
    assert stored(settings) == kept


def test_ids_that_look_missing_or_numeric_stay_text(tmp_path):
    settings = Settings(state_dir=tmp_path)
    path = tmp_path / "labels.csv"
    path.write_text("is_fraud,transaction_id\n1,000123\n0,NA\n1,null\n0,1e5\n")
    assert ingest(settings, path).rows == 4
    assert stored(settings) == {"000123": 1, "NA": 0, "null": 1, "1e5": 0}
    path.write_text("transaction_id,is_fraud\n000124,1\n,0\n")
    with pytest.raises(LabelError, match=r"transaction_id is empty in some rows .*row 2\)"):
        ingest(settings, path)
    assert "000124" not in stored(settings)


def test_a_file_that_is_no_table_fails_clearly(tmp_path):
    path = tmp_path / "labels.parquet"
    path.write_bytes(b"PAR1\x00\x01garbage")
    result = run_cli("labels", "ingest", str(path), env={"DRIFTLOOP_STATE_DIR": str(tmp_path)})
    assert result.returncode == 1 and "cannot read" in result.stderr and "Traceback" not in result.stderr
