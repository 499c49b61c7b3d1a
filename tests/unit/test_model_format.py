"""The registered model's format, without a store: what the model bundles and what its signature says."""

from __future__ import annotations

import ast
import importlib.util
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb
from mlflow.pyfunc import PythonModelContext

from driftloop import contracts
from driftloop.contracts import FEATURES, MODEL_FEATURES
from pipelines.steps import train

pytestmark = pytest.mark.unit

ROW = {"amount": 120.5, "channel": "online", "hour_of_day": 3, "distance_km": 12.0, "account_age_days": 634,
       "txn_count_7d": 26, "avg_amount_30d": 58.9, "chargeback_rate_90d": 0.0146,
       "merchant_fraud_rate_30d": 0.0003, "merchant_category": "electronics"}


def test_the_contracts_module_can_travel_with_the_model():
    """The model bundles driftloop/contracts.py alone: it may import only what the model's requirements hold."""
    tree = ast.parse(Path(contracts.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "dataclasses", "numpy", "pandas"}


def test_the_signature_is_the_raw_request():
    signature = train.request_signature()
    assert [(s.name, s.type.name) for s in signature.inputs.inputs] == [
        (c.name, "string" if c.kind == "category" else "double") for c in FEATURES]
    assert signature.outputs.inputs[0].name == train.OUTPUT
    rows = train.request_rows(pd.DataFrame([ROW]))
    assert list(rows.columns) == list(MODEL_FEATURES) and rows["hour_of_day"].dtype == np.float64
    assert rows["channel"].iloc[0] == "online"


def test_the_pyfunc_encodes_as_training_does(tmp_path):
    """The pyfunc module, imported as the project's, scores raw rows as ``train.score`` does; the artifact
    key it reads is the one ``train`` writes."""
    spec = importlib.util.spec_from_file_location("pyfunc_under_test", train.MODEL_CODE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.BOOSTER == train.BOOSTER
    rng = np.random.default_rng(3)
    frame = pd.DataFrame({**{c.name: rng.uniform(0, 10, 200) for c in FEATURES if c.kind != "category"},
                          **{c.name: rng.choice([*c.categories, "unseen", None], 200) for c in FEATURES
                             if c.kind == "category"}})[list(MODEL_FEATURES)]
    model = xgb.XGBClassifier(n_estimators=5, max_depth=2).fit(contracts.to_model_frame(frame),
                                                               rng.integers(0, 2, 200))
    path = tmp_path / "model.ubj"
    model.get_booster().save_model(path)
    pyfunc = module.FraudProbability()
    pyfunc.load_context(PythonModelContext(artifacts={module.BOOSTER: str(path)}, model_config=None))
    np.testing.assert_array_equal(pyfunc.predict(None, train.request_rows(frame)), train.score(model, frame))


def test_run_names_say_what_and_when():
    assert train.run_name("fraud_v1", datetime(2026, 10, 2, 14, 5, 9, tzinfo=UTC)) == "train-fraud_v1-20261002-140509"
