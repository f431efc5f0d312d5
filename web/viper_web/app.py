"""The gateway as an ASGI application: RPC paths go to the back ends, everything else is the web page.

An RPC is POST /viper.v1.<Service>/<Method>; its Content-Type picks the protocol:
application/json or application/proto (Connect unary), application/connect+json or application/connect+proto
(Connect server streaming), application/grpc-web[+proto] or application/grpc-web-text[+proto] (gRPC-Web).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf.message import Message

# The per-user routing header the SDK sends too: a proxy in front of several replicas hashes it.
from viper_client.channel import USER_HEADER
from viper_client.telemetry import inject_trace_context

from . import codecs, tracing
from .backends import Backends
from .codecs import WORKERS
from .codes import RpcError
from .connect import ConnectStream, ConnectUnary, connect_timeout
from .exchange import Exchange, HttpHeaders, Send
from .forward import Outcome, forward
from .grpcweb import GrpcWeb, GrpcWebText, grpc_timeout
from .jsonlimits import JsonLimits
from .registry import METHODS, Method
from .static_files import STATIC_DIR, plain_response, serve_static

log = logging.getLogger("viper_web.rpc")

REQUEST_ID = "x-request-id"
# Caller headers passed on to the back end as metadata; nothing else is (no cookies, no host).
_PASSED_THROUGH = ("authorization",)
_PRINTABLE = re.compile(r"[\x20-\x7e]{1,4096}")
_SAFE_USER = re.compile(r"[A-Za-z0-9._:@-]{1,128}")

# content type -> (exchange class, codec, for streaming methods (True), unary ones (False) or both (None))
_PROTOCOLS: dict[str, tuple[type[Exchange], object, bool | None]] = {
    "application/json": (ConnectUnary, codecs.JSON, False),
    "application/proto": (ConnectUnary, codecs.PROTO, False),
    "application/connect+json": (ConnectStream, codecs.JSON, True),
    "application/connect+proto": (ConnectStream, codecs.PROTO, True),
    "application/grpc-web": (GrpcWeb, codecs.PROTO, None),
    "application/grpc-web+proto": (GrpcWeb, codecs.PROTO, None),
    "application/grpc-web-text": (GrpcWebText, codecs.PROTO, None),
    "application/grpc-web-text+proto": (GrpcWebText, codecs.PROTO, None),
}
_CORS_REQUEST_HEADERS = (
    b"content-type, authorization, x-request-id, traceparent, tracestate, connect-protocol-version, "
    b"connect-timeout-ms, "
    b"connect-content-encoding, connect-accept-encoding, content-encoding, grpc-timeout, grpc-encoding, "
    b"grpc-accept-encoding, x-grpc-web, x-user-agent"
)
_CORS_EXPOSED_HEADERS = b"x-request-id, grpc-status, grpc-message, grpc-status-details-bin"
# On a refusal of a client too slow to send its body. Other refusals made before the body was read leave the
# connection open: uvicorn drops the rest of the body as it comes (no memory), so the client can read the answer,
# and the header deadline (http11) closes the connection if no new request follows within it.
_CLOSE = (b"connection", b"close")
MiB = 1024 * 1024


@dataclass
class Settings:
    max_message_bytes: int = 64 * MiB
    # Request bodies of the calls that carry images (ExtractProfile, Score); None: 4/3 of max_message_bytes
    # (base64 in JSON) plus 1 MiB.
    max_body_bytes: int | None = None
    # Request bodies of every other call (profile reads and updates, Generate).
    max_small_body_bytes: int = 1 * MiB
    json_limits: JsonLimits = field(default_factory=JsonLimits)
    # Seconds a request's whole body may take to arrive; a client trickling it is cut off.
    body_timeout: float = 60.0
    # Request bytes held at once over all calls, while their bodies are read and decoded: many large bodies
    # arriving together are refused rather than run the gateway out of memory.
    max_buffered_bytes: int = 512 * MiB
    # Refuse calls without an `authorization` header before reading their body. Off, this is learned per
    # method: once the back end refuses a call without one (UNAUTHENTICATED), the gateway refuses the next.
    require_auth: bool = False
    # Origins of other sites whose pages may call the API (CORS); "*" for any. The gateway's own page needs none.
    allow_origins: frozenset[str] = field(default_factory=frozenset)
    static_dir: Path = STATIC_DIR

    def body_limit(self, method: Method) -> int:
        if not method.carries_images:
            return self.max_small_body_bytes
        return self.max_body_bytes if self.max_body_bytes is not None else self.max_message_bytes * 4 // 3 + MiB


class Gateway:
    def __init__(self, backends: Backends, settings: Settings | None = None) -> None:
        self.backends = backends
        self.settings = settings or Settings()
        self._json = codecs.JsonCodec(self.settings.json_limits)
        self._auth_learned: set[str] = set()  # methods the back end refused without a token
        self._buffered = _Budget(self.settings.max_buffered_bytes)

    async def __call__(self, scope: dict, receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            method = METHODS.get(scope["path"])
            if method is None and scope["method"] == "POST":
                await plain_response(send, 404, f"no RPC at {scope['path'][:200]}\n")
            elif method is None:
                await serve_static(scope, send, self.settings.static_dir)
            elif scope["method"] == "OPTIONS":
                await self._preflight(scope, send)
            elif scope["method"] != "POST":
                await plain_response(send, 405, "RPCs are POST requests\n", [(b"allow", b"POST, OPTIONS")])
            else:
                with tracing.rpc_span(method.path, _headers(scope)):
                    await self._rpc(scope, receive, send, method)

    async def _lifespan(self, receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
                logging.getLogger("viper_web").info("viper-web ready")
            elif message["type"] == "lifespan.shutdown":
                await self.backends.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _cors(self, headers: dict[str, str]) -> HttpHeaders:
        origin = headers.get("origin")
        allowed = self.settings.allow_origins
        if origin is None or not ("*" in allowed or origin in allowed):
            return []
        return [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"vary", b"origin"),
            (b"access-control-expose-headers", _CORS_EXPOSED_HEADERS),
        ]

    async def _preflight(self, scope: dict, send: Send) -> None:
        cors = self._cors(_headers(scope))
        if not cors:
            await plain_response(send, 403, "origin not allowed\n")
            return
        await send({"type": "http.response.start", "status": 204, "headers": cors + [
            (b"access-control-allow-methods", b"POST"),
            (b"access-control-allow-headers", _CORS_REQUEST_HEADERS),
            (b"access-control-max-age", b"7200"),
        ]})
        await send({"type": "http.response.body", "body": b""})

    async def _rpc(self, scope: dict, receive, send: Send, method: Method) -> None:
        started = time.monotonic()
        headers = _headers(scope)
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        protocol = _PROTOCOLS.get(content_type)
        if protocol is None or protocol[2] not in (None, method.server_streaming):
            # Connect's answer to a content type it does not serve for this method (unary vs streaming).
            accepted = [name for name, (_, _, streaming) in _PROTOCOLS.items()
                        if streaming is None or streaming == method.server_streaming]
            await plain_response(send, 415, f"unsupported content type {content_type!r}\n",
                                 [(b"accept-post", ", ".join(accepted).encode())])
            return
        exchange_class, codec, _ = protocol
        codec = self._json if codec is codecs.JSON else codec
        request_id = headers.get(REQUEST_ID) or uuid.uuid4().hex[:16]
        response_headers = self._cors(headers)
        if _PRINTABLE.fullmatch(request_id):
            response_headers.append((REQUEST_ID.encode(), request_id.encode()))
        exchange = exchange_class(send, method, codec, _response_type(content_type), response_headers)
        outcome = Outcome()
        user_id = ""
        try:
            try:
                decoded = await self._request(receive, headers, method, exchange)
                if decoded is None:  # the caller left before sending its whole request
                    outcome.code = grpc.StatusCode.CANCELLED
                    return
                request, wire = decoded
                user_id = request.user_id if "user_id" in request.DESCRIPTOR.fields_by_name else ""
                metadata = _backend_metadata(headers, request_id, user_id)
                timeout = grpc_timeout(headers) if isinstance(exchange, GrpcWeb) else connect_timeout(headers)
            except RpcError as error:  # the gateway's own refusal: nothing reaches a back end
                outcome.code = error.code
                await exchange.finish(error, ())
                return
            try:
                await _until_disconnect(receive, forward(
                    method, wire, user_id, metadata, timeout, self.backends, exchange, outcome,
                ), outcome)
            except Exception as exc:  # a gateway bug: say so in the log, answer INTERNAL where still possible
                log.error("rpc method=%s request_id=%s failed in the gateway", method.path, request_id, exc_info=exc)
                outcome.code = grpc.StatusCode.INTERNAL
                with contextlib.suppress(Exception):
                    await exchange.finish(RpcError(grpc.StatusCode.INTERNAL,
                                                   f"gateway error (request_id {request_id})"), ())
            self._learn_auth(method, headers, outcome)
        finally:
            elapsed_ms = (time.monotonic() - started) * 1e3
            # The fields again as `extra`, for --log-format json.
            fields = {"method": method.path, "protocol": f"{exchange.protocol}/{codec.name}",
                      "user": _loggable(user_id), "backend": outcome.backend, "status": outcome.code.name,
                      "duration_ms": round(elapsed_ms, 1), "request_id": _loggable(request_id)}
            log.info("rpc method=%s protocol=%s/%s user=%s backend=%s status=%s ms=%.1f request_id=%s",
                     method.path.lstrip("/"), exchange.protocol, codec.name, _loggable(user_id),
                     outcome.backend, outcome.code.name, elapsed_ms, _loggable(request_id), extra=fields)

    async def _request(self, receive, headers: dict[str, str], method: Method,
                       exchange: Exchange) -> tuple[Message, bytes] | None:
        """The call's request message and its wire bytes, within the limits; None if the caller left first."""
        settings = self.settings
        if not headers.get("authorization") and (settings.require_auth or method.path in self._auth_learned):
            # Refused before a byte of the body is read (it is dropped as it comes, see _CLOSE).
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED,
                           "missing bearer token (header 'authorization: Bearer <token>')")
        limit = settings.body_limit(method)
        with self._buffered.share() as share:
            try:
                body = await asyncio.wait_for(_read_body(receive, headers, limit, share), settings.body_timeout)
            except asyncio.TimeoutError:
                exchange.extra_headers.append(_CLOSE)
                raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"the request body did not arrive within {settings.body_timeout:g} s") from None
            if body is None:
                return None
            # Decoding (base64, gzip, JSON) is CPU work of up to a body's size: a worker thread does it.
            return await asyncio.get_running_loop().run_in_executor(
                WORKERS, exchange.decode, body, headers, min(settings.max_message_bytes, limit))

    def _learn_auth(self, method: Method, headers: dict[str, str], outcome: Outcome) -> None:
        if (outcome.code is grpc.StatusCode.UNAUTHENTICATED and not headers.get("authorization")
                and method.path not in self._auth_learned):
            self._auth_learned.add(method.path)
            log.info("rpc method=%s needs a token: calls without one are now refused before their body is read",
                     method.path.lstrip("/"))


