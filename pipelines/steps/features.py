"""Features: the Feast store from settings, apply, materialize, and the point-in-time training set.

A training set's rows come from two sources: the generated transactions (``transactions.parquet`` in the
data dir) and the traffic, the served predictions of the inference log whose late label has arrived.
Both go through one point-in-time join with the FeatureService, so a traffic row gets its customer's and
merchant's features as of the moment it was scored, and its request features as they were logged.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from string import Template
from types import ModuleType

import numpy as np
import pandas as pd
import yaml
from feast import FeatureService, FeatureStore
from feast.repo_config import RepoConfig

from driftloop.contracts import (
    ENTITY_KEYS,
    FEAST_FEATURES,
    GENERATED,
    LABEL,
    LABEL_TIMESTAMP,
    REQUEST_FEATURES,
    SOURCE,
    TIMESTAMP,
    TRAFFIC,
    TRANSACTION_ID,
    outside_contract,
)
from driftloop.settings import Settings
from monitoring.store import LABELLED_AT, LogStore

# Why a labelled served prediction is left out of a training set.
DUPLICATE = "duplicate"  # a transaction scored again, or one the generated transactions already hold
IMPLAUSIBLE = "implausible"  # a request feature the data contract rules out
NO_FEATURES = "no_features"  # no customer or merchant features as of its time (or no entity key at all)


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
    rows_by_source: dict[str, int] = field(default_factory=dict)  # GENERATED, TRAFFIC
    left_out: dict[str, int] = field(default_factory=dict)  # labelled traffic not used, by reason


def fingerprint(frame: pd.DataFrame) -> str:
    """A content hash of a frame (row order and values), stable across processes."""
    hashed = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    digest = hashlib.sha256(hashed.tobytes())
    digest.update(",".join(map(str, frame.columns)).encode())
    return digest.hexdigest()[:16]


def traffic_rows(settings: Settings, as_of: datetime, known_ids: pd.Series,
                 like: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Entity rows from the labelled traffic as of ``as_of`` (``LogStore.labelled_traffic``), typed as ``like``
    (the generated rows), and the rows left out by reason. A transaction in ``known_ids`` is already a
    generated row: its served copy is left out, so each transaction counts once."""
    left_out = {DUPLICATE: 0, IMPLAUSIBLE: 0, NO_FEATURES: 0}
    if settings.traffic_rows_max == 0:
        return like.iloc[:0], left_out
    served = LogStore(settings).labelled_traffic(settings.model_name, as_of.timestamp(), settings.traffic_rows_max)
    left_out[DUPLICATE] = int(served["repeats"].sum())
    known = served[TRANSACTION_ID].isin(known_ids).to_numpy()
    keys = served[list(ENTITY_KEYS)].apply(pd.to_numeric, errors="coerce")
    # The log keeps keys as doubles: beyond 2^53 they are not the ids that were sent.
    keyless = ~((keys >= 0) & (keys <= 2**53) & (keys % 1 == 0)).all(axis=1).to_numpy()
    bad = outside_contract(served, REQUEST_FEATURES) & ~known & ~keyless
    left_out[DUPLICATE] += int(known.sum())
    left_out[NO_FEATURES] += int((keyless & ~known).sum())
    left_out[IMPLAUSIBLE] = int(bad.sum())
    served = served[~(known | keyless | bad)]
    rows = pd.DataFrame({
        TRANSACTION_ID: served[TRANSACTION_ID].astype(str),
        **{k: served[k].astype(np.int64) for k in ENTITY_KEYS},
        TIMESTAMP: pd.to_datetime(served["ts"].astype(np.float64), unit="s", utc=True),
        **{c.name: served[c.name] if c.kind == "category" else pd.to_numeric(served[c.name]) for c in REQUEST_FEATURES},
        LABEL: served[LABEL].astype(like[LABEL].dtype),
        LABEL_TIMESTAMP: pd.to_datetime(served[LABELLED_AT].astype(np.float64), unit="s", utc=True),
    })
    rows = rows.astype({TIMESTAMP: like[TIMESTAMP].dtype, LABEL_TIMESTAMP: like[LABEL_TIMESTAMP].dtype})
    return rows[list(like.columns)].reset_index(drop=True), left_out


def build_training_set(settings: Settings, as_of: datetime | None = None,
                       store: FeatureStore | None = None) -> TrainingSet:
    """Point-in-time join of labelled transactions with the FeatureService; written as Parquet.

    The transactions are the generated ones and the labelled traffic (``traffic_rows``, at most
    ``settings.traffic_rows_max``, the newest), each only if its label had arrived by ``as_of`` (default:
    now); the column ``SOURCE`` says which. Traffic rows the contract rules out or the offline store has no
    features for are left out and counted (``TrainingSet.left_out``).
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
    generated = tx.loc[tx[LABEL_TIMESTAMP] <= pd.Timestamp(as_of), needed]
    traffic, left_out = traffic_rows(settings, as_of, tx[TRANSACTION_ID], generated)
    # Concatenated only when there is traffic: pandas types an empty frame's columns as objects.
    entity_df = pd.concat([generated.assign(**{SOURCE: GENERATED}), traffic.assign(**{SOURCE: TRAFFIC})],
                          ignore_index=True) if len(traffic) else generated.assign(**{SOURCE: GENERATED})
    joined = store.get_historical_features(entity_df=entity_df, features=service(settings, store)).to_df()
    unknown = (joined[SOURCE] == TRAFFIC) & joined[[c.name for c in FEAST_FEATURES]].isna().any(axis=1)
    left_out[NO_FEATURES] += int(unknown.sum())
    joined = joined[~unknown].sort_values([TIMESTAMP, TRANSACTION_ID], kind="stable").reset_index(drop=True)
    fp = fingerprint(joined)
    settings.datasets_path.mkdir(parents=True, exist_ok=True)
    path = settings.datasets_path / f"training-{fp}.parquet"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        joined.to_parquet(tmp, index=False)
        tmp.replace(path)
    by_source = {source: int((joined[SOURCE] == source).sum()) for source in (GENERATED, TRAFFIC)}
    return TrainingSet(str(path), len(joined), fp, settings.feature_service, by_source, left_out)
