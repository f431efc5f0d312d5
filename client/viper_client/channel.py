"""Connection settings shared by the sync and async clients, and the one place channels are made."""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc
import grpc.aio

from viper_proto.v1 import generation_pb2_grpc, metric_pb2_grpc, profile_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 30.0
# Extraction, generation and scoring run models and may queue behind other
# requests, so they get a deadline of minutes rather than seconds.
DEFAULT_LONG_TIMEOUT = 600.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class _Unset(enum.Enum):
    UNSET = "UNSET"


# A method's timeout= when not given: the client's default applies. (None
# cannot mark that, since it means "no deadline".)
UNSET = _Unset.UNSET
Timeout = float | None | Literal[_Unset.UNSET]


def resolve_timeout(timeout: Timeout, default: float | None) -> float | None:
    return default if timeout is UNSET else timeout


@dataclass(frozen=True)
class Tls:
    """TLS settings: `ca` verifies the server (None: the system's roots); `cert` + `key` for mutual TLS.

    Each is PEM bytes or the path of a PEM file.
    """

    ca: bytes | str | Path | None = None
    cert: bytes | str | Path | None = None
    key: bytes | str | Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate and its key go together")
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.ca), private_key=_pem(self.key), certificate_chain=_pem(self.cert)
        )


def _pem(source: bytes | str | Path | None) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


def create_channel(
    target: str, *, max_message_bytes: int, tls: Tls | None = None, asynchronous: bool = False
) -> grpc.Channel | grpc.aio.Channel:
    """A channel (sync, or grpc.aio when asynchronous), TLS when tls is given, allowing messages up to
    max_message_bytes."""
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
    api = grpc.aio if asynchronous else grpc
    if tls is None:
        return api.insecure_channel(target, options=options)
    return api.secure_channel(target, tls.credentials(), options=options)


class _StubWithMetadata:
    """A generated stub whose every call carries the given metadata (works for sync and asyncio stubs)."""

    def __init__(self, stub: object, metadata: tuple[tuple[str, str], ...]) -> None:
        self._stub = stub
        self._metadata = metadata

    def __getattr__(self, method: str):
        return functools.partial(getattr(self._stub, method), metadata=self._metadata)


@dataclass(frozen=True)
class Connection:
    """A channel and the service stubs on it, every call carrying the bearer token if one is given."""

    channel: grpc.Channel | grpc.aio.Channel
    profiles: profile_pb2_grpc.ProfileServiceStub
    generation: generation_pb2_grpc.GenerationServiceStub
    metric: metric_pb2_grpc.MetricServiceStub


def connect(target: str, *, max_message_bytes: int, token: str | None, tls: Tls | None,
            asynchronous: bool = False) -> Connection:
    channel = create_channel(target, max_message_bytes=max_message_bytes, tls=tls, asynchronous=asynchronous)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return Connection(
        channel=channel,
        profiles=_StubWithMetadata(profile_pb2_grpc.ProfileServiceStub(channel), metadata),
        generation=_StubWithMetadata(generation_pb2_grpc.GenerationServiceStub(channel), metadata),
        metric=_StubWithMetadata(metric_pb2_grpc.MetricServiceStub(channel), metadata),
    )
