"""Normal output keeps no library's deprecation notices (the kfp engine's short summary, with no executor JSON
or component logs, is checked on its one kfp.local run in test_pipelines)."""

import pytest

pytestmark = pytest.mark.integration


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
