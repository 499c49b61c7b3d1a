"""``driftloop``: one CLI, the same locally, in CI, in the container and as a pipeline step.

Commands build settings once, call the plain step functions and print a short summary. Known failures
end with one clear ``error:`` line and exit code 1; nothing is half-written.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from driftloop.settings import Settings, SettingsError, load_settings, redact, redact_logs
from monitoring.cli import CatThreshold, ClipQuantile, DriftShare, Kinds, MinRows, NumThreshold, drift_app, drift_policy

app = typer.Typer(help="driftloop: the whole production ML loop.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Generate the reference use case's data.", no_args_is_help=True)
features_app = typer.Typer(help="The Feast feature store.", no_args_is_help=True)
pipeline_app = typer.Typer(help="Pipeline definitions for orchestrators.", no_args_is_help=True)
labels_app = typer.Typer(help="Late ground truth for logged predictions.", no_args_is_help=True)
batch_app = typer.Typer(help="Batch inference with the champion.", no_args_is_help=True)
monitor_app = typer.Typer(help="Drift and performance checks on the inference log; retraining.",
                          no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(features_app, name="features")
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(labels_app, name="labels")
app.add_typer(monitor_app, name="monitor")
app.add_typer(batch_app, name="batch")
app.add_typer(drift_app, name="drift")

out = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """One ``error:`` line, its passwords masked (an error may quote a connection string), then exit."""
    err.print(f"[bold red]error:[/] {escape(_masked(message))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _secrets() -> Settings | None:
    """This environment's settings, for the passwords to mask; None where they do not load."""
    try:
        return load_settings()
    except SettingsError:
        return None


def _masked(text: str) -> str:
    return redact(text, _secrets())


# Errors whose message tells the user what to do: (module, class). Only a loaded module can have raised one,
# so an error line never waits for imports (the KFP module alone pulls in every pipeline step).
USER_ERRORS = (("monitoring.demo", "DemoError"), ("monitoring.labels", "LabelError"),
               ("monitoring.monitor", "MonitorError"), ("pipelines.kfp_pipeline", "ComponentError"),
               ("pipelines.steps.features", "FeatureStoreError"), ("pipelines.steps.register", "RegistryError"),
               ("pipelines.steps.registry_api", "RegistryApiError"), ("pipelines.steps.tracking", "TrackingError"),
               ("pipelines.steps.validate", "DataValidationError"),
               ("serving.batch", "BatchError"))


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message tells the user what to do: printed as one line, not a traceback."""
    loaded = (getattr(sys.modules.get(module), name, None) for module, name in USER_ERRORS)
    return (SettingsError, FileNotFoundError, *(error for error in loaded if error is not None))


@contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except typer.Exit:
        raise
    except Exception as error:
        if isinstance(error, _user_errors()):
            fail(str(error))
        raise


def settings_or_fail() -> Settings:
    try:
        return load_settings()
    except SettingsError as error:
        fail(str(error))


def _elsewhere(settings: Settings) -> str:
    """What to set when a store is empty because the command looked in the wrong place."""
    if settings.mlflow_tracking_uri:
        return "or point DRIFTLOOP_MLFLOW_TRACKING_URI at the registry that has it"
    return "or set DRIFTLOOP_STATE_DIR to the state dir that has it (run from another directory, a fresh one is used)"


def registry_or_fail(settings: Settings, alias: str | None = "champion", *, rest: bool = False,
                     missing_ok: bool = False) -> Any:
    """The tracking client once the registry holds the model (and ``alias``), else one line naming the registry.

    A command run from another directory finds a fresh state dir: saying where it looked is the whole hint.
    A local store that is not there yet is not created just to find it empty. ``rest``: for a command that only
    moves aliases and tags, a tracking server's REST API stands in for MLflow's client, whose import alone costs
    about 4 CPU-s (``tracking.rest_registry``); an embedded store still gets MLflow's client. ``missing_ok``: a
    model not trained yet is said in one line and the command exits 0 (a scheduled check on a fresh cluster).
    """
    from pipelines.steps import tracking
    from pipelines.steps.registry_api import registry_errors

    wanted = f"{settings.model_name}@{alias}" if alias else settings.model_name
    missing = f"no {wanted} in the registry at {settings.tracking_uri}: train one first (`driftloop train`), " \
              f"{_elsewhere(settings)}"

    def absent() -> NoReturn:
        if missing_ok:
            out.print(f"nothing to do yet: {escape(_masked(missing))}", highlight=False, soft_wrap=True)
            raise typer.Exit(0)
        fail(missing)

    uri = settings.tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        absent()
    with user_errors():  # the REST client's errors (a 401, say) are one line too
        client = (tracking.rest_registry(settings) if rest else None) or tracking.configure(settings)
        try:
            if alias:
                client.get_model_version_by_alias(settings.model_name, alias)
            elif not client.search_model_versions(f"name='{settings.model_name}'", max_results=1):
                absent()
        except registry_errors() as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            absent()
    return client


def unchecked_feast() -> None:
    """Feast decorates its API with typeguard's ``@typechecked``, which re-parses and recompiles the source of
    every decorated function when Feast is imported: about 4 of the 10 CPU-seconds that a command touching
    Feast spent before doing anything. typeguard itself makes the decorator a no-op under ``python -O``
    (checks meant for development); this does the same for the CLI's process (`main`), before any command
    imports Feast. driftloop's calls into Feast are tested with the checks on (the test processes keep them)."""
    import typeguard

    def typechecked(target: Any = None, **_options: Any) -> Any:
        return typechecked if target is None else target

    typeguard.typechecked = typechecked


