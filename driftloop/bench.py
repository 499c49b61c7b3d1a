"""``make bench-cli``: the CPU time (user + system) of each everyday command, next to ``python -c pass``
and ``mlflow --version`` measured in the same run.

It builds a throw-away local state (data, features, two trained versions, a running model server and a
2,000-row window of logged predictions), then runs every command ``REPEATS`` times as a child process and
keeps the lowest CPU time of each (CPU time, not wall time: the machine's other work barely moves it).
Commands with a goal are marked against it. Nothing here is a test: no assertion, only a table.

``rollback`` and ``promote`` run twice: on the local SQLite store (MLflow's own client, as there is no server)
and against a real ``mlflow server`` on that same store, as on a cluster, where they speak its REST API.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from serving.bench import free_port, wait_ready

REPEATS = 3
GOALS = {"config": 1.5, "predict": 1.5, "rollback": 1.5, "promote": 1.5, "rollback (MLflow server)": 1.5,
         "promote (MLflow server)": 1.5, "monitor check": 5.0}


def cpu_seconds(argv: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(user + system CPU seconds, wall seconds, exit code) of one run of argv as a child process."""
    started = time.perf_counter()
    child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime, time.perf_counter() - started, child.returncode


def run(argv: list[str], env: dict[str, str], fine: str | None = None) -> None:
    """Run a set-up step; a failure whose error says ``fine`` is the state wanted already."""
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode and not (fine and fine in done.stderr):
        sys.exit(f"error: `{' '.join(argv[1:])}` failed while setting up the benchmark:\n{done.stderr[-2000:]}")


def main() -> None:
    bin_dir = Path(sys.executable).parent
    driftloop, mlflow = str(bin_dir / "driftloop"), str(bin_dir / "mlflow")
    state = Path(tempfile.mkdtemp(prefix="driftloop-bench-cli-"))
    env = dict(os.environ, DRIFTLOOP_STATE_DIR=str(state), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    port, mlflow_port = free_port(), free_port()
    server = tracking_server = None
    try:
        print("setting up: data, features, two trainings, a server, 2,000 logged predictions …", flush=True)
        for argv in (["data", "generate", "--rows", "20000"], ["features", "apply"], ["features", "materialize"],
                     ["train"], ["train"]):
            run([driftloop, *argv], env)
        server = subprocess.Popen([driftloop, "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        wait_ready(f"{url}/v2/health/ready", server)
        # The same store behind a tracking server, as on a cluster (job execution off, as the chart runs it).
        tracking_server = subprocess.Popen(
            [mlflow, "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}",
             "--default-artifact-root", (state / "mlartifacts").as_uri()],
            env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        wait_ready(f"{mlflow_url}/health", tracking_server)
        on_server = dict(env, DRIFTLOOP_MLFLOW_TRACKING_URI=mlflow_url)
        rows = [{"customer_id": i % 2000, "merchant_id": i % 200, "amount": 20.0 + i % 300, "channel": "online",
                 "hour_of_day": i % 24} for i in range(2000)]
        with httpx.Client(timeout=30) as client:
            for start in range(0, len(rows), 100):
                client.post(f"{url}/v1/models/driftloop-fraud:predict",
                            json={"instances": rows[start:start + 100]}).raise_for_status()
        time.sleep(2)  # the inference log's writer commits off the request path

        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "mlflow --version": [mlflow, "--version"],
            "config": [driftloop, "config"],
            "predict": [driftloop, "predict", "--customer-id", "7", "--merchant-id", "3", "--amount", "120",
                        "--url", url],
            "rollback": [driftloop, "rollback"],
            "promote": [driftloop, "promote", "2", "--force", "--reason", "benchmark"],
            "rollback (MLflow server)": [driftloop, "rollback"],
            "promote (MLflow server)": [driftloop, "promote", "2", "--force", "--reason", "benchmark"],
            "monitor check": [driftloop, "monitor", "check", "--window-rows", "2000"],
            "pipeline compile": [driftloop, "pipeline", "compile", "--out", str(state / "pipeline.yaml")],
        }
        # v2 the champion, so that every repetition's `rollback` (to v1) and `promote 2` (back) has a move
        run([driftloop, "promote", "2", "--force", "--reason", "benchmark set-up"], env,
            fine="already the champion")  # the gate may have promoted v2
        runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in commands}
        for _ in range(REPEATS):
            for name, argv in commands.items():
                runs[name].append(cpu_seconds(argv, on_server if "(MLflow server)" in name else env))
        results = {name: min(measured) for name, measured in runs.items()}
        report(results)
    except RuntimeError as error:  # a server that exited or never answered
        sys.exit(f"error: {error}")
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        if tracking_server is not None:  # and the workers it started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(tracking_server.pid, signal.SIGTERM)
            tracking_server.wait(30)
        shutil.rmtree(state, ignore_errors=True)


def report(results: dict[str, tuple[float, float, int]]) -> None:
    floor, peer = results["python -c pass"][0], results["mlflow --version"][0]
    print(f"\nCPU time per command (user + system, best of {REPEATS}; one run, this machine)\n")
    print("| command | CPU s | wall s | vs `mlflow --version` | goal |")
    print("|---|---|---|---|---|")
    for name, (cpu, wall, code) in results.items():
        goal = GOALS.get(name)
        mark = "" if goal is None else f"< {goal:g} s: {'met' if cpu < goal else 'missed'}"
        failed = f" (exit {code})" if code else ""
        print(f"| `{name}`{failed} | {cpu:.2f} | {wall:.2f} | {cpu / peer:.2f}x | {mark} |")
    print(f"\nfloor: `python -c pass` {floor:.2f} CPU-s; peer: `mlflow --version` {peer:.2f} CPU-s")


if __name__ == "__main__":
    main()
