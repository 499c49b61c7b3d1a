"""No secret outside its store: one password, planted in every connection string of the cluster profile (the
MLflow tracking URI, the PostgreSQL DSN and so Feast's registry, the Redis string), is searched for everywhere
driftloop writes: what the CLI prints on success and on failure, its logs, the Prefect server's records of
flow runs, MLflow's store and the compiled KFP pipeline. The servers are real; only the password is planted.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import psycopg
import pytest
from mlflow.tracking import MlflowClient
from psycopg import sql

from tests.helpers import AS_OF, TINY, create_database, free_port, redis_server, run_cli

pytestmark = pytest.mark.integration

SECRET = "Pl4nted-S3cret-xyz"
AS_OF_ARG = ("--as-of", AS_OF.strftime("%Y-%m-%dT%H:%M:%S"))


class Run(NamedTuple):
    command: str
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return f"{self.stdout}\n{self.stderr}"

    def hits(self) -> int:
        return self.output.count(SECRET)


def driftloop(env: dict[str, str], *args: str, timeout: float = 300) -> Run:
    """Run the CLI as a user would; keep what it printed, for the search."""
    result = run_cli(*args, env=env, timeout=timeout)
    return Run(" ".join(args[:2]), result.returncode, result.stdout, result.stderr)


@pytest.fixture(scope="module")
def redis_with_password():
    with redis_server(password=SECRET) as url:
        yield url


@pytest.fixture(scope="module")
def cluster(postgres_dsn, redis_with_password, mlflow_url, tmp_path_factory) -> dict[str, str]:
    """The cluster profile's variables on the real servers, the password in each connection string."""
    state = tmp_path_factory.mktemp("secrets")
    dsn = create_database(postgres_dsn, "secrets")
    env = {
        "DRIFTLOOP_PROFILE": "cluster",
        "DRIFTLOOP_STATE_DIR": str(state),
        "DRIFTLOOP_DATA_DIR": str(state / "data"),
        # MLflow's client sends user:password as Basic auth; the test server needs none, so any is accepted
        "DRIFTLOOP_MLFLOW_TRACKING_URI": mlflow_url.replace("http://", f"http://driftloop:{SECRET}@", 1),
        # the test server trusts loopback: a password is accepted and ignored
        "DRIFTLOOP_POSTGRES_DSN": dsn.replace("//postgres@", f"//postgres:{SECRET}@", 1),
        "DRIFTLOOP_REDIS_URL": redis_with_password,  # this one is checked: Redis requires it
        "DRIFTLOOP_EXPERIMENT": "secrets",
        "DRIFTLOOP_MODEL_NAME": "secrets-fraud",
        "PREFECT_HOME": str(state / "prefect"),
    }
    assert SECRET in env["DRIFTLOOP_MLFLOW_TRACKING_URI"] and SECRET in env["DRIFTLOOP_POSTGRES_DSN"]
    assert SECRET in env["DRIFTLOOP_REDIS_URL"]
    return env


@pytest.fixture(scope="module")
def prepared(cluster) -> list[Run]:
    """Data generated and the Feast definitions applied through the CLI; its output, for the search."""
    outputs = [
        driftloop(cluster, "data", "generate", "--rows", str(TINY.rows), "--customers", str(TINY.customers),
                  "--merchants", str(TINY.merchants), "--days", str(TINY.days), "--end-date",
                  TINY.end.isoformat(), "--seed", str(TINY.seed)),
        driftloop(cluster, "features", "apply"),
    ]
    assert [o.code for o in outputs] == [0, 0], outputs
    return outputs


def dead(url: str) -> str:
    """``url`` with its port swapped for one where nothing listens: an unreachable store."""
    head, _, tail = url.rpartition(":")
    rest = tail.split("/", 1)[1] if "/" in tail else ""
    return f"{head}:{free_port()}" + (f"/{rest}" if rest else "")