def quiet_libraries() -> None:
    """Third-party INFO chatter would bury the summary; warnings still show."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("mlflow", "feast", "alembic", "kfp", "prefect", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("mlflow.utils.environment").setLevel(logging.ERROR)  # "pip version" noise in uv venvs
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*(GPU|pkg_resources).*")
    # Feast puts a filter of its own first when imported ("once" for DeprecationWarning): the hook that
    # shows warnings is where a library's later filters cannot bring its dependencies' notices back.
    if getattr(warnings.showwarning, "__name__", "") != "show_unless_deprecation":  # once, however often called
        show = warnings.showwarning

        def show_unless_deprecation(message, category, *args, **kwargs) -> None:
            if not issubclass(category, DeprecationWarning):
                show(message, category, *args, **kwargs)

        warnings.showwarning = show_unless_deprecation


def table(title: str, rows: dict[str, Any]) -> Table:
    t = Table(title=title, show_header=False, title_justify="left", title_style="bold")
    t.add_column(style="cyan", no_wrap=True)
    t.add_column(overflow="fold")
    settings = _secrets()
    for k, v in rows.items():
        t.add_row(k, redact(str(v), settings))
    return t


# config ---------------------------------------------------------------------------------------------
@app.command("config")
def config_cmd(as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False) -> None:
    """Print the resolved settings: the profile and where every store lives."""
    settings = settings_or_fail()
    locations = settings.locations()
    if as_json:
        typer.echo(json.dumps(locations, indent=2))
    else:
        out.print(table(f"driftloop settings (profile: {settings.profile})", locations))


# data -----------------------------------------------------------------------------------------------
class DriftKind(StrEnum):
    none = "none"
    covariate = "covariate"
    concept = "concept"
    shift = "shift"
    quality = "quality"


@data_app.command("generate")
def data_generate(
    rows: Annotated[int, typer.Option(min=1, help="transactions")] = 50_000,
    customers: Annotated[int, typer.Option(min=1)] = 2_000,
    merchants: Annotated[int, typer.Option(min=1)] = 200,
    days: Annotated[int, typer.Option(min=2, help="days of history")] = 60,
    end_date: Annotated[
        datetime | None, typer.Option(formats=["%Y-%m-%d"], help="last day (default today, UTC)")] = None,
    seed: Annotated[int, typer.Option()] = 7,
    drift: Annotated[DriftKind, typer.Option(help="inject drift into the last --drift-days")] = DriftKind.none,
    drift_days: Annotated[int, typer.Option(min=0, help="0: the whole range")] = 7,
    out_dir: Annotated[Path | None, typer.Option("--out", help="default: the data dir")] = None,
) -> None:
    """Write customers, merchants and transactions as Parquet (seeded, deterministic)."""
    from pipelines.steps.ingest import GeneratorConfig, generate_to

    settings = settings_or_fail()
    with user_errors():
        cfg = GeneratorConfig(rows=rows, customers=customers, merchants=merchants, days=days,
                              end=end_date.date() if end_date else None, seed=seed, drift=drift.value,
                              drift_days=drift_days)
        t0 = time.perf_counter()
        summary = generate_to(cfg, out_dir or settings.data_path)
    out.print(table(f"generated in {time.perf_counter() - t0:.1f}s", {
        "transactions": f"{summary['transactions']:,} ({summary['from'][:10]} .. {summary['to'][:10]})",
        "customers / merchants": f"{summary['customers']:,} / {summary['merchants']:,}",
        "fraud rate": f"{summary['fraud_rate']:.2%}",
        "drift": f"{drift.value}" + (f" (last {drift_days} days)" if drift.value != "none" else ""),
        **{f"{name} file": path for name, path in summary["paths"].items()},
    }))


# features -------------------------------------------------------------------------------------------
@features_app.command("apply")
def features_apply() -> None:
    """Register the entities, feature views and FeatureService in the Feast registry."""
    from pipelines.steps import features

    quiet_libraries()
    settings = settings_or_fail()
    with user_errors():
        names = features.apply(settings)
    out.print(table("feast apply", {"registry": settings.feast_variables()["DRIFTLOOP_FEAST_REGISTRY"],
                                    "objects": ", ".join(names)}))


@features_app.command("materialize")
def features_materialize() -> None:
    """Load the latest feature values into the online store."""
    from pipelines.steps import features

    quiet_libraries()
    settings = settings_or_fail()
    t0 = time.perf_counter()
    with user_errors():
        result = features.materialize(settings)
    out.print(table(f"materialized in {time.perf_counter() - t0:.1f}s", {
        "views": ", ".join(result["views"]), "window": f"{result['from'][:19]} .. {result['to'][:19]}",
        "online store": settings.locations()["feast_online_store"]}))


# train ----------------------------------------------------------------------------------------------
class Engine(StrEnum):
    local = "local"
    prefect = "prefect"
    kfp = "kfp"


def _progress(step: str, what: str) -> None:
    err.print(f"[dim]{time.strftime('%H:%M:%S')}[/] [cyan]{step:<9}[/] {what}", highlight=False)


@app.command("train")
def train_cmd(
    engine: Annotated[Engine, typer.Option(help="who runs the steps")] = Engine.local,
    n_estimators: Annotated[int, typer.Option(min=1)] = 300,
    max_depth: Annotated[int, typer.Option(min=1)] = 5,
    learning_rate: Annotated[float, typer.Option(min=0.0)] = 0.08,
    min_auc: Annotated[float, typer.Option(help="gate: absolute AUC floor")] = 0.70,
    margin: Annotated[float, typer.Option(help="gate: AUC margin over the champion")] = 0.002,
    slice_tolerance: Annotated[float, typer.Option(help="gate: allowed per-slice AUC drop")] = 0.03,
    as_of: Annotated[datetime | None, typer.Option(help="use labels that arrived by then (default now)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Build the training set, validate, train, evaluate and gate; register the model."""
    from pipelines.steps.register import GatePolicy
    from pipelines.steps.train import TrainParams
    from pipelines.training import TrainingConfig

    quiet_libraries()
    settings = settings_or_fail()
    config = TrainingConfig(
        params=TrainParams(n_estimators=n_estimators, max_depth=max_depth, learning_rate=learning_rate,
                           device=settings.device),
        gate=GatePolicy(min_auc=min_auc, margin=margin, slice_tolerance=slice_tolerance),
        as_of=as_of.replace(tzinfo=as_of.tzinfo or UTC) if as_of else None,
    )
    t0 = time.perf_counter()
    with user_errors():
        result = _run_engine(engine, settings, config)
    seconds = time.perf_counter() - t0
    if as_json:
        typer.echo(json.dumps({**result, "engine": engine.value, "seconds": round(seconds, 2)}, default=str))
        return
    decision = result["decision"]
    metrics = result["metrics"]
    verdict = "[green]promoted to champion[/]" if decision["promoted"] else "[yellow]kept as challenger[/]"
    out.print(table(f"trained with engine={engine.value} in {seconds:.1f}s", {
        "training set": f"{result['training_set']['rows']:,} rows, fingerprint {result['training_set']['fingerprint']}",
        "rows by source": _rows_by_source(result["training_set"]),
        "MLflow run": result["run_id"],
        "holdout AUC": f"{metrics['auc']:.4f} (PR-AUC {metrics['average_precision']:.4f})",
        "slice AUC": ", ".join(f"{k} {v:.3f}" for k, v in metrics["slices"].items()),
        "model": f"{settings.model_name} v{decision['version']}",
        "decision": f"{verdict}: {decision['reason']}",
    }))


