"""Train: XGBoost on the training set's older part; log everything to MLflow; return the run id."""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import xgboost as xgb
from mlflow.models import infer_signature

from driftloop.contracts import LABEL, MODEL_FEATURES, TIMESTAMP, to_model_frame

log = logging.getLogger(__name__)

REFERENCE_ROWS = 5_000
TAG_FEATURE_SERVICE = "driftloop.feature_service"
TAG_FINGERPRINT = "driftloop.data_fingerprint"
TAG_DATASET = "driftloop.dataset_uri"
TAG_MODEL_URI = "driftloop.model_uri"
TAG_CUTOFF = "driftloop.holdout_from"


@dataclass(frozen=True)
class TrainParams:
    n_estimators: int = 300
    max_depth: int = 5
    learning_rate: float = 0.08
    subsample: float = 0.9
    colsample_bytree: float = 0.9
    min_child_weight: float = 2.0
    holdout_fraction: float = 0.2
    seed: int = 7
    device: str = "cpu"  # cpu | cuda | auto (cuda when a GPU is there)


def resolve_device(requested: str) -> str:
    """``cuda`` only when asked for (or ``auto``) and XGBoost can really use a GPU; else ``cpu``."""
    if requested == "cpu":
        return "cpu"
    if not xgb.build_info().get("USE_CUDA"):
        if requested == "cuda":
            log.warning("device=cuda asked for, but this XGBoost has no CUDA support: training on CPU")
        return "cpu"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            probe = xgb.DMatrix(np.zeros((2, 1), dtype=np.float32), label=[0, 1])
            xgb.train({"device": "cuda", "tree_method": "hist"}, probe, num_boost_round=1)
            found = not any("GPU" in str(w.message) for w in caught)  # XGBoost warns, then uses the CPU
        except xgb.core.XGBoostError:
            found = False
    if not found:
        if requested == "cuda":
            log.warning("device=cuda asked for, but no usable GPU was found: training on CPU")
        return "cpu"
    return "cuda"


def split_by_time(frame: pd.DataFrame, holdout_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Older rows train, the newest ``holdout_fraction`` evaluate: no look into the future."""
    ordered = frame.sort_values(TIMESTAMP, kind="stable")
    cut = round(len(ordered) * (1.0 - holdout_fraction))
    return ordered.iloc[:cut], ordered.iloc[cut:]


def fit(frame: pd.DataFrame, params: TrainParams) -> xgb.XGBClassifier:
    """Fit on raw feature rows (``to_model_frame`` encodes them)."""
    model = xgb.XGBClassifier(
        n_estimators=params.n_estimators,
        max_depth=params.max_depth,
        learning_rate=params.learning_rate,
        subsample=params.subsample,
        colsample_bytree=params.colsample_bytree,
        min_child_weight=params.min_child_weight,
        random_state=params.seed,
        tree_method="hist",
        device=resolve_device(params.device),
        eval_metric="auc",
        n_jobs=0,
    )
    model.fit(to_model_frame(frame), frame[LABEL].to_numpy())
    return model


def score(model: xgb.XGBClassifier, frame: pd.DataFrame) -> np.ndarray:
    return model.predict_proba(to_model_frame(frame))[:, 1]


def serving_requirements() -> list[str]:
    """What loading the model needs, pinned to this environment (not the whole project lock)."""
    import sklearn

    return [f"mlflow=={mlflow.__version__}", f"xgboost=={xgb.__version__}",
            f"scikit-learn=={sklearn.__version__}", f"pandas=={pd.__version__}", f"numpy=={np.__version__}"]


def train(dataset_uri: str, feature_service: str, fingerprint: str, params: TrainParams = TrainParams()) -> str:
    """Train and log to the active MLflow experiment; return the run id.

    Logged: params, tags (FeatureService, data fingerprint, dataset), the model with signature and input
    example, and ``reference/reference.parquet``, the sample the drift monitor compares traffic with.
    The run stays open for ``evaluate`` and ``register`` only by id: each step reopens it.
    """
    frame = pd.read_parquet(dataset_uri)
    train_part, holdout = split_by_time(frame, params.holdout_fraction)
    with mlflow.start_run() as run:
        mlflow.log_params({**asdict(params), "device": resolve_device(params.device)})
        mlflow.set_tags({
            TAG_FEATURE_SERVICE: feature_service,
            TAG_FINGERPRINT: fingerprint,
            TAG_DATASET: dataset_uri,
            TAG_CUTOFF: str(holdout[TIMESTAMP].min()),
            "driftloop.stage": "train",
        })
        mlflow.log_metrics({"train_rows": len(train_part), "holdout_rows": len(holdout),
                            "train_label_rate": float(train_part[LABEL].mean())})
        model = fit(train_part, params)
        x_example = to_model_frame(train_part.head(5))
        info = mlflow.xgboost.log_model(
            model,
            name="model",
            signature=infer_signature(x_example, model.predict_proba(x_example)[:, 1]),
            input_example=x_example,
            pip_requirements=serving_requirements(),
        )
        mlflow.set_tag(TAG_MODEL_URI, info.model_uri)
        reference = train_part.sample(min(REFERENCE_ROWS, len(train_part)), random_state=params.seed)
        reference = reference[[TIMESTAMP, *MODEL_FEATURES, LABEL]].assign(prediction=score(model, reference))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "reference.parquet"
            reference.to_parquet(path, index=False)
            mlflow.log_artifact(str(path), artifact_path="reference")
        return run.info.run_id
