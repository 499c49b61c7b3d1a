"""The registered model's pyfunc: raw feature rows in (the request the server documents), fraud probability out.

``train`` logs this file as the model's code (MLflow's "models from code"): ``mlflow models serve``, MLServer's
MLflow runtime (KServe's ``modelFormat: mlflow``) and ``mlflow.pyfunc.load_model`` load it by path and call
``predict`` with a DataFrame of raw rows. The encoding is ``to_model_frame`` from ``driftloop/contracts.py``,
which ``train`` bundles with the model as ``driftloop_contracts`` (``code_paths``): the model carries the one
encoding that training and the server use, and needs neither this project nor a copy of its logic. The
booster is the model's artifact ``booster``; the server loads that file natively, not this wrapper.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import xgboost as xgb

try:  # loaded by MLflow: the contracts bundled with the model (its code directory comes first on sys.path)
    from driftloop_contracts import to_model_frame
except ModuleNotFoundError:  # imported as a module of this project
    from driftloop.contracts import to_model_frame

BOOSTER = "booster"  # the artifact key of the XGBoost model file


class FraudProbability(mlflow.pyfunc.PythonModel):
    """``predict``: one fraud probability (float32) per row. Unknown values (null) and unseen categories are
    the model's missing value, as in the server."""

    def load_context(self, context) -> None:
        self.booster = xgb.Booster(model_file=context.artifacts[BOOSTER])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        # A DataFrame in: XGBoost checks its column names against the booster's, so no order can be wrong.
        return self.booster.inplace_predict(to_model_frame(model_input))


# What MLflow loads from this file; imported as a module, it only sets MLflow's "model being loaded" slot.
mlflow.models.set_model(FraudProbability())