def _rows_by_source(training_set: dict[str, Any]) -> str:
    """``7,200 generated + 1,450 traffic``, and the labelled traffic left out by reason, if any."""
    rows = " + ".join(f"{n:,} {source}" for source, n in training_set.get("rows_by_source", {}).items()) or "-"
    left_out = [f"{n:,} {reason.replace('_', ' ')}" for reason, n in training_set.get("left_out", {}).items() if n]
    if left_out:
        rows += "; traffic left out: " + ", ".join(left_out)
    return rows


def _run_engine(engine: Engine, settings: Settings, config: Any) -> dict[str, Any]:
    from dataclasses import asdict

    from pipelines import training

    if engine is Engine.local:
        return training.run_local(settings, config, progress=_progress).as_dict()
    if engine is Engine.prefect:
        os.environ.update(training.prefect_environment(settings))
        from pipelines.prefect_flow import run_prefect

        _progress("prefect", "starting the flow (a local ephemeral server unless PREFECT_API_URL is set)")
        return asdict(run_prefect(config))  # the flow builds the same settings from this environment
    from pipelines.kfp_pipeline import run_kfp_local

    _progress("kfp", "running the pipeline with kfp.local (one subprocess per component)")
    return run_kfp_local(settings, config, progress=_progress)


# pipeline -------------------------------------------------------------------------------------------
@pipeline_app.command("compile")
def pipeline_compile(
    out_path: Annotated[Path, typer.Option("--out", help="where to write the KFP v2 pipeline YAML")] = Path(
        "pipeline.yaml"),
) -> None:
    """Write the KFP v2 training pipeline (components run the project image)."""
    from pipelines.kfp_pipeline import compile_pipeline

    settings = settings_or_fail()
    with user_errors():
        path = compile_pipeline(settings, out_path)
    out.print(table("compiled KFP v2 pipeline", {
        "file": path, "image": settings.image,
        "upload": "KFP UI > Pipelines > Upload, or `make submit-pipeline ENGINE=kfp`"}))


@contextmanager
def _reaching(url: str) -> Iterator[None]:
    """A server that is not there, or refuses: one line that says where and what to check."""
    try:
        yield
    except Exception as error:  # the clients raise their own many types; all end the same way here
        fail(f"could not submit to {url} ({type(error).__name__}: {str(error)[:300]}): is the server up and "
             "port-forwarded? `make submit-pipeline` does both")


