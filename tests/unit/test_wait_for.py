"""`driftloop wait-for`: a pod's first init container waits until its stores accept connections."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.helpers import free_port, run_cli

pytestmark = pytest.mark.unit


@contextmanager
def listening(port: int = 0) -> Iterator[int]:
    """A TCP server on a loopback port (it accepts connections, as a store's server does); yields the port."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen(16)
        yield server.getsockname()[1]


def cluster_env(postgres: int, redis: int, mlflow: int, prefect: int) -> dict[str, str]:
    """The variables the chart's ConfigMap and Secret set, pointed at loopback ports."""
    return {
        "DRIFTLOOP_PROFILE": "cluster",
        "DRIFTLOOP_DATA_DIR": "/nonexistent/data",
        "DRIFTLOOP_POSTGRES_DSN": f"postgresql://driftloop:s3cret@127.0.0.1:{postgres}/driftloop",
        "DRIFTLOOP_REDIS_URL": f"127.0.0.1:{redis},password=s3cret",
        "DRIFTLOOP_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow}",
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect}/api",
    }


def test_returns_once_every_store_accepts_connections():
    with listening() as pg, listening() as redis, listening() as mlflow, listening() as prefect:
        result = run_cli("wait-for", "--timeout=10", "postgres", "redis", "mlflow", "prefect",
                         env=cluster_env(pg, redis, mlflow, prefect))
    assert result.returncode == 0, result.stderr
    for store, port in (("postgres", pg), ("redis", redis), ("mlflow", mlflow), ("prefect", prefect)):
        assert f"{store} at 127.0.0.1:{port} accepts connections" in result.stdout
    assert "s3cret" not in result.stdout + result.stderr


def test_a_closed_port_ends_in_one_error_naming_the_store_and_its_variable():
    closed = free_port()  # bound, then released: nothing listens there
    with listening() as redis:
        result = run_cli("wait-for", "--timeout=1.5", "redis", "postgres", env=cluster_env(closed, redis, 1, 1))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert f"postgres at 127.0.0.1:{closed}" in errors[0] and "DRIFTLOOP_POSTGRES_DSN" in errors[0]
    assert "s3cret" not in result.stdout + result.stderr


def test_a_store_that_starts_late_is_waited_for_with_progress_lines():
    port = free_port()
    started = threading.Event()

    def serve_later() -> None:
        started.wait(2.0)  # the command keeps trying meanwhile
        with listening(port):
            started.wait(30)

    thread = threading.Thread(target=serve_later, daemon=True)
    thread.start()
    try:
        result = run_cli("wait-for", "--timeout=30", "--every=0.5", "mlflow", env=cluster_env(1, 1, port, 1))
    finally:
        started.set()
        thread.join(10)
    assert result.returncode == 0, result.stderr
    assert f"waiting for mlflow at 127.0.0.1:{port}" in result.stdout
    assert f"mlflow at 127.0.0.1:{port} accepts connections" in result.stdout


def test_a_store_without_an_address_is_an_error_naming_the_variable():
    result = run_cli("wait-for", "--timeout=1", "prefect", env={"DRIFTLOOP_PROFILE": "local", "PREFECT_API_URL": ""})
    assert result.returncode == 1 and "PREFECT_API_URL is not set" in result.stderr
