"""Every container of the rendered chart, run here with its own command, arguments and environment.

Service names map to loopback ports of real local servers (Debian's PostgreSQL and Redis; the MLflow and
Prefect servers are the chart's own containers, run from the project's venv), volume mounts to folders.
Each pod's init containers run first and must exit 0 (the wait for its stores among them); each server
must answer its probes; each Job must exit 0. This proves every command, port, variable and probe the
chart holds.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.chart.chart import NAMESPACE, find, pod_specs, render, secret_data
from tests.helpers import free_port, postgres_server, stop_group, wait_for_http

pytestmark = pytest.mark.chart

VENV_BIN = Path(sys.executable).parent
# Small data and model: the wiring is under test here, not the model.
FAST = ("bootstrap.rows=8000", "bootstrap.customers=400", "bootstrap.merchants=40", "bootstrap.nEstimators=30")


@dataclass
class LocalCluster:
    """The chart's workloads as local processes."""

    docs: list[dict]
    root: Path
    ports: dict[str, int] = field(default_factory=dict)  # "service:port" -> loopback port
    procs: list[subprocess.Popen] = field(default_factory=list)
    servers: dict[str, subprocess.Popen] = field(default_factory=dict)  # pod name -> its server

    def __post_init__(self) -> None:
        for svc in (d for d in self.docs if d["kind"] == "Service"):
            for port in svc["spec"]["ports"]:
                self.ports[f"{svc['metadata']['name']}:{port['port']}"] = free_port()
        self.ports["driftloop-fraud-predictor:80"] = free_port()  # KServe makes this Service
        self.config = find(self.docs, "ConfigMap", "driftloop-config")["data"]
        self.secrets = {d["metadata"]["name"]: secret_data(d) for d in self.docs if d["kind"] == "Secret"}

    def local(self, service: str) -> str:
        return f"127.0.0.1:{self.ports[service]}"

    # What a pod sees -------------------------------------------------------------------------------
    def _hosts(self, value: str) -> str:
        """Service addresses (short or cluster-local names) to loopback ports."""
        for service, port in self.ports.items():
            name, svc_port = service.split(":")
            short = name.split(".")[0]
            pattern = rf"\b{re.escape(short)}(\.{NAMESPACE})?(\.[a-z]+)?(\.svc(\.cluster\.local)?)?:{svc_port}\b"
            value = re.sub(pattern, f"127.0.0.1:{port}", value)
        return value

    def _paths(self, value: str, mounts: dict[str, Path]) -> str:
        for mount in sorted(mounts, key=len, reverse=True):
            if value == mount or value.startswith(mount + "/"):
                return str(mounts[mount]) + value[len(mount):]
            value = value.replace(f"={mount}", f"={mounts[mount]}")
        return value

    def mounts(self, pod: str, spec: dict, container: dict) -> dict[str, Path]:
        """mountPath -> folder: a claim is one folder for every pod; an emptyDir is the pod's own."""
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        found = {}
        for mount in container.get("volumeMounts", []):
            volume = volumes.get(mount["name"], {})
            if "persistentVolumeClaim" in volume:
                folder = self.root / "claims" / volume["persistentVolumeClaim"]["claimName"]
            else:
                folder = self.root / "pods" / pod / mount["name"]
            folder.mkdir(parents=True, exist_ok=True)
            if "secret" in volume:  # its keys as files, the Services' names in them mapped as in variables
                data = self.secrets[volume["secret"]["secretName"]]
                for item in volume["secret"].get("items") or [{"key": k, "path": k} for k in data]:
                    (folder / item["path"]).write_text(self._hosts(data[item["key"]]))
            found[mount["mountPath"]] = folder
        return found

    def env(self, container: dict, mounts: dict[str, Path], listen: dict[int, int]) -> dict[str, str]:
        env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "LANG": "C.UTF-8"}  # the image's PATH, nothing of ours
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env.update(self.config)
            else:
                env.update(self.secrets[source["secretRef"]["name"]])  # the workload's own Secret
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = str(var["value"])
            else:
                ref = var["valueFrom"]["secretKeyRef"]
                env[var["name"]] = self.secrets[ref["name"]][ref["key"]]
        for name, value in env.items():
            if name.endswith("_PORT") and value.isdigit() and int(value) in listen:
                value = str(listen[int(value)])
            env[name] = self._paths(self._hosts(value), mounts)
        return env

    def command(self, container: dict, env: dict[str, str], mounts: dict[str, Path],
                listen: dict[int, int]) -> list[str]:
        argv = [*container.get("command", ["driftloop"]), *container.get("args", [])]  # ENTRYPOINT driftloop
        out = []
        for i, arg in enumerate(map(str, argv)):
            arg = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg)  # Kubernetes' $(VAR) expansion
            for inside, local in listen.items():  # the port this container listens on
                if re.fullmatch(rf"--[\w-]*port={inside}", arg):
                    arg = arg.replace(f"={inside}", f"={local}")
                elif arg == str(inside) and i and str(argv[i - 1]).endswith("port"):
                    arg = str(local)
            out.append(self._paths(self._hosts(arg), mounts))
        binary = VENV_BIN / out[0]
        return [str(binary) if binary.exists() else out[0], *out[1:]]

    def prepare(self, pod: str, spec: dict, container: dict, listen: dict[int, int] | None = None):
        listen = listen or {}
        mounts = self.mounts(pod, spec, container)
        env = self.env(container, mounts, listen)
        return self.command(container, env, mounts, listen), env

    # Running -----------------------------------------------------------------------------------------
    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = (self.root / "logs" / f"{name}.log").open("w")
        proc = subprocess.Popen(argv, env=env, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, name: str, argv: list[str], env: dict[str, str], timeout: float = 300) -> None:
        proc = self.start(name, argv, env)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not finish in {timeout:.0f} s:\n{self.tail(name)}")
        assert code == 0, f"{name} exited {code}:\n{self.tail(name)}"

    def tail(self, name: str) -> str:
        return (self.root / "logs" / f"{name}.log").read_text()[-3000:]

    def wait_http(self, name: str, port: int, path: str, proc: subprocess.Popen, timeout: float = 120) -> None:
        wait_for_http(f"http://127.0.0.1:{port}{path}", proc, self.root / "logs" / f"{name}.log", timeout)

    @property
    def workdir(self) -> Path:
        """The working directory (the image's /app, read-only there): nothing may be written into it."""
        folder = self.root / "app"
        folder.mkdir(exist_ok=True)
        return folder

    def stop(self) -> None:
        for proc in self.procs:
            stop_group(proc)

