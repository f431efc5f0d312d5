"""Prometheus metrics of one server, in a registry of its own.

The metrics are always collected (cheap); they are exposed over HTTP only
when a metrics port is configured.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rpcs = Counter("viper_rpcs", "RPCs handled, by method and status code",
                            ["method", "code"], registry=self.registry)
        self.rpc_latency = Histogram("viper_rpc_latency_seconds", "RPC latency by method (whole stream)",
                                     ["method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("viper_queue_depth", "model jobs waiting, by runtime",
                                 ["runtime"], registry=self.registry)
        self.queue_wait = Histogram("viper_queue_wait_seconds", "time model jobs waited before running",
                                    ["runtime"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.generation_steps = Counter("viper_generation_steps",
                                        "denoising steps run (rate() gives steps per second)",
                                        registry=self.registry)

    def watch(self, collector: Collector) -> None:
        """Adds a collector read at scrape time (profile count, cache statistics)."""
        self.registry.register(collector)

    def serve(self, port: int, host: str) -> int:
        """Exposes the metrics over HTTP; returns the bound port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port


class ScrapeTimeCollector(Collector):
    """Reads gauges and counters from callables when Prometheus scrapes."""

    def __init__(self, read: Callable[[], Iterator[CounterMetricFamily | GaugeMetricFamily]]) -> None:
        self._read = read

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        yield from self._read()
