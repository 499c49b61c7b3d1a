"""Shared fixtures: tiny generated data in a real Feast store, and per-test MLflow stores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from driftloop.settings import Settings
from pipelines.steps import features, ingest
from tests.helpers import AS_OF, TINY, create_database, env_for, mlflow_server, postgres_server, redis_server

# The slowest modules first, as measured (`--durations`): the workers take whole modules (`--dist loadfile`, in
# this order with `--no-loadscope-reorder`), and a long module taken last would leave one worker alone at the end.
SLOWEST_FIRST = (
    "chart/test_wiring.py", "integration/test_serving.py", "integration/test_cli_errors.py",
    "integration/test_monitor.py", "integration/test_failures.py", "integration/test_pipelines.py",
    "integration/test_secrets.py", "integration/test_promotion.py", "integration/test_hardening_serving.py",
    "integration/test_demo.py", "chart/test_chart.py", "integration/test_cluster_stores.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    here = Path(__file__).parent
    # a stable sort: the rest, and every module's own tests, stay as collected
    items.sort(key=lambda item: rank.get(item.path.relative_to(here).as_posix(), len(rank)))


@pytest.fixture(autouse=True)
def _restore_environment():
    """MLflow writes MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI into os.environ; keep each test's to itself."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def feast_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated data, applied definitions and a materialized online store, shared read-only."""
    state = tmp_path_factory.mktemp("feast-state")
    settings = Settings(state_dir=state)
    ingest.generate_to(TINY, settings.data_path)
    features.apply(settings)
    features.materialize(settings, end=AS_OF)
    return state


@pytest.fixture
def settings(feast_state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings on the shared Feast store and a fresh MLflow store; the same in subprocesses."""
    for key, value in env_for(feast_state, tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    return Settings()


@pytest.fixture(scope="session")
def postgres_dsn():
    """A real PostgreSQL for the cluster profile's code paths."""
    with postgres_server() as dsn:
        yield dsn


@pytest.fixture(scope="session")
def redis_url():
    """A real Redis for the cluster profile's online store: ``127.0.0.1:PORT``."""
    with redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def mlflow_artifacts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the ``mlflow_url`` server keeps the artifacts that clients upload through it."""
    return tmp_path_factory.mktemp("mlflow-server") / "artifacts"


@pytest.fixture(scope="session")
def mlflow_url(postgres_dsn, mlflow_artifacts_dir: Path):
    """A real MLflow tracking server: runs and registry in the session PostgreSQL (a fresh database
    ``mlflow``), artifacts proxied by the server to ``mlflow_artifacts_dir``."""
    backend = create_database(postgres_dsn, "mlflow").replace("postgresql://", "postgresql+psycopg://", 1)
    with mlflow_server(backend, mlflow_artifacts_dir) as url:
        yield url
