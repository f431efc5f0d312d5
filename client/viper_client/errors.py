"""Errors raised by the SDK: one class per gRPC status a caller may want to handle."""

from __future__ import annotations

import grpc


class ViperError(Exception):
    """A failed call: the gRPC status code and the server's message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class NotFound(ViperError):
    """No profile for the user."""


class InvalidArgument(ViperError):
    """The request was rejected as malformed (bad user id, image, size...)."""


class Conflict(ViperError):
    """An expected_version did not match (ABORTED) or the resource exists (ALREADY_EXISTS)."""


class FailedPrecondition(ViperError):
    """The request is valid but the server's state does not allow it."""


class ResourceExhausted(ViperError):
    """The server is overloaded or a size limit was exceeded: retry later or send less."""


class Unauthenticated(ViperError):
    pass


class PermissionDenied(ViperError):
    pass


class Unavailable(ViperError):
    """The server cannot be reached or is shutting down."""


class DeadlineExceeded(ViperError):
    """The call ran past its timeout."""


class Cancelled(ViperError):
    pass


_ERROR_BY_CODE: dict[grpc.StatusCode, type[ViperError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.ABORTED: Conflict,
    grpc.StatusCode.ALREADY_EXISTS: Conflict,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def error_from_rpc(error: grpc.RpcError) -> ViperError:
    """The SDK error for a failed sync or async call."""
    # Both the sync errors and grpc.aio.AioRpcError carry code() and details().
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    message: str = error.details() or ""  # type: ignore[attr-defined]
    return _ERROR_BY_CODE.get(code, ViperError)(code, message)
