"""An OTLP trace receiver in memory: what a collector would get, for tests and benches (no collector needed)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import Span


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span exported to it as (service name, span). `endpoint` is what OTEL_EXPORTER_OTLP_ENDPOINT
    should say; a context manager (leaving it stops the receiver)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Span]] = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, service: str) -> dict[str, str]:
        """The OTEL_* variables that make a server or gateway export here, within a moment of each span."""
        return {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_SERVICE_NAME": service,
            "OTEL_BSP_SCHEDULE_DELAY": "50",
        }

    def Export(self, request, context):
        with self._lock:
            for resource_spans in request.resource_spans:
                attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend((attributes.get("service.name", ""), span) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(self, predicate: Callable[[str, Span], bool], timeout: float = 60) -> list[tuple[str, Span]]:
        """The spans matching predicate(service, span), once there is at least one."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                found = [entry for entry in self.spans if predicate(*entry)]
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching span within {timeout} s; got {[s.name for _, s in self.spans]}")
            time.sleep(0.05)

    def close(self) -> None:
        self._server.stop(0)

    def __enter__(self) -> OtlpReceiver:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