@pipeline_app.command("submit")
def pipeline_submit(
    url: Annotated[str, typer.Option(help="prefect: the server's API (http://…:4200/api); kfp: the KFP endpoint")],
    engine: Annotated[Engine, typer.Option(help="prefect: a run of the retraining deployment; kfp: a pipeline run")
                      ] = Engine.prefect,
    release: Annotated[str, typer.Option(help="kfp: the chart's release (its ConfigMap, Secret and volume)")
                       ] = "driftloop",
    secret: Annotated[str | None, typer.Option(help="kfp: the Secret, when the chart uses secrets.existingSecret")
                      ] = None,
) -> None:
    """Start a training run on a cluster: Prefect's retraining deployment, or the KFP pipeline."""
    quiet_libraries()
    settings = settings_or_fail()
    if engine is Engine.local:
        fail("--engine takes prefect or kfp: `driftloop train` runs the local engine")
    if engine is Engine.kfp:
        from pipelines.kfp_pipeline import ClusterWiring, submit
        from pipelines.training import TrainingConfig

        with _reaching(url):
            run_id = submit(settings, url, ClusterWiring(release=release, secret=secret), TrainingConfig())
        out.print(table("submitted a KFP run", {"run id": run_id, "image": settings.image,
                                                "follow it": f"{url}/#/runs/details/{run_id}"}))
        return
    os.environ["PREFECT_API_URL"] = url
    from prefect.deployments import run_deployment

    from pipelines.prefect_flow import RETRAINING_DEPLOYMENT

    with _reaching(url):
        flow_run = run_deployment(RETRAINING_DEPLOYMENT, timeout=0, as_subflow=False)
    out.print(table("submitted a Prefect flow run", {"deployment": RETRAINING_DEPLOYMENT, "flow run": flow_run.name,
                                                      "id": str(flow_run.id),
                                                      "follow it": f"{url.removesuffix('/api')}/runs/flow-run/"
                                                      f"{flow_run.id}"}))


@labels_app.command("ingest")
def labels_ingest(
    file: Annotated[Path, typer.Argument(help="Parquet or CSV with transaction_id and is_fraud")],
) -> None:
    """Record late labels; performance of the served model is then monitored too."""
    from monitoring.labels import ingest, performance

    settings = settings_or_fail()
    with user_errors():
        summary = ingest(settings, file)
        metrics = performance(settings)
    out.print(table("labels ingested", {
        "labels": f"{summary.rows:,} ({summary.matched:,} match logged predictions)",
        "served AUC so far": f"{metrics.auc:.4f} on {metrics.rows:,} labelled predictions" if metrics
        else "not enough labelled predictions of both classes yet",
    }))


def _monitor_policy(window_rows: int, k: int, n: int, cooldown: float, drift=None):
    """``drift`` None: the settings' drift policy, the one `driftloop drift compare` uses."""
    from monitoring.monitor import MonitorPolicy
    from monitoring.retrain import TriggerPolicy

    return MonitorPolicy(window_rows=window_rows, drift=drift, trigger=TriggerPolicy(k=k, n=n, cooldown_s=cooldown))


def _print_check(result, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result.as_dict(), default=str))
        return
    if result.verdict == "waiting":  # a new champion: its own window is not full yet, nothing is judged
        out.print(table("drift check", {"window": f"[yellow]{result.status}[/]", "signal": "none"}))
        return
    verdict = {"drift": "[red]drift[/]", "no_drift": "[green]no drift[/]"}.get(result.verdict, result.verdict)
    quality = "; ".join(f"{c}: {', '.join(i)}" for c, i in result.quality_issues.items()) or "ok"
    if result.implausible_rows:
        quality = f"{result.implausible_rows:,} row(s) with implausible values; {quality}"
    served = "too few labels yet"
    if result.served_auc is not None:  # this version's labelled rows, against this version's holdout AUC
        served = f"{result.served_auc:.4f} on {result.labelled_rows:,} labelled rows of v{result.model_version}"
        if result.champion_auc is not None:
            served += f" (holdout {result.champion_auc:.4f})"
    rows = {"window": result.status,
            "drift": f"{verdict} (share {result.drift_share:.0%}"
                     + (f": {', '.join(result.drifted_columns)})" if result.drifted_columns else ")"),
            "data quality": quality,
            "served AUC": served,
            "signal": "; ".join(result.reasons) or "none"}
    if result.retraining is not None:
        rows["retraining"] = ("started: " if result.retraining.start else "skipped: ") + result.retraining.reason
    out.print(table("drift check", rows))


@monitor_app.command("check")
def monitor_check(
    window_rows: Annotated[int, typer.Option(min=1, help="the champion's latest N predictions")] = 2_000,
    retrain: Annotated[bool, typer.Option(help="retrain when the guardrails allow")] = False,
    k: Annotated[int, typer.Option(help="signals needed ...")] = 2,
    n: Annotated[int, typer.Option(help="... among the last n windows")] = 3,
    cooldown: Annotated[float, typer.Option(help="seconds between retrainings")] = 3_600.0,
    drift_share: DriftShare = None,
    num_threshold: NumThreshold = None,
    cat_threshold: CatThreshold = None,
    min_rows: MinRows = None,
    clip_quantile: ClipQuantile = None,
    kind: Kinds = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    no_champion_ok: Annotated[bool, typer.Option(
        "--no-champion-ok", help="no champion yet: say so and exit 0 (a schedule that starts before the first "
        "training, as the chart's CronJob)")] = False,
) -> None:
    """One drift and performance check on the champion's latest window of the inference log (the same
    drift policy as `driftloop drift compare`); a new champion's window fills before anything is judged."""
    from monitoring.monitor import check, retrain_for

    quiet_libraries()
    settings = settings_or_fail()
    drift = drift_policy(settings, drift_share, num_threshold, cat_threshold, min_rows, clip_quantile, kind)
    client = registry_or_fail(settings, missing_ok=no_champion_ok)
    with user_errors():
        result = check(settings, client, _monitor_policy(window_rows, k, n, cooldown, drift),
                       retrain_for(settings) if retrain else None)
    _print_check(result, as_json)


