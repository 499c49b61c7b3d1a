"""The chart's PostgreSQL roles, on a real PostgreSQL: its init script run as the image runs it, then each
role tried for what it must and must not do. Least privilege is proven by the server refusing, not by
reading the SQL."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import psycopg
import pytest

from driftloop.settings import Settings
from monitoring.store import LogStore
from serving.inference_log import COLUMNS, PostgresSink
from tests.chart.chart import find, render, secret_data
from tests.helpers import postgres_server

pytestmark = pytest.mark.chart


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A PostgreSQL initialised by the chart's init script; yields role -> DSN."""
    docs = render("kind")
    script = find(docs, "ConfigMap", "driftloop-postgres-init")["data"]["10-roles.sh"]
    passwords = secret_data(find(docs, "Secret", "driftloop-postgres"))
    with postgres_server() as admin:
        port = admin.rsplit(":", 1)[1].split("/")[0]
        env = {"PATH": os.environ["PATH"], "PGHOST": "127.0.0.1", "PGPORT": port, "POSTGRES_USER": "postgres",
               **{f"{role.upper()}_PASSWORD": passwords[f"{role}-password"]
                  for role in ("driftloop", "predictor", "mlflow", "prefect")}}
        path = tmp_path_factory.mktemp("init") / "10-roles.sh"
        path.write_text(script)
        # the image's entrypoint sources a .sh file that is not executable (a ConfigMap's is not)
        result = subprocess.run(["bash", "-c", f". {path}"], env=env, capture_output=True, text=True, timeout=60,
                                check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        yield {role: f"postgresql://{role}@127.0.0.1:{port}/{db}" for role, db in
               (("postgres", "postgres"), ("driftloop", "driftloop"), ("predictor", "driftloop"),
                ("mlflow", "mlflow"), ("prefect", "prefect"))}


def refused(dsn: str, sql: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=5, autocommit=True) as db:
            db.execute(sql)
    except psycopg.errors.InsufficientPrivilege:
        return True
    return False


@pytest.fixture(scope="module")
def bootstrapped(server) -> dict[str, str]:
    """What the bootstrap makes as role driftloop: the Feast registry (in schema feast), the inference log
    and the labels."""
    settings = Settings(profile="cluster", postgres_dsn=server["driftloop"], redis_url="127.0.0.1:6379",
                        mlflow_tracking_uri="http://127.0.0.1:5000", data_dir="/tmp")
    store = LogStore(settings)
    assert store.labelled_traffic("m", 1e10, 10).empty  # the first training reads the traffic: makes the log
    with store.connect() as db:
        store._labels_table(db)
        db.execute("INSERT INTO labels VALUES ('t1', 1, 0)")
    with psycopg.connect(server["driftloop"], autocommit=True, options="-c search_path=feast,public") as db:
        db.execute("CREATE TABLE projects (project_id TEXT PRIMARY KEY)")  # Feast's create_all, as Feast runs it
        db.execute("INSERT INTO projects VALUES ('driftloop')")
    return server


def test_every_workload_role_owns_its_database_and_only_that(server):
    with psycopg.connect(server["postgres"]) as db:
        owners = dict(db.execute("SELECT datname, pg_get_userbyid(datdba) FROM pg_database "
                                 "WHERE datname NOT LIKE 'template%'").fetchall())
        superusers = [r[0] for r in db.execute("SELECT rolname FROM pg_roles WHERE rolsuper")]
    assert owners == {"postgres": "postgres", "driftloop": "driftloop", "mlflow": "mlflow",
                      "mlflow_auth": "mlflow", "prefect": "prefect"}
    assert superusers == ["postgres"]
    reaches = {role: {db for db, owner in owners.items() if owner == role} for role in owners.values()}
    reaches["predictor"] = {"driftloop"}  # the log and the registry
    for role in ("driftloop", "predictor", "mlflow", "prefect"):
        for other in {"driftloop", "mlflow", "prefect", "mlflow_auth"} - reaches[role]:
            dsn = server[role].rsplit("/", 1)[0] + f"/{other}"
            with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
                psycopg.connect(dsn, connect_timeout=5).close()


def test_predictor_writes_the_log_and_reads_the_registry_and_nothing_else(bootstrapped):
    predictor = bootstrapped["predictor"]
    sink = PostgresSink(predictor)  # the table exists: the predictor runs no DDL
    sink.write([tuple(f"r{i}" if c in ("request_id", "transaction_id") else None for c in COLUMNS)
                for i in range(3)])
    sink.close()
    with psycopg.connect(predictor, options="-c search_path=feast,public") as db:
        assert db.execute("SELECT count(*) FROM predictions WHERE request_id LIKE 'r%'").fetchone()[0] == 3
        assert db.execute("SELECT project_id FROM projects").fetchall() == [("driftloop",)]
    for sql in ("SELECT * FROM labels", "INSERT INTO labels VALUES ('t2', 0, 0)", "DELETE FROM predictions",
                "UPDATE predictions SET score = 1", "DROP TABLE predictions", "DROP TABLE labels",
                "TRUNCATE predictions", "CREATE TABLE mine (x int)", "CREATE INDEX i ON predictions (score)",
                "INSERT INTO feast.projects VALUES ('x')", "DROP TABLE feast.projects"):
        assert refused(predictor, sql), sql
    for db in ("mlflow", "prefect", "mlflow_auth"):
        with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
            psycopg.connect(predictor.rsplit("/", 1)[0] + f"/{db}", connect_timeout=5).close()


def test_the_platform_role_keeps_every_right_over_its_own_tables(bootstrapped):
    with psycopg.connect(bootstrapped["driftloop"], autocommit=True) as db:
        assert db.execute("SELECT count(*) FROM labels").fetchone()[0] == 1
        db.execute("CREATE INDEX IF NOT EXISTS predictions_score ON predictions (score)")  # the monitor's index
        db.execute("DROP INDEX predictions_score")
    assert refused(bootstrapped["driftloop"], "CREATE ROLE intruder")
