"""Normal output is the summary: no executor JSON, no component logs, no deprecation warnings."""

import pytest

from tests.helpers import AS_OF, run_cli

pytestmark = pytest.mark.integration


def test_kfp_engine_prints_the_same_short_summary(settings):
    result = run_cli("train", "--engine", "kfp", "--as-of", AS_OF.strftime("%Y-%m-%dT%H:%M:%S"),
                     "--n-estimators", "50", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) <= 30, "\n".join(lines)
    for words in ("trained with engine=kfp", "holdout AUC", "slice AUC", "driftloop-fraud v1", "promoted to champion"):
        assert words in result.stdout
    for noise in ("Executor", "executor_input", "Warning", "Streamed logs"):
        assert noise not in result.stdout + result.stderr
    for step in ("features", "validate", "train", "evaluate", "register"):
        assert f"{step}" in result.stderr  # a progress line per step, as with the local engine
    assert (settings.state / "kfp" / "last-run.log").stat().st_size > 0  # the whole of kfp.local's log, kept


def test_no_library_brings_its_deprecation_notices_back():
    """Feast puts a "once" filter for DeprecationWarning first when imported; Evidently's and Litestar's
    notices then printed in every monitor check on the cluster."""
    import subprocess
    import sys

    code = ("from driftloop.cli import quiet_libraries; quiet_libraries(); import feast, warnings; "
            "warnings.warn('gone', DeprecationWarning); warnings.warn('a notice that tells the user something')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "gone" not in result.stderr
    assert "a notice that tells the user something" in result.stderr
