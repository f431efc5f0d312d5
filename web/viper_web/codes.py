"""gRPC status codes as the two web protocols spell them.

Connect names each code and gives it an HTTP status (connectrpc.com/docs/protocol, "Error Codes");
gRPC-Web carries the numeric code in its grpc-status trailer, as gRPC does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

# code -> (Connect name, HTTP status of a Connect unary error)
_CONNECT: dict[grpc.StatusCode, tuple[str, int]] = {
    grpc.StatusCode.CANCELLED: ("canceled", 499),
    grpc.StatusCode.UNKNOWN: ("unknown", 500),
    grpc.StatusCode.INVALID_ARGUMENT: ("invalid_argument", 400),
    grpc.StatusCode.DEADLINE_EXCEEDED: ("deadline_exceeded", 504),
    grpc.StatusCode.NOT_FOUND: ("not_found", 404),
    grpc.StatusCode.ALREADY_EXISTS: ("already_exists", 409),
    grpc.StatusCode.PERMISSION_DENIED: ("permission_denied", 403),
    grpc.StatusCode.RESOURCE_EXHAUSTED: ("resource_exhausted", 429),
    grpc.StatusCode.FAILED_PRECONDITION: ("failed_precondition", 400),
    grpc.StatusCode.ABORTED: ("aborted", 409),
    grpc.StatusCode.OUT_OF_RANGE: ("out_of_range", 400),
    grpc.StatusCode.UNIMPLEMENTED: ("unimplemented", 501),
    grpc.StatusCode.INTERNAL: ("internal", 500),
    grpc.StatusCode.UNAVAILABLE: ("unavailable", 503),
    grpc.StatusCode.DATA_LOSS: ("data_loss", 500),
    grpc.StatusCode.UNAUTHENTICATED: ("unauthenticated", 401),
}


def connect_name(code: grpc.StatusCode) -> str:
    return _CONNECT[code][0]


def connect_http_status(code: grpc.StatusCode) -> int:
    return _CONNECT[code][1]


def grpc_number(code: grpc.StatusCode) -> int:
    return code.value[0]


@dataclass
class RpcError(Exception):
    """A call's failure as the gateway reports it: the back end's status, or one of the gateway's own
    (a request that does not parse, an unsupported encoding, ...)."""

    code: grpc.StatusCode
    message: str
    trailers: tuple[tuple[str, str | bytes], ...] = field(default=())

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"
