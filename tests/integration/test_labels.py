"""Late labels joined to the inference log; performance of what was served."""

import pandas as pd
import pytest

from driftloop.contracts import MODEL_FEATURES
from driftloop.settings import Settings
from monitoring.labels import labelled_window, performance
from serving.inference_log import InferenceLog, SqliteSink
from tests.helpers import run_cli

pytestmark = pytest.mark.integration


def served(settings: Settings, n: int) -> None:
    log = InferenceLog(SqliteSink(settings.inference_log_path)).start()
    for i in range(n):
        score = 0.9 if i % 10 == 0 else 0.1 + (i % 7) / 100
        log.record([(f"r{i}", 100.0 + i, "m", "1", f"t{i}", 1, 2, 5.0, "pos", 3.0, None,
                     *([1.0] * (len(MODEL_FEATURES) - 4)), score, 1.0)])
    log.close()


def test_labels_join_the_log_and_give_performance(tmp_path):
    settings = Settings(state_dir=tmp_path)
    served(settings, 500)
    labels = pd.DataFrame({"transaction_id": [f"t{i}" for i in range(400)] + ["never-served"],
                           "is_fraud": [1 if i % 10 == 0 else 0 for i in range(400)] + [0]})
    labels.to_parquet(tmp_path / "labels.parquet")
    result = run_cli("labels", "ingest", str(tmp_path / "labels.parquet"), env={"DRIFTLOOP_STATE_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "401 (400 match logged predictions)" in result.stdout
    assert "served AUC so far" in result.stdout
    metrics = performance(settings)
    assert metrics is not None and metrics.rows == 400 and metrics.auc == pytest.approx(1.0)
    assert len(labelled_window(settings, since=100.0, until=200.0)) == 100
    # ingesting again is idempotent, and a relabel wins
    labels.assign(is_fraud=0).to_csv(tmp_path / "again.csv", index=False)
    assert run_cli("labels", "ingest", str(tmp_path / "again.csv"),
                   env={"DRIFTLOOP_STATE_DIR": str(tmp_path)}).returncode == 0
    assert performance(settings) is None  # one class only now
    assert len(labelled_window(settings)) == 400


@pytest.mark.parametrize(("content", "expected"), [
    (None, "no label file"),
    (b"not,a\n1,2\n", "lacks columns"),
    (b"transaction_id,is_fraud\nt1,2\n", "must be 0 or 1"),
])
def test_bad_label_files_fail_clearly(tmp_path, content, expected):
    path = tmp_path / "labels.csv"
    if content is not None:
        path.write_bytes(content)
    result = run_cli("labels", "ingest", str(path), env={"DRIFTLOOP_STATE_DIR": str(tmp_path)})
    assert result.returncode == 1 and expected in result.stderr and "Traceback" not in result.stderr
