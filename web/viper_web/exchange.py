"""What every web protocol does for one RPC: decode the request, then write the back end's answer.

The gateway hands a protocol's Exchange, in order: start(headers) once, message(data) per response
message, finish(error, trailers) once. Metadata travels as (key, value) pairs, `-bin` values as bytes.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable, Sequence

import grpc
from google.protobuf.message import Message

from .codecs import WORKERS, JsonCodec, ProtoCodec
from .codes import RpcError
from .registry import Method

Send = Callable[[dict], Awaitable[None]]
Metadata = Sequence[tuple[str, str | bytes]]
HttpHeaders = list[tuple[bytes, bytes]]

# Back-end metadata that is not the app's business, or that HTTP itself defines.
_NOT_FORWARDED = frozenset({
    "content-type", "content-length", "content-encoding", "transfer-encoding", "connection", "te", "trailer",
    "host", "date", "server", "user-agent", "x-request-id",
})


def forwardable(key: str) -> bool:
    return not (key.startswith(("grpc-", ":")) or key in _NOT_FORWARDED)


def header_value(key: str, value: str | bytes) -> bytes:
    """A metadata value as an HTTP header value: binary (-bin) values base64, as gRPC and Connect both do."""
    if isinstance(value, bytes) or key.endswith("-bin"):
        raw = value if isinstance(value, bytes) else value.encode()
        return base64.b64encode(raw)
    return value.encode("latin-1", "replace")


class Exchange:
    """One RPC in one web protocol. Subclasses decode the body and write the response."""

    protocol = "?"

    def __init__(self, send: Send, method: Method, codec: JsonCodec | ProtoCodec, content_type: str,
                 extra_headers: HttpHeaders) -> None:
        self.send = send
        self.method = method
        self.codec = codec
        self.content_type = content_type
        # CORS and x-request-id: on every response, success or not.
        self.extra_headers = extra_headers

    def decode(self, body: bytes, headers: dict[str, str], max_bytes: int) -> tuple[Message, bytes]:
        """The request message, and its protobuf bytes for the back end. Raises RpcError."""
        raise NotImplementedError

    async def start(self, metadata: Metadata) -> None:
        raise NotImplementedError

    async def message(self, data: bytes) -> None:
        raise NotImplementedError

    async def finish(self, error: RpcError | None, trailers: Metadata) -> None:
        raise NotImplementedError

    async def encoded(self, data: bytes) -> bytes:
        """A response message in the caller's codec; JSON is encoded in a worker thread."""
        if isinstance(self.codec, ProtoCodec):
            return data
        return await asyncio.get_running_loop().run_in_executor(WORKERS, self.codec.encode, data, self.method.output)

    async def _start_streaming(self, metadata: Metadata) -> None:
        """Streaming protocols answer 200 at once with the back end's headers; the outcome comes at the end."""
        headers = self.extra_headers + self._metadata_headers(metadata)
        headers.append((b"content-type", self.content_type.encode()))
        await self.send({"type": "http.response.start", "status": 200, "headers": headers})
        self._started = True

    def _decoded(self, data: bytes, max_bytes: int) -> tuple[Message, bytes]:
        request = self.codec.decode(data, self.method.input)
        wire = data if isinstance(self.codec, ProtoCodec) else request.SerializeToString()
        if len(wire) > max_bytes:
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"request message is {len(wire)} bytes, the gateway takes at most {max_bytes}")
        return request, wire

    @staticmethod
    def _metadata_headers(metadata: Metadata, prefix: str = "") -> HttpHeaders:
        return [((prefix + key).encode(), header_value(key, value)) for key, value in metadata if forwardable(key)]
