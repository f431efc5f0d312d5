"""The one server interceptor every RPC passes through.

It authenticates the call, maps domain errors to gRPC status codes, counts
and times the RPC and logs one line for it. Handlers raise plain exceptions
(InvalidRequest, ProfileNotFound, QueueFull, ...) and read as straight-line
code; this is the one place that knows which status code each one means.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from viper_profiles import (
    USER_ID_PATTERN,
    InvalidText,
    InvalidUserId,
    ProfileNotFound,
    StoreUnavailable,
    VersionConflict,
    quote_user_id,
)

from ..domain import ContextError
from ..engine.errors import ModelsNotReady, QueueFull, WorkerClosed
from ..observability import Telemetry
from .auth import TokenAuthenticator
from .servicers import ResponseTooLarge
from .validation import InvalidRequest
from .wire import more_fields_than

log = logging.getLogger("viper_server.rpc")

REQUEST_ID_KEY = "x-request-id"
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Probes must work without credentials.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


class Unauthenticated(Exception):
    """The call carries no valid bearer token."""


class CallTooLong(Exception):
    """A call without a client deadline ran past the server's limit (--max-call-seconds); its work is cancelled."""


class RequestTooLarge(Exception):
    """A request message is larger than its method's limit (RequestLimit): refused before it is parsed."""


_STATUS_OF: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidUserId, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidText, grpc.StatusCode.INVALID_ARGUMENT),
    (ProfileNotFound, grpc.StatusCode.NOT_FOUND),
    (VersionConflict, grpc.StatusCode.ABORTED),
    (ContextError, grpc.StatusCode.FAILED_PRECONDITION),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ResponseTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RequestTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ModelsNotReady, grpc.StatusCode.UNAVAILABLE),
    (WorkerClosed, grpc.StatusCode.UNAVAILABLE),
    (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (CallTooLong, grpc.StatusCode.DEADLINE_EXCEEDED),
)

_HANDLER_FACTORIES = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


class _Undecodable:
    """Stands for a request message that did not parse, so the handler wrapper can answer INVALID_ARGUMENT
    (gRPC itself would answer UNKNOWN)."""

    def __init__(self, error: DecodeError) -> None:
        self.error = error


@dataclass(frozen=True)
class RequestLimit:
    """The most bytes a method's request may have, and the flag that says so; and the most top-level fields
    (0 = not counted), far above what a valid request has, so that validation names any moderate excess."""

    max_bytes: int
    flag: str
    max_fields: int = 0
    fields_hint: str = ""


class _Oversized:
    """Stands for a request message refused unparsed: parsing is what costs (8 million empty images in 16 MB
    become half a gigabyte of objects)."""

    def __init__(self, size: int, limit: RequestLimit, *, fields: bool = False) -> None:
        self.error = (InvalidRequest(f"request: more than {limit.max_fields} fields ({limit.fields_hint})") if fields
                      else RequestTooLarge(f"request: {size} bytes, more than this method accepts ({limit.flag} "
                                           f"{limit.max_bytes})"))


def _tolerant(deserializer: Callable[[bytes], object] | None,
              limit: RequestLimit | None = None) -> Callable[[bytes], object] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> object:
        if limit is not None and len(data) > limit.max_bytes:
            return _Oversized(len(data), limit)
        if limit is not None and limit.max_fields and more_fields_than(data, limit.max_fields):
            return _Oversized(len(data), limit, fields=True)
        try:
            return deserializer(data)
        except DecodeError as error:
            return _Undecodable(error)

    return deserialize


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, StoreUnavailable):  # its message may name the database's host: that stays in the log
        log.warning("profile store unavailable: %s", exc)
        return grpc.StatusCode.UNAVAILABLE, "the profile store is unavailable; retry shortly"
    for kind, code in _STATUS_OF:
        if isinstance(exc, kind):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, "internal error; see the server log"


class RpcInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, telemetry: Telemetry, authenticator: TokenAuthenticator | None = None,
                 request_limits: dict[str, RequestLimit] | None = None, max_call_seconds: float = 0) -> None:
        self._telemetry = telemetry
        self._authenticator = authenticator
        # Method -> its request size limit, checked on the raw bytes before parsing.
        self._request_limits = request_limits or {}
        self._max_call_seconds = max_call_seconds

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        metadata = details.invocation_metadata or ()
        call = _CallInfo(
            method=details.method,
            request_id=_request_id(metadata),
            authenticated=(
                self._authenticator is None
                or details.method.startswith(OPEN_METHOD_PREFIXES)
                or self._authenticator.allows(metadata)
            ),
            telemetry=self._telemetry,
            max_seconds=self._max_call_seconds,
        )
        for kind, factory in _HANDLER_FACTORIES.items():
            behavior = getattr(handler, kind)
            if behavior is not None:
                wrap = _wrap_stream if inspect.isasyncgenfunction(behavior) else _wrap_awaitable
                deserializer = handler.request_deserializer
                return factory(
                    wrap(call, behavior),
                    request_deserializer=(_tolerant(deserializer, self._request_limits.get(details.method))
                                          if kind.startswith("unary_") else deserializer),
                    response_serializer=handler.response_serializer,
                )
        return handler


