"""The one typed settings object.

Every value comes from the environment (prefix ``DRIFTLOOP_``) or its default; Helm values become
environment variables become these settings. Build it once at the edge (the CLI) and pass it down.

Two profiles:
- ``local``: everything embedded under one state directory (SQLite MLflow store with local artifacts,
  Feast file offline store, SQLite online store and file registry).
- ``cluster``: PostgreSQL, Redis, an MLflow server and object storage. Connection strings have no
  defaults: a cluster without them is an error that says which variable to set.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent

Profile = Literal["local", "cluster"]


class SettingsError(ValueError):
    """The configuration cannot work; the message says which variable to set."""


class Settings(BaseSettings):
    """Where every store lives and the knobs of the loop."""

    model_config = SettingsConfigDict(env_prefix="DRIFTLOOP_", extra="ignore", frozen=True)

    profile: Profile = Field("local", description="local (embedded stores) or cluster (servers)")
    state_dir: Path = Field(Path(".driftloop"), description="all local state: data, stores, artifacts")

    # MLflow
    mlflow_tracking_uri: str | None = Field(None, description="default: SQLite file in the state dir")
    mlflow_artifact_root: str | None = Field(None, description="default: mlartifacts in the state dir")
    mlflow_timeout_s: float = Field(10.0, gt=0, description="per HTTP request to a tracking server")
    mlflow_retries: int = Field(2, ge=0, description="HTTP retries to a tracking server")
    experiment: str = "driftloop"
    model_name: str = "driftloop-fraud"

    # Feast
    feast_repo: Path = Field(PROJECT_ROOT / "feature_repo", description="the feature repository")
    feast_project: str = "driftloop"
    feature_service: str = Field("fraud_model_v1", description="the versioned FeatureService")
    data_dir: str | None = Field(None, description="Parquet sources; default: data in the state dir")
    feast_registry: str | None = Field(None, description="cluster: postgresql+psycopg://… registry")
    postgres_dsn: str | None = Field(None, description="cluster: postgresql://user:pass@host:5432/db")
    redis_url: str | None = Field(None, description="cluster: host:6379[,password=…]")

    # Pipelines
    image: str = Field("driftloop:0.1.0", description="the project image, for KFP components")
    device: Literal["auto", "cpu", "cuda"] = Field("cpu", description="XGBoost device; auto: cuda if present")
    retrain: Literal["local", "deployment"] = Field(
        "local", description="local: the Prefect flow in a child process; deployment: the driftloop-retraining "
        "deployment on the Prefect server at PREFECT_API_URL (`driftloop pipeline serve` runs it)")
    traffic_rows_max: int = Field(
        500_000, ge=0, description="a training set takes at most this many labelled served predictions, the "
        "newest; 0: none, only the generated transactions")

    # Drift policy: one for `driftloop monitor` and `driftloop drift compare` (options override it per run)
    drift_share: float = Field(0.3, gt=0, le=1, description="a window drifts when this share of its features do")
    drift_num_method: Literal["wasserstein", "psi", "jensenshannon"] = Field(
        "wasserstein", description="numerical columns: normed Wasserstein distance, PSI or Jensen-Shannon")
    drift_num_threshold: float = Field(0.1, gt=0, description="a numerical column drifts at this score")
    drift_cat_method: Literal["jensenshannon", "psi"] = Field("jensenshannon", description="categorical columns")
    drift_cat_threshold: float = Field(0.1, gt=0, description="a categorical column drifts at this score")
    drift_min_rows: int = Field(200, ge=1, description="fewer rows (or values in a column): no verdict")
    drift_clip_quantile: float = Field(
        0.005, ge=0, lt=0.5, description="numerical tests see both samples clipped to the reference's "
        "[q, 1-q] quantiles, so a few extreme rows cannot fake drift; 0: Evidently's exact formula")
    drift_extreme_margin: float = Field(
        1.0, ge=0, description="values beyond the reference's range by more than this many range widths are "
        "extreme: counted in data quality")
    drift_kinds: dict[str, Literal["numerical", "categorical"]] = Field(
        default_factory=dict, description="column -> kind, over the inference (JSON in the environment)")

    @model_validator(mode="after")
    def _cluster_needs_servers(self) -> Settings:
        if self.profile == "cluster":
            missing = [
                f"DRIFTLOOP_{name.upper()}"
                for name in ("mlflow_tracking_uri", "postgres_dsn", "redis_url", "data_dir")
                if not getattr(self, name)
            ]
            if missing:
                raise SettingsError(
                    "profile 'cluster' needs these variables set: " + ", ".join(missing)
                    + " (or use DRIFTLOOP_PROFILE=local for embedded stores)"
                )
        return self

    # Resolved locations -------------------------------------------------------------------------
    @cached_property
    def state(self) -> Path:
        return self.state_dir.expanduser().resolve()

    @cached_property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.state / 'mlflow.db'}"

    @cached_property
    def artifact_root(self) -> str | None:
        """Local: a folder in the state dir. Cluster: the server's own (proxied) store unless set."""
        if self.mlflow_artifact_root or self.profile == "cluster":
            return self.mlflow_artifact_root
        return (self.state / "mlartifacts").as_uri()

    @cached_property
    def data_path(self) -> str:
        return self.data_dir or str(self.state / "data")

    @cached_property
    def datasets_path(self) -> Path:
        """Training sets built by the point-in-time join (local file system in both profiles)."""
        return self.state / "datasets"

    @cached_property
    def inference_log_path(self) -> Path:
        """Every prediction the server made (local profile: SQLite in the state dir)."""
        return self.state / "inference_log.db"

    @property
    def feature_store_yaml(self) -> Path:
        name = "feature_store.yaml" if self.profile == "local" else "feature_store.cluster.yaml"
        return self.feast_repo / name

    def feast_variables(self) -> dict[str, str]:
        """The variables that ``feature_store*.yaml`` takes its locations from."""
        local = self.profile == "local"
        return {
            "DRIFTLOOP_FEAST_PROJECT": self.feast_project,
            "DRIFTLOOP_DATA_DIR": self.data_path,
            "DRIFTLOOP_FEAST_REGISTRY": self.feast_registry
            or (str(self.state / "feast" / "registry.db") if local else self._pg_sqlalchemy()),
            "DRIFTLOOP_FEAST_ONLINE": str(self.state / "feast" / "online.db") if local else self.redis_url or "",
        }

    def _pg_sqlalchemy(self) -> str:
        dsn = self.postgres_dsn or ""
        return dsn.replace("postgresql://", "postgresql+psycopg://", 1)

    def locations(self) -> dict[str, str]:
        """What ``driftloop config`` prints: the profile and where every store lives."""
        feast = self.feast_variables()
        return {
            "profile": self.profile,
            "state_dir": str(self.state),
            "mlflow_tracking_uri": redact(self.tracking_uri),
            "mlflow_artifact_root": redact(self.artifact_root or "(the tracking server's default)"),
            "model": f"models:/{self.model_name}@champion",
            "feast_repo": str(self.feast_repo),
            "feast_config": str(self.feature_store_yaml),
            "feature_service": self.feature_service,
            "feast_offline_store": f"file: {feast['DRIFTLOOP_DATA_DIR']}",
            "feast_online_store": ("sqlite: " if self.profile == "local" else "redis: ")
            + redact(feast["DRIFTLOOP_FEAST_ONLINE"]),
            "feast_registry": redact(feast["DRIFTLOOP_FEAST_REGISTRY"]),
            "data_dir": self.data_path,
            "inference_log": str(self.inference_log_path),
            "image": self.image,
            "device": self.device,
            "retrain": self.retrain,
        }

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """The repr (in a traceback, a log line) masks passwords, as ``locations`` does."""
        for name, value in super().__repr_args__():
            yield name, redact(value) if name in SECRET_FIELDS and isinstance(value, str) else value


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment, with explicit overrides (used by tests and the CLI)."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except SettingsError:
        raise
    except ValidationError as err:  # not chained: pydantic's message quotes the input, passwords included
        raise SettingsError(_explain(err)) from None
    except ValueError as err:  # pydantic-settings' own (a value that is not JSON): it names the field only
        raise SettingsError(f"invalid driftloop settings: {err}") from err


