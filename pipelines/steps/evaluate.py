"""Evaluate: overall and per-slice metrics on the time-based holdout, logged on the run."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import mlflow
import numpy as np
import pandas as pd

from driftloop.contracts import LABEL

SLICE_COLUMN = "channel"
MIN_SLICE_CLASS = 5  # a slice needs this many of each class for its AUC to mean anything


@dataclass(frozen=True)
class Metrics:
    auc: float
    average_precision: float
    logloss: float
    brier: float
    rows: int
    slices: dict[str, float] = field(default_factory=dict)  # slice -> AUC; slices too small are left out
    # slice -> [positives, negatives]: how much a slice's AUC can move by chance alone (auc_standard_error)
    slice_counts: dict[str, list[int]] = field(default_factory=dict)

    def flat(self, prefix: str = "") -> dict[str, float]:
        out = {f"{prefix}{k}": float(v) for k, v in asdict(self).items() if k not in {"slices", "slice_counts"}}
        out.update({f"{prefix}auc_{SLICE_COLUMN}_{k}": v for k, v in self.slices.items()})
        return out


def compute(labels: np.ndarray, scores: np.ndarray, slices: pd.Series | None = None) -> Metrics:
    """Metrics of scores against labels; per-slice AUC where a slice has both classes."""
    # sklearn costs about 2 CPU-s to import: rollback and promote --force import this module, never compute
    from sklearn.metrics import average_precision_score, brier_score_loss, log_loss, roc_auc_score

    labels = np.asarray(labels)
    scores = np.clip(np.asarray(scores, dtype=np.float64), 1e-7, 1 - 1e-7)
    if len(np.unique(labels)) < 2:
        raise ValueError("the evaluation set has one class only: AUC is undefined")
    per_slice: dict[str, float] = {}
    counts: dict[str, list[int]] = {}
    if slices is not None:
        keys = np.asarray(pd.Series(slices).astype(str))
        for name in np.unique(keys):
            y = labels[keys == name]
            positives, negatives = int(y.sum()), int(len(y) - y.sum())
            if min(positives, negatives) >= MIN_SLICE_CLASS:
                per_slice[str(name)] = float(roc_auc_score(y, scores[keys == name]))
                counts[str(name)] = [positives, negatives]
    return Metrics(
        auc=float(roc_auc_score(labels, scores)),
        average_precision=float(average_precision_score(labels, scores)),
        logloss=float(log_loss(labels, scores)),
        brier=float(brier_score_loss(labels, scores)),
        rows=len(labels),
        slices=per_slice,
        slice_counts=counts,
    )


def auc_standard_error(auc: float, positives: int, negatives: int) -> float:
    """Hanley and McNeil's (1982) standard error of an AUC measured on this many positives and negatives."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = (auc * (1 - auc) + (positives - 1) * (q1 - auc * auc) + (negatives - 1) * (q2 - auc * auc))
    return math.sqrt(max(variance, 0.0) / (positives * negatives))


def holdout(run_id: str) -> pd.DataFrame:
    """The evaluation rows of a run: its dataset's newest ``holdout_fraction``."""
    from pipelines.steps.train import TAG_DATASET, split_by_time  # XGBoost's import loads sklearn: not at import

    run = mlflow.get_run(run_id)
    frame = pd.read_parquet(run.data.tags[TAG_DATASET])
    return split_by_time(frame, float(run.data.params["holdout_fraction"]))[1]


def evaluate_model(model_uri: str, rows: pd.DataFrame) -> Metrics:
    """Metrics of the logged model on raw rows, scored as the server scores: the native booster."""
    from pipelines.steps.train import load_booster, score

    return compute(rows[LABEL].to_numpy(), score(load_booster(model_uri), rows), rows[SLICE_COLUMN])


def evaluate(run_id: str) -> Metrics:
    """Score the run's model on its holdout; log the metrics (``eval_*``) on the run."""
    from pipelines.steps.train import TAG_MODEL_URI

    run = mlflow.get_run(run_id)
    metrics = evaluate_model(run.data.tags[TAG_MODEL_URI], holdout(run_id))
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({k: v for k, v in metrics.flat("eval_").items() if math.isfinite(v)})
        mlflow.log_dict(asdict(metrics), "evaluation.json")
    return metrics
