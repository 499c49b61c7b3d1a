"""The predictor: a small ``kserve.Model`` over the champion's native XGBoost booster.

It parses v1 and v2 payloads (``serving.payload``), fills Feast features for entity-only rows
(``serving.features``), scores through the micro-batcher, records every prediction in the inference log
and says in every response which model version answered. The champion is swapped atomically when the
alias moves; a request keeps the version it started with.

A champion that cannot be loaded (corrupt or unreachable artifacts) does not stop the server: a running one
keeps the version it serves, and a starting one serves the newest earlier champion that loads (the chain
of previous champions the gate tags on each promoted version, then older versions the gate promoted,
rolled-back ones left out). Either way one log line says which version is served and why,
``driftloop_model_champion_broken{version}`` is 1 and the readiness answer names the broken version; the
champion is retried at every check and served once it loads.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

import numpy as np
import xgboost as xgb
from kserve import Model
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from mlflow.tracking import MlflowClient

from driftloop.contracts import BY_NAME, ENTITY_KEYS, MODEL_FEATURES, TRANSACTION_ID
from pipelines.steps.register import CHAMPION, TAG_PREVIOUS, RegistryError
from pipelines.steps.train import load_booster, resolve_device
from serving import payload
from serving.batcher import MicroBatcher
from serving.features import OnlineFeatures
from serving.inference_log import InferenceLog
from serving.metrics import Metrics

log = logging.getLogger(__name__)

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


def wait_for_champion(client: MlflowClient, model_name: str, timeout_s: float, poll_s: float = 5.0) -> None:
    """Block until ``@champion`` exists (on a fresh cluster the first training may still run).

    Raises what the registry raised once ``timeout_s`` has passed (0: look once).
    """
    from mlflow.exceptions import MlflowException

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.get_model_version_by_alias(model_name, CHAMPION)
            return
        except MlflowException as error:
            if time.monotonic() >= deadline:
                raise
            log.warning("no %s@%s yet (%s): waiting", model_name, CHAMPION, error.error_code)
            time.sleep(poll_s)


def load_champion(client: MlflowClient, model_name: str, device: str = "cpu") -> Champion:
    """The version behind ``@champion``, loaded as a native booster (not the pyfunc wrapper)."""
    mv = client.get_model_version_by_alias(model_name, CHAMPION)
    return load_version(client, model_name, str(mv.version), device)


def load_version(client: MlflowClient, model_name: str, version: str, device: str = "cpu") -> Champion:
    """One registered version, loaded as a native booster: the model's booster file, not its pyfunc."""
    mv = client.get_model_version(model_name, version)
    booster = load_booster(f"models:/{model_name}/{version}")
    resolved = resolve_device(device)
    booster.set_param({"device": resolved, "nthread": 1})  # one request's rows: threads cost more than help
    return Champion(str(mv.version), mv.run_id or "", booster, resolved)


# Version tags that pipelines.steps.register sets: the alias the gate gave a version at registration, a
# promotion by hand, a rollback away from it, a registration still under way.
TAG_GATE = "gate.decision"
TAG_PROMOTION = "driftloop.promotion"
TAG_ROLLED_BACK = "driftloop.rolled_back"
TAG_REGISTRATION = "driftloop.registration"
MAX_FALLBACKS = 5  # earlier champions a starting server tries before it gives up


def earlier_champions(client: MlflowClient, model_name: str, version: str) -> list[str]:
    """Versions that were champion before ``version``, newest first: its chain of previous champions, then
    older versions the gate or a person promoted; versions rolled back or still being registered are left
    out."""
    tags = {str(mv.version): mv.tags or {} for mv in client.search_model_versions(f"name='{model_name}'")}
    chain, current = [], version
    while (previous := tags.get(current, {}).get(TAG_PREVIOUS)) and previous not in chain and previous != version:
        chain.append(previous)
        current = previous
    promoted = [v for v in sorted(tags, key=int, reverse=True) if int(v) < int(version) and v not in chain
                and (tags[v].get(TAG_GATE) == CHAMPION or TAG_PROMOTION in tags[v])]
    return [v for v in chain + promoted if v in tags and tags[v].get(TAG_ROLLED_BACK) != "true"
            and tags[v].get(TAG_REGISTRATION) != "pending"]


