"""The model registry over MLflow's REST API (``/api/2.0/mlflow/…``), without ``import mlflow``.

``import mlflow`` alone costs about 4 CPU-s (it pulls in pandas and more); ``driftloop rollback`` and
``promote --force`` against a tracking server need only a handful of registry calls. ``RestRegistry`` makes
them with httpx under the MlflowClient method names, signatures and return shapes that
``pipelines.steps.register``'s moves use, so one code path serves both clients. It authenticates, verifies TLS,
retries and fails as MLflow's own client does, from MLflow's own variables (``MLFLOW_TRACKING_USERNAME`` and
``_PASSWORD``, ``_TOKEN``, ``_INSECURE_TLS``, ``_SERVER_CERT_PATH``, ``_CLIENT_CERT_PATH``), and its errors
carry MLflow's ``error_code`` as ``MlflowException`` does.
"""

from __future__ import annotations

import configparser
import os
import ssl
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx

API = "/api/2.0/mlflow"
MAX_RESULTS = 10_000  # MlflowClient.search_model_versions' default page
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})  # MLflow's client retries these, and so do we
# MLflow's error code for an HTTP status whose body is not MLflow's JSON (a proxy's page): its own table
STATUS_CODES = {400: "BAD_REQUEST", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "ENDPOINT_NOT_FOUND",
                409: "ALREADY_EXISTS", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL_ERROR",
                501: "NOT_IMPLEMENTED", 503: "TEMPORARILY_UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
PLUGIN_AUTH = ("MLFLOW_TRACKING_AUTH", "MLFLOW_TRACKING_AWS_SIGV4")  # schemes only MLflow's client speaks


class RegistryApiError(RuntimeError):
    """MLflow answered with an error, or not at all; ``error_code`` as on ``MlflowException``."""

    def __init__(self, message: str, error_code: str = "INTERNAL_ERROR", status: int | None = None) -> None:
        super().__init__(message)
        self.error_code = error_code
        self.status = status


def registry_errors() -> tuple[type[Exception], ...]:
    """What a registry client raises for MLflow's errors: this module's, and ``MlflowException`` once MLflow is
    loaded (only a loaded module can have raised one, and importing it just to catch it costs seconds)."""
    mlflow_errors = sys.modules.get("mlflow.exceptions")
    return (RegistryApiError, *((mlflow_errors.MlflowException,) if mlflow_errors else ()))


@dataclass(frozen=True)
class ModelVersion:
    """The fields of MLflow's ``ModelVersion`` that the registry's moves read."""

    name: str
    version: str
    run_id: str
    tags: dict[str, str] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)  # a search's results carry none, as MLflow's

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelVersion:
        return cls(name=data["name"], version=str(data["version"]), run_id=data.get("run_id", ""),
                   tags={tag["key"]: tag.get("value", "") for tag in data.get("tags", [])},
                   aliases=list(data.get("aliases", [])))


class Page(list[ModelVersion]):
    """One page of a search, as MLflow's ``PagedList``: a list, and ``token`` for the next page (None: last)."""

    def __init__(self, items: list[ModelVersion], token: str | None) -> None:
        super().__init__(items)
        self.token = token


class Registry(Protocol):
    """The registry calls the moves make (``promote``, ``rollback``, ``clean_up_orphans``): MlflowClient's."""

    def get_model_version(self, name: str, version: str) -> Any: ...
    def get_model_version_by_alias(self, name: str, alias: str) -> Any: ...
    def search_model_versions(self, filter_string: str | None = None, max_results: int = MAX_RESULTS) -> Any: ...
    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None: ...
    def delete_registered_model_alias(self, name: str, alias: str) -> None: ...
    def set_model_version_tag(self, name: str, version: str, key: str, value: str) -> None: ...
    def delete_model_version_tag(self, name: str, version: str, key: str) -> None: ...
    def delete_model_version(self, name: str, version: str) -> None: ...
    def set_tag(self, run_id: str, key: str, value: Any) -> Any: ...


def speaks_for(environ: Mapping[str, str]) -> bool:
    """False where MLflow's client would authenticate with a plugin (``MLFLOW_TRACKING_AUTH``, AWS SigV4)."""
    return not any(environ.get(name, "").strip().lower() not in ("", "false", "0") for name in PLUGIN_AUTH)


def _credentials(environ: Mapping[str, str]) -> tuple[str | None, str | None]:
    """MLflow's: ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``, else ``~/.mlflow/credentials``' [mlflow] section."""
    user, password = environ.get("MLFLOW_TRACKING_USERNAME"), environ.get("MLFLOW_TRACKING_PASSWORD")
    stored = Path("~/.mlflow/credentials").expanduser()
    if not (user and password) and stored.is_file():
        config = configparser.ConfigParser()
        config.read(stored)
        section = config["mlflow"] if config.has_section("mlflow") else {}  # ConfigParser.get reads an option
        user = user or section.get("mlflow_tracking_username")
        password = password or section.get("mlflow_tracking_password")
    return user, password


