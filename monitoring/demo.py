"""``make demo``: the whole loop on one machine, told as it runs.

data -> features -> training through the Prefect flow -> champion -> served -> normal traffic -> the world
shifts -> drifted traffic -> its late labels arrive -> drift detected -> retraining (Prefect flow, promotion
gate) on the generated data and the labelled traffic -> the new champion answers without a restart. Each
step runs the same ``driftloop`` command a user would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
import pandas as pd

from driftloop.contracts import REQUEST_FEATURES, SOURCES
from driftloop.settings import Settings
from pipelines.steps import ingest

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

Say = Callable[[str, str], None]


@dataclass(frozen=True)
class DemoConfig:
    rows: int = 50_000
    customers: int = 2_000
    merchants: int = 200
    days: int = 60
    traffic: int = 2_000  # requests per traffic window
    seed: int = 7


class DemoError(RuntimeError):
    pass


def _driftloop(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "driftloop", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise DemoError(f"`driftloop {' '.join(args)}` failed: {result.stderr.strip()[-2000:]}")
    return result.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def traffic_window(cfg: DemoConfig, stream: int, drift: str, label: str) -> tuple[list[dict], pd.DataFrame]:
    """One window of new transactions as requests by entity (ids prefixed with ``label``), and the transactions."""
    gen = ingest.GeneratorConfig(rows=cfg.traffic, customers=cfg.customers, merchants=cfg.merchants, days=cfg.days,
                                 seed=cfg.seed, stream=stream, drift=drift, drift_days=0)
    tx = ingest.generate(gen).transactions
    requests = [{"transaction_id": f"{label}-{row['transaction_id']}", "customer_id": int(row["customer_id"]),
                 "merchant_id": int(row["merchant_id"]),
                 **{c.name: (None if row[c.name] != row[c.name] else row[c.name]) for c in REQUEST_FEATURES}}
                for row in tx.to_dict("records")]
    return requests, tx


def post_requests(url: str, requests: list[dict], threads: int = 8) -> dict:
    """POST each request as its own single-instance call, ``threads`` at a time: answers by model version and
    failures (an error status or no answer at all)."""
    versions: dict[str, int] = {}
    failures = 0
    lock = threading.Lock()

    def worker(chunk: list[dict]) -> None:
        nonlocal failures
        with httpx.Client(timeout=10) as client:
            for instance in chunk:
                try:
                    response = client.post(url, json={"instances": [instance]})
                    version = response.json()["model_version"] if response.status_code == 200 else None
                except (httpx.HTTPError, ValueError, KeyError):
                    version = None
                with lock:
                    if version is None:
                        failures += 1
                    else:
                        versions[version] = versions.get(version, 0) + 1

    workers = [threading.Thread(target=worker, args=(requests[i::threads],)) for i in range(threads)]
    t0 = time.perf_counter()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return {"requests": len(requests), "answered": sum(versions.values()), "failures": failures,
            "versions": versions, "seconds": time.perf_counter() - t0}


def send_traffic(url: str, cfg: DemoConfig, stream: int, drift: str, label: str) -> dict:
    """POST one window of new transactions by entity (features from the online store); 8 at a time."""
    requests, tx = traffic_window(cfg, stream, drift, label)
    sent = post_requests(url, requests)
    return {**sent, "rps": round(len(requests) / sent["seconds"]), "labels": tx[["transaction_id", "is_fraud"]].assign(
        transaction_id=lambda f: label + "-" + f["transaction_id"])}


def run(settings: Settings, cfg: DemoConfig, say: Say) -> dict:
    """Run the loop; return the summary. Leaves the state dir for the UIs to show."""
    from mlflow.tracking import MlflowClient

    from monitoring.monitor import MonitorPolicy, check, retrain_locally
    from monitoring.retrain import TriggerPolicy
    from pipelines.steps import tracking

    gen = ("--rows", str(cfg.rows), "--customers", str(cfg.customers), "--merchants", str(cfg.merchants),
           "--days", str(cfg.days), "--seed", str(cfg.seed))
    say("data", f"generating {cfg.rows:,} transactions of {cfg.customers:,} customers at {cfg.merchants} merchants")
    _driftloop("data", "generate", *gen)
    say("features", "feast apply + materialize into the online store")
    _driftloop("features", "apply")
    _driftloop("features", "materialize")
    say("train", "training through the Prefect flow (ephemeral local server) and the promotion gate")
    first = json.loads(_driftloop("train", "--engine", "prefect", "--json").strip().splitlines()[-1])
    say("train", f"v{first['decision']['version']} -> {first['decision']['alias']} "
                 f"(holdout AUC {first['metrics']['auc']:.3f})")

    port = _free_port()
    url = f"http://127.0.0.1:{port}/v1/models/{settings.model_name}:predict"
    log = (settings.state / "demo-server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "serving", "--port", str(port), "--reload-interval", "1"],
                              stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        _wait_ready(f"http://127.0.0.1:{port}/v2/models/{settings.model_name}/ready", server)
        say("serve", f"KServe model server on port {port}, serving the champion")
        client = tracking.configure(settings)
        policy = MonitorPolicy(window_rows=cfg.traffic, trigger=TriggerPolicy(k=1, n=1, cooldown_s=0))

        normal = send_traffic(url, cfg, 1, "none", "normal")
        say("traffic", f"{normal['requests']:,} normal requests by entity (sent at {normal['rps']}/s by this "
                       f"demo's client), {normal['failures']} failed")
        quiet = check(settings, client, policy, retrain=retrain_locally())
        say("monitor", f"window 1: {quiet.verdict} (drift share {quiet.drift_share:.0%})")

        say("world", "the world shifts: bigger, more online, more distant payments, and fraud changes its habits")
        _driftloop("data", "generate", *gen, "--drift", "shift", "--drift-days", "30")
        _driftloop("features", "materialize")
        shifted = send_traffic(url, cfg, 2, "shift", "shifted")
        say("traffic", f"{shifted['requests']:,} requests from the shifted world, {shifted['failures']} failed")
        labels = settings.state / "demo-labels.parquet"
        pd.concat([normal["labels"], shifted["labels"]]).to_parquet(labels)
        _driftloop("labels", "ingest", str(labels))
        say("labels", "late labels of both windows ingested: served performance is monitored, and a retraining "
                      "trains on the labelled traffic too")
        say("monitor", "checking the window; drift triggers a retraining (Prefect flow, then the gate)")
        drifted = check(settings, client, policy, retrain=retrain_locally())
        say("monitor", f"window 2: {drifted.verdict} in {', '.join(drifted.drifted_columns) or 'no columns'}")
        retraining = drifted.retraining.reason if drifted.retraining else "not triggered"
        say("retrain", retraining)
        retrain_data = _rows_by_source(client, settings) if drifted.retraining and drifted.retraining.start \
            else "no retraining"
        champion = str(MlflowClient(settings.tracking_uri, settings.tracking_uri)
                       .get_model_version_by_alias(settings.model_name, "champion").version)
        after = _until_served(url, cfg, champion)
        say("serve", f"now answered by v{champion}, without a restart: {after['versions']}, "
                     f"{after['failures']} failed")
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    return {
        "first training": f"v{first['decision']['version']} {first['decision']['alias']} "
                          f"(holdout AUC {first['metrics']['auc']:.3f})",
        "window 1": f"{quiet.verdict}, drift share {quiet.drift_share:.0%} ({quiet.status})",
        "window 2": f"{drifted.verdict}, drift share {drifted.drift_share:.0%} "
                    f"({', '.join(drifted.drifted_columns)}; {drifted.status})",
        "retraining": retraining,
        "retrain data": retrain_data,
        "champion now": f"v{champion}, answering requests: v{max(after['versions'], key=after['versions'].get)}",
        "requests": f"{normal['requests'] + shifted['requests'] + after['requests']:,}, "
                    f"{normal['failures'] + shifted['failures'] + after['failures']} failed",
    }


def _rows_by_source(client: MlflowClient, settings: Settings) -> str:
    """Rows per source of the newest training run (the retraining's): ``52,000 generated + 4,000 traffic``."""
    experiment = client.get_experiment_by_name(settings.experiment)
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    metrics = runs[0].data.metrics if runs else {}
    return " + ".join(f"{int(metrics.get(f'rows_{source}', 0)):,} {source}" for source in SOURCES)


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    from serving.bench import wait_ready

    try:
        wait_ready(url, proc, timeout)
    except RuntimeError as error:
        raise DemoError(f"the model server was not ready ({error}); see demo-server.log") from error


def _until_served(url: str, cfg: DemoConfig, version: str, timeout: float = 30) -> dict:
    """Traffic until the server answers with ``version`` (it polls the alias every second)."""
    deadline = time.monotonic() + timeout
    small = dataclasses.replace(cfg, traffic=200)
    while True:
        result = send_traffic(url, small, 3, "shift", "after")
        if version in result["versions"] or time.monotonic() > deadline:
            return result