def _explain(err: ValidationError) -> str:
    """Each problem with the variable it comes from, and never the value: it may hold a password."""
    problems = []
    for error in err.errors(include_url=False, include_input=False):
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, SettingsError):  # our own validator's message says it all
            problems.append(str(cause))
            continue
        name, *inner = [str(part) for part in error["loc"]] or [""]
        where = ".".join((name, *inner)) + f" (DRIFTLOOP_{name.upper()})"
        problems.append(f"{where}: {error['msg']}" if name else error["msg"])
    return "invalid driftloop settings: " + "; ".join(problems)


# Secrets -----------------------------------------------------------------------------------------
# Passwords live only in connection strings: these settings. Whatever prints, logs or records text that
# may quote one (the CLI's errors and summaries, every log record, a pipeline step's failure) masks it
# with ``redact``; the Prefect flow and the KFP components read them from their worker's environment.
SECRET_FIELDS = ("mlflow_tracking_uri", "mlflow_artifact_root", "postgres_dsn", "redis_url", "feast_registry")
MASK = "***"
# A password shorter than this is masked where it stands (in a URL or a pair) but not wherever its letters
# happen to occur in a text: masking "pw" everywhere would garble messages and tell which letters it has.
MIN_LITERAL_SECRET = 6

_PATTERNS = (
    # scheme://user:PASSWORD@host; the password runs to the authority's last "@", as URL parsers read it
    re.compile(r"(?P<keep>\b[a-z][a-z0-9+.-]*://[^\s:/?#@'\"]*:)(?P<secret>[^\s/?#'\"]+)(?=@)", re.IGNORECASE),
    # password=PASSWORD: Feast's Redis string (host:port,password=…), libpq keyword DSNs, query strings
    re.compile(r"(?P<keep>\b\w*password\s*=\s*)(?P<secret>[^\s,;&'\"]+)", re.IGNORECASE),
    # 'password': 'PASSWORD' in a printed dict or JSON
    re.compile(r"(?P<keep>['\"]\w*password['\"]\s*:\s*['\"])(?P<secret>[^'\"]+)", re.IGNORECASE),
)


