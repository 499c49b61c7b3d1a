"""Features: the Feast store from settings, apply, materialize, and the point-in-time training set."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from string import Template
from types import ModuleType

import pandas as pd
import yaml
from feast import FeatureService, FeatureStore
from feast.repo_config import RepoConfig

from driftloop.contracts import ENTITY_KEYS, LABEL, LABEL_TIMESTAMP, REQUEST_FEATURES, TIMESTAMP, TRANSACTION_ID
from driftloop.settings import Settings


class FeatureStoreError(RuntimeError):
    """The feature store is not ready; the message says which command fixes it."""


def repo_config(settings: Settings) -> RepoConfig:
    """``feature_store*.yaml`` with its ``${DRIFTLOOP_*}`` placeholders filled from settings.

    Feast's ``repo_path`` is the data directory: the definitions' relative source paths resolve there.
    """
    text = settings.feature_store_yaml.read_text()
    try:
        raw = yaml.safe_load(Template(text).substitute(settings.feast_variables()))
    except KeyError as err:
        raise FeatureStoreError(f"{settings.feature_store_yaml} uses an unknown variable {err}") from err
    config = RepoConfig(**raw)
    config.repo_path = Path(settings.data_path)
    return config


def feature_store(settings: Settings) -> FeatureStore:
    if settings.profile == "local":
        (settings.state / "feast").mkdir(parents=True, exist_ok=True)
    return FeatureStore(config=repo_config(settings))


def definitions(settings: Settings) -> ModuleType:
    """Load ``features.py`` from the feature repo (by path: the repo is not a Python package)."""
    path = settings.feast_repo / "features.py"
    spec = importlib.util.spec_from_file_location("driftloop_feature_repo", path)
    if spec is None or spec.loader is None:
        raise FeatureStoreError(f"no feature definitions at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def apply(settings: Settings, store: FeatureStore | None = None) -> list[str]:
    """Register entities, feature views and feature services; return their names."""
    from feast import Entity, FeatureView

    store = store or feature_store(settings)
    module = definitions(settings)
    objects = [v for v in vars(module).values() if isinstance(v, Entity | FeatureView | FeatureService)]
    store.apply(objects)
    return sorted(f"{type(o).__name__}:{o.name}" for o in objects)


def _require_data(settings: Settings) -> None:
    """Every feature view's Parquet source exists, reads as Parquet and has the columns the view needs:
    checked before Feast reads them, whose own failure is a traceback from deep inside pandas."""
    import pyarrow.parquet as pq
    from feast import FeatureView

    if settings.data_path.startswith(("s3://", "gs://")):
        return
    missing = [n for n in ("customers", "merchants") if not (Path(settings.data_path) / f"{n}.parquet").exists()]
    if missing:
        raise FeatureStoreError(
            f"no {', '.join(missing)} data in {settings.data_path}: run `driftloop data generate` first"
        )
    for view in (v for v in vars(definitions(settings)).values() if isinstance(v, FeatureView)):
        source = view.batch_source
        path = Path(settings.data_path) / source.path
        if not path.exists():
            continue
        try:
            columns = set(pq.read_schema(path).names)
        except Exception as error:  # pyarrow raises ArrowInvalid, OSError and more for a file that is not Parquet
            raise FeatureStoreError(f"cannot read {path} ({type(error).__name__}: {str(error)[:200]}): "
                                    "regenerate it with `driftloop data generate`") from None
        needed = [*view.join_keys, source.timestamp_field, source.created_timestamp_column,
                  *(field.name for field in view.features)]
        if lacking := [c for c in needed if c and c not in columns]:
            raise FeatureStoreError(f"{path} lacks columns {', '.join(lacking)} (feature view {view.name}): "
                                    "regenerate it with `driftloop data generate`")


def service(settings: Settings, store: FeatureStore) -> FeatureService:
    try:
        return store.get_feature_service(settings.feature_service)
    except Exception as err:  # Feast raises several types for 'not registered'
        raise FeatureStoreError(
            f"feature service {settings.feature_service!r} is not registered: run `driftloop features apply`"
        ) from err


def materialize(settings: Settings, end: datetime | None = None, store: FeatureStore | None = None) -> dict:
    """Load the latest feature values up to ``end`` (default now) into the online store."""
    _require_data(settings)
    store = store or feature_store(settings)
    service(settings, store)
    end = end or datetime.now(UTC)
    views = [fv.name for fv in store.list_feature_views()]
    start = end - pd.Timedelta(days=3).to_pytimedelta()  # views' ttl is 2 days: older values are stale
    store.materialize(start_date=start, end_date=end, feature_views=views)
    return {"views": views, "from": start.isoformat(), "to": end.isoformat()}


@dataclass(frozen=True)
class TrainingSet:
    uri: str
    rows: int
    fingerprint: str
    feature_service: str


def fingerprint(frame: pd.DataFrame) -> str:
    """A content hash of a frame (row order and values), stable across processes."""
    hashed = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    digest = hashlib.sha256(hashed.tobytes())
    digest.update(",".join(map(str, frame.columns)).encode())
    return digest.hexdigest()[:16]


def build_training_set(settings: Settings, as_of: datetime | None = None,
                       store: FeatureStore | None = None) -> TrainingSet:
    """Point-in-time join of labelled transactions with the FeatureService; written as Parquet.

    Only transactions whose label had arrived by ``as_of`` (default: now) are used.
    """
    _require_data(settings)
    store = store or feature_store(settings)
    tx_path = Path(settings.data_path) / "transactions.parquet"
    try:
        tx = pd.read_parquet(tx_path)
    except FileNotFoundError as err:
        raise FeatureStoreError(f"no transactions at {tx_path}: run `driftloop data generate`") from err
    except Exception as err:
        raise FeatureStoreError(f"cannot read {tx_path} ({err}): regenerate it with `driftloop data generate`") from err
    needed = [TRANSACTION_ID, *ENTITY_KEYS, TIMESTAMP, *(c.name for c in REQUEST_FEATURES), LABEL, LABEL_TIMESTAMP]
    missing = [c for c in needed if c not in tx.columns]
    if missing:
        raise FeatureStoreError(f"{tx_path} lacks columns {', '.join(missing)}")
    as_of = as_of or datetime.now(UTC)
    entity_df = tx.loc[tx[LABEL_TIMESTAMP] <= pd.Timestamp(as_of), needed]
    joined = store.get_historical_features(entity_df=entity_df, features=service(settings, store)).to_df()
    joined = joined.sort_values([TIMESTAMP, TRANSACTION_ID], kind="stable").reset_index(drop=True)
    fp = fingerprint(joined)
    settings.datasets_path.mkdir(parents=True, exist_ok=True)
    path = settings.datasets_path / f"training-{fp}.parquet"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        joined.to_parquet(tmp, index=False)
        tmp.replace(path)
    return TrainingSet(str(path), len(joined), fp, settings.feature_service)
