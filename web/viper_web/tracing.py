"""The gateway's part of a trace: it continues the caller's W3C `traceparent` and passes it on to the back end.

With tracing on (OTEL_TRACES_EXPORTER, see viper_client.telemetry), each RPC gets a server span of its own,
child of the caller's, and the back end sees the gateway's span as its parent: the page's request, the gateway
and the server share one trace. With tracing off, the caller's trace context is still passed on unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import context, propagate
from opentelemetry.trace import SpanKind

_tracer: Any = None
_provider: Any = None


def configure(provider: Any | None) -> None:
    """Spans go to `provider` (an SDK TracerProvider) from now on; None: no spans, trace context passed on."""
    global _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer("viper_web") if provider is not None else None


def shutdown() -> None:
    if _provider is not None:
        _provider.shutdown()
    configure(None)


@contextlib.contextmanager
def rpc_span(path: str, headers: Mapping[str, str]) -> Iterator[Any]:
    """The caller's trace context current for the block (so that the back-end call carries it), under a span
    of the gateway's own when tracing is on."""
    caller = propagate.extract(headers)
    if _tracer is None:
        token = context.attach(caller)
        try:
            yield None
        finally:
            context.detach(token)
        return
    service, _, method = path.lstrip("/").rpartition("/")
    with _tracer.start_as_current_span(
        f"gateway {path.lstrip('/')}", context=caller, kind=SpanKind.SERVER,
        attributes={"rpc.system": "connect_rpc", "rpc.service": service, "rpc.method": method},
    ) as span:
        yield span
