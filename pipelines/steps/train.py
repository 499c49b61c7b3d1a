"""Train: XGBoost on the training set's older part; log everything to MLflow; return the run id.

The logged model is self-contained: its signature is the raw request (the rows the server documents), its
pyfunc (``pyfunc_model.py``) applies ``to_model_frame`` from ``driftloop/contracts.py``, bundled with the
model, and the XGBoost booster is its artifact ``booster``, which the server and the evaluation load
natively (``load_booster``).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import xgboost as xgb
from mlflow.models import Model, ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import ColSpec, Schema, TensorSpec

from driftloop import contracts
from driftloop.contracts import (
    FEATURES,
    GENERATED,
    LABEL,
    MODEL_FEATURES,
    SOURCE,
    SOURCES,
    TIMESTAMP,
    TRAFFIC,
    to_model_frame,
)

log = logging.getLogger(__name__)

REFERENCE_ROWS = 5_000
TAG_FEATURE_SERVICE = "driftloop.feature_service"
TAG_FINGERPRINT = "driftloop.data_fingerprint"
TAG_DATASET = "driftloop.dataset_uri"
TAG_MODEL_URI = "driftloop.model_uri"
TAG_CUTOFF = "driftloop.holdout_from"
TAG_ROWS_BY_SOURCE = "driftloop.rows_by_source"

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")  # the pyfunc, logged as code
BUNDLED_CONTRACTS = "driftloop_contracts.py"  # contracts.py's name inside the model: no clash with the project
BOOSTER = "booster"  # the booster's artifact key (pyfunc_model.BOOSTER: that file must not import this one)
OUTPUT = "fraud_probability"


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


def score(model: xgb.XGBClassifier | xgb.Booster, frame: pd.DataFrame) -> np.ndarray:
    """Fraud probabilities of raw feature rows."""
    booster = model.get_booster() if isinstance(model, xgb.XGBClassifier) else model
    return booster.inplace_predict(to_model_frame(frame))


def serving_requirements() -> list[str]:
    """What loading the model needs, pinned to this environment (not the whole project lock)."""
    return [f"mlflow=={mlflow.__version__}", f"xgboost=={xgb.__version__}", f"pandas=={pd.__version__}",
            f"numpy=={np.__version__}"]


def request_signature() -> ModelSignature:
    """The raw request: categories as strings, every other feature a double; out, one probability per row.

    Integer features are doubles too: the model reads float32 and any feature may be null, which MLflow
    refuses in a ``long`` column. A JSON request's integers are cast on parsing (``mlflow models serve``);
    a DataFrame passed to ``predict`` needs float columns (MLflow will not cast int64 to double itself).
    """
    inputs = Schema([ColSpec("string" if c.kind == "category" else "double", c.name) for c in FEATURES])
    return ModelSignature(inputs, Schema([TensorSpec(np.dtype(np.float32), (-1,), OUTPUT)]))


def request_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Raw feature rows as the signature types them: ``MODEL_FEATURES``, categories as they are, numbers float."""
    return frame[list(MODEL_FEATURES)].astype({c.name: "float64" for c in FEATURES if c.kind != "category"})


def log_model(model: xgb.XGBClassifier, example: pd.DataFrame) -> ModelInfo:
    """Log the self-contained model in the active run: pyfunc, bundled contracts, booster, signature of the
    raw request and ``example`` (raw rows) as its input example."""
    with tempfile.TemporaryDirectory() as tmp:
        bundled = Path(tmp) / BUNDLED_CONTRACTS
        shutil.copyfile(contracts.__file__, bundled)  # the module itself, imported by the pyfunc
        booster = Path(tmp) / "model.ubj"
        model.get_booster().save_model(booster)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            artifacts={BOOSTER: str(booster)},
            code_paths=[str(bundled)],
            signature=request_signature(),
            input_example=request_rows(example),
            pip_requirements=serving_requirements(),
            uv_project_path=tmp,  # no uv project there: MLflow would copy the project's lock into the model
        )


def load_booster(model_uri: str) -> xgb.Booster:
    """The native booster of a logged model (``models:/...``): the file only, not the pyfunc around it.

    Models logged before the pyfunc (XGBoost flavor) load too: a server may fall back to one of them.
    """
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp))
        flavors = Model.load(local).flavors
        if "xgboost" in flavors:
            path = flavors["xgboost"]["data"]
        else:
            path = flavors["python_function"]["artifacts"][BOOSTER]["path"]
        return xgb.Booster(model_file=str(local / path))