@monitor_app.command("run")
def monitor_run(
    interval: Annotated[float, typer.Option(min=0.0, help="seconds between checks")] = 300.0,
    checks: Annotated[int | None, typer.Option(help="stop after this many (default: run until stopped)")] = None,
    window_rows: Annotated[int, typer.Option(min=1)] = 2_000,
    k: Annotated[int, typer.Option()] = 2,
    n: Annotated[int, typer.Option()] = 3,
    cooldown: Annotated[float, typer.Option()] = 3_600.0,
    metrics_port: Annotated[int | None, typer.Option(help="serve Prometheus metrics on this port")] = None,
    metrics_host: Annotated[str, typer.Option(help="address of the metrics port; 0.0.0.0 in a pod")] = "127.0.0.1",
    webhook: Annotated[str | None, typer.Option(help="POST every signal and retraining decision here")] = None,
) -> None:
    """Check on a schedule; retrain (Prefect flow, then the gate) when the policy says so."""
    from prometheus_client import start_http_server

    from monitoring.monitor import MonitorMetrics, run_forever

    quiet_libraries()
    settings = settings_or_fail()
    client = registry_or_fail(settings)
    with user_errors():
        metrics = MonitorMetrics()
        if metrics_port is not None:
            start_http_server(metrics_port, addr=metrics_host)
        run_forever(settings, client, _monitor_policy(window_rows, k, n, cooldown), interval, checks,
                    lambda result: _print_check(result, False), metrics, webhook)


@app.command("demo")
def demo_cmd(
    rows: Annotated[int, typer.Option(min=1_000)] = 50_000,
    customers: Annotated[int, typer.Option(min=10)] = 2_000,
    merchants: Annotated[int, typer.Option(min=5)] = 200,
    traffic: Annotated[int, typer.Option(min=200, help="requests per traffic window")] = 2_000,
) -> None:
    """The whole loop on this machine: train, serve, drift, retrain, and the new champion served."""
    from monitoring.demo import DemoConfig, run

    quiet_libraries()
    settings = settings_or_fail()
    t0 = time.perf_counter()
    with user_errors():
        summary = run(settings, DemoConfig(rows=rows, customers=customers, merchants=merchants, traffic=traffic),
                      _progress)
    out.print(table(f"the loop, closed in {time.perf_counter() - t0:.0f}s", summary))
    out.print("Look around: [bold]make ui[/] (MLflow: runs, versions, aliases, gate decisions), "
              "[bold]driftloop monitor check[/], [bold]driftloop serve[/] then "
              "[bold]driftloop predict --customer-id 7 --merchant-id 3 --amount 120 --explain[/].")


@batch_app.command("score")
def batch_score(
    input_path: Annotated[Path, typer.Argument(help="Parquet: entity keys, request features, event_timestamp if any")],
    output_path: Annotated[Path, typer.Argument(help="where to write the scored Parquet")],
    engine: Annotated[Engine, typer.Option(help="local, or prefect (a flow run)")] = Engine.local,
) -> None:
    """Score a file of transactions with the champion (features point-in-time, or online)."""
    from dataclasses import asdict

    from serving.batch import score_file

    quiet_libraries()
    settings = settings_or_fail()
    if engine is Engine.kfp:
        fail("batch scoring runs with --engine local or prefect")
    if not input_path.exists():
        fail(f"no input file at {input_path}")
    registry_or_fail(settings)
    with user_errors():
        if engine is Engine.prefect:
            from pipelines import training

            os.environ.update(training.prefect_environment(settings))
            from pipelines.prefect_flow import batch_scoring_flow

            summary = batch_scoring_flow(str(input_path), str(output_path))  # settings: from the environment
        else:
            summary = asdict(score_file(settings, input_path, output_path))
    out.print(table(f"scored {summary['rows']:,} rows in {summary['seconds']:.1f}s", {
        "model": f"{settings.model_name} v{summary['model_version']}", "output": summary["output"],
        "features": "point-in-time (offline store)" if summary["point_in_time"] else "online store (now)"}))