def secrets_of(settings: Settings) -> tuple[str, ...]:
    """The passwords in the settings' secret fields, as written and URL-decoded, longest first."""
    found: set[str] = set()
    for name in SECRET_FIELDS:
        for pattern in _PATTERNS:
            for match in pattern.finditer(getattr(settings, name) or ""):
                found.update((match["secret"], unquote(match["secret"])))
    return tuple(sorted((s for s in found if len(s) >= MIN_LITERAL_SECRET), key=len, reverse=True))


def _mask(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        text = text.replace(secret, MASK)
    for pattern in _PATTERNS:
        text = pattern.sub(rf"\g<keep>{MASK}", text)
    return text


def redact(text: str, settings: Settings | None = None) -> str:
    """``text`` with passwords masked: in URLs' userinfo, in ``password=`` pairs and, given the settings,
    each of their passwords wherever it appears (a driver may quote one alone)."""
    return _mask(text, secrets_of(settings) if settings is not None else ())


def redact_logs(settings: Settings | None = None) -> None:
    """From now on, mask passwords in every log record this process makes, whichever handler writes it
    (a terminal, a file, Prefect's API). Call it at the edge; calling it again replaces the secrets known."""
    secrets = secrets_of(settings) if settings is not None else ()
    current = logging.getLogRecordFactory()
    plain = getattr(current, "unmasked", current)

    def masked_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = plain(*args, **kwargs)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # arguments that do not fit: logging reports that when it writes
            return record
        masked = _mask(message, secrets)
        if masked != message:
            record.msg, record.args = masked, ()
        if record.exc_info and not record.exc_text:  # formatters use exc_text when it is set
            record.exc_text = _mask(logging.Formatter().formatException(record.exc_info), secrets)
        if record.stack_info:
            record.stack_info = _mask(record.stack_info, secrets)
        return record

    masked_record.unmasked = plain  # type: ignore[attr-defined]
    logging.setLogRecordFactory(masked_record)


def redact_error(error: BaseException, settings: Settings | None = None) -> BaseException:
    """Mask passwords in an error's message and its causes', in place, and return it: its type and traceback
    stay, so whoever catches it still can; whoever records its text (a Prefect task's state, a pod's log) gets
    no secret. A driver's error may quote the URL it could not reach, password and all."""
    secrets = secrets_of(settings) if settings is not None else ()
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.args = tuple(_mask(arg, secrets) if isinstance(arg, str) else arg for arg in current.args)
        message = getattr(current, "message", None)
        if isinstance(message, str):  # MLflow's errors keep their text here too
            with contextlib.suppress(AttributeError):  # a read-only property: it reads the args masked above
                current.message = _mask(message, secrets)  # type: ignore[attr-defined]
        pending += [current.__cause__, current.__context__]
    return error