def tls(environ: Mapping[str, str]) -> ssl.SSLContext | bool:
    """What to verify the server with, from MLflow's variables (``verify`` for httpx)."""
    insecure = environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").strip().lower() in ("true", "1")
    server_cert, client_cert = (environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"),
                                environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH"))
    if insecure and server_cert:
        raise RegistryApiError("MLFLOW_TRACKING_INSECURE_TLS and MLFLOW_TRACKING_SERVER_CERT_PATH are both set: "
                               "unset one", "INVALID_PARAMETER_VALUE")
    if insecure:
        return False
    if not (server_cert or client_cert):
        return True
    context = ssl.create_default_context(cafile=server_cert)
    if client_cert:  # one file holding the certificate and its key, as requests' ``cert`` takes it
        context.load_cert_chain(client_cert)
    return context


class RestRegistry:
    """The registry of the MLflow tracking server at ``uri``; a user and password in ``uri`` are sent as Basic
    auth (as MLflow's client does), and no error or ``repr`` shows them."""

    def __init__(self, uri: str, *, timeout_s: float = 10.0, retries: int = 2, auth: httpx.Auth | None = None,
                 verify: ssl.SSLContext | bool = True, transport: httpx.BaseTransport | None = None) -> None:
        url = urlsplit(uri)
        if url.username is not None or url.password is not None:  # as requests does, the URI's pair wins
            auth = httpx.BasicAuth(unquote(url.username or ""), unquote(url.password or ""))
        self.where = urlunsplit(url._replace(netloc=url.netloc.rpartition("@")[2])).rstrip("/")
        self._retries = retries
        self._http = httpx.Client(auth=auth, verify=verify, timeout=timeout_s, transport=transport,
                                  headers={"User-Agent": "driftloop"})

    @classmethod
    def from_environment(cls, uri: str, *, timeout_s: float = 10.0, retries: int = 2,
                         environ: Mapping[str, str] = os.environ) -> RestRegistry:
        """Authenticated as MLflow's client would be in ``environ``: username and password, else a token."""
        user, password = _credentials(environ)
        token = environ.get("MLFLOW_TRACKING_TOKEN")
        auth = httpx.BasicAuth(user, password) if user and password else _Bearer(token) if token else None
        return cls(uri, timeout_s=timeout_s, retries=retries, auth=auth, verify=tls(environ))

    def __repr__(self) -> str:
        return f"RestRegistry({self.where!r})"

    def close(self) -> None:
        self._http.close()

    # MlflowClient's methods ------------------------------------------------------------------------
    def get_model_version(self, name: str, version: str) -> ModelVersion:
        found = self._call("GET", "model-versions/get", {"name": name, "version": str(version)})
        return ModelVersion.from_json(found["model_version"])

    def get_model_version_by_alias(self, name: str, alias: str) -> ModelVersion:
        found = self._call("GET", "registered-models/alias", {"name": name, "alias": alias})
        return ModelVersion.from_json(found["model_version"])

    def search_model_versions(self, filter_string: str | None = None, max_results: int = MAX_RESULTS,
                              order_by: list[str] | None = None, page_token: str | None = None) -> Page:
        query: dict[str, Any] = {"max_results": max_results}
        query.update({key: value for key, value in (("filter", filter_string), ("order_by", order_by),
                                                    ("page_token", page_token)) if value})
        found = self._call("GET", "model-versions/search", query)
        return Page([ModelVersion.from_json(v) for v in found.get("model_versions", [])],
                    found.get("next_page_token") or None)

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        self._call("POST", "registered-models/alias", {"name": name, "alias": alias, "version": str(version)})

    def delete_registered_model_alias(self, name: str, alias: str) -> None:
        self._call("DELETE", "registered-models/alias", {"name": name, "alias": alias})

    def set_model_version_tag(self, name: str, version: str, key: str, value: Any) -> None:
        self._call("POST", "model-versions/set-tag", {"name": name, "version": str(version), "key": key,
                                                       "value": str(value)})

    def delete_model_version_tag(self, name: str, version: str, key: str) -> None:
        self._call("DELETE", "model-versions/delete-tag", {"name": name, "version": str(version), "key": key})

    def delete_model_version(self, name: str, version: str) -> None:
        self._call("DELETE", "model-versions/delete", {"name": name, "version": str(version)})

    def set_tag(self, run_id: str, key: str, value: Any) -> None:
        self._call("POST", "runs/set-tag", {"run_id": run_id, "key": key, "value": str(value)})

    # One request ---------------------------------------------------------------------------------
    def _call(self, method: str, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        """MLflow's JSON answer; GET sends ``body`` as the query, the others as JSON (as MLflow's client)."""
        url = f"{self.where}{API}/{endpoint}"
        sent = {"params": body} if method == "GET" else {"json": body}
        for attempt in range(self._retries + 1):
            try:
                response = self._http.request(method, url, **sent)  # type: ignore[arg-type]
            except httpx.TransportError as err:  # refused, timed out, TLS: nothing came back
                if attempt < self._retries:
                    time.sleep(0.5 * 2**attempt)
                    continue
                raise RegistryApiError(f"MLflow tracking server {self.where} did not answer {method} {endpoint} "
                                       f"({type(err).__name__}: {err})", "TEMPORARILY_UNAVAILABLE") from err
            if response.status_code in RETRY_STATUS and attempt < self._retries:
                time.sleep(0.5 * 2**attempt)
                continue
            break
        if response.is_success:
            return response.json() if response.content.strip() else {}
        raise self._error(response, method, endpoint)

    def _error(self, response: httpx.Response, method: str, endpoint: str) -> RegistryApiError:
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and "error_code" in body:  # MLflow's own error
            code, message = str(body["error_code"]), str(body.get("message", ""))
        else:  # a proxy's or an auth layer's page: MLflow's code for the status
            code = STATUS_CODES.get(response.status_code, "INTERNAL_ERROR")
            message = " ".join(response.text.split())[:300]
        hint = ("; check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN"
                if response.status_code in (401, 403) else "")
        return RegistryApiError(f"MLflow tracking server {self.where} answered {method} {endpoint} with "
                                f"{response.status_code} {code}: {message}{hint}", code, response.status_code)


class _Bearer(httpx.Auth):
    """``Authorization: Bearer <MLFLOW_TRACKING_TOKEN>``."""

    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token}"

    def auth_flow(self, request: httpx.Request):  # type: ignore[no-untyped-def]
        request.headers["Authorization"] = self._header
        yield request
