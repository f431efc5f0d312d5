"""The length-prefixed envelopes that Connect streaming and gRPC-Web share, and request decompression.

An envelope is one flags byte, a 4-byte big-endian length and that many bytes. Flag 0x01 marks a
compressed message; 0x02 a Connect end-of-stream message; 0x80 a gRPC-Web trailers frame.
"""

from __future__ import annotations

import struct
import zlib

import grpc

from .codes import RpcError

COMPRESSED = 0x01
CONNECT_END_STREAM = 0x02
GRPC_WEB_TRAILERS = 0x80

_HEADER = struct.Struct(">BI")


def envelope(flags: int, data: bytes) -> bytes:
    return _HEADER.pack(flags, len(data)) + data


def single_envelope(body: bytes, encoding: str, max_bytes: int) -> bytes:
    """The one message of a unary or server-streaming request body, decompressed."""
    if len(body) < _HEADER.size:
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "request body: an enveloped message needs a 5-byte prefix")
    flags, length = _HEADER.unpack_from(body)
    data = body[_HEADER.size:]
    if len(data) != length:
        raise RpcError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"request body: the envelope announces {length} bytes, {len(data)} follow (one message expected)",
        )
    if flags & ~COMPRESSED:
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"request body: unexpected envelope flags 0x{flags:02x}")
    return decompress(data, encoding, max_bytes) if flags & COMPRESSED else data


def decompress(data: bytes, encoding: str, max_bytes: int) -> bytes:
    """Bytes compressed with `encoding` ("identity" or "gzip"), refused past max_bytes once inflated."""
    if encoding in ("", "identity"):
        return data
    if encoding != "gzip":
        raise RpcError(grpc.StatusCode.UNIMPLEMENTED, f"compression {encoding!r} is not supported (gzip, identity)")
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, max_bytes + 1)
    except zlib.error as exc:
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"request body: bad gzip data ({exc})") from None
    if len(out) > max_bytes:
        raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"request message larger than {max_bytes} bytes")
    return out

