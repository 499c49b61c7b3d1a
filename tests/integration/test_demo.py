"""The whole loop, scaled down: what `make demo` runs, end to end, on small data."""

import re

import pytest

from tests.helpers import run_cli

pytestmark = pytest.mark.integration


def test_the_loop_closes(tmp_path):
    # On this little data the gate may keep v1 (a slice regresses): the test checks the loop, not the luck.
    result = run_cli("demo", "--rows", "8000", "--customers", "400", "--merchants", "40", "--traffic", "600",
                     env={"DRIFTLOOP_STATE_DIR": str(tmp_path), "COLUMNS": "200"}, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    assert "window 1       │ no_drift" in out
    assert "window 2       │ drift" in out
    assert "retraining     │ signal in 1 of the last 1 windows; v2 " in out  # retrained, then gated
    assert "champion" in out.split("retraining")[1]
    served = re.search(r"champion now   │ v(\d+), answering requests: v(\d+)", out)
    assert served and served.group(1) == served.group(2)  # the server follows the registry, no restart
    assert ", 0 failed" in out
    for step in ("data", "features", "train", "serve", "traffic", "monitor", "retrain", "labels"):
        assert step in result.stderr  # told as it goes
    assert (tmp_path / "inference_log.db").exists()