def _operator() -> str:
    """Who runs this command, for the record on the version: user@host."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container's uid with no passwd entry and no USER
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"


@app.command("rollback")
def rollback_cmd(
    version: Annotated[int | None, typer.Argument(min=1, help="the version to put back (default: the one the "
                                                    "champion replaced)")] = None,
    reason: Annotated[str, typer.Option(help="why, recorded on the version")] = "",
) -> None:
    """Put the previous champion back, or VERSION, with no gate (a running server switches at its next check)."""
    from pipelines.steps.register import PromotionLock, rollback

    quiet_libraries()
    settings = settings_or_fail()
    client = registry_or_fail(settings, alias=None, rest=True)
    with user_errors():
        move = rollback(client, settings.model_name, None if version is None else str(version),
                        lock=PromotionLock.for_settings(settings), by=_operator(), why=reason)
    out.print(table("rollback", {"model": settings.model_name, "champion": f"v{move.was} -> v{move.now}",
                                 "why": move.reason}))


@app.command("promote")
def promote_cmd(
    version: Annotated[int, typer.Argument(min=1, help="the version to make champion")],
    force: Annotated[bool, typer.Option("--force", help="skip the gate; needs --reason, recorded on the "
                                        "version with who and when")] = False,
    reason: Annotated[str, typer.Option(help="why (required with --force)")] = "",
    min_auc: Annotated[float, typer.Option(help="gate: absolute AUC floor")] = 0.70,
    margin: Annotated[float, typer.Option(help="gate: AUC margin over the champion")] = 0.002,
    slice_tolerance: Annotated[float, typer.Option(help="gate: allowed per-slice AUC drop")] = 0.03,
) -> None:
    """Make VERSION the champion if the promotion gate passes it against the current one (or --force)."""
    from pipelines.steps.register import GatePolicy, PromotionLock, promote

    if force and not reason.strip():
        fail("--force needs --reason WHY: a forced promotion is recorded on the version with who, when and why")
    quiet_libraries()
    settings = settings_or_fail()
    client = registry_or_fail(settings, alias=None, rest=force)  # the gate scores models: MLflow's client
    with user_errors():
        move = promote(client, settings.model_name, str(version),
                       GatePolicy(min_auc=min_auc, margin=margin, slice_tolerance=slice_tolerance),
                       lock=PromotionLock.for_settings(settings), by=_operator(),
                       force_reason=reason.strip() if force else None)
    out.print(table("promote", {"model": settings.model_name,
                                "champion": f"v{move.was} -> v{move.now}" if move.was else f"v{move.now}",
                                "why": move.reason}))


# serving ------------------------------------------------------------------------------------------
@app.command("serve")
def serve_cmd(
    port: Annotated[int, typer.Option(help="HTTP port")] = 8080,
    host: Annotated[str, typer.Option(help="address to listen on; 0.0.0.0 in a container")] = "127.0.0.1",
    reload_interval: Annotated[float, typer.Option(min=0.1, help="seconds between champion checks")] = 10.0,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="larger bodies get 413")] = 1 << 20,
    max_header_bytes: Annotated[int, typer.Option(min=1024, help="request line + headers; more get 431")] = 16 << 10,
    request_timeout: Annotated[float, typer.Option(
        min=0.1, help="seconds for a request's head, then its body (else 408); a silent connection closes")] = 10.0,
    keep_alive_timeout: Annotated[float, typer.Option(min=0.1, help="seconds an idle connection is kept")] = 65.0,
    max_instances: Annotated[int, typer.Option(min=1, help="rows per request")] = 1_000,
    feature_staleness: Annotated[float, typer.Option(min=0.0, help="seconds an online feature may be cached")] = 5.0,
    log_queue: Annotated[int, typer.Option(
        min=1, help="predictions held unwritten at most (more are dropped, counted): a crash loses no more")] = 10_000,
    wait_for_champion: Annotated[float, typer.Option(
        min=0.0, help="seconds to wait for a first champion (a fresh cluster's bootstrap); 0: fail at once")] = 0.0,
) -> None:
    """Serve the champion (KServe v1 and v2) with Feast enrichment, inference log and hot reload."""
    from serving.server import ServeOptions, serve

    quiet_libraries()
    settings = settings_or_fail()
    options = ServeOptions(port=port, host=host, max_body_bytes=max_body_bytes, max_header_bytes=max_header_bytes,
                           request_timeout_s=request_timeout, keep_alive_s=keep_alive_timeout,
                           max_instances=max_instances, reload_interval_s=reload_interval,
                           feature_max_staleness_s=feature_staleness, log_queue=log_queue,
                           wait_for_champion_s=wait_for_champion)
    if not wait_for_champion:
        registry_or_fail(settings)
    with user_errors():
        serve(settings, options)


@app.command("predict")
def predict_cmd(
    customer_id: Annotated[int, typer.Option(help="features looked up in the online store")] = 1,
    merchant_id: Annotated[int, typer.Option()] = 1,
    amount: Annotated[float, typer.Option()] = 42.0,
    channel: Annotated[str, typer.Option()] = "pos",
    hour_of_day: Annotated[int, typer.Option()] = 12,
    distance_km: Annotated[float | None, typer.Option()] = None,
    url: Annotated[str, typer.Option(help="the model server")] = "http://127.0.0.1:8080",
    explain: Annotated[bool, typer.Option(help="per-feature contributions")] = False,
) -> None:
    """Score one transaction on a running server (features looked up by entity)."""
    import httpx

    settings = settings_or_fail()
    instance = {"customer_id": customer_id, "merchant_id": merchant_id, "amount": amount, "channel": channel,
                "hour_of_day": hour_of_day, "distance_km": distance_km}
    verb = "explain" if explain else "predict"
    try:
        url = url.rstrip("/")
        response = httpx.post(f"{url}/v1/models/{settings.model_name}:{verb}", json={"instances": [instance]},
                              timeout=10)
    except (httpx.HTTPError, httpx.InvalidURL) as error:
        fail(f"no model server at {url} ({error}): start one with `driftloop serve`, or pass its --url")
    try:
        body = response.json()
    except ValueError:  # HTML, plain text, nothing: some other server
        body = None
    if response.status_code != 200 and isinstance(body, dict) and isinstance(body.get("error"), str):
        fail(f"{url} answered {response.status_code}: {body['error']}")  # the model server's own 4xx/5xx
    rows = _prediction_rows(body, explain)
    if rows is None:
        kind = response.headers.get("content-type", "no content type").split(";")[0]
        fail(f"{url} is not a driftloop model server (POST /v1/models/{settings.model_name}:{verb} answered "
             f"{response.status_code}, {kind}): start one with `driftloop serve`, or pass its --url")
    out.print(table(f"{settings.model_name}:{verb}", rows))


def _prediction_rows(body: Any, explain: bool) -> dict[str, str] | None:
    """The summary of a model server's answer; None when the answer is not one (another server on the port)."""
    try:
        rows = {"fraud probability": f"{float(body['predictions'][0]):.4f}",
                "model version": str(body["model_version"]), "entity found": str(body["entity_found"][0])}
        if explain:
            top = sorted(body["explanations"][0].items(), key=lambda kv: -abs(float(kv[1])))[:5]
            rows["top contributions"] = ", ".join(f"{k} {float(v):+.3f}" for k, v in top)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return None
    return rows


