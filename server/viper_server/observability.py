"""Prometheus telemetry of one server, in a registry of its own.

Counters and histograms are updated as RPCs and model work happen (cheap, always on); gauges that
describe state (queue depths, the metric prefix cache, stored profiles) are read at scrape time. They
are exposed over HTTP only when a metrics port is configured.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from viper_profiles import StoreUnavailable

if TYPE_CHECKING:
    from viper_profiles import ProfileStore

    from .engine.engine import ModelEngine

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Telemetry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rpcs = Counter("viper_rpcs", "RPCs handled, by method and status code",
                            ["method", "code"], registry=self.registry)
        self.rpc_latency = Histogram("viper_rpc_latency_seconds", "RPC latency by method (whole stream)",
                                     ["method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram("viper_queue_wait_seconds", "time model jobs waited before running, by model",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.generation_steps = Counter("viper_generation_steps",
                                        "denoising steps run (rate() gives steps per second)",
                                        registry=self.registry)
        # The step schedulers (engine.scheduler), by model and kind of step (prefill, decode, prefix, query,
        # encode, base, refiner, vae): rate(viper_steps_total) is steps per second.
        self.steps = Counter("viper_steps", "scheduler steps run, by model and step", ["model", "step"],
                             registry=self.registry)
        self.batch_size = Histogram("viper_step_batch_size", "requests served by one step, by model and step",
                                    ["model", "step"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.step_seconds = Histogram("viper_step_seconds", "time one step took, by model and step",
                                      ["model", "step"], buckets=STEP_BUCKETS, registry=self.registry)
        self.work_wait = Histogram("viper_work_queue_wait_seconds",
                                   "time requests waited before running, by model and kind of work",
                                   ["model", "kind"], buckets=LATENCY_BUCKETS, registry=self.registry)

    # ModelEngine's observer.
    def generation_step(self) -> None:
        self.generation_steps.inc()

    def work_waited(self, model: str, kind: str, seconds: float) -> None:
        """A request waited `seconds` before its first step: counted per model and per kind of work."""
        self.queue_wait.labels(model).observe(seconds)
        self.work_wait.labels(model, kind).observe(seconds)

    def step_ran(self, model: str, step: str, batch_size: int, seconds: float) -> None:
        self.steps.labels(model, step).inc()
        self.batch_size.labels(model, step).observe(batch_size)
        self.step_seconds.labels(model, step).observe(seconds)

    def rpc_finished(self, method: str, code: str, seconds: float) -> None:
        self.rpcs.labels(method, code).inc()
        self.rpc_latency.labels(method).observe(seconds)

    def watch(self, engine: ModelEngine, store: ProfileStore) -> None:
        """Adds the gauges read at scrape time."""
        self.registry.register(_ScrapeTime(lambda: _engine_families(engine)))
        self.registry.register(_ScrapeTime(lambda: _store_families(store)))

    def serve(self, port: int, host: str) -> int:
        """Exposes the metrics over HTTP; returns the bound port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port


Families = Iterator[CounterMetricFamily | GaugeMetricFamily]


class _ScrapeTime(Collector):
    def __init__(self, read: Callable[[], Families]) -> None:
        self._read = read

    def collect(self) -> Families:
        yield from self._read()


def _engine_families(engine: ModelEngine) -> Families:
    depth = GaugeMetricFamily("viper_queue_depth", "model jobs waiting, by model", labels=["model"])
    for model, waiting in engine.queue_depths.items():
        depth.add_metric([model], waiting)
    yield depth
    running = GaugeMetricFamily("viper_running", "requests admitted to their model's steps, by model and kind",
                                labels=["model", "kind"])
    for (model, kind), count in engine.running.items():
        running.add_metric([model, kind], count)
    yield running
    yield from _preprocessing_families(engine)
    stats = engine.cache_stats
    if stats is None:  # models not loaded yet
        return
    yield CounterMetricFamily("viper_metric_cache_hits", "metric prefix-cache hits", value=stats.hits)
    yield CounterMetricFamily("viper_metric_cache_misses", "metric prefix-cache misses", value=stats.misses)
    yield GaugeMetricFamily("viper_metric_cache_bytes", "bytes held by the metric prefix cache", value=stats.bytes)
    yield GaugeMetricFamily("viper_metric_cache_entries", "contexts in the metric prefix cache", value=stats.entries)
    vision = engine.vision_cache_stats
    if vision is None:  # --vision-cache-bytes 0
        return
    yield CounterMetricFamily("viper_vision_cache_hits", "image features taken from the cache", value=vision.hits)
    yield CounterMetricFamily("viper_vision_cache_misses", "image features computed (not cached)",
                              value=vision.misses)
    yield GaugeMetricFamily("viper_vision_cache_bytes", "bytes held by the image features' cache", value=vision.bytes)
    yield GaugeMetricFamily("viper_vision_cache_entries", "image features in the cache (per image and adapter)",
                            value=vision.entries)


def _preprocessing_families(engine: ModelEngine) -> Families:
    """The preprocessing workers (engine.preprocessing) and the processed-input cache."""
    pool, cache = engine.preprocessor.pool_stats, engine.preprocessor.cache.stats
    yield GaugeMetricFamily("viper_preprocess_workers", "image preprocessing worker processes running",
                            value=pool.workers)
    yield GaugeMetricFamily("viper_preprocess_in_flight", "images a preprocessing worker is processing now",
                            value=pool.in_flight)
    yield CounterMetricFamily("viper_preprocess_worker_restarts", "preprocessing workers replaced after they died",
                              value=pool.restarts)
    yield CounterMetricFamily("viper_processed_cache_hits", "processed-image cache hits", value=cache.hits)
    yield CounterMetricFamily("viper_processed_cache_misses", "processed-image cache misses", value=cache.misses)
    yield GaugeMetricFamily("viper_processed_cache_bytes", "bytes held by the processed-image cache",
                            value=cache.bytes)
    yield GaugeMetricFamily("viper_processed_cache_entries", "images in the processed-image cache",
                            value=cache.entries)


def _store_families(store: ProfileStore) -> Families:
    try:
        count = store.count()
    except StoreUnavailable:  # the database is down: health says so; the scrape goes on without the gauge
        return
    yield GaugeMetricFamily("viper_profiles", "stored profiles", value=count)
