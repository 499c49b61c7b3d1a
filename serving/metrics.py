"""Prometheus metrics of the model server, served by KServe's ``/metrics``.

Created by the server at start-up (not at import), on a registry it is given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.requests = Counter("driftloop_requests", "HTTP requests by protocol and status",
                                ["protocol", "status"], registry=registry)
        self.latency = Histogram("driftloop_request_seconds", "request latency", ["protocol"],
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_size = Histogram("driftloop_batch_rows", "rows scored per model call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=registry)
        self.lookup_seconds = Histogram("driftloop_feature_lookup_seconds", "Feast online lookup latency",
                                        buckets=LATENCY_BUCKETS, registry=registry)
        self.missing_entities = Counter("driftloop_missing_entities", "rows whose entity had no online features",
                                        registry=registry)
        self.model_version = Gauge("driftloop_model_version", "version of the model answering", ["model"],
                                   registry=registry)
        self.reloads = Counter("driftloop_model_reloads", "champion swaps without restart", registry=registry)
        self.load_failures = Counter("driftloop_model_load_failures", "failed loads of a model version "
                                     "(corrupt or unreachable artifacts), by version", ["model", "version"],
                                     registry=registry)
        self.champion_broken = Gauge("driftloop_model_champion_broken", "1 for the champion version that cannot "
                                     "be loaded while an earlier version is served", ["model", "version"],
                                     registry=registry)
        self.connections_closed = Counter("driftloop_connections_closed", "connections the server closed for "
                                          "sending no request in time", ["reason"], registry=registry)
        self._registry = registry

    def watch_log(self, depth: Callable[[], int], dropped: Callable[[], int],
                  healthy: Callable[[], bool] = lambda: True, limit: int = 0) -> None:
        """Expose the inference log's unwritten records, its limit, drops and health (read at scrape time)."""
        self._registry.register(_LogCollector(depth, dropped, healthy, limit))


class _LogCollector(Collector):
    def __init__(self, depth: Callable[[], int], dropped: Callable[[], int], healthy: Callable[[], bool],
                 limit: int) -> None:
        self._depth, self._dropped, self._healthy, self._limit = depth, dropped, healthy, limit

    def collect(self) -> Iterator:
        yield GaugeMetricFamily("driftloop_inference_log_queue_depth", "records answered but not yet written "
                                "(a SIGKILL loses these)", value=self._depth())
        yield GaugeMetricFamily("driftloop_inference_log_queue_limit", "most records held unwritten; beyond it "
                                "records are dropped and counted", value=self._limit)
        yield CounterMetricFamily("driftloop_inference_log_dropped", "records dropped (queue full or sink error)",
                                  value=self._dropped())
        yield GaugeMetricFamily("driftloop_inference_log_healthy", "1 when the last write succeeded, 0 while the "
                                "store is away and batches are retried", value=float(self._healthy()))
