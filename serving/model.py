"""The predictor: a small ``kserve.Model`` over the champion's native XGBoost booster.

It parses v1 and v2 payloads (``serving.payload``), fills Feast features for entity-only rows
(``serving.features``), scores through the micro-batcher, records every prediction in the inference log
and says in every response which model version answered. The champion is swapped atomically when the
alias moves; a request keeps the version it started with.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import mlflow
import numpy as np
import xgboost as xgb
from kserve import Model
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from mlflow.tracking import MlflowClient

from driftloop.contracts import BY_NAME, ENTITY_KEYS, MODEL_FEATURES, TRANSACTION_ID
from pipelines.steps.register import CHAMPION
from pipelines.steps.train import resolve_device
from serving import payload
from serving.batcher import MicroBatcher
from serving.features import OnlineFeatures
from serving.inference_log import InferenceLog
from serving.metrics import Metrics

OUTPUT = "fraud_probability"


@dataclass(frozen=True)
class Champion:
    version: str
    run_id: str
    booster: xgb.Booster
    device: str

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.booster.inplace_predict(x, validate_features=False)

    def contributions(self, x: np.ndarray) -> np.ndarray:
        return self.booster.predict(xgb.DMatrix(x, feature_names=list(MODEL_FEATURES)), pred_contribs=True)


def load_champion(client: MlflowClient, model_name: str, device: str = "cpu") -> Champion:
    """The version behind ``@champion``, loaded as a native booster (not the pyfunc wrapper)."""
    mv = client.get_model_version_by_alias(model_name, CHAMPION)
    model = mlflow.xgboost.load_model(f"models:/{model_name}/{mv.version}")
    booster = model.get_booster() if hasattr(model, "get_booster") else model
    resolved = resolve_device(device)
    booster.set_param({"device": resolved, "nthread": 1})  # one request's rows: threads cost more than help
    return Champion(str(mv.version), mv.run_id or "", booster, resolved)


class FraudModel(Model):
    def __init__(self, name: str, client: MlflowClient, model_name: str, log: InferenceLog,
                 metrics: Metrics, features: OnlineFeatures | None = None, device: str = "cpu",
                 max_instances: int = 1_000, max_batch: int = 256) -> None:
        super().__init__(name)
        self._client = client
        self._model_name = model_name
        self._device = device
        self._features = features
        self._log = log
        self._metrics = metrics
        self._max_instances = max_instances
        self._batcher = MicroBatcher(self._score, max_batch=max_batch, on_batch=metrics.batch_size.observe)
        self.champion: Champion | None = None

    # lifecycle ------------------------------------------------------------------------------------
    def load(self) -> bool:
        self.champion = load_champion(self._client, self._model_name, self._device)
        self._metrics.model_version.labels(self.name).set(float(self.champion.version))
        self.ready = True
        return True

    def reload_if_moved(self) -> str | None:
        """Load the new champion if the alias moved; return its version (None when unchanged)."""
        version = str(self._client.get_model_version_by_alias(self._model_name, CHAMPION).version)
        if self.champion is not None and version == self.champion.version:
            return None
        fresh = load_champion(self._client, self._model_name, self._device)
        self.champion = fresh  # one reference assignment: atomic for every request that reads it after
        self._metrics.model_version.labels(self.name).set(float(fresh.version))
        self._metrics.reloads.inc()
        return fresh.version

    def stop(self) -> None:
        self._log.close()

    # metadata (GET /v2/models/<name>) -------------------------------------------------------------
    def get_input_types(self) -> list[dict]:
        types = {"float": "FP32", "int": "INT64", "category": "BYTES"}
        inputs = [{"name": c.name, "datatype": types[c.kind], "shape": [-1]} for c in BY_NAME.values()]
        inputs += [{"name": k, "datatype": "INT64", "shape": [-1]} for k in ENTITY_KEYS]
        return [*inputs, {"name": TRANSACTION_ID, "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": OUTPUT, "datatype": "FP32", "shape": [-1]}]

    # inference ------------------------------------------------------------------------------------
    def _score(self, x: np.ndarray) -> tuple[np.ndarray, Champion]:
        champion = self.champion
        return champion.predict(x), champion

    async def _prepare(self, body: dict | InferRequest) -> tuple[payload.Rows, list[bool]]:
        if isinstance(body, InferRequest):
            rows = payload.from_tensors(body.inputs, self._max_instances)
        else:
            rows = payload.from_instances(body, self._max_instances)
        found = [True] * rows.n
        need = [i for i in range(rows.n) if rows.lookup[i]]
        if need:
            if self._features is None:
                raise InvalidInput("this server has no feature store: send every feature in the request")
            entities = [{k: rows.columns[k][i] for k in ENTITY_KEYS} for i in need]
            t0 = time.perf_counter()
            values, ok = await asyncio.to_thread(self._features.lookup, entities)
            self._metrics.lookup_seconds.observe(time.perf_counter() - t0)
            for name, column in values.items():
                for j, i in enumerate(need):
                    rows.columns[name][i] = column[j]
            for j, i in enumerate(need):
                found[i] = ok[j]
            self._metrics.missing_entities.inc(ok.count(False))
        return rows, found

    async def predict(self, body: dict | InferRequest, headers: dict[str, str] | None = None):
        rows, found = await self._prepare(body)
        scores, champion = await self._batcher.submit(payload.to_matrix(rows))
        request_id = (headers or {}).get("x-request-id") or (
            body.id if isinstance(body, InferRequest) and body.id else uuid.uuid4().hex)
        self._record(rows, found, scores, champion, request_id)
        if isinstance(body, InferRequest):
            output = InferOutput(OUTPUT, [rows.n], "FP32", scores.astype(np.float32).tolist())
            return InferResponse(request_id, self.name, [output], model_version=champion.version,
                                 parameters={"entity_found": all(found)})
        return {"predictions": scores.tolist(), "model_version": champion.version, "entity_found": found,
                "request_id": request_id}

    async def explain(self, body: dict, headers: dict[str, str] | None = None) -> dict:
        """Per-feature contributions (log-odds, XGBoost's TreeSHAP) for each instance."""
        if isinstance(body, InferRequest):
            raise InvalidInput("explanations are served on the v1 :explain verb")
        rows, found = await self._prepare(body)
        champion = self.champion
        x = payload.to_matrix(rows)
        contributions = await asyncio.to_thread(champion.contributions, x)
        names = [*MODEL_FEATURES, "bias"]
        return {
            "predictions": champion.predict(x).tolist(),
            "explanations": [dict(zip(names, map(float, row), strict=True)) for row in contributions],
            "model_version": champion.version,
            "entity_found": found,
        }

    def _record(self, rows: payload.Rows, found: list[bool], scores: np.ndarray, champion: Champion,
                request_id: str) -> None:
        now = time.time()
        cols = rows.columns
        records = [
            (request_id, now, self._model_name, champion.version, cols[TRANSACTION_ID][i],
             *(cols[k][i] for k in ENTITY_KEYS), *(cols[f][i] for f in MODEL_FEATURES),
             float(scores[i]), float(found[i]))
            for i in range(rows.n)
        ]
        self._log.record(records)
