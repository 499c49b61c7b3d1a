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
    host: str = "127.0.0.1"  # loopback on a workstation; a container passes 0.0.0.0
    max_body_bytes: int = 1 << 20
    max_header_bytes: int = 16 << 10  # the request line and headers together
    request_timeout_s: float = 10.0  # a request's head, then its body, must each arrive within this
    keep_alive_s: float = 65.0  # idle time between requests (KServe's: above the 60 s of common proxies)
    max_instances: int = 1_000
    reload_interval_s: float = 10.0
    feature_max_staleness_s: float = 5.0
    log_queue: int = 10_000  # predictions held unwritten at most: what a SIGKILL can lose
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
    from mlflow.exceptions import MlflowException

    from pipelines.steps import features as features_step
    from pipelines.steps import tracking
    from pipelines.steps.register import RegistryError
    from serving.fastpath import FrontDoor
    from serving.features import OnlineFeatures
    from serving.inference_log import InferenceLog, sink_for
    from serving.model import FraudModel, wait_for_champion

    client = tracking.configure(settings)
    # Before the feature store: the first champion comes after `features apply`, so once it exists the
    # Feast registry does too.
    try:
        wait_for_champion(client, settings.model_name, options.wait_for_champion_s)
    except MlflowException as error:
        raise RegistryError(f"no {settings.model_name}@champion in the registry ({error.error_code}): train one "
                            "first (`driftloop train`), or wait for it with --wait-for-champion SECONDS") from error
    metrics = Metrics()
    inference_log = InferenceLog(sink_for(settings), max_rows=options.log_queue).start()
    metrics.watch_log(inference_log.depth, lambda: inference_log.dropped, lambda: inference_log.healthy,
                      options.log_queue)
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
    app.add_middleware(FrontDoor, model=model, metrics=metrics, max_body_bytes=options.max_body_bytes,
                       request_timeout_s=options.request_timeout_s, readiness=model.readiness)
    app.router.lifespan_context = _with_lifecycle(app.router.lifespan_context, model, options.reload_interval_s)
    server = _server_class(kserve.ModelServer)(options, metrics, http_port=options.port, enable_grpc=False,
                                               workers=1, timeout_keep_alive=options.keep_alive_s)
    logging.getLogger("kserve").addFilter(ClientErrorFilter())  # after KServe configured its logging
    logging.getLogger("kserve.trace").setLevel(logging.WARNING)  # no per-request timing lines
    return model, server


def _server_class(base):
    """KServe's ``ModelServer`` on our listener.

    KServe's REST server hard-codes host 0.0.0.0 and runs uvicorn's protocol with no limit on request
    heads and no timer before a connection's first request. It builds uvicorn's ``Config`` in ``start()``,
    and uvicorn reads it only when serving begins: ``setup_event_loop``, called in between, sets ours.
    """
    from serving.connections import guarded_protocol

    class ModelServer(base):
        def __init__(self, options: ServeOptions, metrics: Metrics, **kwargs) -> None:
            super().__init__(**kwargs)
            self._options, self._metrics = options, metrics

        def setup_event_loop(self) -> None:
            config = self._rest_server.config
            config.host = self._options.host
            config.http = guarded_protocol(
                self._options.max_header_bytes, self._options.request_timeout_s,
                on_refused=lambda status: self._metrics.requests.labels("other", str(status)).inc(),
                on_idle=lambda: self._metrics.connections_closed.labels("idle").inc())
            super().setup_event_loop()

    return ModelServer


def _raise_file_limit() -> None:
    """Use every file descriptor the hard limit allows: each open connection holds one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)  # macOS: no finite hard limit
    try:
        if soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as error:
        log.warning("could not raise the open-file limit from %d (%s): idle connections count against it", soft,
                    error)


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
    """Poll the registry; swap in a new champion when the alias moves. Errors are logged (one line when the
    registry stops answering, one when it answers again), never fatal."""
    failing = False
    while True:
        await asyncio.sleep(interval_s)
        try:
            version = await asyncio.to_thread(model.reload_if_moved)
        except Exception as error:
            if not failing:
                log.error("champion check failed (%s: %s); still serving version %s, checking again every %g s",
                          type(error).__name__, " ".join(str(error).split())[:200], model.champion.version,
                          interval_s)
            failing = True
            continue
        if failing:
            log.warning("champion check works again; serving version %s", model.champion.version)
            failing = False
        if version is not None:
            log.warning("now serving %s version %s", model.name, version)


def serve(settings: Settings, options: ServeOptions) -> None:
    _raise_file_limit()
    model, server = build(settings, options)
    log.warning("serving %s version %s on http://%s:%d", settings.model_name, model.champion.version,
                options.host, options.port)
    server.start([model])
