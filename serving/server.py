"""``driftloop serve``: the champion on ``kserve.ModelServer``, with enrichment, logging and hot reload."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import orjson

from driftloop.settings import Settings
from serving.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    port: int = 8080
    max_body_bytes: int = 1 << 20
    max_instances: int = 1_000
    reload_interval_s: float = 10.0
    feature_max_staleness_s: float = 5.0
    log_queue: int = 100_000


class GuardMiddleware:
    """Pure ASGI: refuse bodies over the limit (413) before reading them; count requests by status."""

    def __init__(self, app, metrics: Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        protocol = "v1" if path.startswith("/v1/") else "v2" if path.startswith("/v2/") else "other"
        start = time.perf_counter()
        status = 500
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await self._too_large(send, protocol, start)

        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _BodyTooLarge
            return message

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, limited_receive, counting_send)
        except _BodyTooLarge:
            return await self._too_large(send, protocol, start)
        finally:
            if status != 413:
                self.metrics.requests.labels(protocol, str(status)).inc()
                self.metrics.latency.labels(protocol).observe(time.perf_counter() - start)

    async def _too_large(self, send, protocol: str, start: float) -> None:
        body = orjson.dumps({"error": f"request body over the limit of {self.max_body} bytes"})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        self.metrics.requests.labels(protocol, "413").inc()
        self.metrics.latency.labels(protocol).observe(time.perf_counter() - start)


class _BodyTooLarge(Exception):
    pass


class ClientErrorFilter(logging.Filter):
    """KServe logs a traceback for every 4xx; a client's mistake is answered and counted, not logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        from kserve.errors import InvalidInput, ModelNotFound

        error = record.exc_info[1] if record.exc_info else record.msg
        return not isinstance(error, InvalidInput | ModelNotFound)


def build(settings: Settings, options: ServeOptions):
    """The model (loaded) and the server, wired from settings. Imports KServe only when called."""
    import kserve
    from kserve import model_server

    from pipelines.steps import features as features_step
    from pipelines.steps import tracking
    from serving.features import OnlineFeatures
    from serving.inference_log import InferenceLog, SqliteSink
    from serving.model import FraudModel

    client = tracking.configure(settings)
    metrics = Metrics()
    inference_log = InferenceLog(SqliteSink(settings.inference_log_path), max_queue=options.log_queue).start()
    metrics.watch_log(inference_log.depth, lambda: inference_log.dropped)
    try:
        store = features_step.feature_store(settings)
        online = OnlineFeatures(store, features_step.service(settings, store), options.feature_max_staleness_s)
    except features_step.FeatureStoreError as error:
        log.warning("no online features (%s): requests must carry every feature", error)
        online = None
    model = FraudModel(settings.model_name, client, settings.model_name, inference_log, metrics,
                       features=online, device=settings.device, max_instances=options.max_instances)
    model.load()
    app = model_server.app
    app.add_middleware(GuardMiddleware, metrics=metrics, max_body_bytes=options.max_body_bytes)
    app.router.lifespan_context = _with_lifecycle(app.router.lifespan_context, model, options.reload_interval_s)
    server = kserve.ModelServer(http_port=options.port, enable_grpc=False, workers=1)
    logging.getLogger("kserve").addFilter(ClientErrorFilter())  # after KServe configured its logging
    logging.getLogger("kserve.trace").setLevel(logging.WARNING)  # no per-request timing lines
    return model, server


def _with_lifecycle(inner, model, reload_interval_s: float):
    """Run the champion watcher while the server runs; flush the inference log when it stops.

    Uvicorn's shutdown runs this after in-flight requests have been answered, so every answered
    request's record is written before the process exits.
    """

    @asynccontextmanager
    async def lifespan(app):
        async with inner(app) as state:
            watcher = asyncio.create_task(watch_champion(model, reload_interval_s))
            try:
                yield state
            finally:
                watcher.cancel()
                await asyncio.to_thread(model.stop)

    return lifespan


async def watch_champion(model, interval_s: float) -> None:
    """Poll the registry; swap in a new champion when the alias moves. Errors are logged, not fatal."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            version = await asyncio.to_thread(model.reload_if_moved)
        except Exception:
            log.exception("champion check failed; still serving version %s", model.champion.version)
            continue
        if version is not None:
            log.warning("now serving %s version %s", model.name, version)


def serve(settings: Settings, options: ServeOptions) -> None:
    model, server = build(settings, options)
    server.start([model])
