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

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
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
            "mlflow_tracking_uri": _redact(self.tracking_uri),
            "mlflow_artifact_root": self.artifact_root or "(the tracking server's default)",
            "model": f"models:/{self.model_name}@champion",
            "feast_repo": str(self.feast_repo),
            "feast_config": str(self.feature_store_yaml),
            "feature_service": self.feature_service,
            "feast_offline_store": f"file: {feast['DRIFTLOOP_DATA_DIR']}",
            "feast_online_store": ("sqlite: " if self.profile == "local" else "redis: ")
            + _redact(feast["DRIFTLOOP_FEAST_ONLINE"]),
            "feast_registry": _redact(feast["DRIFTLOOP_FEAST_REGISTRY"]),
            "data_dir": self.data_path,
            "inference_log": str(self.inference_log_path),
            "image": self.image,
            "device": self.device,
            "retrain": self.retrain,
        }


def _redact(uri: str) -> str:
    """Hide a password in ``scheme://user:password@host`` or ``host,password=…``."""
    if "password=" in uri:
        head, _, _ = uri.partition("password=")
        return head + "password=***"
    if "://" in uri and "@" in uri:
        scheme, _, rest = uri.partition("://")
        creds, _, host = rest.rpartition("@")
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else uri
    return uri


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment, with explicit overrides (used by tests and the CLI)."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except SettingsError:
        raise
    except ValueError as err:  # pydantic's ValidationError: name the variable
        raise SettingsError(f"invalid driftloop settings: {err}") from err