@pipeline_app.command("serve")
def pipeline_serve() -> None:
    """Register the retraining deployment on the Prefect server (PREFECT_API_URL) and run its flow runs."""
    from pipelines import training

    quiet_libraries()
    settings = settings_or_fail()
    os.environ.update(training.prefect_environment(settings))
    if not os.environ.get("PREFECT_API_URL"):
        fail("set PREFECT_API_URL to the Prefect server's API (e.g. http://prefect-server:4200/api)")
    from pipelines.prefect_flow import RETRAINING_DEPLOYMENT, serve_retraining

    out.print(_masked(f"serving deployment {RETRAINING_DEPLOYMENT} on {os.environ['PREFECT_API_URL']}; Ctrl-C "
                      "stops it"))
    serve_retraining()


# ui -------------------------------------------------------------------------------------------------
@app.command("ui")
def ui_cmd(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    mlflow_port: Annotated[int, typer.Option(help="MLflow: runs, model versions, aliases, gate decisions")] = 5000,
    evidently_port: Annotated[int, typer.Option(help="Evidently: drift dashboards, one snapshot per check")] = 8000,
    prefect_port: Annotated[int, typer.Option(help="Prefect: flow runs of training and batch scoring")] = 4200,
    only: Annotated[str | None, typer.Option(help="serve just one: mlflow, evidently or prefect")] = None,
) -> None:
    """Serve the UIs on the configured stores, side by side; Ctrl-C stops them all."""
    import signal
    import subprocess

    from monitoring.dashboard import UI_ENV, ui_command, workspace_path
    from pipelines.training import prefect_environment

    settings = settings_or_fail()
    bin_dir = Path(sys.executable).parent
    mlflow_cmd = [str(bin_dir / "mlflow"), "server", "--host", host, "--port", str(mlflow_port), "--workers", "1",
                  "--backend-store-uri", settings.tracking_uri]
    if settings.artifact_root:
        mlflow_cmd += ["--default-artifact-root", settings.artifact_root]
    if settings.tracking_uri.startswith("sqlite:///"):
        Path(settings.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    workspace_path(settings).mkdir(parents=True, exist_ok=True)
    uis = {
        "mlflow": (mlflow_cmd, mlflow_port, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}),  # as the chart
        "evidently": (ui_command(settings, host, evidently_port), evidently_port, UI_ENV),
        "prefect": ([str(bin_dir / "prefect"), "server", "start", "--host", host, "--port", str(prefect_port)],
                    prefect_port, prefect_environment(settings)),
    }
    if only is not None and only not in uis:
        fail(f"--only takes one of {', '.join(uis)}, not {only!r}")
    chosen = {name: ui for name, ui in uis.items() if only in (None, name)}
    for name, (_, port, _) in chosen.items():
        _port_free_or_fail(host, port, f"--{name}-port")
    if only is not None:  # one UI (a container's command): become it, so signals and logs go straight to it
        command, port, env = chosen[only]
        os.execve(command[0], command, {**os.environ, **env})  # noqa: S606 - a fixed argument list, no shell
    procs: dict[str, subprocess.Popen] = {}
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs.values():
            proc.terminate()

    signal.signal(signal.SIGTERM, stop)
    try:
        for name, (command, _, env) in chosen.items():
            procs[name] = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)
        for name, (_, port, _) in chosen.items():  # a URL is printed once its UI answers, not before
            if not _answers(host, port, procs[name], lambda: stopping):
                if stopping:
                    break
                stop()
                code = procs[name].poll()
                fail(f"the {name} UI " + (f"exited ({code})" if code is not None else "did not answer in "
                                          f"{UI_START_S:.0f} s") + f" on port {port}: run `driftloop ui --only "
                     f"{name}` to see its output")
            out.print(f"{name:<10} http://{host}:{port}")
        if not stopping:
            out.print("Ctrl-C stops them.")
        for proc in procs.values():
            proc.wait()
    except KeyboardInterrupt:
        stop()
        for proc in procs.values():
            proc.wait()


UI_START_S = 180.0  # Prefect's server migrates its database on a first start