def container_of(docs: list[dict], kind: str, name: str, container: str | None = None) -> tuple[dict, dict]:
    """The pod spec and one container: the named one, else the pod's (first) main container."""
    spec = next(s for _, s in pod_specs([find(docs, kind, name)]))
    if container is None:
        return spec, spec["containers"][0]
    return spec, next(c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == container)


def run_init_containers(cluster: LocalCluster, pod: str, spec: dict) -> None:
    """A pod's init containers, in order, as the kubelet runs them: each must exit 0 before the next."""
    for container in spec.get("initContainers", []):
        argv, env = cluster.prepare(pod, spec, container)
        cluster.run(f"{pod}-{container['name']}", argv, env, timeout=300)


def probe_exec(cluster: LocalCluster, probe: dict, env: dict[str, str], extra: list[str]) -> None:
    """An exec probe as the kubelet runs it, pointed at the local server's port."""
    binary, *args = probe["exec"]["command"]
    result = subprocess.run([binary, *extra, *args], env=env, capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0, f"{probe['exec']['command']}: {result.stdout}{result.stderr}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    root = tmp_path_factory.mktemp("cluster")
    (root / "logs").mkdir()
    cluster = LocalCluster(render("kind", *FAST), root)
    try:
        with postgres_server() as admin_dsn:
            yield from _stores_up(cluster, admin_dsn)
    finally:
        cluster.stop()


def _stores_up(cluster: LocalCluster, admin_dsn: str) -> Iterator[LocalCluster]:
    docs = cluster.docs
    # PostgreSQL: what the official image does on an empty data dir (its superuser `postgres`, then the
    # init scripts the chart mounts, with the pod's environment), on Debian's server.
    spec, pg = container_of(docs, "StatefulSet", "driftloop-postgres")
    env = {v["name"]: v.get("value") or cluster.secrets[v["valueFrom"]["secretKeyRef"]["name"]][
        v["valueFrom"]["secretKeyRef"]["key"]] for v in pg["env"]}
    assert env["POSTGRES_USER"] == "postgres"  # the server made by postgres_server(), trusting loopback
    port = int(admin_dsn.rsplit(":", 1)[1].split("/")[0])
    cluster.ports["driftloop-postgres:5432"] = port
    init = find(docs, "ConfigMap", "driftloop-postgres-init")["data"]
    for name in sorted(init):
        (cluster.root / name).write_text(init[name])
        result = subprocess.run(["bash", "-c", f". {cluster.root / name}"], capture_output=True, text=True,
                                env={**env, "PATH": os.environ["PATH"], "PGHOST": "127.0.0.1", "PGPORT": str(port)},
                                timeout=60, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
    probe_exec(cluster, pg["readinessProbe"], {"PATH": os.environ["PATH"], "PGPORT": str(port)}, [])

    # Redis: the chart's command and arguments on Debian's redis-server, on a loopback port.
    spec, redis = container_of(docs, "StatefulSet", "driftloop-redis")
    argv, env = cluster.prepare("redis", spec, redis)
    redis_port = cluster.ports["driftloop-redis:6379"]
    cluster.start("redis", [*argv, "--port", str(redis_port), "--bind", "127.0.0.1"], env)
    deadline = time.monotonic() + 20
    while subprocess.run(["redis-cli", "-p", str(redis_port), "-h", "127.0.0.1", "ping"], env=env,
                         capture_output=True, check=False).stdout.strip() != b"PONG":
        assert time.monotonic() < deadline, cluster.tail("redis")
        time.sleep(0.2)
    probe_exec(cluster, redis["readinessProbe"], env, ["-p", str(redis_port)])

    # The chart's Prefect server, on its database in PostgreSQL (made by the init SQL above).
    proc, container, port = start_server(cluster, "Deployment", "driftloop-prefect", "driftloop-prefect:4200")
    probe_paths(cluster, "driftloop-prefect", container, port, proc, timeout=180)
    yield cluster


def start_server(cluster: LocalCluster, kind: str, name: str, service: str) -> tuple[subprocess.Popen, dict, int]:
    spec, container = container_of(cluster.docs, kind, name)
    run_init_containers(cluster, name, spec)
    inside = container["ports"][0]["containerPort"]
    local = cluster.ports[service]
    argv, env = cluster.prepare(name, spec, container, listen={inside: local})
    cluster.servers[name] = cluster.start(name, argv, env)
    return cluster.servers[name], container, local


def probe_paths(cluster: LocalCluster, name: str, container: dict, port: int, proc, timeout: float) -> None:
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if probe in container:
            cluster.wait_http(name, port, container[probe]["httpGet"]["path"], proc, timeout)


@pytest.fixture(scope="module")
def mlflow(cluster) -> int:
    proc, container, port = start_server(cluster, "Deployment", "driftloop-mlflow", "driftloop-mlflow:5000")
    probe_paths(cluster, "driftloop-mlflow", container, port, proc, timeout=120)
    return port


def credentials(cluster: LocalCluster, secret: str) -> tuple[str, str]:
    """The MLflow user and password a workload's Secret gives it."""
    data = cluster.secrets[secret]
    return data["MLFLOW_TRACKING_USERNAME"], data["MLFLOW_TRACKING_PASSWORD"]


def test_mlflow_server_answers_its_probes_and_the_service_name(cluster, mlflow):
    # MLflow refuses unknown Host headers: the Service's name must be among the allowed ones.
    api = f"http://127.0.0.1:{mlflow}/api/2.0/mlflow/registered-models/search"  # /health skips the check
    admin = credentials(cluster, "driftloop-env")
    for host in ("driftloop-mlflow:5000", f"driftloop-mlflow.{NAMESPACE}.svc.cluster.local:5000", "localhost:5000"):
        assert httpx.get(api, headers={"Host": host}, auth=admin, timeout=5).status_code == 200, host
    assert httpx.get(api, headers={"Host": "evil.example:5000"}, auth=admin, timeout=5).status_code == 403
    assert httpx.get(api, timeout=5).status_code == 401  # basic-auth: no credentials, no answer
    assert httpx.get(f"http://127.0.0.1:{mlflow}/health", timeout=5).status_code == 200  # the probes need none


def test_mlflow_server_starts_no_job_runner(cluster, mlflow):
    """MLflow 3's job runner (a consumer per job type, ~1.5 GiB together) idled the pod at its limit."""
    server = cluster.servers["driftloop-mlflow"]
    processes = subprocess.run(["ps", "-o", "rss=,args=", "--sid", str(server.pid)], capture_output=True, text=True,
                               check=True).stdout.splitlines()
    assert processes and not [line for line in processes if "huey" in line or "_job_runner" in line], processes


@pytest.fixture(scope="module")
def bootstrapped(cluster, mlflow) -> LocalCluster:
    doc = find(cluster.docs, "Job", "driftloop-bootstrap")
    spec = doc["spec"]["template"]["spec"]
    for container in spec["initContainers"] + spec["containers"]:  # in order, each must exit 0
        argv, env = cluster.prepare("bootstrap", spec, container)
        cluster.run(f"bootstrap-{container['name']}", argv, env, timeout=300)
    return cluster


def test_bootstrap_job_makes_a_champion_in_the_servers(bootstrapped, mlflow):
    from mlflow import MlflowClient

    url = f"http://127.0.0.1:{mlflow}"
    os.environ.update(zip(("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"),
                          credentials(bootstrapped, "driftloop-predictor"), strict=True))
    try:
        version = MlflowClient(url, url).get_model_version_by_alias("driftloop-fraud", "champion")
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME")
        os.environ.pop("MLFLOW_TRACKING_PASSWORD")
    assert version.version == "1"
    # The predictor's user (made by the bootstrap) reads the champion and cannot move it; the jobs' can.
    alias = f"{url}/api/2.0/mlflow/registered-models/alias"
    move = {"name": "driftloop-fraud", "alias": "champion", "version": "1"}
    assert httpx.post(alias, json=move, auth=credentials(bootstrapped, "driftloop-predictor"), timeout=5
                      ).status_code == 403
    assert httpx.post(alias, json=move, timeout=5).status_code == 401
    assert httpx.post(alias, json=move, auth=credentials(bootstrapped, "driftloop-env"), timeout=5).status_code == 200
    with psycopg.connect(bootstrapped.secrets["driftloop-env"]["DRIFTLOOP_POSTGRES_DSN"].replace(
            "driftloop-postgres:5432", bootstrapped.local("driftloop-postgres:5432"))) as db:
        # the Feast SQL registry, in its schema (the predictor's role may read it alone)
        assert db.execute("SELECT COUNT(*) FROM feast.feature_views").fetchone()[0] >= 2
        # the inference log, made by this role before the first champion (the predictor may only write it)
        assert db.execute("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = 'predictions'"
                          ).fetchone() == ("driftloop",)


def test_predictor_serves_the_champion_with_online_features(bootstrapped):
    proc, container, port = start_server(bootstrapped, "InferenceService", "driftloop-fraud",
                                         "driftloop-fraud-predictor:80")
    probe_paths(bootstrapped, "driftloop-fraud", container, port, proc, timeout=180)
    body = {"instances": [{"customer_id": 7, "merchant_id": 3, "amount": 120.0, "channel": "online",
                           "hour_of_day": 3, "distance_km": 40.0}]}
    response = httpx.post(f"http://127.0.0.1:{port}/v1/models/driftloop-fraud:predict", json=body, timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["entity_found"] == [True] and 0.0 <= response.json()["predictions"][0] <= 1.0


def test_evidently_ui_answers_its_probes(bootstrapped):
    proc, container, port = start_server(bootstrapped, "Deployment", "driftloop-evidently",
                                         "driftloop-evidently:8000")
    probe_paths(bootstrapped, "driftloop-evidently", container, port, proc, timeout=120)


def test_retrainer_registers_the_deployment_and_runs_a_submitted_flow_run(bootstrapped, mlflow):
    spec, container = container_of(bootstrapped.docs, "Deployment", "driftloop-retrainer")
    run_init_containers(bootstrapped, "retrainer", spec)
    port = free_port()
    argv, env = bootstrapped.prepare("retrainer", spec, container, listen={8080: port})
    proc = bootstrapped.start("retrainer", argv, env)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        bootstrapped.wait_http("retrainer", port, container[probe]["httpGet"]["path"], proc)

    # `make submit-pipeline ENGINE=prefect` does this through a port-forward.
    api = f"http://{bootstrapped.local('driftloop-prefect:4200')}/api"
    submit = subprocess.run([str(VENV_BIN / "driftloop"), "pipeline", "submit", "--engine", "prefect", "--url", api],
                            env={**env, "PREFECT_API_URL": api}, capture_output=True, text=True, timeout=120,
                            check=False)
    assert submit.returncode == 0, submit.stderr
    run_id = re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", submit.stdout).group(0)
    deadline = time.monotonic() + 300
    while True:
        state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=5).json()["state"]["type"]
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        assert time.monotonic() < deadline, f"flow run still {state}:\n{bootstrapped.tail('retrainer')}"
        time.sleep(1)
    assert state == "COMPLETED", bootstrapped.tail("retrainer")


def test_cronjobs_run_against_the_stores(bootstrapped):
    for name in ("driftloop-materialize", "driftloop-monitor"):
        spec, container = container_of(bootstrapped.docs, "CronJob", name)
        run_init_containers(bootstrapped, name, spec)
        argv, env = bootstrapped.prepare(name, spec, container)
        bootstrapped.run(name, argv, env, timeout=300)


def test_nothing_was_written_outside_the_mounted_volumes(bootstrapped):
    """The image's root file system is read-only: every write must land on a volume."""
    assert list(bootstrapped.workdir.iterdir()) == []
