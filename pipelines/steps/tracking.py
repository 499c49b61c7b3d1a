"""Tracking: one place that points MLflow at the configured store, with timeouts, and checks it answers.

MLflow is imported where it is used: ``import mlflow`` alone costs about 4 CPU-s, and the registry's moves
against a tracking server go without it (``rest_registry``).
"""

from __future__ import annotations

import base64
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit, urlunsplit

from driftloop.settings import Settings, redact

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from pipelines.steps.registry_api import RestRegistry

TAG_ENGINE = "driftloop.engine"  # what ran the training run: an engine of `driftloop train --engine`


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message says what to check."""


def _health_request(uri: str) -> urllib.request.Request:
    """GET ``<uri>/health``; a user and password in the URI (as MLflow's client sends them) become Basic auth,
    since urllib would read ``user:password@host`` as the host's name."""
    url = urlsplit(uri)
    request = urllib.request.Request(  # noqa: S310 - the configured tracking server, http(s) only
        urlunsplit(url._replace(netloc=url.netloc.rpartition("@")[2], path=f"{url.path.rstrip('/')}/health")))
    if url.username is not None or url.password is not None:
        pair = f"{unquote(url.username or '')}:{unquote(url.password or '')}".encode()
        request.add_header("Authorization", f"Basic {base64.b64encode(pair).decode()}")
    return request


def check_reachable(settings: Settings) -> None:
    """Fail fast, with a clear message (its password masked), when the tracking store is not there."""
    uri = settings.tracking_uri
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(_health_request(uri), timeout=settings.mlflow_timeout_s):  # noqa: S310
                return
        except (urllib.error.URLError, OSError, ValueError) as err:  # ValueError: a port that is not a number
            raise TrackingError(redact(
                f"MLflow tracking server {uri} is unreachable ({err}). Start it, or point "
                "DRIFTLOOP_MLFLOW_TRACKING_URI at a running one.", settings)) from err  # err: no URL in its text
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingError(f"cannot create the MLflow store's directory {db.parent}: {err}") from err


def configure(settings: Settings) -> MlflowClient:
    """Point MLflow at the store (tracking and registry), with request timeouts; return a client.

    MLflow reads its HTTP timeouts from the environment, so they are set here, at the edge.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(settings.mlflow_timeout_s))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(settings.mlflow_retries)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # With a tracking server MLflow writes "View run … at: <url>" to stdout when a run ends; stdout is the
    # CLI's output (`driftloop train --json` must print JSON only), so the run's URL is not printed there.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    check_reachable(settings)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    experiment = client.get_experiment_by_name(settings.experiment)
    if experiment is None:
        try:
            client.create_experiment(settings.experiment, artifact_location=settings.artifact_root)
        except MlflowException as err:  # another process created it first
            if "already exists" not in str(err).lower() and "unique" not in str(err).lower():
                raise
    mlflow.set_experiment(settings.experiment)
    return client


def rest_registry(settings: Settings) -> RestRegistry | None:
    """The tracking server's registry over its REST API, with the settings' timeout and retries and MLflow's
    credentials from the environment (``registry_api``), once the server answers; None where only MLflow's
    client will do: an embedded store (no server to ask) or an auth plugin (``MLFLOW_TRACKING_AUTH``, AWS SigV4).
    """
    from pipelines.steps.registry_api import RestRegistry, speaks_for

    if not settings.tracking_uri.startswith(("http://", "https://")) or not speaks_for(os.environ):
        return None
    check_reachable(settings)
    return RestRegistry.from_environment(settings.tracking_uri, timeout_s=settings.mlflow_timeout_s,
                                         retries=settings.mlflow_retries)


def origin_tags(engine: str, **run: str | None) -> dict[str, str]:
    """The tags that say what ran a training run: ``driftloop.engine``, and for an orchestrator its own run's
    ids as ``driftloop.<engine>.<key>`` (``origin_tags("kfp", run_id=…)``); keys left empty are left out."""
    return {TAG_ENGINE: engine, **{f"driftloop.{engine}.{key}": str(value) for key, value in run.items() if value}}


def tag_run(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    """Set ``tags`` on a run, finished or not, in one request."""
    from mlflow.entities import RunTag

    if tags:
        client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
