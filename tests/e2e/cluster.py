"""``make e2e``: the cluster half of driftloop, end to end, on a real kind cluster on this machine.

Deploys with ``make deploy`` (AIRGAP=1 by default: every image built here), then drives the loop the way
a user does (``make predict``, ``make submit-pipeline``, drifted traffic, the monitor's CronJob,
``make dashboards``), breaks things (a predictor, MLflow and PostgreSQL pod deleted under traffic) and
removes it all with ``make undeploy``. Each step is timed; the run ends with a table of the steps and a
``N passed, N failed`` line. Logs, screenshots and the table are kept in ``.e2e/``.

    make e2e                      # or: python tests/e2e/cluster.py [--keep] [--from STEP]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
OUT = ROOT / ".e2e"
NAMESPACE = os.environ.get("NAMESPACE", "kubeflow")
VALUES = os.environ.get("VALUES", "helm/values/kind-small.yaml")
MODEL = "driftloop-fraud"
PREDICT = f"/v1/models/{MODEL}:predict"


def versions() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (ROOT / "infra/versions.env").read_text().splitlines()
             if "=" in line and not line.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def tool_env() -> dict[str, str]:
    """The environment infra/lib.sh gives the scripts: with AIRGAP=1, the tools and engine built here."""
    env = dict(os.environ, NAMESPACE=NAMESPACE, VALUES=VALUES)
    env.setdefault("AIRGAP", "1")
    if env["AIRGAP"] == "1":
        v = versions()
        cache = Path(env.get("DRIFTLOOP_AIRGAP_CACHE") or Path(env.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                     / "driftloop/airgap")
        env["DOCKER_HOST"] = f"unix://{cache}/docker/docker.sock"
        bins = [cache / "bin" / f"{name}-{v[key]}" for name, key in
                (("helm", "HELM_VERSION"), ("kind", "KIND_VERSION"), ("kubernetes", "KUBECTL_VERSION"))]
        env["PATH"] = os.pathsep.join([str(cache / "docker/cli"), *map(str, bins), env["PATH"]])
    return env


ENV = tool_env()


class StepFailed(AssertionError):
    pass


def sh(cmd: str | list[str], *, timeout: float = 600, check: bool = True, log: str | None = None,
       input: str | None = None) -> str:
    """Run a command with the tools' environment. With `log`, its output goes to .e2e/<log>.log as it comes
    and its `==>` stage lines are shown (long steps show progress)."""
    args = shlex.split(cmd) if isinstance(cmd, str) else cmd
    if log is None:
        result = subprocess.run(args, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                                input=input, check=False)
        returncode, stdout, output = result.returncode, result.stdout, result.stdout + result.stderr
    else:
        lines: list[str] = []
        with (OUT / f"{log}.log").open("w") as sink, subprocess.Popen(
                args, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            timer = threading.Timer(timeout, proc.kill)
            timer.start()
            for line in proc.stdout:
                sink.write(line)
                sink.flush()
                lines.append(line)
                if line.startswith("==> "):
                    print(f"    {line.rstrip()}", flush=True)
            timer.cancel()
        returncode, stdout = proc.returncode, "".join(lines)
        output = stdout
    if check and returncode != 0:
        raise StepFailed(f"`{' '.join(args)}` exited {returncode}:\n{output[-3000:]}")
    return stdout


def kubectl(*args: str, timeout: float = 120, check: bool = True, input: str | None = None) -> str:
    return sh(["kubectl", "-n", NAMESPACE, *args], timeout=timeout, check=check, input=input)


def kjson(*args: str) -> dict:
    return json.loads(kubectl("get", *args, "-o", "json"))


@contextlib.contextmanager
def forward(target: str, port: int, namespace: str = NAMESPACE) -> Iterator[str]:
    """kubectl port-forward to a free local port; yields http://127.0.0.1:PORT."""
    proc = subprocess.Popen(["kubectl", "-n", namespace, "port-forward", target, f":{port}", "--address",
                             "127.0.0.1"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        if not match:
            raise StepFailed(f"port-forward {target}: {line}{proc.stdout.read() if proc.poll() is not None else ''}")
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its pipe drained
        yield f"http://127.0.0.1:{match.group(1)}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def until(what: str, probe: Callable[[], object], timeout: float, every: float = 3.0) -> object:
    """Poll until probe() returns something truthy; its last exception or value explains a time-out."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            value = probe()
            if value:
                return value
            last = value
        except Exception as error:  # a probe of a cluster in motion fails in many ways; retried
            last = error
        time.sleep(every)
    raise StepFailed(f"{what}: not within {timeout:.0f} s (last: {last!r})")


# ---------------------------------------------------------------- cluster facts used by several steps


def pods(selector: str = "") -> list[dict]:
    return kjson("pods", *(["-l", selector] if selector else []))["items"]


def predictor_pods() -> list[dict]:
    return [p for p in pods(f"serving.kserve.io/inferenceservice={MODEL}")
            if not p["metadata"].get("deletionTimestamp")]


def psql(sql: str) -> str:
    pod = kjson("pods", "-l", "app.kubernetes.io/component=postgres")["items"][0]["metadata"]["name"]
    return kubectl("exec", pod, "--", "psql", "-h", "/var/run/postgresql", "-U", "driftloop", "-d", "driftloop", "-tAc",
                   sql).strip()


_CREDENTIALS: dict[str, tuple[str, str]] = {}


def mlflow_user(secret: str = "driftloop-predictor") -> tuple[str, str]:
    """The MLflow user and password of a workload's Secret: the predictor's reads, the platform's
    (driftloop-env) registers and moves aliases. MLflow's basic-auth app answers nothing without one."""
    if secret not in _CREDENTIALS:
        import base64

        data = kjson(f"secret/{secret}")["data"]
        _CREDENTIALS[secret] = tuple(base64.b64decode(data[key]).decode() for key in (
            "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"))
    return _CREDENTIALS[secret]


def mlflow_champion(url: str) -> str:
    r = httpx.get(f"{url}/api/2.0/mlflow/registered-models/alias", params={"name": MODEL, "alias": "champion"},
                  auth=mlflow_user(), timeout=10)
    r.raise_for_status()
    return r.json()["model_version"]["version"]


def run_job(name: str, from_cronjob: str, args: list[str] | None = None, timeout: float = 900) -> str:
    """A Job made from one of the chart's CronJobs (its args replaced when given); waits, returns its logs."""
    template = kjson(f"cronjob/{from_cronjob}")["spec"]["jobTemplate"]
    if args is not None:
        template["spec"]["template"]["spec"]["containers"][0]["args"] = args
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": NAMESPACE},
           "spec": template["spec"]}
    kubectl("delete", "job", name, "--ignore-not-found", "--wait")
    kubectl("create", "-f", "-", input=json.dumps(job))

    def done() -> str | None:
        status = kjson(f"job/{name}").get("status", {})
        if status.get("succeeded"):
            return "ok"
        if status.get("failed"):
            raise StepFailed(f"job {name} failed:\n{kubectl('logs', f'job/{name}', '--tail=60', check=False)}")
        return None

    until(f"job {name}", done, timeout, every=5)
    return kubectl("logs", f"job/{name}", "--tail=400")


def scheduled_checks(suspend: bool) -> None:
    """Suspend (or resume) the monitor's CronJob; on suspending, wait out a check it has already started."""
    kubectl("patch", "cronjob/driftloop-monitor", "--type=merge", "-p", json.dumps({"spec": {"suspend": suspend}}))
    if suspend:
        until("the monitor's scheduled checks to finish",
              lambda: not kjson("cronjob/driftloop-monitor").get("status", {}).get("active"), 3600, every=5)


def send(url: str, instances: list[dict], threads: int = 4) -> dict:
    """POST single-instance requests to the predictor; answers by version and failures."""
    from monitoring.demo import post_requests

    return post_requests(url + PREDICT, instances, threads)


def traffic(label: str, rows: int, stream: int, drift: str) -> list[dict]:
    """Requests by entity from the generator's world (the same customers and merchants as the bootstrap)."""
    from monitoring.demo import DemoConfig, traffic_window

    b = bootstrap_values()
    cfg = DemoConfig(traffic=rows, customers=b["customers"], merchants=b["merchants"], seed=7)
    return traffic_window(cfg, stream, drift, label)[0]


def bootstrap_values() -> dict:
    import yaml

    merged = yaml.safe_load((ROOT / "helm/driftloop/values.yaml").read_text())["bootstrap"]
    merged.update((yaml.safe_load((ROOT / VALUES).read_text()) or {}).get("bootstrap", {}))
    return merged


# ---------------------------------------------------------------- the steps


@dataclass
class Step:
    name: str
    fn: Callable[[], str]
    always: bool = False


@dataclass
class Result:
    name: str
    ok: bool | None
    seconds: float
    detail: str = ""


STEPS: list[Step] = []


def step(name: str, always: bool = False) -> Callable[[Callable[[], str]], Callable[[], str]]:
    def register(fn: Callable[[], str]) -> Callable[[], str]:
        STEPS.append(Step(name, fn, always))
        return fn

    return register


def inotify_limits() -> str:
    """kind's nodes watch many files: raise the host's inotify limits (as root) the way preflight asks."""
    wanted = {"max_user_watches": 524288, "max_user_instances": 512}
    low = {k: v for k, v in wanted.items() if int(Path(f"/proc/sys/fs/inotify/{k}").read_text()) < v}
    if low and os.geteuid() == 0:
        for key, value in low.items():
            Path(f"/proc/sys/fs/inotify/{key}").write_text(str(value))
        return "raised inotify " + ", ".join(f"{k}={v}" for k, v in low.items()) + "; "
    return ""


@step("deploy")
def deploy() -> str:
    # on a bare machine there is no kind yet (the deploy builds it), so no cluster either
    if shutil.which("kind", path=ENV["PATH"]) and "driftloop" in sh(["kind", "get", "clusters"], check=False).split():
        raise StepFailed("a kind cluster named driftloop exists: the e2e starts from none "
                         f"(`make undeploy AIRGAP={ENV['AIRGAP']}` removes it, data included)")
    raised = inotify_limits()
    t0 = time.monotonic()
    out = sh(["make", "deploy", f"AIRGAP={ENV['AIRGAP']}", f"VALUES={VALUES}"], timeout=5400, log="deploy")
    stages = re.findall(r"^==> (\[\d/8\][^\n]*)", out, re.M)
    built = re.findall(r"^\s+(\S+): built in (\d+) s", out, re.M)
    return (f"{raised}{time.monotonic() - t0:.0f} s, {len(stages)} stages; built: "
            + (", ".join(f"{n.split('/')[-1]} {s}s" for n, s in built) or "nothing (all cached)"))


@step("pods settle: Ready, no restart")
def settled() -> str:
    def all_ready() -> list[dict] | None:
        items = json.loads(sh(["kubectl", "get", "pods", "-A", "-o", "json"]))["items"]
        running = [p for p in items if p["status"].get("phase") != "Succeeded"]
        ready = all(c.get("ready") for p in running for c in p["status"].get("containerStatuses", []))
        return items if ready and running else None

    items = until("every pod Ready", all_ready, 600, every=5)
    ours = {NAMESPACE, "kserve"}
    restarts = {}
    for p in items:
        for c in p["status"].get("containerStatuses", []):
            if c["restartCount"]:
                last = c.get("lastState", {}).get("terminated", {})
                restarts[f"{p['metadata']['namespace']}/{p['metadata']['name']}"] = (
                    f"{c['restartCount']}x {last.get('reason', '?')}: {last.get('message', '')[:160]}")
    mine = {k: v for k, v in restarts.items() if k.split("/")[0] in ours}
    if mine:
        raise StepFailed("restarts: " + "; ".join(f"{k} {v}" for k, v in mine.items()))
    memory = sh(["docker", "stats", "--no-stream", "--format", "{{.MemUsage}} {{.CPUPerc}}"], check=False).strip()
    others = "; ".join(f"{k} {v}" for k, v in restarts.items())
    return (f"{len(items)} pods Ready, none of {NAMESPACE}/kserve restarted; node {memory}"
            + (f"\nsystem pods restarted at boot: {others}" if others else ""))


CODE_HASH = """
import hashlib, importlib.util, pathlib, sys
total = hashlib.sha256()
for package in sys.argv[1:]:
    root = pathlib.Path(importlib.util.find_spec(package).origin).parent
    for path in sorted(root.rglob("*.py")):
        total.update(f"{package}/{path.relative_to(root).as_posix()}".encode() + b"\\0" + path.read_bytes())
print(total.hexdigest())
"""
PACKAGES = ("driftloop", "pipelines", "serving", "monitoring")


@step("the pods run this tree's code")
def same_code() -> str:
    """The image's installed packages, file by file, against the working tree: a build cache that kept an
    old wheel of the project (it happened: uv keys a local project's wheel on pyproject.toml) shows here."""
    here = subprocess.run([sys.executable, "-c", CODE_HASH, *PACKAGES], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    pods_checked = []
    for pod in predictor_pods() + pods("app.kubernetes.io/component=retrainer"):
        name = pod["metadata"]["name"]
        there = kubectl("exec", name, "-c", pod["spec"]["containers"][0]["name"], "--", "python", "-c", CODE_HASH,
                        *PACKAGES).strip()
        assert there == here, f"{name} runs other code than this tree ({there[:12]} != {here[:12]}): rebuild the image"
        pods_checked.append(name)
    assert pods_checked, "no predictor or retrainer pod to check"
    return f"{len(pods_checked)} pods: {', '.join(PACKAGES)} match the tree file by file ({here[:12]})"


@step("kubelet enforces non-root, read-only root, resources, probes")
def enforced() -> str:
    checked = 0
    for pod in pods("app.kubernetes.io/instance=driftloop") + predictor_pods():
        if pod["status"].get("phase") != "Running":
            continue
        for c in pod["spec"]["containers"]:
            name = f"{pod['metadata']['name']}/{c['name']}"
            assert c.get("resources", {}).get("requests") and c["resources"].get("limits"), f"{name}: no resources"
            batch = any(owner["kind"] == "Job" for owner in pod["metadata"].get("ownerReferences", []))
            assert batch or c.get("readinessProbe") or c.get("livenessProbe"), f"{name}: no probe"  # servers
            uid = kubectl("exec", pod["metadata"]["name"], "-c", c["name"], "--", "id", "-u").strip()
            assert uid != "0", f"{name} runs as root"
            wrote = kubectl("exec", pod["metadata"]["name"], "-c", c["name"], "--", "sh", "-c",
                            "touch /e2e-probe 2>/dev/null && echo wrote || echo refused").strip()
            assert wrote == "refused", f"{name}: the root file system is writable"
            checked += 1
    assert checked >= 6, f"only {checked} containers checked"
    return f"{checked} containers: uid != 0, / read-only, requests+limits, probes (servers; a Job's run has none)"


@step("make predict (by entity, features from Redis)")
def predict() -> str:
    out = sh(["make", "predict", f"AIRGAP={ENV['AIRGAP']}"], timeout=300, log="predict")
    assert "entity_found" in out or "found" in out, out[-500:]
    with forward(f"svc/{MODEL}-predictor", 80) as url:
        body = httpx.post(url + PREDICT, json={"instances": [
            {"customer_id": 7, "merchant_id": 3, "amount": 120.5, "channel": "online", "hour_of_day": 3}]},
            timeout=30).json()
    assert body["entity_found"] == [True], body
    return f"v{body['model_version']}: p={body['predictions'][0]:.4f}, entity_found {body['entity_found']}"


@step("make submit-pipeline ENGINE=prefect -> new version in MLflow")
def submit() -> str:
    with forward("svc/driftloop-mlflow", 5000) as mlflow:
        before = latest_version(mlflow)
        out = sh(["make", "submit-pipeline", "ENGINE=prefect", f"AIRGAP={ENV['AIRGAP']}"], timeout=300, log="submit")
        flow_run = re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", out)
        assert flow_run, out[-800:]
        with forward("svc/driftloop-prefect", 4200) as prefect:
            state = until("flow run completes", lambda: flow_state(prefect, flow_run.group(0)), 1200, every=10)
        assert state == "COMPLETED", state
        after = latest_version(mlflow)
    assert after > before, (before, after)
    return f"flow run {flow_run.group(0)[:8]} COMPLETED; MLflow versions {before} -> {after}"


def latest_version(mlflow: str) -> int:
    r = httpx.get(f"{mlflow}/api/2.0/mlflow/model-versions/search", params={"filter": f"name='{MODEL}'"},
                  auth=mlflow_user(), timeout=10)
    r.raise_for_status()
    return max((int(v["version"]) for v in r.json().get("model_versions", [])), default=0)


def gate_reasons(mlflow: str) -> dict[str, str]:
    r = httpx.get(f"{mlflow}/api/2.0/mlflow/model-versions/search", params={"filter": f"name='{MODEL}'"},
                  auth=mlflow_user(), timeout=10)
    return {v["version"]: next((t["value"] for t in v.get("tags", []) if t["key"] == "gate.reason"), "?")
            for v in r.json().get("model_versions", [])}


def flow_state(prefect: str, flow_run_id: str) -> str | None:
    state = httpx.get(f"{prefect}/api/flow_runs/{flow_run_id}", timeout=10).json()["state"]["type"]
    if state in {"FAILED", "CRASHED", "CANCELLED"}:
        raise StepFailed(f"flow run {flow_run_id} {state}")
    return state if state == "COMPLETED" else None


@step("drift -> monitor -> Prefect retraining -> gate -> served without restart")
def drift_loop() -> str:
    b = bootstrap_values()
    gen = ["data", "generate", f"--rows={b['rows']}", f"--customers={b['customers']}",
           f"--merchants={b['merchants']}", "--drift=shift", "--drift-days=30"]
    run_job("e2e-shift-data", "driftloop-materialize", gen)
    run_job("e2e-shift-features", "driftloop-materialize")
    restarts_before = {p["metadata"]["name"]: p["status"]["containerStatuses"][0]["restartCount"]
                       for p in predictor_pods()}
    window = 2000
    # the CronJob's own checks would take signals and start the retraining themselves, at times of their own
    scheduled_checks(suspend=True)
    try:
        with forward("svc/driftloop-mlflow", 5000) as mlflow:
            champion = mlflow_champion(mlflow)
            checks = []
            for n in (1, 2):
                with forward(f"svc/{MODEL}-predictor", 80) as url:
                    sent = send(url, traffic(f"shift{n}", window, 10 + n, "shift"))
                assert sent["failures"] == 0, sent
                logs = run_job(f"e2e-monitor-{n}", "driftloop-monitor", timeout=2400)
                (OUT / f"monitor-{n}.log").write_text(logs)
                checks.append(logs)
            new = mlflow_champion(mlflow)
            gates = gate_reasons(mlflow)
    finally:
        scheduled_checks(suspend=False)
    verdict = [line for line in checks[0].splitlines() if "share" in line]
    assert verdict and "no drift" not in verdict[0], f"the first check found no drift:\n{checks[0][-1500:]}"
    assert "started:" in checks[1], f"the second check started no retraining:\n{checks[1][-1500:]}"
    assert new != champion, f"champion stayed v{champion}; the gate said: {gates}"

    def served_by_new() -> dict | None:
        with forward(f"svc/{MODEL}-predictor", 80) as url:
            got = send(url, traffic("after", 50, 30, "shift"), threads=2)
        return got if set(got["versions"]) == {new} and not got["failures"] else None

    after = until(f"predictor answers with v{new}", served_by_new, 180, every=5)
    restarts_after = {p["metadata"]["name"]: p["status"]["containerStatuses"][0]["restartCount"]
                      for p in predictor_pods()}
    assert restarts_after == restarts_before, (restarts_before, restarts_after)
    return f"v{champion} -> v{new} promoted by the monitor's retraining; {after['answered']} answers from v{new}, " \
           "same pods, no restart"


@contextlib.contextmanager
def signed_in(upstream: str, user: tuple[str, str]) -> Iterator[str]:
    """A local HTTP proxy to `upstream` that adds the user's basic auth to every request: what a browser does
    once its user typed them in. Headless Chromium cannot type, and its pages cannot fetch from a URL with
    credentials in it (MLflow's UI, loaded from http://user:pass@…, fails on its first request)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    client = httpx.Client(base_url=upstream, auth=user, timeout=30)
    hop = {"host", "authorization", "connection", "content-length", "transfer-encoding", "content-encoding",
           "accept-encoding", "keep-alive"}

    class Relay(BaseHTTPRequestHandler):
        def relay(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                answer = client.request(self.command, self.path, content=body,
                                        headers={k: v for k, v in self.headers.items() if k.lower() not in hop})
            except httpx.HTTPError as error:  # the port-forward is not up yet: as a gateway says it
                self.send_error(502, type(error).__name__)
                return
            self.send_response(answer.status_code)
            for key, value in answer.headers.multi_items():
                if key.lower() not in hop:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(answer.content)))
            self.end_headers()
            with contextlib.suppress(ConnectionError):  # the browser left before the answer: its business
                self.wfile.write(answer.content)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = relay

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Relay)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        client.close()


@step("make dashboards: Evidently, MLflow, Prefect in Chromium")
def dashboards() -> str:
    shots = OUT / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["make", "dashboards", f"AIRGAP={ENV['AIRGAP']}"], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    # MLflow asks for a user: the browser is signed in as the predictor's (read-only)
    try:
        with signed_in("http://127.0.0.1:5000", mlflow_user()) as mlflow:
            pages = {"evidently": "http://127.0.0.1:8000/", "mlflow": f"{mlflow}/#/models/{MODEL}",
                     "prefect": "http://127.0.0.1:4200/"}
            for name, page in pages.items():
                until(f"{name} answers",
                      lambda page=page: httpx.get(page.split("#")[0], timeout=5).status_code == 200, 90)
            assert httpx.get("http://127.0.0.1:5000/", timeout=5).status_code == 401, "MLflow answered with no user"
            # the drift panels: the monitor's project, not the list of projects
            projects = httpx.get("http://127.0.0.1:8000/api/projects", timeout=10).json()
            assert projects, "no Evidently project: the monitor made no snapshot"
            pages["evidently"] = f"http://127.0.0.1:8000/projects/{projects[0]['id']}"
            sizes = {}
            for name, page in pages.items():
                png = shots / f"{name}.png"
                png.unlink(missing_ok=True)
                subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                "--window-size=1400,900", "--virtual-time-budget=15000", f"--screenshot={png}", page],
                               capture_output=True, timeout=120, check=False)
                assert png.exists() and png.stat().st_size > 20_000, f"{name}: no screenshot (or a blank one)"
                sizes[name] = png.stat().st_size // 1024
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=20)
    return ", ".join(f"{n} {kb} KiB" for n, kb in sizes.items()) + f" in {shots.relative_to(ROOT)}/"


LOAD = """
import collections, json, sys, time, httpx
url, label, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
ok, errors, i = 0, collections.Counter(), 0
end = time.monotonic() + seconds
with httpx.Client(timeout=5) as c:
    while time.monotonic() < end:
        i += 1
        try:
            r = c.post(url, json={"instances": [{"transaction_id": f"{label}-{i}", "customer_id": i % 500,
                                                 "merchant_id": i % 50, "amount": 42.0, "channel": "online",
                                                 "hour_of_day": 12}]})
            if r.status_code == 200:
                ok += 1
            else:
                errors[f"HTTP {r.status_code}"] += 1
        except httpx.HTTPError as error:
            errors[type(error).__name__] += 1
            time.sleep(0.2)
print(json.dumps({"answered": ok, "failed": sum(errors.values()), "sent": i, "errors": dict(errors)}))
"""


def start_pod(name: str, labels: dict[str, str], script: str, args: list[str], limits: dict[str, str]) -> None:
    """A pod of the project's image running `python -c script args`, as restricted as the chart's pods."""
    image = kjson("deployment/driftloop-retrainer")["spec"]["template"]["spec"]["containers"][0]["image"]
    kubectl("delete", "pod", name, "--ignore-not-found", "--wait")
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
           "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{"name": "main", "image": image, "imagePullPolicy": "IfNotPresent",
                                    "command": ["python", "-c", script], "args": args,
                                    "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": limits},
                                    "securityContext": {"allowPrivilegeEscalation": False,
                                                        "readOnlyRootFilesystem": True,
                                                        "capabilities": {"drop": ["ALL"]}}}]}}
    kubectl("create", "-f", "-", input=json.dumps(pod))


def pod_output(name: str, timeout: float) -> dict:
    """Wait for the pod to end; its last line of output, as JSON."""
    until(f"{name} ends", lambda: kjson(f"pod/{name}")["status"].get("phase") in {"Succeeded", "Failed"}, timeout,
          every=5)
    result = json.loads(kubectl("logs", name).strip().splitlines()[-1])
    kubectl("delete", "pod", name, "--wait=false")
    return result


def load_pod(label: str, seconds: int) -> str:
    """A pod in the cluster that sends requests to the predictor's Service for `seconds` (survives its pods)."""
    name = f"e2e-load-{label}"
    start_pod(name, {"app.kubernetes.io/part-of": "driftloop-e2e"}, LOAD,
              [f"http://{MODEL}-predictor.{NAMESPACE}.svc{PREDICT}", label, str(seconds)],
              {"cpu": "500m", "memory": "512Mi"})
    until(f"load pod {name} runs", lambda: kjson(f"pod/{name}")["status"].get("phase") in {"Running", "Succeeded"},
          120)
    return name


def load_result(name: str, seconds: int) -> dict:
    return pod_output(name, seconds + 120)


def logged(label: str) -> int:
    return int(psql(f"SELECT count(*) FROM predictions WHERE transaction_id LIKE '{label}-%'"))


@step("fault: predictor pod deleted under load")
def kill_predictor() -> str:
    label = f"kill{uuid.uuid4().hex[:6]}"
    name = load_pod(label, 90)
    time.sleep(20)
    victim = predictor_pods()[0]["metadata"]["name"]
    kubectl("delete", "pod", victim, "--wait=false")
    result = load_result(name, 90)
    rows = until("the log catches up", lambda: logged(label) if logged(label) >= result["answered"] else None, 60)
    assert result["answered"] > 0 and rows >= result["answered"], (result, rows)
    replacement = until("a replacement is Ready", lambda: [p for p in predictor_pods() if p["metadata"]["name"] !=
                                                           victim and all(c.get("ready") for c in
                                                           p["status"].get("containerStatuses", []))], 180)
    return (f"{result['answered']} answered, {result['failed']} failed {result['errors']} while no pod was Ready; "
            f"{rows} rows logged "
            f"(= answered: the deleted pod flushed on SIGTERM); replacement {replacement[0]['metadata']['name']}")


@step("fault: MLflow pod deleted (serving goes on, reloads resume)")
def kill_mlflow() -> str:
    victim = kjson("pods", "-l", "app.kubernetes.io/component=mlflow")["items"][0]["metadata"]["name"]
    kubectl("delete", "pod", victim, "--wait=false")
    with forward(f"svc/{MODEL}-predictor", 80) as url:
        during = send(url, traffic("mlflowdown", 200, 40, "none"), threads=2)
    assert during["failures"] == 0, during
    kubectl("rollout", "status", "deployment/driftloop-mlflow", "--timeout=300s", timeout=320)
    # reloads resume: roll the champion back and see the predictor follow, then promote it again
    with forward("svc/driftloop-mlflow", 5000) as mlflow:
        champion = mlflow_champion(mlflow)
        until("MLflow answers", lambda: latest_version(mlflow), 120)
        # `driftloop rollback` where an operator has the platform's settings: in one of its pods
        rolled = subprocess.run(["kubectl", "-n", NAMESPACE, "exec", "deployment/driftloop-retrainer", "--",
                                 "driftloop", "rollback"], env=ENV, capture_output=True, text=True, timeout=180,
                                check=False)
        back_to = mlflow_champion(mlflow)
    assert back_to != champion, f"rollback from v{champion}: {rolled.stdout[-800:]}{rolled.stderr[-800:]}"

    def follows() -> dict | None:
        with forward(f"svc/{MODEL}-predictor", 80) as url:
            got = send(url, traffic("rollback", 20, 41, "none"), threads=1)
        return got if set(got["versions"]) == {back_to} else None

    until(f"predictor follows the rollback to v{back_to}", follows, 120, every=5)
    # MLflow's basic-auth: the predictor's user cannot move @champion (403), no user gets nothing (401)
    with forward("svc/driftloop-mlflow", 5000) as mlflow:
        move = {"name": MODEL, "alias": "champion", "version": champion}
        alias = f"{mlflow}/api/2.0/mlflow/registered-models/alias"
        as_predictor = httpx.post(alias, json=move, auth=mlflow_user(), timeout=10).status_code
        anonymous = httpx.post(alias, json=move, timeout=10).status_code
        still = mlflow_champion(mlflow)
    assert (as_predictor, anonymous) == (403, 401), f"moving @champion: predictor {as_predictor}, anonymous {anonymous}"
    assert still == back_to, f"@champion moved to v{still}"
    return (f"{during['answered']} answered while MLflow was down; rollback v{champion} -> v{back_to} served; "
            f"moving @champion: the predictor's user {as_predictor}, no user {anonymous}")


@step("fault: PostgreSQL pod deleted (serving goes on, the log catches up)")
def kill_postgres() -> str:
    label = f"pg{uuid.uuid4().hex[:6]}"
    name = load_pod(label, 60)
    time.sleep(10)
    victim = kjson("pods", "-l", "app.kubernetes.io/component=postgres")["items"][0]["metadata"]["name"]
    kubectl("delete", "pod", victim, "--wait=false")
    result = load_result(name, 60)
    kubectl("rollout", "status", "statefulset/driftloop-postgres", "--timeout=300s", timeout=320)
    metrics = {}
    with forward(f"svc/{MODEL}-predictor", 80) as url:
        for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
            if line.startswith("driftloop_inference_log_dropped_total"):
                metrics["dropped"] = float(line.split()[-1])
    rows = until("the log catches up", lambda: psql_count(label, result["answered"] - int(metrics.get("dropped", 0))),
                 180, every=5)
    logs = kubectl("logs", f"deployment/{MODEL}-predictor", "-c", "kserve-container", "--tail=3000",
                   check=False).splitlines()
    # the writer's own lines, and the last line of each traceback (the exception that made it drop a batch)
    writer = [line[-200:] for i, line in enumerate(logs) if "inference log" in line or (
        re.match(r"^[\w.]+(Error|Exception|Warning)\b", line) and i > 0 and logs[i - 1].startswith(" "))]
    # the predictor writes the log off the request path: PostgreSQL's restart must not fail requests
    assert result["failed"] <= result["sent"] // 1000, result
    # the writer retries while the store is away (up to retry_s, far longer than a restart): nothing lost
    assert int(metrics.get("dropped", 0)) == 0, f"{int(metrics['dropped'])} records dropped: " + "\n".join(writer[-8:])
    return (f"{result['answered']} answered, {result['failed']} failed {result['errors'] or ''} while PostgreSQL "
            f"restarted; {rows} rows logged, {int(metrics.get('dropped', 0))} dropped (counted)\n"
            + "\n".join(dict.fromkeys(writer[-40:])))


def psql_count(label: str, want: int) -> int | None:
    n = logged(label)
    return n if n >= want else None


PROBE = """
import json, socket, sys, time
def probe(target):
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=4).close()
        return "open"
    except OSError as error:
        return type(error).__name__
# A new pod's address reaches the policy engine's sets a moment after it starts: first wait (up to 60 s)
# until the targets this pod must reach answer and those it must not ("-") refuse, then probe every target.
must = [t[1:] for t in sys.argv[1:] if t.startswith("+")]
must_not = [t[1:] for t in sys.argv[1:] if t.startswith("-")]
deadline = time.monotonic() + 60
while time.monotonic() < deadline and not (all(probe(t) == "open" for t in must)
                                           and all(probe(t) != "open" for t in must_not)):
    time.sleep(1)
print(json.dumps({t.lstrip("+-"): probe(t.lstrip("+-")) for t in sys.argv[1:]}))
"""


def reach(name: str, labels: dict[str, str], targets: list[str]) -> dict[str, str]:
    """From a new pod with these labels, which of host:port targets accept a TCP connection (a `+` before a
    target: the pod waits until it answers before probing them all; a `-`: until it does not)."""
    start_pod(name, labels, PROBE, targets, {"cpu": "200m", "memory": "256Mi"})
    return pod_output(name, 120)


def component_labels(component: str) -> dict[str, str]:
    """The labels of one of the chart's components: a pod with them is under that component's policies."""
    return {"app.kubernetes.io/name": "driftloop", "app.kubernetes.io/instance": "driftloop",
            "app.kubernetes.io/part-of": "driftloop", "app.kubernetes.io/component": component}


@step("NetworkPolicies enforced (kube-router)")
def network_policy() -> str:
    stores = ["driftloop-postgres:5432", "driftloop-redis:6379", "driftloop-mlflow:5000", "driftloop-prefect:4200"]
    open_to_all = [f"{MODEL}-predictor:80", "driftloop-evidently:8000"]
    stranger = reach("e2e-stranger", {"e2e": "stranger"}, stores + [f"+{t}" for t in open_to_all])
    member = reach("e2e-member", {"app.kubernetes.io/part-of": "driftloop"}, [f"+{t}" for t in stores])
    blocked = [t for t in stores if stranger[t] != "open"]
    assert blocked == stores, f"a pod without the platform's labels reached: {stranger}"
    assert all(stranger[t] == "open" for t in open_to_all), f"namespace clients must reach the UIs: {stranger}"
    assert all(v == "open" for v in member.values()), f"the platform's pods must reach the stores: {member}"
    # Egress: each component reaches only what it needs. By the Services' addresses, so that a blocked DNS
    # does not pass for a blocked connection.
    ip = {}
    for target in stores + open_to_all:
        service, port = target.split(":")
        ip[target] = f"{kjson(f'svc/{service}')['spec']['clusterIP']}:{port}"
    # (not the UI's own Service, which takes this pod among its endpoints)
    ui = reach("e2e-as-evidently", component_labels("evidently"), [f"-{ip[t]}" for t in stores + open_to_all[:1]])
    assert all(v != "open" for v in ui.values()), f"a pod with the Evidently UI's labels reached: {ui}"
    needs = stores[:3]
    predictor = reach("e2e-as-predictor", component_labels("predictor"),
                      [f"+{t}" for t in needs] + [f"-{ip[t]}" for t in stores[3:] + open_to_all[1:]])
    assert all(predictor[t] == "open" for t in needs), f"the predictor's stores must be open to it: {predictor}"
    assert all(predictor[ip[t]] != "open" for t in stores[3:] + open_to_all[1:]), \
        f"a pod with the predictor's labels reached more than it needs: {predictor}"
    return (f"unlabelled pod: {len(blocked)} stores blocked ({', '.join(sorted(set(stranger[t] for t in stores)))}), "
            f"predictor and Evidently open; labelled pod: all {len(member)} stores open; as the Evidently UI: "
            f"none of {len(ui)} servers reached ({', '.join(sorted(set(ui.values())))}); as the predictor: "
            "PostgreSQL, Redis, MLflow by name, not Prefect nor the UI")


@step("make undeploy: nothing left", always=True)
def undeploy() -> str:
    sh(["make", "undeploy", f"AIRGAP={ENV['AIRGAP']}"], timeout=600, log="undeploy")
    clusters = sh(["kind", "get", "clusters"], check=False).split()
    assert "driftloop" not in clusters, clusters
    nodes = sh(["docker", "ps", "-a", "--filter", "label=io.x-k8s.kind.cluster=driftloop", "-q"], check=False)
    assert not nodes.strip(), f"kind node containers left: {nodes}"
    return "no kind cluster, no node container, no release"


def diagnostics() -> None:
    for ns in (NAMESPACE, "kserve"):
        sh(["kubectl", "get", "pods,jobs,events", "-n", ns, "-o", "wide"], check=False, log=f"diagnostics-{ns}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the cluster up (no undeploy)")
    parser.add_argument("--from", dest="start", default=None, help="start at this step (a cluster is up)")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    results: list[Result] = []
    failed = False
    started = args.start is None
    for s in STEPS:
        started = started or s.name.startswith(args.start)
        if not started or (args.keep and s.always):
            continue
        if failed and not s.always:
            results.append(Result(s.name, None, 0, "skipped (an earlier step failed)"))
            continue
        print(f"==> {s.name}", flush=True)
        t0 = time.monotonic()
        try:
            detail = s.fn()
            results.append(Result(s.name, True, time.monotonic() - t0, detail))
        except (AssertionError, subprocess.TimeoutExpired, httpx.HTTPError, KeyError, IndexError) as error:
            if not failed:
                diagnostics()
            failed = True
            results.append(Result(s.name, False, time.monotonic() - t0, str(error).strip()[-1500:]))
        print(f"    {results[-1].detail.splitlines()[0] if results[-1].detail else ''}", flush=True)
    width = max(len(r.name) for r in results)
    lines = [f"{'step':<{width}}  result  seconds  detail"]
    for r in results:
        mark = {True: "pass", False: "FAIL", None: "skip"}[r.ok]
        first, *rest = r.detail.splitlines() or [""]
        lines.append(f"{r.name:<{width}}  {mark:<6}  {r.seconds:7.0f}  {first}")
        lines.extend(f"{'':<{width + 18}}{line}" for line in rest[:20])
    passed = sum(r.ok is True for r in results)
    failures = sum(r.ok is False for r in results)
    lines.append(f"{passed} passed, {failures} failed")
    report = "\n".join(lines)
    (OUT / "report.txt").write_text(report + "\n")
    print("\n" + report)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
