"""``driftloop serve``: the champion on ``kserve.ModelServer``, with enrichment, logging and hot reload."""

from __future__ import annotations

import asyncio
import gc
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass

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
    wait_for_champion_s: float = 0.0


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
    from serving.fastpath import FrontDoor
    from serving.features import OnlineFeatures
    from serving.inference_log import InferenceLog, sink_for
    from serving.model import FraudModel, wait_for_champion

    client = tracking.configure(settings)
    # Before the feature store: the first champion comes after `features apply`, so once it exists the
    # Feast registry does too.
    wait_for_champion(client, settings.model_name, options.wait_for_champion_s)
    metrics = Metrics()
    inference_log = InferenceLog(sink_for(settings), max_queue=options.log_queue).start()
    metrics.watch_log(inference_log.depth, lambda: inference_log.dropped, lambda: inference_log.healthy)
    try:
        store = features_step.feature_store(settings)
        online = OnlineFeatures.for_service(store, features_step.service(settings, store),
                                            options.feature_max_staleness_s)
    except features_step.FeatureStoreError as error:
        log.warning("no online features (%s): requests must carry every feature", error)
        online = None
    model = FraudModel(settings.model_name, client, settings.model_name, inference_log, metrics,
                       features=online, device=settings.device, max_instances=options.max_instances)
    model.load()
    app = model_server.app
    app.add_middleware(FrontDoor, model=model, metrics=metrics, max_body_bytes=options.max_body_bytes)
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
        # KServe adds a timing middleware that logs every request; our front door measures instead.
        app.user_middleware = [m for m in app.user_middleware if m.cls.__name__ != "TimingMiddleware"]
        app.middleware_stack = app.build_middleware_stack()
        # Everything loaded so far (MLflow, Feast, the model) lives as long as the process: keep it out of
        # the garbage collector's full passes, which otherwise stall requests for 100+ ms.
        gc.collect()
        gc.freeze()
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
