"""One server interceptor: maps domain errors to gRPC status codes and logs every RPC.

Handlers raise plain exceptions (InvalidRequest, ProfileNotFound, QueueFull,
...); this is the one place that knows which status code each one means, so
handlers read as straight-line code and every RPC answers consistently.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable

import grpc

from viper_profiles import InvalidUserId, ProfileNotFound, VersionConflict

from .models.metric import ContextError
from .runtime import ModelsNotReady
from .validation import InvalidRequest
from .worker import QueueFull, WorkerClosed

log = logging.getLogger("viper_server.rpc")

_STATUS_OF: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidUserId, grpc.StatusCode.INVALID_ARGUMENT),
    (ProfileNotFound, grpc.StatusCode.NOT_FOUND),
    (VersionConflict, grpc.StatusCode.ABORTED),
    (ContextError, grpc.StatusCode.FAILED_PRECONDITION),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ModelsNotReady, grpc.StatusCode.UNAVAILABLE),
    (WorkerClosed, grpc.StatusCode.UNAVAILABLE),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    for kind, code in _STATUS_OF:
        if isinstance(exc, kind):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, "internal error; see the server log"


class ErrorAndLogInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # health Watch and reflection manage their own streams


class _Call:
    """Tracks one RPC for its log line."""

    def __init__(self, method: str, request: object) -> None:
        self.method = method
        self.user = getattr(request, "user_id", "") or "-"
        self.code = grpc.StatusCode.OK
        self.started = time.monotonic()

    async def fail(self, exc: BaseException, context: grpc.aio.ServicerContext) -> None:
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):  # the client left
            self.code = grpc.StatusCode.CANCELLED
            raise exc
        if isinstance(exc, grpc.aio.AbortError):  # the handler set the status itself
            self.code = context.code() or grpc.StatusCode.UNKNOWN
            raise exc
        self.code, message = status_for(exc)
        if self.code is grpc.StatusCode.INTERNAL:
            log.exception("%s failed", self.method, exc_info=exc)
        await context.abort(self.code, message)

    def log(self) -> None:
        elapsed_ms = (time.monotonic() - self.started) * 1e3
        log.info("rpc method=%s user=%s status=%s ms=%.1f", self.method, self.user, self.code.name, elapsed_ms)


def _wrap_unary(method: str, behavior):
    async def unary(request, context):
        call = _Call(method, request)
        try:
            return await behavior(request, context)
        except BaseException as exc:
            await call.fail(exc, context)
        finally:
            call.log()

    return unary


def _wrap_stream(method: str, behavior):
    async def stream(request, context):
        call = _Call(method, request)
        try:
            async for response in behavior(request, context):
                yield response
        except BaseException as exc:
            await call.fail(exc, context)
        finally:
            call.log()

    return stream
