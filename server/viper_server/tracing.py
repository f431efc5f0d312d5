"""Traces of the server's work (OpenTelemetry), off unless OTEL_TRACES_EXPORTER names an exporter.

A leaf module, like logging: every layer may use it and it imports nothing of ours. The interceptor starts
one span per RPC (continuing the caller's `traceparent`); validation, the store and the engine open child
spans with `span(...)`; the step schedulers record each request's wait in the queue and its model steps
through `StepTrace` handles captured when the request is submitted (the scheduler thread has no context of
its own). Spans carry methods, step names, batch sizes, counts and user ids, never comments, features, images
or tokens.

Off (no provider configured), `span()` returns a shared no-op context manager and `capture()` returns None,
so the schedulers skip every per-step call: nothing measurable.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

_tracer: trace.Tracer | None = None
_provider: Any = None
_NOTHING = contextlib.nullcontext()
# Span events kept per model phase: a 2,000-token decode records its step count, not 2,000 events.
MAX_STEP_EVENTS = 32


def configure(provider: Any | None) -> None:
    """Traces go to `provider` (an SDK TracerProvider) from now on; None turns tracing off."""
    global _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer("viper_server") if provider is not None else None


def shutdown() -> None:
    """Flushes and stops the exporters (at server exit)."""
    if _provider is not None:
        _provider.shutdown()
    configure(None)


def enabled() -> bool:
    return _tracer is not None


def span(name: str, **attributes: Any) -> contextlib.AbstractContextManager[Span | None]:
    """A child span of the current one, made current for the block; a no-op when tracing is off."""
    if _tracer is None:
        return _NOTHING
    return _tracer.start_as_current_span(name, attributes=_clean(attributes))


def annotate(**attributes: Any) -> None:
    """Sets attributes on the current span (if tracing)."""
    if _tracer is not None:
        trace.get_current_span().set_attributes(_clean(attributes))


@contextlib.contextmanager
def rpc_span(method: str, metadata: Mapping[str, str]) -> Iterator[Span | None]:
    """The server span of one RPC, continuing the caller's trace when its metadata carries `traceparent`."""
    if _tracer is None:
        yield None
        return
    service, _, name = method.lstrip("/").rpartition("/")
    parent = propagate.extract(metadata) if metadata else None  # None: a trace of its own
    with _tracer.start_as_current_span(
        method.lstrip("/"), context=parent, kind=SpanKind.SERVER, record_exception=False,
        set_status_on_exception=False,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
    ) as current:
        yield current


def finish_rpc(current: Span | None, code: str, user: str) -> None:
    """The RPC's outcome on its span: the status code (ERROR for server faults) and whose call it was."""
    if current is None:
        return
    current.set_attribute("rpc.grpc.status_code", code)
    if user != "-":
        current.set_attribute("viper.user_id", user)
    if code in ("INTERNAL", "UNKNOWN", "UNAVAILABLE", "DATA_LOSS", "DEADLINE_EXCEEDED"):
        current.set_status(Status(StatusCode.ERROR, code))


def first_response(rpc: Span | None) -> None:
    """A stream's first message goes out now: a span from the RPC's start to here (time to first byte)."""
    if rpc is not None and _tracer is not None:
        _tracer.start_span("stream.first_response", start_time=getattr(rpc, "start_time", None)).end()


def current_trace_id() -> str | None:
    """The current trace id in hex (for error messages and log lines), or None."""
    if _tracer is None:
        return None
    span_context = trace.get_current_span().get_span_context()
    return f"{span_context.trace_id:032x}" if span_context.is_valid else None


def capture(model: str, kind: str) -> StepTrace | None:
    """A handle for a request about to be queued on `model`'s scheduler (call it on the request's side)."""
    if _tracer is None or not trace.get_current_span().get_span_context().is_valid:
        return None
    return StepTrace(_tracer, otel_context.get_current(), model, kind)


class StepTrace:
    """One request's spans on a scheduler thread: its wait in the queue, then one span per phase of
    consecutive steps of one kind (prefill, decode, base, refiner, ...), each step an event with its batch size."""

    def __init__(self, tracer: trace.Tracer, parent: otel_context.Context, model: str, kind: str) -> None:
        self._tracer = tracer
        self._parent = parent
        self._attributes = {"viper.model": model, "viper.kind": kind}
        self._queued_ns = time.time_ns()
        self._phase: str | None = None
        self._span: Span | None = None
        self._steps = 0
        self._largest_batch = 0

    def admitted(self) -> None:
        """Called when the scheduler admits the request: its wait becomes the `queue` span."""
        queue = self._tracer.start_span("queue", context=self._parent, attributes=self._attributes,
                                        start_time=self._queued_ns)
        queue.end()

    def stepped(self, label: str, batch_size: int, seconds: float) -> None:
        """A step of this request ran (batched with batch_size - 1 others) and took `seconds`."""
        ended = time.time_ns()
        started = ended - int(seconds * 1e9)
        if label != self._phase:
            self._end_phase(started)
            self._phase = label
            self._span = self._tracer.start_span(f"model.{label}", context=self._parent,
                                                 attributes=self._attributes, start_time=started)
        self._steps += 1
        self._largest_batch = max(self._largest_batch, batch_size)
        if self._steps <= MAX_STEP_EVENTS:
            self._span.add_event("step", {"batch_size": batch_size, "ms": round(seconds * 1e3, 3)}, started)

    def ended(self) -> None:
        """The request finished, failed or was cancelled."""
        self._end_phase(time.time_ns())

    def _end_phase(self, at_ns: int) -> None:
        if self._span is None:
            return
        self._span.set_attributes({"viper.steps": self._steps, "viper.batch_size.max": self._largest_batch})
        self._span.end(end_time=at_ns)
        self._span, self._phase, self._steps, self._largest_batch = None, None, 0, 0


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {f"viper.{key}": value for key, value in attributes.items() if value is not None}


class Traced:
    """`target` with a span around each call of its public methods (`store.get`, `store.save_extraction`,
    ...): how the store's reads and writes appear in traces without the store knowing of tracing."""

    def __init__(self, target: Any, prefix: str) -> None:
        self._target = target
        self._prefix = prefix

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if name.startswith("_") or not callable(value):
            return value

        def traced(*args: Any, **kwargs: Any) -> Any:
            if _tracer is None:
                return value(*args, **kwargs)
            # A leaf: started under the current span but not made current (cheaper; nothing nests in it).
            leaf = _tracer.start_span(f"{self._prefix}.{name}")
            try:
                return value(*args, **kwargs)
            finally:
                leaf.end()

        return traced