def _port_free_or_fail(host: str, port: int, option: str) -> None:
    """Fail, naming the option, when something already listens on ``port``: the UI would not start, and its
    URL would show that other server."""
    import socket

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is not taken
        try:
            probe.bind((host, port))
        except OSError as error:
            fail(f"port {port} on {host} is taken ({error.strerror}): stop what listens there, or choose another "
                 f"with {option}")


def _answers(host: str, port: int, proc: Any, stopping: Callable[[], bool]) -> bool:
    """Wait until the UI at ``port`` answers HTTP; False when its process exits or it is too slow."""
    import httpx

    address = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host  # noqa: S104
    deadline = time.monotonic() + UI_START_S
    while proc.poll() is None and not stopping() and time.monotonic() < deadline:
        try:
            httpx.get(f"http://{address}:{port}/", timeout=2)
            return True
        except httpx.HTTPError:
            time.sleep(0.3)
    return False


# wait-for -------------------------------------------------------------------------------------------
class Store(StrEnum):
    postgres = "postgres"
    redis = "redis"
    mlflow = "mlflow"
    prefect = "prefect"


def _store_address(settings: Settings, store: Store) -> tuple[str, int, str]:
    """(host, port, the variable that says where) of a store, from the settings' connection strings."""
    from urllib.parse import urlsplit

    variable, value = {
        Store.postgres: ("DRIFTLOOP_POSTGRES_DSN", settings.postgres_dsn),
        Store.redis: ("DRIFTLOOP_REDIS_URL", settings.redis_url),
        Store.mlflow: ("DRIFTLOOP_MLFLOW_TRACKING_URI", settings.mlflow_tracking_uri),
        Store.prefect: ("PREFECT_API_URL", os.environ.get("PREFECT_API_URL")),
    }[store]
    if not value:
        fail(f"{store.value}: {variable} is not set, so there is no server to wait for")
    if store is Store.redis and "://" not in value:  # Feast's form: host:port[,password=…,ssl=true]
        value = "redis://" + value.split(",", 1)[0]
    default_port = {"postgresql": 5432, "postgres": 5432, "redis": 6379, "rediss": 6379, "http": 80, "https": 443}
    try:
        url = urlsplit(value)
        host, port = url.hostname, url.port or default_port.get(url.scheme)
    except ValueError:
        host = port = None
    if not host or port is None:
        fail(f"{store.value}: cannot read a host and port from {variable} (scheme://host:port/… expected)")
    return host, port, variable


@app.command("wait-for")
def wait_for_cmd(
    stores: Annotated[list[Store], typer.Argument(help="the servers to wait for, in order")],
    timeout: Annotated[float, typer.Option(min=0.0, help="seconds for all of them together")] = 600.0,
    every: Annotated[float, typer.Option(min=0.1, help="seconds between progress lines")] = 10.0,
) -> None:
    """Wait until the configured stores accept TCP connections (a pod's first init container); MLflow, when
    MLFLOW_TRACKING_USERNAME names this pod's user, until it also accepts that user (its basic-auth app: a
    user that a job creates after the server starts)."""
    import base64
    import socket
    import urllib.error
    import urllib.request

    settings = settings_or_fail()
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
    started = time.monotonic()
    deadline = started + timeout

    def refusal(store: Store, host: str, port: int) -> str | None:
        """Why the store does not take this pod yet; None once it does."""
        left = max(0.1, min(2.0, deadline - time.monotonic()))
        try:
            with socket.create_connection((host, port), timeout=left):
                pass
        except OSError as error:  # refused, unreachable, or a name that does not resolve yet
            return error.strerror or type(error).__name__
        if store is not Store.mlflow or not user:
            return None
        request = urllib.request.Request(  # noqa: S310 - the configured server's http(s) URL
            f"{settings.mlflow_tracking_uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1",
            headers={"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()})
        try:
            with urllib.request.urlopen(request, timeout=left):  # noqa: S310 - as above
                return None  # any answer but 401: the user is known
        except urllib.error.HTTPError as error:
            return f"it does not accept user {user} yet" if error.code == 401 else None
        except OSError as error:
            return str(getattr(error, "reason", error))

    for store in stores:
        host, port, variable = _store_address(settings, store)
        next_line = time.monotonic() + every
        while True:
            reason = refusal(store, host, port)
            if reason is None:
                break
            now = time.monotonic()
            if now >= deadline:
                fail(f"{store.value} at {host}:{port} accepted no connection in {timeout:.0f} s (last: {reason}): "
                     f"is its server running and ready, and does {variable} name it?")
            if now >= next_line:
                out.print(f"waiting for {store.value} at {host}:{port} ({reason}), {now - started:.0f} s",
                          highlight=False)
                next_line = now + every
            time.sleep(min(0.5, max(0.0, deadline - now)))
        out.print(f"{store.value} at {host}:{port} accepts connections ({time.monotonic() - started:.1f} s)",
                  highlight=False)


def main(argv: list[str] | None = None) -> Callable[..., Any] | None:
    """The CLI; log records and an unexpected error's traceback have their passwords masked too."""
    settings = _secrets()
    redact_logs(settings)
    unchecked_feast()
    try:
        return app(args=argv)
    except Exception:  # not a user error: the traceback, for a bug report, printed as Python would, masked
        sys.stderr.write(redact(traceback.format_exc(), settings))
        sys.exit(1)