@dataclass(frozen=True)
class _CallInfo:
    """What the interceptor knows of a call before its handler runs."""

    method: str
    request_id: str
    authenticated: bool
    telemetry: Telemetry
    max_seconds: float = 0  # for calls without a client deadline; 0 = no limit


class _Outcome:
    """Tracks one RPC to its status, metrics and log line."""

    def __init__(self, call: _CallInfo, request: object) -> None:
        self.call = call
        self.user = _loggable_user(getattr(request, "user_id", ""))
        self.code = grpc.StatusCode.OK
        self.started = time.monotonic()

    def check(self, request: object) -> None:
        """What every call must pass before its handler runs: auth, then a parsable request."""
        if not self.call.authenticated:
            raise Unauthenticated("missing or unknown bearer token (metadata 'authorization: Bearer <token>')")
        if isinstance(request, _Undecodable):
            raise InvalidRequest(f"request: not a valid {self.call.method} message ({request.error})")
        if isinstance(request, _Oversized):
            raise request.error

    async def fail(self, exc: BaseException, context: grpc.aio.ServicerContext) -> None:
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):  # the client left
            self.code = grpc.StatusCode.CANCELLED
            raise exc
        if isinstance(exc, grpc.aio.AbortError):  # the handler set the status itself
            self.code = context.code() or grpc.StatusCode.UNKNOWN
            raise exc
        self.code, message = status_for(exc)
        if self.code is grpc.StatusCode.INTERNAL:
            log.error("rpc method=%s request_id=%s failed", self.call.method, self.call.request_id, exc_info=exc)
            message = f"{message} (request_id {self.call.request_id})"
        await context.abort(self.code, message)

    def finish(self) -> None:
        elapsed = time.monotonic() - self.started
        self.call.telemetry.rpc_finished(self.call.method, self.code.name, elapsed)
        # Probes come every few seconds from every orchestrator: their lines only at debug.
        level = logging.DEBUG if self.call.method.startswith(OPEN_METHOD_PREFIXES) else logging.INFO
        log.log(level, "rpc method=%s user=%s status=%s ms=%.1f request_id=%s",
                self.call.method, self.user, self.code.name, elapsed * 1e3, self.call.request_id)


def _request_id(metadata) -> str:
    """The caller's x-request-id if it is a plain short token, else a generated one: a raw value could write
    fake fields (`r1 user=admin status=OK`) or megabytes into the log line."""
    given = dict(metadata).get(REQUEST_ID_KEY)
    if isinstance(given, str) and REQUEST_ID_PATTERN.fullmatch(given):
        return given
    return uuid.uuid4().hex[:16]


def _loggable_user(user_id: str) -> str:
    """A valid user_id as it is; anything else escaped and cut short, so it cannot forge or flood a log line."""
    if not user_id:
        return "-"
    return user_id if USER_ID_PATTERN.fullmatch(user_id) else quote_user_id(user_id)


@contextlib.asynccontextmanager
async def _time_limit(call: _CallInfo, context: grpc.aio.ServicerContext):
    """The server's limit on a call the client gave no deadline (health probes' Watch streams excepted)."""
    if not call.max_seconds or context.time_remaining() is not None or call.method.startswith(OPEN_METHOD_PREFIXES):
        yield
        return
    limit = asyncio.timeout(call.max_seconds)
    try:
        async with limit:
            yield
    except TimeoutError:
        if not limit.expired():  # the handler's own
            raise
        raise CallTooLong(f"the call ran longer than this server allows a call without a deadline "
                          f"(--max-call-seconds {call.max_seconds:g})") from None


def _wrap_awaitable(call: _CallInfo, behavior):
    """Unary responses, and streams written with context.write (health Watch)."""

    async def handle(request, context):
        outcome = _Outcome(call, request)
        try:
            outcome.check(request)
            async with _time_limit(call, context):
                return await behavior(request, context)
        except BaseException as exc:
            await outcome.fail(exc, context)
        finally:
            outcome.finish()

    return handle


def _wrap_stream(call: _CallInfo, behavior):
    """Streams written as async generators."""

    async def handle(request, context):
        outcome = _Outcome(call, request)
        try:
            outcome.check(request)
            # Past the limit while the client is not reading, the call is cancelled (CANCELLED) instead.
            async with _time_limit(call, context):
                async for response in behavior(request, context):
                    yield response
        except BaseException as exc:
            await outcome.fail(exc, context)
        finally:
            outcome.finish()

    return handle
