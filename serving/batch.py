"""Batch inference: score a Parquet file of transactions with the champion, for scheduled scoring.

Rows carry the entity keys and the request features. With an ``event_timestamp`` column the Feast
features are joined point-in-time from the offline store (a backfill sees what was known then); without
one they come from the online store (now). Output: the input columns plus ``fraud_probability`` and
``model_version``, written atomically.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from driftloop.contracts import ENTITY_KEYS, REQUEST_FEATURES, TIMESTAMP, to_model_frame
from driftloop.settings import Settings


class BatchError(ValueError):
    """The input cannot be scored; the message names the problem."""


@dataclass(frozen=True)
class BatchSummary:
    rows: int
    model_version: str
    output: str
    point_in_time: bool
    seconds: float


def read_input(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise BatchError(f"no input file at {path}")
    try:
        frame = pd.read_parquet(path)
    except Exception as error:
        raise BatchError(f"cannot read {path} as Parquet ({type(error).__name__}: {error})") from error
    required = [*ENTITY_KEYS, *(c.name for c in REQUEST_FEATURES if c.max_null_rate == 0.0)]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise BatchError(f"{path} lacks columns {missing}")
    if frame.empty:
        raise BatchError(f"{path} has no rows")
    return frame


def score_file(settings: Settings, input_path: Path, output_path: Path) -> BatchSummary:
    from pipelines.steps import features as features_step
    from pipelines.steps import tracking
    from serving.model import load_champion

    t0 = time.perf_counter()
    frame = read_input(input_path)
    client = tracking.configure(settings)
    champion = load_champion(client, settings.model_name, settings.device)
    store = features_step.feature_store(settings)
    service = features_step.service(settings, store)
    point_in_time = TIMESTAMP in frame.columns
    if point_in_time:
        entity_df = frame.assign(_row=range(len(frame)))
        entity_df[TIMESTAMP] = pd.to_datetime(entity_df[TIMESTAMP], utc=True)
        joined = store.get_historical_features(entity_df=entity_df, features=service).to_df()
        joined = joined.sort_values("_row").drop(columns="_row").reset_index(drop=True)
    else:
        online = store.get_online_features(features=service,
                                           entity_rows=frame[list(ENTITY_KEYS)].to_dict("records")).to_dict()
        extra = {k: v for k, v in online.items() if k not in frame.columns}
        joined = pd.concat([frame.reset_index(drop=True), pd.DataFrame(extra)], axis=1)
    scored = frame.reset_index(drop=True).assign(
        fraud_probability=champion.predict(to_model_frame(joined).to_numpy()), model_version=champion.version)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_suffix(".tmp")
    scored.to_parquet(tmp, index=False)
    tmp.replace(output_path)
    return BatchSummary(len(scored), champion.version, str(output_path), point_in_time,
                        round(time.perf_counter() - t0, 2))
