"""gRPC-Web (github.com/grpc/grpc/blob/master/doc/PROTOCOL-WEB.md): gRPC's framing over HTTP/1.1, the
trailers sent as a last frame in the body (flag 0x80); the -text variant base64-encodes the body."""

from __future__ import annotations

import base64
import binascii
import re

import grpc
from google.protobuf.message import Message

from . import codes
from .codes import RpcError
from .exchange import Exchange, Metadata, forwardable, header_value
from .framing import GRPC_WEB_TRAILERS, envelope, single_envelope

_TIMEOUT = re.compile(r"(\d{1,8})([HMSmun])")
_UNIT_SECONDS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def grpc_timeout(headers: dict[str, str]) -> float | None:
    value = headers.get("grpc-timeout")
    if value is None:
        return None
    match = _TIMEOUT.fullmatch(value)
    if match is None:
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"grpc-timeout: {value[:20]!r} is not 1-8 digits and a unit")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def percent_encode(message: str) -> str:
    """grpc-message's encoding: printable ASCII except '%' as is, every other UTF-8 byte as %XX."""
    return "".join(chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in message.encode())


class GrpcWeb(Exchange):
    protocol = "grpc-web"
    text = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._started = False

    def decode(self, body: bytes, headers: dict[str, str], max_bytes: int) -> tuple[Message, bytes]:
        if self.text:
            try:
                body = base64.b64decode(body, validate=True)
            except (binascii.Error, ValueError):
                raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "request body: not valid base64") from None
        data = single_envelope(body, headers.get("grpc-encoding", ""), max_bytes)
        return self._decoded(data, max_bytes)

    async def start(self, metadata: Metadata) -> None:
        await self._start_streaming(metadata)

    async def message(self, data: bytes) -> None:
        await self._write(envelope(0, data), more=True)

    async def finish(self, error: RpcError | None, trailers: Metadata) -> None:
        if not self._started:
            await self.start(())
        code = grpc.StatusCode.OK if error is None else error.code
        lines = [f"grpc-status: {codes.grpc_number(code)}"]
        if error is not None and error.message:
            lines.append(f"grpc-message: {percent_encode(error.message)}")
        for key, value in [*trailers, *(error.trailers if error else ())]:
            if forwardable(key):
                lines.append(f"{key}: {header_value(key, value).decode('latin-1')}")
        block = "".join(line + "\r\n" for line in lines).encode("latin-1")
        await self._write(envelope(GRPC_WEB_TRAILERS, block), more=False)

    async def _write(self, frame: bytes, more: bool) -> None:
        if self.text:  # each frame its own padded base64 chunk, which clients decode 4 characters at a time
            frame = base64.b64encode(frame)
        await self.send({"type": "http.response.body", "body": frame, "more_body": more})


class GrpcWebText(GrpcWeb):
    protocol = "grpc-web-text"
    text = True