def _why(error: BaseException) -> str:
    """An error on one line, short enough for a log line, a label or a readiness answer."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}"


@dataclass(frozen=True)
class Scored:
    scores: np.ndarray
    champion: Champion
    found: list[bool]
    request_id: str

    def v1(self) -> dict:
        return {"predictions": self.scores.tolist(), "model_version": self.champion.version,
                "entity_found": self.found, "request_id": self.request_id}

    def v2(self, model_name: str) -> dict:
        return {"model_name": model_name, "model_version": self.champion.version, "id": self.request_id,
                "parameters": {"entity_found": all(self.found)},
                "outputs": [{"name": OUTPUT, "shape": [len(self.scores)], "datatype": "FP32",
                             "data": self.scores.tolist()}]}


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
        self.max_instances = max_instances
        self._batcher = MicroBatcher(self._score, max_batch=max_batch, on_batch=metrics.batch_size.observe)
        self.champion: Champion | None = None
        self.broken: tuple[str, str] | None = None  # (version, why) of a champion that cannot be loaded

    # lifecycle ------------------------------------------------------------------------------------
    def load(self) -> bool:
        """Load the champion, or (if it cannot be loaded) the newest earlier champion that can."""
        version = str(self._client.get_model_version_by_alias(self._model_name, CHAMPION).version)
        try:
            champion = load_version(self._client, self._model_name, version, self._device)
        except Exception as error:
            self._failed(version, error)
            champion = self._earlier_than(version)
            log.error("%s v%s, the champion, cannot be loaded (%s): serving v%s, the newest earlier champion that "
                      "loads. Fix v%s's artifacts or run `driftloop rollback`; this server switches to the champion "
                      "once it loads.", self._model_name, version, self.broken[1], champion.version, version)
        self._serve(champion)
        self.ready = True
        return True

    def _earlier_than(self, broken: str) -> Champion:
        tried = [f"v{broken}: {self.broken[1]}"]
        for version in earlier_champions(self._client, self._model_name, broken)[:MAX_FALLBACKS]:
            try:
                return load_version(self._client, self._model_name, version, self._device)
            except Exception as error:
                self._metrics.load_failures.labels(self.name, version).inc()
                tried.append(f"v{version}: {_why(error)}")
        raise RegistryError(f"no version of {self._model_name} can be loaded ({'; '.join(tried)}): fix the "
                            "champion's artifacts or promote a new champion")

    def reload_if_moved(self) -> str | None:
        """Load the new champion if the alias moved; return its version (None when unchanged, or when it
        cannot be loaded: the served version stays, the failure is counted and the next check retries)."""
        version = str(self._client.get_model_version_by_alias(self._model_name, CHAMPION).version)
        if self.champion is not None and version == self.champion.version:
            self._clear_broken()  # e.g. rolled back to the version served
            return None
        try:
            fresh = load_version(self._client, self._model_name, version, self._device)
        except Exception as error:
            if self._failed(version, error):
                log.error("%s v%s, the new champion, cannot be loaded (%s): still serving v%s, retrying at every "
                          "check. Fix its artifacts or run `driftloop rollback`.", self._model_name, version,
                          self.broken[1], self.champion.version if self.champion else "none")
            return None
        self._clear_broken()
        self._serve(fresh)
        self._metrics.reloads.inc()
        return fresh.version

    def _serve(self, champion: Champion) -> None:
        self.champion = champion  # one reference assignment: atomic for every request that reads it after
        self._metrics.model_version.labels(self.name).set(float(champion.version))

    def _failed(self, version: str, error: BaseException) -> bool:
        """Count a failed load of the champion ``version``; True the first time in a row for this version."""
        self._metrics.load_failures.labels(self.name, version).inc()
        if self.broken is not None and self.broken[0] == version:
            return False
        self._clear_broken()
        self.broken = (version, _why(error))
        self._metrics.champion_broken.labels(self.name, version).set(1)
        return True

    def _clear_broken(self) -> None:
        if self.broken is not None:
            self._metrics.champion_broken.remove(self.name, self.broken[0])
            self.broken = None

    def readiness(self) -> tuple[bool, dict]:
        """Ready once a version is loaded, with what is served, a champion that cannot be loaded, and the
        inference log's state. An unhealthy log does not make the server unready: every replica shares the
        store, so a store outage would take the whole service out of its Service's endpoints; the log
        retries and counts what it drops (``driftloop_inference_log_*``) while predictions go on."""
        detail = {"name": self.name, "ready": self.ready,
                  "model_version": self.champion.version if self.champion else None,
                  "inference_log": {"healthy": self._log.healthy, "unwritten": self._log.depth(),
                                    "limit": self._log.max_rows, "dropped": self._log.dropped}}
        if self.broken is not None:
            detail["champion"] = {"version": self.broken[0], "loaded": False, "error": self.broken[1]}
        return self.ready, detail

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

    def parse(self, body: dict | InferRequest) -> payload.Rows:
        if isinstance(body, InferRequest):
            return payload.from_tensors(body.inputs, self.max_instances)
        return payload.from_instances(body, self.max_instances)

    async def _enrich(self, rows: payload.Rows) -> list[bool]:
        """Fill Feast features for entity-only rows; return whether each row's entity was found."""
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
        return found

    async def score(self, rows: payload.Rows, request_id: str | None = None) -> Scored:
        """Enrich, score (micro-batched) and log one request's rows."""
        found = await self._enrich(rows)
        scores, champion = await self._batcher.submit(payload.to_matrix(rows))
        scored = Scored(scores, champion, found, request_id or uuid.uuid4().hex)
        self._record(rows, scored)
        return scored

    async def predict(self, body: dict | InferRequest, headers: dict[str, str] | None = None):
        """KServe's route (the fast path in ``serving.fastpath`` answers the same requests the same way)."""
        request_id = payload.request_id((headers or {}).get("x-request-id"), "the X-Request-Id header")
        if isinstance(body, InferRequest):
            request_id = request_id or payload.request_id(body.id, 'the v2 "id"')
        scored = await self.score(self.parse(body), request_id)
        if isinstance(body, InferRequest):
            output = InferOutput(OUTPUT, [len(scored.scores)], "FP32", scored.scores.tolist())
            return InferResponse(scored.request_id, self.name, [output], model_version=scored.champion.version,
                                 parameters={"entity_found": all(scored.found)})
        return scored.v1()

    async def explain(self, body: dict, headers: dict[str, str] | None = None) -> dict:
        """Per-feature contributions (log-odds, XGBoost's TreeSHAP) for each instance."""
        if isinstance(body, InferRequest):
            raise InvalidInput("explanations are served on the v1 :explain verb")
        rows = self.parse(body)
        found = await self._enrich(rows)
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

    def _record(self, rows: payload.Rows, scored: Scored) -> None:
        now = time.time()
        cols = rows.columns
        version = scored.champion.version
        records = [
            (scored.request_id, now, self._model_name, version, cols[TRANSACTION_ID][i],
             *(cols[k][i] for k in ENTITY_KEYS), *(cols[f][i] for f in MODEL_FEATURES),
             float(scored.scores[i]), float(scored.found[i]))
            for i in range(rows.n)
        ]
        self._log.record(records)
