"""The one server interceptor every RPC passes through.

It authenticates the call from its metadata, before the request message is
parsed (an unauthenticated call of any size costs no more than a small one), and
checks the request's raw bytes against its method's limits (limits.py) before they are parsed,
maps domain errors to gRPC status codes, counts and times the RPC, logs one
line for it and hands an audit record to the AuditSink. Handlers raise plain exceptions
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
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone

import grpc

from viper_client.telemetry import request_id as current_request_id
from viper_profiles import (
    USER_ID_PATTERN,
    InvalidText,
    InvalidUserId,
    ProfileExists,
    ProfileNotFound,
    StoreUnavailable,
    VersionConflict,
    VersionNotFound,
    quote_user_id,
)

from .. import access, tracing
from ..access import PermissionDenied
from ..application import ImageNotInProfile, NoImagesLeft, TooManyProfileImages
from ..audit import AuditEvent, AuditSink
from ..domain import ContextError
from ..engine.errors import ContextChanged, ModelsNotReady, PreprocessWorkerLost, QueueFull, WorkerClosed
from ..observability import Telemetry
from .auth import Authenticator, Unauthenticated
from .context import CallState, bind_call
from .limits import Oversized, RequestLimit, RequestTooLarge, Undecodable, tolerant, unread
from .servicers import ResponseTooLarge
from .validation import InvalidRequest

log = logging.getLogger("viper_server.rpc")

REQUEST_ID_KEY = "x-request-id"
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
# W3C trace context: a caller's trace continues here.
TRACE_KEYS = ("traceparent", "tracestate")
# Probes must work without credentials.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
# Any valid credential may use reflection.
REFLECTION_PREFIX = "/grpc.reflection."
# One permission per RPC; a method not listed here is refused to every credential (deny by default).
PERMISSION_OF = {
    "/viper.v1.ProfileService/ExtractProfile": access.EXTRACT,
    "/viper.v1.ProfileService/GetProfile": access.GET,
    "/viper.v1.ProfileService/ListProfiles": access.LIST,
    "/viper.v1.ProfileService/UpdateProfile": access.UPDATE,
    "/viper.v1.ProfileService/DeleteProfile": access.DELETE,
    "/viper.v1.ProfileService/AddRatings": access.ADD_RATINGS,
    "/viper.v1.ProfileService/RemoveRatings": access.REMOVE_RATINGS,
    "/viper.v1.ProfileService/ListProfileVersions": access.HISTORY,
    "/viper.v1.ProfileService/RestoreProfileVersion": access.RESTORE,
    "/viper.v1.ProfileService/ExportProfile": access.EXPORT,
    "/viper.v1.ProfileService/ImportProfile": access.IMPORT,
    "/viper.v1.GenerationService/Generate": access.GENERATE,
    "/viper.v1.MetricService/Score": access.SCORE,
}


class CallTooLong(Exception):
    """A call without a client deadline ran past the server's limit (--max-call-seconds); its work is cancelled."""


_STATUS_OF: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidUserId, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidText, grpc.StatusCode.INVALID_ARGUMENT),
    (ProfileNotFound, grpc.StatusCode.NOT_FOUND),
    (VersionConflict, grpc.StatusCode.ABORTED),
    (ProfileExists, grpc.StatusCode.ABORTED),
    (ContextChanged, grpc.StatusCode.ABORTED),
    (VersionNotFound, grpc.StatusCode.NOT_FOUND),
    (ImageNotInProfile, grpc.StatusCode.NOT_FOUND),
    (TooManyProfileImages, grpc.StatusCode.INVALID_ARGUMENT),
    (NoImagesLeft, grpc.StatusCode.FAILED_PRECONDITION),
    (ContextError, grpc.StatusCode.FAILED_PRECONDITION),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ResponseTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RequestTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ModelsNotReady, grpc.StatusCode.UNAVAILABLE),
    (WorkerClosed, grpc.StatusCode.UNAVAILABLE),
    (PreprocessWorkerLost, grpc.StatusCode.UNAVAILABLE),
    (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (CallTooLong, grpc.StatusCode.DEADLINE_EXCEEDED),
)
_REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)

_HANDLER_FACTORIES = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, StoreUnavailable):  # its message may name the database's host: that stays in the log
        log.warning("profile store unavailable: %s", exc)
        return grpc.StatusCode.UNAVAILABLE, "the profile store is unavailable; retry shortly"
    for kind, code in _STATUS_OF:
        if isinstance(exc, kind):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, "internal error; see the server log"


class RpcInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, telemetry: Telemetry, authenticator: Authenticator | None = None,
                 audit: AuditSink | None = None, request_limits: dict[str, RequestLimit] | None = None,
                 max_call_seconds: float = 0) -> None:
        self._telemetry = telemetry
        self._authenticator = authenticator
        self._audit = audit
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
            telemetry=self._telemetry,
            trace_carrier={key: value for key, value in metadata if key in TRACE_KEYS and isinstance(value, str)},
            audit=self._audit,
            max_seconds=self._max_call_seconds,
        )
        try:
            await self._identify(details.method, metadata, call.state)
        except (Unauthenticated, PermissionDenied) as refusal:
            return _refusing(handler, call, refusal)
        for kind, factory in _HANDLER_FACTORIES.items():
            behavior = getattr(handler, kind)
            if behavior is not None:
                wrap = _wrap_stream if inspect.isasyncgenfunction(behavior) else _wrap_awaitable
                deserializer = handler.request_deserializer
                return factory(
                    wrap(call, behavior),
                    request_deserializer=(tolerant(deserializer, self._request_limits.get(details.method))
                                          if kind.startswith("unary_") else deserializer),
                    response_serializer=handler.response_serializer,
                )
        return handler

    async def _identify(self, method: str, metadata, state: CallState) -> None:
        """Sets the call's caller, from the metadata alone; raises Unauthenticated or PermissionDenied.

        An open method (health) has no caller."""
        if method.startswith(OPEN_METHOD_PREFIXES):
            return
        state.caller = (access.UNAUTHENTICATED_CALLER if self._authenticator is None
                        else await self._authenticator.authenticate(metadata))
        if method.startswith(REFLECTION_PREFIX):
            return
        permission = PERMISSION_OF.get(method)
        if permission is None:
            raise PermissionDenied(f"{method} is not open to any credential")
        access.authorize(state.caller, permission)  # the user id is checked by the application, once parsed