def _headers(scope: dict) -> dict[str, str]:
    # Repeated headers: the last one wins, which is all the gateway needs.
    return {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}


def _response_type(content_type: str) -> str:
    if content_type == "application/grpc-web":
        return "application/grpc-web+proto"
    if content_type == "application/grpc-web-text":
        return "application/grpc-web-text+proto"
    return content_type


def _loggable(value: str) -> str:
    if not value:
        return "-"
    return value if _SAFE_USER.fullmatch(value) else repr(value[:40])


def _backend_metadata(headers: dict[str, str], request_id: str, user_id: str) -> list[tuple[str, str]]:
    metadata = []
    for key, value in [(REQUEST_ID, request_id), *((key, headers.get(key)) for key in _PASSED_THROUGH)]:
        if value is None:
            continue
        if not _PRINTABLE.fullmatch(value):
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"header {key}: expected 1-4096 printable ASCII characters")
        metadata.append((key, value))
    # A user id that is not a valid header value is not a valid user id either: the server says so.
    if user_id and _PRINTABLE.fullmatch(user_id):
        metadata.append((USER_HEADER, user_id))
    return list(inject_trace_context(metadata))  # the caller's trace (and the gateway's span) go on


class _Budget:
    """Bytes held by all calls together; each call takes its share as its body arrives."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    @contextlib.contextmanager
    def share(self):
        share = _Share(self)
        try:
            yield share
        finally:
            self.used -= share.taken


class _Share:
    def __init__(self, budget: _Budget) -> None:
        self.budget = budget
        self.taken = 0

    def take(self, size: int) -> None:
        if self.budget.used + size > self.budget.limit:
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "the gateway holds too many request bodies right "
                                                               "now (--max-buffered-bytes): retry later")
        self.budget.used += size
        self.taken += size


async def _read_body(receive, headers: dict[str, str], limit: int, share: _Share) -> bytes | None:
    """The whole request body; None if the caller disconnected first."""
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                       f"request body of {declared} bytes is over this call's limit of {limit} bytes")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"request body over this call's limit of {limit} bytes")
        share.take(len(chunk))
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _until_disconnect(receive, call, outcome: Outcome) -> None:
    """Runs the forwarded call; if the caller disconnects first, cancels it (and with it the back-end call)."""
    task = asyncio.ensure_future(call)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            outcome.code = grpc.StatusCode.CANCELLED
        try:
            await task
        except asyncio.CancelledError:
            if not watcher.done():  # the gateway itself is being cancelled (shutdown): pass it on
                raise
    finally:
        watcher.cancel()
        task.cancel()


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
