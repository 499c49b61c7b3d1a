"""Helpers shared by the tests: tiny data's shape, running the CLI as a user would, and throwaway servers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path

import httpx

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


@contextmanager
def redis_server(password: str | None = None) -> Iterator[str]:
    """A throwaway Redis (Debian's package) on a free loopback port, nothing persisted; yields the
    Feast-style connection string ``127.0.0.1:PORT`` (``…,password=PASSWORD`` when it requires one)."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("Redis is not installed: apt-get install redis-server")
    folder = Path(tempfile.mkdtemp(prefix="driftloop-redis-"))
    port = free_port()
    auth = ["--requirepass", password] if password else []
    with (folder / "log").open("w") as out:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(folder), *auth],
                                stdout=out, stderr=subprocess.STDOUT)
    client = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=1)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                pass
            assert proc.poll() is None, f"redis-server exited: {(folder / 'log').read_text()[-2000:]}"
            assert time.monotonic() < deadline, "Redis did not start in 30 s"
            time.sleep(0.1)
        yield f"127.0.0.1:{port}" + (f",password={password}" if password else "")
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def create_database(dsn: str, name: str) -> str:
    """A fresh, empty database ``name`` on the server of ``dsn`` (dropped first if there); returns its DSN."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as db:
        db.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        db.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return f"{dsn.rsplit('/', 1)[0]}/{name}"


@contextmanager
def mlflow_server(backend_uri: str, artifacts_dir: Path) -> Iterator[str]:
    """A real MLflow tracking server (this venv's ``mlflow server``) on a free loopback port that proxies
    artifacts to ``artifacts_dir``; yields its URL."""
    bin_dir = Path(sys.executable).parent
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    log = artifacts_dir.parent / f"mlflow-server-{port}.log"  # a file, not a pipe nobody reads: it would fill
    # job execution off, as the chart runs it: MLflow 3 otherwise starts a job runner and seven consumers
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(key, None)
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts_dir), "--serve-artifacts"],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=artifacts_dir.parent, start_new_session=True)
    try:
        wait_for_http(f"{url}/health", proc, log, timeout=90)
        yield url
    finally:
        stop_group(proc)


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> httpx.Response:
    """Poll GET ``url`` until it answers 200; fail with the log's tail if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = httpx.get(url, timeout=5)
            if response.status_code == 200:
                return response
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, f"{proc.args[0]} exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{url} did not answer 200 in {timeout:.0f} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.3)


def stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM a child started in its own session, with everything it started (a server's workers)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=timeout)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def trained_state(state: Path) -> Path:
    """Data, applied and materialized features and a champion (a small model) in ``state``: all a server needs."""
    from driftloop.settings import Settings
    from pipelines import training
    from pipelines.steps import features, ingest
    from pipelines.steps.train import TrainParams

    settings = Settings(state_dir=state)
    ingest.generate_to(TINY, settings.data_path)
    features.apply(settings)
    features.materialize(settings, end=AS_OF)
    training.run_local(settings, training.TrainingConfig(as_of=AS_OF, params=TrainParams(n_estimators=60)))
    return state