def log_dataset(frame: pd.DataFrame, dataset_uri: str, feature_service: str, fingerprint: str) -> None:
    """The training set as the active run's dataset input: named by its FeatureService, its digest the
    data fingerprint, so runs on the same data show the same dataset."""
    with warnings.catch_warnings():
        # MLflow registers its local-file source twice and warns about its own ambiguity; and its hint about
        # integer columns is for model signatures, not for a dataset's description.
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted", UserWarning)
        warnings.filterwarnings("ignore", "Hint: Inferred schema contains integer column", UserWarning)
        dataset = mlflow.data.from_pandas(frame, source=dataset_uri, name=feature_service, targets=LABEL,
                                          digest=fingerprint)
        mlflow.log_input(dataset, context="training")


def rows_by_source(frame: pd.DataFrame) -> dict[str, int]:
    """Rows per source (``SOURCES``); a training set without the column is all generated."""
    if SOURCE not in frame.columns:
        return {source: len(frame) if source == GENERATED else 0 for source in SOURCES}
    counts = frame[SOURCE].value_counts()
    return {source: int(counts.get(source, 0)) for source in SOURCES}


def run_name(feature_service: str, now: datetime | None = None) -> str:
    """A readable run name: what was trained on, and when (UTC)."""
    return f"train-{feature_service}-{(now or datetime.now(UTC)):%Y%m%d-%H%M%S}"


def train(dataset_uri: str, feature_service: str, fingerprint: str, params: TrainParams = TrainParams()) -> str:
    """Train and log to the active MLflow experiment; return the run id.

    Logged: params, tags (FeatureService, data fingerprint, dataset, rows by source), the training set as the
    run's dataset input (digest: its fingerprint), rows per source (``rows_generated``, ``rows_traffic``;
    ``train_rows_traffic`` of them in the training part: traffic is the newest, so most of it is holdout
    until there is more of it than the holdout holds), the self-contained model (``log_model``) and
    ``reference/reference.parquet``, the sample of the holdout the drift monitor compares traffic with.
    The run stays open for ``evaluate`` and ``register`` only by id: each step reopens it.
    """
    frame = pd.read_parquet(dataset_uri)
    by_source = rows_by_source(frame)
    train_part, holdout = split_by_time(frame, params.holdout_fraction)
    train_traffic = rows_by_source(train_part)[TRAFFIC]
    # The source is bookkeeping, not data: the model, its input example and the run's dataset never see it.
    frame, train_part, holdout = (f.drop(columns=SOURCE, errors="ignore") for f in (frame, train_part, holdout))
    with mlflow.start_run(run_name=run_name(feature_service)) as run:
        log_dataset(frame, dataset_uri, feature_service, fingerprint)
        mlflow.log_params({**asdict(params), "device": resolve_device(params.device)})
        mlflow.set_tags({
            TAG_FEATURE_SERVICE: feature_service,
            TAG_FINGERPRINT: fingerprint,
            TAG_DATASET: dataset_uri,
            TAG_CUTOFF: str(holdout[TIMESTAMP].min()),
            TAG_ROWS_BY_SOURCE: json.dumps(by_source),
            "driftloop.stage": "train",
        })
        mlflow.log_metrics({"train_rows": len(train_part), "holdout_rows": len(holdout),
                            "train_label_rate": float(train_part[LABEL].mean()),
                            **{f"rows_{source}": n for source, n in by_source.items()},
                            "train_rows_traffic": train_traffic})
        model = fit(train_part, params)
        info = log_model(model, train_part.head(5))
        mlflow.set_tag(TAG_MODEL_URI, info.model_uri)
        # The reference is the holdout: the newest world the model was judged on, scored out of sample as
        # traffic is. (The older training rows would keep a retrained model's reference half in the world
        # before a shift, and its own traffic from the new world would drift again.)
        reference = holdout.sample(min(REFERENCE_ROWS, len(holdout)), random_state=params.seed)
        reference = reference[[TIMESTAMP, *MODEL_FEATURES, LABEL]].assign(prediction=score(model, reference))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "reference.parquet"
            reference.to_parquet(path, index=False)
            mlflow.log_artifact(str(path), artifact_path="reference")
        return run.info.run_id
