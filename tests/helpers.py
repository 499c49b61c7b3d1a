"""Helpers shared by the tests: tiny data's shape, and running the CLI as a user would."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL (Debian's package) on a free loopback port; yields its DSN.

    Its folder is a fresh one under /tmp: pytest's own are private to root, and initdb refuses root.
    """
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")) or [shutil.which("pg_ctl")]
    if not found or not found[-1]:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
    bin_dir = Path(found[-1]).parent
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # initdb refuses root
    folder = Path(tempfile.mkdtemp(prefix="driftloop-pg-"))
    if as_user:
        shutil.chown(folder, "postgres")
    data, port = folder / "data", free_port()
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-l", str(folder / "log"), "-o",
                    f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True)
    try:
        deadline = time.monotonic() + 30
        while subprocess.run([str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                             capture_output=True, check=False).returncode != 0:
            assert time.monotonic() < deadline, "PostgreSQL did not start"
            time.sleep(0.2)
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
                       check=False, capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
