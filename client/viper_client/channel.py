"""Connection settings shared by the sync and async clients, and the one place channels are made."""

from __future__ import annotations

import enum
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
# Metadata of every per-user call: the user id, so a proxy can route each user to the replica that
# caches their metric context (nginx: hash $http_x_viper_user consistent).
USER_HEADER = "x-viper-user"


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


Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Connection:
    """A channel, the service stubs on it, and the metadata every call carries (the bearer token if given)."""

    channel: grpc.Channel | grpc.aio.Channel
    profiles: profile_pb2_grpc.ProfileServiceStub
    generation: generation_pb2_grpc.GenerationServiceStub
    metric: metric_pb2_grpc.MetricServiceStub
    metadata: Metadata

    def metadata_for(self, user_id: str | None) -> Metadata:
        """A call's metadata: the connection's, plus the user id header for a per-user call."""
        return self.metadata if user_id is None else (*self.metadata, (USER_HEADER, user_id))


def connect(target: str, *, max_message_bytes: int, token: str | None, tls: Tls | None,
            asynchronous: bool = False) -> Connection:
    channel = create_channel(target, max_message_bytes=max_message_bytes, tls=tls, asynchronous=asynchronous)
    return Connection(
        channel=channel,
        profiles=profile_pb2_grpc.ProfileServiceStub(channel),
        generation=generation_pb2_grpc.GenerationServiceStub(channel),
        metric=metric_pb2_grpc.MetricServiceStub(channel),
        metadata=(("authorization", f"Bearer {token}"),) if token else (),
    )
