"""``make bench-serving``: our server against the servers a user would pick instead, in one run.

One champion (trained here on default-size data), single-row requests, the same concurrency, ``wrk``
from a second process, one server at a time on this machine:

- driftloop, full-feature requests and entity-only requests (Feast lookup);
- ``mlflow models serve`` (``--env-manager local``), sent the README's request body unchanged;
- MLServer with its MLflow runtime (what KServe runs for ``modelFormat: mlflow``), from its own venv
  (``MLSERVER_PYTHON``: MLServer 1.7 needs a FastAPI older than Prefect accepts), sent the same row as v2
  tensors, typed as its metadata for the model's signature says (numbers FP64, categories BYTES).

The peers load the registered model itself: its pyfunc encodes the raw row (``pipelines/steps/pyfunc_model.py``),
so every server answers the same request with the same probability.
- two HTTP floors: a raw ASGI echo on uvicorn, and a FastAPI echo.

Prints requests/s, p50 and p99 per server and the ratios. Numbers, not pass/fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from driftloop.contracts import BY_NAME
from driftloop.settings import Settings

MODEL = "driftloop-fraud"
ROW = {"amount": 120.5, "channel": "online", "hour_of_day": 3, "distance_km": 12.0, "account_age_days": 634,
       "txn_count_7d": 26, "avg_amount_30d": 58.9, "chargeback_rate_90d": 0.0146,
       "merchant_fraud_rate_30d": 0.0003, "merchant_category": "electronics"}  # the README's example row

RAW_ECHO = '''
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
'''
FASTAPI_ECHO = '''
from fastapi import FastAPI, Request, Response
app = FastAPI()

@app.post("/v1/models/{name}:predict")
async def echo(name: str, request: Request) -> Response:
    return Response(await request.body(), media_type="application/json")
'''
ENTITY_LUA = '''
counter = 0
request = function()
  counter = counter + 1
  local body = string.format('{"instances":[{"customer_id":%%d,"merchant_id":%%d,%s}]}',
                             (counter %% 2000) + 1, (counter %% 200) + 1)
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)
end
'''


@dataclass
class Result:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready ({url})")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} not ready in {timeout} s")


def wrk(url: str, script: Path, seconds: int, connections: int) -> tuple[float, float, float, int]:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout

    def ms(label: str) -> float:
        value, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, ms("50%"), ms("99%"), int(errors.group(1)) if errors else 0


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's whole process group (uvicorn workers too), SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def post_script(folder: Path, name: str, body: dict) -> Path:
    path = folder / f"{name}.lua"
    path.write_text(f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                    f"wrk.body = {json.dumps(json.dumps(body))}\n")
    return path


def v2_input(name: str, value: object) -> dict:
    """One feature as a v2 tensor, typed as MLServer's metadata for the model's signature says: a category
    BYTES (MLServer decodes it to a string), a number FP64."""
    if BY_NAME[name].kind == "category":
        return {"name": name, "shape": [1], "datatype": "BYTES", "data": [value]}
    return {"name": name, "shape": [1], "datatype": "FP64", "data": [float(value)]}


class Bench:
    def __init__(self, work: Path, seconds: int, connections: int) -> None:
        self.work = work
        self.seconds = seconds
        self.connections = connections
        tracking = Settings(state_dir=work / "state").tracking_uri
        self.env = {**os.environ, "DRIFTLOOP_STATE_DIR": str(work / "state"), "MLFLOW_TRACKING_URI": tracking,
                    "MLFLOW_REGISTRY_URI": tracking,  # for the peers, which read MLflow's own variables
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        self.results: list[Result] = []

    def driftloop(self, *args: str) -> None:
        subprocess.run([sys.executable, "-m", "driftloop", *args], env=self.env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def measure(self, name: str, command: list[str], ready: str, runs: list[tuple[str, str, Path]],
                env: dict | None = None, cwd: Path | None = None) -> None:
        print(f"starting {name} ...", flush=True)
        log = (self.work / f"{name.split()[0]}.log").open("w")
        proc = subprocess.Popen(command, env=env or self.env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            wait_ready(ready, proc)
            for label, url, script in runs:
                wrk(url, script, 2, self.connections)  # warm-up: first calls, caches, allocator
                rps, p50, p99, errors = wrk(url, script, self.seconds, self.connections)
                self.results.append(Result(label, rps, p50, p99, errors))
                print(f"  {label:<34} {rps:9.0f} req/s  p50 {p50:6.2f} ms  p99 {p99:7.2f} ms"
                      + (f"  {errors} errors" if errors else ""), flush=True)
        finally:
            stop(proc)
            log.close()


def main(seconds: int = 10, connections: int = 8) -> None:
    if shutil.which("wrk") is None:
        sys.exit("bench-serving needs wrk: apt-get install wrk")
    mlserver_python = os.environ.get("MLSERVER_PYTHON")
    with tempfile.TemporaryDirectory(prefix="driftloop-bench-serving-") as tmp:
        work = Path(tmp)
        bench = Bench(work, seconds, connections)
        print("preparing default-size data and a champion ...", flush=True)
        for args in (("data", "generate"), ("features", "apply"), ("features", "materialize"), ("train",)):
            bench.driftloop(*args)
        full = post_script(work, "full", {"instances": [ROW]})
        request_part = json.dumps({k: ROW[k] for k in ("amount", "channel", "hour_of_day", "distance_km")})[1:-1]
        (work / "entity.lua").write_text(ENTITY_LUA % request_part)

        port = free_port()
        url = f"http://127.0.0.1:{port}/v1/models/{MODEL}:predict"
        bench.measure("driftloop", [sys.executable, "-m", "serving", "--port", str(port)],
                      f"http://127.0.0.1:{port}/v2/models/{MODEL}/ready",
                      [("driftloop, all features", url, full),
                       ("driftloop, by entity (Feast)", url, work / "entity.lua")])

        port = free_port()
        uri = f"models:/{MODEL}@champion"
        bench.measure("mlflow models serve",
                      [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", uri, "-p", str(port),
                       "-h", "127.0.0.1", "--env-manager", "local"],
                      f"http://127.0.0.1:{port}/ping", [("mlflow models serve", f"http://127.0.0.1:{port}/invocations",
                                                         full)])

        if mlserver_python:
            port = free_port()
            model_dir = work / "mlserver" / MODEL
            model_dir.mkdir(parents=True)
            subprocess.run([sys.executable, "-c", "import mlflow, sys; mlflow.artifacts.download_artifacts("
                            f"artifact_uri='{uri}', dst_path=sys.argv[1])", str(model_dir / "model")],
                           env=bench.env, check=True, capture_output=True)
            (model_dir / "model-settings.json").write_text(json.dumps({
                "name": MODEL, "implementation": "mlserver_mlflow.MLflowRuntime",
                "parameters": {"uri": str(model_dir / "model")}}))
            tensors = post_script(work, "v2", {"inputs": [v2_input(name, value) for name, value in ROW.items()]})
            env = {**bench.env, "MLSERVER_HTTP_PORT": str(port), "MLSERVER_GRPC_PORT": str(free_port()),
                   "MLSERVER_METRICS_PORT": str(free_port()),
                   "PATH": f"{Path(mlserver_python).parent}:{os.environ['PATH']}"}
            bench.measure("MLServer (MLflow runtime)", [str(Path(mlserver_python).with_name("mlserver")), "start",
                                                        str(work / "mlserver")],
                          f"http://127.0.0.1:{port}/v2/models/{MODEL}/ready",
                          [("MLServer, MLflow runtime", f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer", tensors)],
                          env=env)
        else:
            print("MLSERVER_PYTHON not set: MLServer skipped (make bench-serving sets it up)")

        for name, source in (("raw ASGI echo", RAW_ECHO), ("FastAPI echo", FASTAPI_ECHO)):
            module = work / ("raw_echo.py" if "raw" in name else "fastapi_echo.py")
            module.write_text(source)
            port = free_port()
            bench.measure(name, [sys.executable, "-m", "uvicorn", f"{module.stem}:app", "--port", str(port),
                                 "--log-level", "warning"],
                          f"http://127.0.0.1:{port}/docs" if "FastAPI" in name else f"http://127.0.0.1:{port}/",
                          [(f"{name} (uvicorn)", f"http://127.0.0.1:{port}/v1/models/{MODEL}:predict", full)],
                          cwd=work)
        report(bench.results, connections)


def report(results: list[Result], connections: int) -> None:
    by = {r.name: r for r in results}
    ours, entity = by["driftloop, all features"], by["driftloop, by entity (Feast)"]
    print(f"\nsingle-row requests, {connections} connections, wrk -t1, same machine, same run:")
    print(f"  {'server':<34} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for r in results:
        print(f"  {r.name:<34} {r.rps:9.0f} {r.p50_ms:8.2f} {r.p99_ms:8.2f}")
    print("ratios:")
    peers = ("mlflow models serve", "MLServer, MLflow runtime", "raw ASGI echo (uvicorn)", "FastAPI echo (uvicorn)")
    for peer in peers:
        if peer in by:
            print(f"  driftloop / {peer:<30} {ours.rps / by[peer].rps:6.2f}x")
    print(f"  by entity / all features{'':<17} {entity.rps / ours.rps:6.2f}x")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
