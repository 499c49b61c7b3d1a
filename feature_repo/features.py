"""Feature definitions of the reference use case (card fraud). One concept per object.

Source paths are relative: Feast resolves them against the data directory (``DRIFTLOOP_DATA_DIR``),
so the same definitions work on a laptop and on a cluster volume.
"""

from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.types import Float32, Int64, String

# The card holder.
customer = Entity(name="customer", join_keys=["customer_id"], value_type=ValueType.INT64)

# The shop the card was used at.
merchant = Entity(name="merchant", join_keys=["merchant_id"], value_type=ValueType.INT64)

# Daily snapshots of each customer's behaviour.
customer_source = FileSource(
    name="customers",
    path="customers.parquet",
    timestamp_field="event_timestamp",
    created_timestamp_column="created_timestamp",
)

# Daily snapshots of each merchant's risk.
merchant_source = FileSource(
    name="merchants",
    path="merchants.parquet",
    timestamp_field="event_timestamp",
    created_timestamp_column="created_timestamp",
)

# What the customer did lately; a snapshot older than two days is too stale to use.
customer_stats = FeatureView(
    name="customer_stats",
    entities=[customer],
    ttl=timedelta(days=2),
    schema=[
        Field(name="account_age_days", dtype=Int64),
        Field(name="txn_count_7d", dtype=Int64),
        Field(name="avg_amount_30d", dtype=Float32),
        Field(name="chargeback_rate_90d", dtype=Float32),
    ],
    source=customer_source,
    online=True,
)

# How risky the merchant is.
merchant_stats = FeatureView(
    name="merchant_stats",
    entities=[merchant],
    ttl=timedelta(days=2),
    schema=[
        Field(name="merchant_fraud_rate_30d", dtype=Float32),
        Field(name="merchant_category", dtype=String),
    ],
    source=merchant_source,
    online=True,
)

# Version 1 of what the fraud model reads from Feast; a new model that needs other features gets v2.
fraud_model_v1 = FeatureService(
    name="fraud_model_v1",
    features=[customer_stats, merchant_stats],
    description="Features of the fraud model, version 1",
)