def files_under(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` (databases included) that holds the password, with how many times."""
    found = {}
    for path in folder.rglob("*"):
        if path.is_file():
            count = path.read_bytes().count(SECRET.encode())
            if count:
                found[str(path.relative_to(folder))] = count
    return found


def test_the_cli_masks_every_password_on_success_and_on_failure(cluster, prepared, tmp_path):
    outputs = [
        *prepared,
        driftloop(cluster, "config"),
        driftloop(cluster, "config", "--json"),
        driftloop(cluster, "pipeline", "compile", "--out", str(tmp_path / "pipeline.yaml")),
    ]
    assert [o.code for o in outputs] == [0] * len(outputs), outputs
    applied, shown, shown_json = outputs[1].output, outputs[2].output, json.loads(outputs[3].stdout)
    assert "postgresql+psycopg://postgres:***@" in applied  # the line that printed the password on a cluster
    assert "password=***" in shown and "driftloop:***@" in shown
    assert shown_json["mlflow_tracking_uri"].startswith("http://driftloop:***@")
    assert shown_json["feast_registry"].startswith("postgresql+psycopg://postgres:***@")
    assert shown_json["feast_online_store"].endswith(",password=***")

    # Error paths: a store that is not there, a server that refuses, settings that do not load.
    no_mlflow = {**cluster, "DRIFTLOOP_MLFLOW_TRACKING_URI": dead(cluster["DRIFTLOOP_MLFLOW_TRACKING_URI"]),
                 "DRIFTLOOP_MLFLOW_RETRIES": "0"}
    no_postgres = {**cluster, "DRIFTLOOP_POSTGRES_DSN": dead(cluster["DRIFTLOOP_POSTGRES_DSN"])}
    failures = [
        driftloop(no_mlflow, "train", *AS_OF_ARG),
        driftloop(no_mlflow, "monitor", "check"),
        driftloop(no_mlflow, "serve", "--port", str(free_port())),
        driftloop(cluster, "rollback"),  # a reachable registry with nothing to roll back
        driftloop(no_postgres, "features", "apply"),  # the driver's own error, as a traceback
        driftloop(cluster, "pipeline", "submit", "--url", f"http://admin:{SECRET}@127.0.0.1:{free_port()}/api"),
        driftloop({**cluster, "DRIFTLOOP_DATA_DIR": ""}, "config"),  # pydantic's message quotes the input
    ]
    assert all(o.code == 1 for o in failures), failures
    assert "driftloop:***@127.0.0.1" in failures[0].output  # the message still says which server
    assert "needs these variables set: DRIFTLOOP_DATA_DIR" in failures[-1].output

    hits = {f"{o.command} ({o.code})": o.hits() for o in outputs + failures}
    yaml_hits = (tmp_path / "pipeline.yaml").read_text().count(SECRET)
    assert sum(hits.values()) == 0 and yaml_hits == 0, (hits, yaml_hits)


PREFECT_RECORDS = """
import asyncio, json
from prefect.client.orchestration import get_client

async def records():
    async with get_client() as client:
        flows = {f.id: f.name for f in await client.read_flows()}
        runs = await client.read_flow_runs()
        tasks = await client.read_task_runs()
        logs = await client.read_logs()
    print(json.dumps({
        "flow_runs": [{"flow": flows.get(r.flow_id), "parameters": r.parameters, "state": r.state.type.value,
                       "message": r.state.message} for r in runs],
        "task_runs": [{"name": t.name, "state": t.state.type.value, "message": t.state.message} for t in tasks],
        "logs": [log.message for log in logs],
    }, default=str))

asyncio.run(records())
"""


def prefect_records(env: dict[str, str]) -> str:
    """What the Prefect API serves about the runs: flows, runs with parameters and states, task runs, logs
    (from the local server on the state dir's database, as `driftloop ui` shows it)."""
    from driftloop.settings import Settings
    from pipelines.training import prefect_environment

    variables = {**env, **prefect_environment(Settings(state_dir=env["DRIFTLOOP_STATE_DIR"]))}
    result = subprocess.run([sys.executable, "-c", PREFECT_RECORDS], capture_output=True, text=True, timeout=300,
                            env={**os.environ, **variables}, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def mlflow_store(postgres_dsn: str) -> str:
    """Every row of every table of MLflow's backend store (the session server's database), as text."""
    rows = []
    with psycopg.connect(f"{postgres_dsn.rsplit('/', 1)[0]}/mlflow", connect_timeout=10) as db:
        tables = [r[0] for r in db.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        for table in tables:
            query = sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier(table))
            rows += [f"{table}: {r[0]}" for r in db.execute(query)]
    return "\n".join(rows)


def test_prefect_and_mlflow_record_no_password(cluster, prepared, postgres_dsn, mlflow_artifacts_dir, tmp_path):
    state = Path(cluster["DRIFTLOOP_STATE_DIR"])
    trained = driftloop(cluster, "train", "--engine", "prefect", *AS_OF_ARG, "--json", timeout=600)
    assert trained.code == 0, trained.output[-3000:]
    run_id = json.loads(trained.stdout.strip().splitlines()[-1])["run_id"]
    rows = pd.DataFrame({"customer_id": [7], "merchant_id": [3], "amount": [120.5], "channel": ["online"],
                         "hour_of_day": [3], "distance_km": [12.0], "event_timestamp": [pd.Timestamp(AS_OF)]})
    rows.to_parquet(tmp_path / "in.parquet")
    scored = driftloop(cluster, "batch", "score", str(tmp_path / "in.parquet"), str(tmp_path / "out.parquet"),
                       "--engine", "prefect")
    assert scored.code == 0, scored.output[-3000:]
    # a flow run whose task fails on the store: its state and its logs quote the tracking server's URL
    no_mlflow = {**cluster, "DRIFTLOOP_MLFLOW_TRACKING_URI": dead(cluster["DRIFTLOOP_MLFLOW_TRACKING_URI"])}
    failed = driftloop(no_mlflow, "train", "--engine", "prefect", *AS_OF_ARG, timeout=600)
    assert failed.code == 1, failed.output[-3000:]

    records = prefect_records(cluster)
    parsed = json.loads(records)
    parameters = {r["flow"]: set(r["parameters"]) for r in parsed["flow_runs"]}
    assert parameters == {"driftloop-training": {"config"}, "driftloop-batch-scoring": {"input_path", "output_path"}}
    assert sorted(r["state"] for r in parsed["flow_runs"] if r["flow"] == "driftloop-training") == [
        "COMPLETED", "FAILED"]
    assert "driftloop:***@127.0.0.1" in records  # the failure is there, masked: the search reads the right place

    client = MlflowClient(cluster["DRIFTLOOP_MLFLOW_TRACKING_URI"])
    run = client.get_run(run_id)
    assert run.data.params and run.data.tags  # the store holds the run that was searched
    store = mlflow_store(postgres_dsn)
    assert run_id in store
    assert (state / "prefect" / "prefect.db").is_file()  # the Prefect server's database is among the files

    hits = {
        "CLI output": sum(o.hits() for o in (trained, scored, failed)),
        "Prefect API (flow runs, parameters, states, task runs, logs)": records.count(SECRET),
        "MLflow run params and tags": json.dumps([run.data.params, run.data.tags]).count(SECRET),
        "MLflow backend store (every table)": store.count(SECRET),
        "MLflow artifacts": sum(files_under(mlflow_artifacts_dir).values()),
        "files under the state dir (Prefect's database, datasets, ...)": sum(files_under(state).values()),
    }
    assert sum(hits.values()) == 0, (hits, files_under(state))


def test_a_step_error_from_a_store_client_is_masked_in_place(cluster, monkeypatch):
    """MLflow's own error quotes the URL it could not reach, password and all: a pipeline step masks it before
    Prefect records it or a KFP component prints it, and keeps its type for whoever catches it."""
    from mlflow.exceptions import MlflowException

    from driftloop.settings import Settings
    from pipelines.training import masked_errors

    url = dead(cluster["DRIFTLOOP_MLFLOW_TRACKING_URI"])
    settings = Settings(profile="cluster", mlflow_tracking_uri=url, postgres_dsn=cluster["DRIFTLOOP_POSTGRES_DSN"],
                        redis_url=cluster["DRIFTLOOP_REDIS_URL"], data_dir=cluster["DRIFTLOOP_DATA_DIR"])
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(MlflowException) as raised, masked_errors(settings):
        MlflowClient(url).search_experiments()  # the client's request, with no reachability check before it
    assert "API request to" in str(raised.value) and "driftloop:***@127.0.0.1" in str(raised.value)
    assert SECRET not in str(raised.value) and SECRET not in raised.value.message
