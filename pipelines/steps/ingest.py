"""Ingest: a seeded, deterministic generator of the reference use case (card fraud).

It writes three Parquet files that Feast reads: daily ``customers`` and ``merchants`` feature snapshots,
and ``transactions`` (request-time features, the late-arriving label and when it arrived). On demand it
injects covariate drift, concept drift or data-quality faults into the last ``drift_days`` days.
The same seed, size and end date always give the same bytes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from driftloop.contracts import CHANNELS, LABEL, LABEL_TIMESTAMP, MERCHANT_CATEGORIES, TIMESTAMP

Drift = Literal["none", "covariate", "concept", "shift", "quality"]
DRIFTS: tuple[str, ...] = ("none", "covariate", "concept", "shift", "quality")  # shift: covariate + concept
FILES = ("customers", "merchants", "transactions")


@dataclass(frozen=True)
class GeneratorConfig:
    rows: int = 50_000
    customers: int = 2_000
    merchants: int = 200
    days: int = 60
    end: date | None = None  # default: today (UTC), so the online store holds fresh features
    seed: int = 7
    drift: Drift = "none"
    drift_days: int = 7  # the drift covers the last N days; 0 means the whole range
    stream: int = 0  # > 0: other transactions by the same customers and merchants (fresh traffic)

    def __post_init__(self) -> None:
        if self.rows < 1 or self.customers < 1 or self.merchants < 1 or self.days < 2:
            raise ValueError("rows, customers and merchants must be >= 1 and days >= 2")
        if self.drift not in DRIFTS:
            raise ValueError(f"unknown drift {self.drift!r}; choose one of {', '.join(DRIFTS)}")


@dataclass(frozen=True)
class GeneratedData:
    customers: pd.DataFrame
    merchants: pd.DataFrame
    transactions: pd.DataFrame


def _end_of(cfg: GeneratorConfig) -> datetime:
    end = cfg.end or datetime.now(UTC).date()
    return datetime(end.year, end.month, end.day, tzinfo=UTC)


def generate(cfg: GeneratorConfig) -> GeneratedData:
    """Build the three tables in memory."""
    rng = np.random.default_rng(cfg.seed)
    end = _end_of(cfg)
    start = end - timedelta(days=cfg.days)
    days = pd.date_range(start, end, freq="D", tz=UTC)

    # Customers: latent spend level, risk and activity; daily snapshots with noise.
    c_ids = np.arange(1, cfg.customers + 1, dtype=np.int64)
    c_spend = rng.lognormal(np.log(60.0), 0.7, cfg.customers)
    c_risk = rng.beta(1.0, 40.0, cfg.customers)
    c_activity = rng.gamma(2.0, 1.0, cfg.customers)
    c_age0 = rng.exponential(700.0, cfg.customers).astype(np.int64)
    n_c = cfg.customers * len(days)
    cust = pd.DataFrame({
        "customer_id": np.tile(c_ids, len(days)),
        TIMESTAMP: np.repeat(days, cfg.customers),
        "account_age_days": np.tile(c_age0, len(days)) + np.repeat(np.arange(len(days)), cfg.customers),
        "txn_count_7d": rng.poisson(np.tile(c_activity, len(days)) * 7.0),
        "avg_amount_30d": (np.tile(c_spend, len(days)) * rng.lognormal(0.0, 0.08, n_c)).astype(np.float32),
        "chargeback_rate_90d": np.clip(np.tile(c_risk, len(days)) + rng.normal(0, 0.003, n_c), 0, 1)
        .astype(np.float32),
    })

    # Merchants: category and a base fraud rate (riskier categories a little higher).
    m_ids = np.arange(1, cfg.merchants + 1, dtype=np.int64)
    m_cat_idx = rng.choice(len(MERCHANT_CATEGORIES), cfg.merchants, p=[0.3, 0.15, 0.2, 0.15, 0.1, 0.1])
    m_rate = rng.beta(1.0, 80.0, cfg.merchants) * (1.0 + np.isin(m_cat_idx, [3, 4, 5]) * 1.5)
    n_m = cfg.merchants * len(days)
    merch = pd.DataFrame({
        "merchant_id": np.tile(m_ids, len(days)),
        TIMESTAMP: np.repeat(days, cfg.merchants),
        "merchant_fraud_rate_30d": np.clip(np.tile(m_rate, len(days)) * rng.lognormal(0, 0.1, n_m), 0, 1)
        .astype(np.float32),
        "merchant_category": np.asarray(MERCHANT_CATEGORIES, dtype=object)[np.tile(m_cat_idx, len(days))],
    })
    cust["created_timestamp"] = cust[TIMESTAMP]
    merch["created_timestamp"] = merch[TIMESTAMP]

    # Transactions, after the first snapshot so every one has features as of its time.
    if cfg.stream:
        rng = np.random.default_rng([cfg.seed, cfg.stream])
    n = cfg.rows
    seconds = rng.uniform(86_400, cfg.days * 86_400, n)
    ts = (pd.Timestamp(start) + pd.to_timedelta(np.sort(seconds), unit="s")).floor("s")
    cust_idx = rng.choice(cfg.customers, n, p=c_activity / c_activity.sum())
    merch_idx = rng.integers(0, cfg.merchants, n)
    channel_idx = rng.choice(len(CHANNELS), n, p=[0.6, 0.3, 0.1])
    amount = c_spend[cust_idx] * rng.lognormal(0.0, 0.6, n)
    distance = np.where(channel_idx == 1, rng.exponential(400.0, n), rng.exponential(15.0, n))
    tx = pd.DataFrame({
        "transaction_id": [f"tx-{cfg.seed}-{cfg.stream}-{i:08d}" if cfg.stream else f"tx-{cfg.seed}-{i:08d}"
                           for i in range(n)],
        "customer_id": c_ids[cust_idx],
        "merchant_id": m_ids[merch_idx],
        TIMESTAMP: ts,
        "amount": amount,
        "channel": np.asarray(CHANNELS, dtype=object)[channel_idx],
        "hour_of_day": ts.hour.to_numpy(dtype=np.int64),
        "distance_km": distance,
    })
    in_drift = _drift_mask(tx, end, cfg)
    if cfg.drift in ("covariate", "shift"):
        _covariate_drift(tx, in_drift, rng)

    # The label, from the features as of the transaction's day (what Feast's join will return).
    day = (tx[TIMESTAMP].dt.floor("D") - pd.Timestamp(start)).dt.days.to_numpy()
    snap = cust.iloc[day * cfg.customers + cust_idx]
    msnap = merch.iloc[day * cfg.merchants + merch_idx]
    ratio = np.log(tx["amount"].to_numpy() / snap["avg_amount_30d"].to_numpy())
    online = (tx["channel"] == "online").to_numpy()
    night = (tx["hour_of_day"] < 6).to_numpy()
    dist = np.log1p(np.nan_to_num(tx["distance_km"].to_numpy(), nan=50.0) / 50.0)
    concept = in_drift & (cfg.drift in ("concept", "shift"))
    amount_effect = np.where(concept, -1.2, 1.2)  # after a concept drift, fraud hides in small amounts
    channel_effect = np.where(concept, -0.9, 0.9)
    logit = (
        -5.6
        + amount_effect * ratio
        + 30.0 * snap["chargeback_rate_90d"].to_numpy()
        + 45.0 * msnap["merchant_fraud_rate_30d"].to_numpy()
        + channel_effect * online
        + 0.8 * night
        + 0.3 * dist
        - 0.25 * np.log1p(snap["account_age_days"].to_numpy() / 100.0)
        + rng.normal(0.0, 0.8, n)
    )
    tx[LABEL] = (rng.uniform(size=n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    tx.loc[rng.uniform(size=n) < 0.1, "distance_km"] = np.nan  # unknown for some payments
    tx[LABEL_TIMESTAMP] = tx[TIMESTAMP] + pd.to_timedelta(rng.integers(1, 31, n), unit="D")
    if cfg.drift == "quality":
        _quality_faults(tx, in_drift, rng)
    return GeneratedData(cust, merch, tx)


def _drift_mask(tx: pd.DataFrame, end: datetime, cfg: GeneratorConfig) -> np.ndarray:
    if cfg.drift == "none":
        return np.zeros(len(tx), dtype=bool)
    if cfg.drift_days == 0:
        return np.ones(len(tx), dtype=bool)
    return (tx[TIMESTAMP] >= pd.Timestamp(end - timedelta(days=cfg.drift_days))).to_numpy()


def _covariate_drift(tx: pd.DataFrame, mask: np.ndarray, rng: np.random.Generator) -> None:
    """Bigger amounts, more online payments, further from home."""
    k = int(mask.sum())
    tx.loc[mask, "amount"] = tx.loc[mask, "amount"] * 2.0
    tx.loc[mask, "channel"] = np.asarray(CHANNELS, dtype=object)[rng.choice(3, k, p=[0.3, 0.6, 0.1])]
    tx.loc[mask, "distance_km"] = tx.loc[mask, "distance_km"] * 3.0


def _quality_faults(tx: pd.DataFrame, mask: np.ndarray, rng: np.random.Generator) -> None:
    """Nulls, out-of-range values and unseen categories, as a broken upstream would send."""
    idx = np.flatnonzero(mask)
    pick = lambda share: idx[rng.uniform(size=len(idx)) < share]  # noqa: E731
    tx.loc[pick(0.10), "amount"] = np.nan
    tx.loc[pick(0.03), "amount"] = -tx["amount"].abs().mean()
    tx.loc[pick(0.02), "hour_of_day"] = 27
    tx.loc[pick(0.05), "channel"] = "crypto_kiosk"


def write(data: GeneratedData, out_dir: str | Path) -> dict[str, str]:
    """Write each table atomically (temp file, then rename); return name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in FILES:
        path = out / f"{name}.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        getattr(data, name).to_parquet(tmp, index=False)
        tmp.replace(path)
        paths[name] = str(path)
    return paths


def generate_to(cfg: GeneratorConfig, out_dir: str | Path) -> dict[str, object]:
    """Generate and write; return a summary (paths, sizes, fraud rate) for the CLI and flows."""
    data = generate(cfg)
    paths = write(data, out_dir)
    tx = data.transactions
    return {
        "paths": paths,
        "transactions": len(tx),
        "customers": cfg.customers,
        "merchants": cfg.merchants,
        "from": str(tx[TIMESTAMP].min()),
        "to": str(tx[TIMESTAMP].max()),
        "fraud_rate": round(float(tx[LABEL].mean()), 4),
        "config": {k: str(v) for k, v in asdict(cfg).items()},
    }