def _refusing(handler: grpc.RpcMethodHandler, call: _CallInfo, refusal: Exception) -> grpc.RpcMethodHandler:
    """A handler that refuses the call without parsing its request: the deserializer never reads the bytes."""
    code, message = status_for(refusal)

    async def refuse(request_or_iterator, context):
        outcome = _Outcome(call, None)
        outcome.code = code
        with outcome.scope():
            try:
                await context.abort(code, message)
            finally:
                outcome.finish()

    for kind, factory in _HANDLER_FACTORIES.items():
        if getattr(handler, kind) is not None:
            return factory(refuse, request_deserializer=unread, response_serializer=handler.response_serializer)
    return handler


@dataclass(frozen=True)
class _CallInfo:
    """What the interceptor knows of a call before its handler runs."""

    method: str
    request_id: str
    telemetry: Telemetry
    trace_carrier: dict[str, str]
    audit: AuditSink | None = None
    state: CallState = field(default_factory=CallState)
    max_seconds: float = 0  # for calls without a client deadline; 0 = no limit


class _Outcome:
    """Tracks one RPC to its status, metrics and log line."""

    def __init__(self, call: _CallInfo, request: object) -> None:
        self.call = call
        self.user_id = getattr(request, "user_id", "")
        self.user = _loggable_user(self.user_id)
        self.code = grpc.StatusCode.OK
        self.started = time.monotonic()
        bind_call(call.state)
        self.span = None
        self.answered = False

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """The call's span (when tracing) and its request id, current for log lines written below."""
        token = current_request_id.set(self.call.request_id)
        try:
            with tracing.rpc_span(self.call.method, self.call.trace_carrier) as self.span:
                yield
        finally:
            current_request_id.reset(token)

    def first_response(self) -> None:
        """A stream's first message is about to go out."""
        if not self.answered:
            self.answered = True
            tracing.first_response(self.span)

    def check(self, request: object) -> None:
        """What every call must pass before its handler runs (auth passed already): a parsable request."""
        if isinstance(request, Undecodable):
            raise InvalidRequest(f"request: not a valid {self.call.method} message ({request.error})")
        if isinstance(request, Oversized):
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
            trace_id = tracing.current_trace_id()
            message = f"{message} (request_id {self.call.request_id}{f', trace_id {trace_id}' if trace_id else ''})"
        await context.abort(self.code, message)

    def finish(self) -> None:
        elapsed = time.monotonic() - self.started
        self.call.telemetry.rpc_finished(self.call.method, self.code.name, elapsed)
        # Probes come every few seconds from every orchestrator: their lines only at debug.
        level = logging.DEBUG if self.call.method.startswith(OPEN_METHOD_PREFIXES) else logging.INFO
        caller = self.call.state.caller
        # In a trace the user is tenant-qualified: two tenants' "alice" are two users.
        tracing.finish_rpc(self.span, self.code.name,
                           self.user if caller is None or self.user == "-" else f"{caller.tenant}/{self.user}")
        # The fields again as `extra`, for --log-format json.
        fields = {"method": self.call.method, "user": self.user, "status": self.code.name,
                  "duration_ms": round(elapsed * 1e3, 1), "request_id": self.call.request_id}
        log.log(level, "rpc method=%s user=%s status=%s ms=%.1f request_id=%s", self.call.method, self.user,
                self.code.name, elapsed * 1e3, self.call.request_id, extra=fields)
        if self.call.audit is not None:
            self.call.audit.record(self._audit_event())

    def _audit_event(self) -> AuditEvent:
        caller = self.call.state.caller
        user_id = self.user_id if self.user_id and USER_ID_PATTERN.fullmatch(self.user_id) else None
        if user_id is None and caller is not None and PERMISSION_OF.get(self.call.method) == access.LIST:
            user_id = caller.user_id  # an end user's listing acts on their own profile
        return AuditEvent(
            time=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            request_id=self.call.request_id,
            principal=None if caller is None else caller.name,
            kind=None if caller is None else caller.kind,
            tenant=None if caller is None else caller.tenant,
            method=self.call.method,
            user_id=user_id,
            permission=PERMISSION_OF.get(self.call.method),
            granted=self.code not in _REFUSED,
            code=self.code.name,
            items=self.call.state.items,
        )


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
        with outcome.scope():
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
    """Streams written as async generators, sent here with context.write: a write the client does not read then
    waits in this frame, where the time limit ends it with a status. (Yielded, the write waits in grpc's frame;
    the limit's cancellation lands there and grpc sends no status: the client waited for one forever.)"""

    async def handle(request, context):
        outcome = _Outcome(call, request)
        with outcome.scope():
            try:
                outcome.check(request)
                async with _time_limit(call, context):
                    async for response in behavior(request, context):
                        outcome.first_response()
                        await context.write(response)
            except BaseException as exc:
                await outcome.fail(exc, context)
            finally:
                outcome.finish()

    return handle
