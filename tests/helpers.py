"""Helpers shared by the tests: tiny data's shape, and running the CLI as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, date, datetime
from pathlib import Path

from pipelines.steps import ingest

TINY = ingest.GeneratorConfig(rows=8_000, customers=400, merchants=40, days=40, end=date(2026, 10, 1), seed=11)
AS_OF = datetime(2026, 10, 2, tzinfo=UTC)


def env_for(feast_state: Path, state: Path) -> dict[str, str]:
    """Variables that point a process at the shared Feast store and its own state dir."""
    return {
        "DRIFTLOOP_STATE_DIR": str(state),
        "DRIFTLOOP_DATA_DIR": str(feast_state / "data"),
        "DRIFTLOOP_FEAST_REGISTRY": str(feast_state / "feast" / "registry.db"),
    }


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``driftloop`` in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "driftloop", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, check=False,
    )
