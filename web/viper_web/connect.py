"""The Connect protocol (connectrpc.com/docs/protocol): unary calls as plain POSTs, server streams as
enveloped messages closed by an end-of-stream message."""

from __future__ import annotations

import json
import re

import grpc
from google.protobuf.message import Message

from . import codes
from .codes import RpcError
from .exchange import Exchange, Metadata, forwardable, header_value
from .framing import CONNECT_END_STREAM, decompress, envelope, single_envelope

_TIMEOUT_MS = re.compile(r"\d{1,10}")


def connect_timeout(headers: dict[str, str]) -> float | None:
    value = headers.get("connect-timeout-ms")
    if value is None:
        return None
    if not _TIMEOUT_MS.fullmatch(value):
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"connect-timeout-ms: {value[:20]!r} is not 1-10 digits")
    return int(value) / 1000


def _check_version(headers: dict[str, str]) -> None:
    version = headers.get("connect-protocol-version")
    if version is not None and version != "1":
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"connect-protocol-version: {version[:20]!r}, expected 1")


def error_json(error: RpcError) -> dict:
    body = {"code": codes.connect_name(error.code)}
    if error.message:
        body["message"] = error.message
    return body


class ConnectUnary(Exchange):
    protocol = "connect"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._headers: Metadata = ()
        self._response: bytes | None = None

    def decode(self, body: bytes, headers: dict[str, str], max_bytes: int) -> tuple[Message, bytes]:
        _check_version(headers)
        return self._decoded(decompress(body, headers.get("content-encoding", ""), max_bytes), max_bytes)

    async def start(self, metadata: Metadata) -> None:
        self._headers = metadata  # the status line depends on the outcome: nothing is sent before finish

    async def message(self, data: bytes) -> None:
        self._response = data

    async def finish(self, error: RpcError | None, trailers: Metadata) -> None:
        if error is None and self._response is None:
            error = RpcError(grpc.StatusCode.INTERNAL, "the back end ended a unary call without a response")
        headers = self.extra_headers + self._metadata_headers(self._headers)
        headers += self._metadata_headers(trailers, prefix="trailer-")
        if error is None:
            status, content_type = 200, self.content_type
            body = await self.encoded(self._response)
        else:
            status, content_type = codes.connect_http_status(error.code), "application/json"
            body = json.dumps(error_json(error)).encode()
            headers += self._metadata_headers(error.trailers, prefix="trailer-")
        headers += [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})


class ConnectStream(Exchange):
    protocol = "connect-stream"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._started = False

    def decode(self, body: bytes, headers: dict[str, str], max_bytes: int) -> tuple[Message, bytes]:
        _check_version(headers)
        data = single_envelope(body, headers.get("connect-content-encoding", ""), max_bytes)
        return self._decoded(data, max_bytes)

    async def start(self, metadata: Metadata) -> None:
        await self._start_streaming(metadata)

    async def message(self, data: bytes) -> None:
        frame = envelope(0, await self.encoded(data))
        await self.send({"type": "http.response.body", "body": frame, "more_body": True})

    async def finish(self, error: RpcError | None, trailers: Metadata) -> None:
        if not self._started:
            await self.start(())
        end: dict = {}
        if error is not None:
            end["error"] = error_json(error)
            trailers = [*trailers, *error.trailers]
        metadata: dict[str, list[str]] = {}
        for key, value in trailers:
            if forwardable(key):
                metadata.setdefault(key, []).append(header_value(key, value).decode("latin-1"))
        if metadata:
            end["metadata"] = metadata
        frame = envelope(CONNECT_END_STREAM, json.dumps(end).encode())
        await self.send({"type": "http.response.body", "body": frame})
