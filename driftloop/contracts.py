"""Data contracts shared by training, serving and monitoring.

The reference use case is card-fraud scoring: a transaction (request-time features) by a customer at a
merchant (both entities with time-stamped features in Feast) is fraudulent or not; the label arrives
late, when the chargeback does. The model sees exactly ``MODEL_FEATURES``, in that order, encoded by
``to_model_frame``: the one function both training and serving call.

This module imports only numpy and pandas: every registered model carries this file, and its pyfunc calls
``to_model_frame`` from that copy (``pipelines/steps/train.py``), so MLflow's servers need no project code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

ENTITY_KEYS = ("customer_id", "merchant_id")
TIMESTAMP = "event_timestamp"
LABEL = "is_fraud"
LABEL_TIMESTAMP = "label_timestamp"
TRANSACTION_ID = "transaction_id"

CHANNELS = ("pos", "online", "atm")
MERCHANT_CATEGORIES = ("grocery", "fuel", "fashion", "electronics", "travel", "gaming")


@dataclass(frozen=True)
class Column:
    """One feature's contract: type, valid range or vocabulary, and how many nulls are tolerable."""

    name: str
    kind: str  # "float" | "int" | "category"
    source: str  # "request" (sent with the transaction) or the Feast feature view it comes from
    low: float | None = None
    high: float | None = None
    categories: tuple[str, ...] = ()
    max_null_rate: float = 0.0
    doc: str = ""


REQUEST_FEATURES = (
    Column("amount", "float", "request", 0.0, 50_000.0, doc="transaction amount"),
    Column("channel", "category", "request", categories=CHANNELS, doc="where the card was used"),
    Column("hour_of_day", "int", "request", 0, 23, doc="local hour of the transaction"),
    Column("distance_km", "float", "request", 0.0, 20_000.0, max_null_rate=0.12,
           doc="distance from the customer's home; unknown for some online payments"),
)
CUSTOMER_FEATURES = (
    Column("account_age_days", "int", "customer_stats", 0, 10_000, doc="days since the account opened"),
    Column("txn_count_7d", "int", "customer_stats", 0, 1_000, doc="transactions in the last 7 days"),
    Column("avg_amount_30d", "float", "customer_stats", 0.0, 50_000.0, doc="mean amount, last 30 days"),
    Column("chargeback_rate_90d", "float", "customer_stats", 0.0, 1.0, doc="share charged back, 90 days"),
)
MERCHANT_FEATURES = (
    Column("merchant_fraud_rate_30d", "float", "merchant_stats", 0.0, 1.0, doc="merchant's fraud rate"),
    Column("merchant_category", "category", "merchant_stats", categories=MERCHANT_CATEGORIES,
           doc="merchant category"),
)
FEATURES: tuple[Column, ...] = REQUEST_FEATURES + CUSTOMER_FEATURES + MERCHANT_FEATURES
MODEL_FEATURES: tuple[str, ...] = tuple(c.name for c in FEATURES)
FEAST_FEATURES: tuple[Column, ...] = CUSTOMER_FEATURES + MERCHANT_FEATURES
BY_NAME = {c.name: c for c in FEATURES}

# A training set's column naming each row's origin: the generated transactions, or served predictions joined
# with their late labels (``pipelines.steps.features`` writes it, ``pipelines.steps.train`` counts and drops it).
SOURCE = "source"
GENERATED, TRAFFIC = "generated", "traffic"
SOURCES = (GENERATED, TRAFFIC)


def encode_category(values: pd.Series, categories: tuple[str, ...]) -> np.ndarray:
    """Category names to their index; unseen or missing values become NaN (the model's 'missing')."""
    codes = pd.Categorical(values, categories=list(categories)).codes.astype(np.float32)
    codes[codes < 0] = np.nan
    return codes


def to_model_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The model's input: ``MODEL_FEATURES`` in order, float32, categories as codes.

    Raises ``KeyError`` naming the missing columns.
    """
    missing = [name for name in MODEL_FEATURES if name not in frame.columns]
    if missing:
        raise KeyError(f"missing feature columns: {', '.join(missing)}")
    out = {}
    for col in FEATURES:
        values = frame[col.name]
        if col.kind == "category":
            out[col.name] = encode_category(values, col.categories)
        else:
            out[col.name] = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float32, na_value=np.nan)
    return pd.DataFrame(out, index=frame.index)


def outside_contract(frame: pd.DataFrame, columns: tuple[Column, ...] = FEATURES) -> np.ndarray:
    """Rows with a value that ``columns``' contracts rule out: not finite, outside its range, not a whole number
    where it counts something, a category it does not know, or missing where it allows no nulls. (Served
    traffic is what any client sent: such rows are left out of training sets.)"""
    bad = np.zeros(len(frame), dtype=bool)
    for col in columns:
        values = frame[col.name]
        missing = values.isna().to_numpy()
        if col.kind == "category":
            bad |= ~missing & ~values.isin(col.categories).to_numpy()
        else:
            numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            with np.errstate(invalid="ignore"):
                fine = (numbers >= col.low) & (numbers <= col.high)  # False for NaN and +-inf
                if col.kind == "int":
                    fine &= np.mod(numbers, 1.0) == 0.0
            bad |= ~missing & ~fine
        if col.max_null_rate == 0.0:
            bad |= missing
    return bad
