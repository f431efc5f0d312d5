"""Traces and structured logs shared by the SDK, the server and the gateway; OpenTelemetry stays optional.

- `inject_trace_context(metadata)`: the SDK adds the caller's current trace (W3C `traceparent`) to a call's
  metadata when the caller uses OpenTelemetry; without it installed, nothing is imported and nothing added.
- `tracer_provider_from_env(service)`: the server and the gateway build their tracer provider from the
  standard OTEL_* variables (OTEL_TRACES_EXPORTER = none | console | otlp, OTEL_EXPORTER_OTLP_ENDPOINT,
  OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER[_ARG], OTEL_BSP_*); None when tracing is off, the default.
- `JsonLogFormatter` and `request_id`: one JSON object per log line (`--log-format json`), carrying the request
  id and trace and span ids of the call the line was written for.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

# The request id of the call being handled, set by the server's interceptor and the gateway: log lines written
# anywhere below them (store, engine) carry it without it being passed down.
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("viper_request_id", default=None)

EXPORTERS = ("none", "console", "otlp")


def _tracing_in_use() -> bool:
    """Whether this process uses OpenTelemetry: only then is there a trace to pass on. Asked of sys.modules, so
    that a caller who does not use it pays no import, even where it is installed."""
    return "opentelemetry.trace" in sys.modules


def inject_trace_context(metadata: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """The metadata plus `traceparent` (and `tracestate`) of the caller's current span, if it has one."""
    if not _tracing_in_use():
        return tuple(metadata)
    from opentelemetry import propagate, trace

    if not trace.get_current_span().get_span_context().is_valid:
        return tuple(metadata)
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return (*metadata, *carrier.items())


def exporter_names(environ: Mapping[str, str] = os.environ) -> list[str]:
    """OTEL_TRACES_EXPORTER as a list; ValueError names an unknown exporter."""
    names = [name.strip().lower() for name in environ.get("OTEL_TRACES_EXPORTER", "none").split(",") if name.strip()]
    unknown = [name for name in names if name not in EXPORTERS]
    if unknown:
        raise ValueError(f"OTEL_TRACES_EXPORTER={','.join(unknown)}: expected one of {', '.join(EXPORTERS)}")
    return [name for name in names if name != "none"]


def tracer_provider_from_env(service: str, environ: Mapping[str, str] = os.environ) -> Any | None:
    """A TracerProvider exporting as OTEL_* say, or None when OTEL_TRACES_EXPORTER is unset or `none`."""
    names = exporter_names(environ)
    if not names:
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; ours is only the default.
    attributes = {} if environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service}
    provider = TracerProvider(resource=Resource.create(attributes))  # the sampler comes from OTEL_TRACES_SAMPLER
    for name in names:
        if name == "console":
            exporter = ConsoleSpanExporter()
        else:  # otlp over gRPC: OTEL_EXPORTER_OTLP_ENDPOINT (default http://localhost:4317), headers, timeout
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


# LogRecord attributes that are the record's own, not `extra` fields.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, trace and span ids, and the fields
    the line was logged with (`extra=`: method, status, duration_ms, ...)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({key: value for key, value in vars(record).items() if key not in _RECORD_FIELDS})
        if "request_id" not in entry and (current := request_id.get()) is not None:
            entry["request_id"] = current
        entry.update(_trace_ids())
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)

    converter = staticmethod(time.gmtime)


def _trace_ids() -> dict[str, str]:
    if not _tracing_in_use():
        return {}
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_log_format(log_format: str) -> None:
    """Makes the root logger's handlers write `log_format` (text or json)."""
    formatter = JsonLogFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)
