"""Connection settings shared by the sync and async clients, and the one place channels are made."""

from __future__ import annotations

import enum
import ipaddress
import json
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc
import grpc.aio

from viper_proto.v1 import generation_pb2_grpc, metric_pb2_grpc, profile_pb2_grpc

from .telemetry import inject_trace_context

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 30.0
# Extraction, generation and scoring run models and may queue behind other
# requests, so they get a deadline of minutes rather than seconds.
DEFAULT_LONG_TIMEOUT = 600.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Metadata of every per-user call: the user id, so a proxy can route each user to the replica that
# caches their metric context (nginx: hash $http_x_viper_user consistent).
USER_HEADER = "x-viper-user"
# grpcio (C-core, 1.85 included) ignores ring_hash's requestHashHeader unless this is true in the process's
# environment, and then fails every call with INTERNAL "hash attribute not present". A client over several
# targets sets it when it is unset.
RING_HASH_SWITCH = "GRPC_EXPERIMENTAL_RING_HASH_SET_REQUEST_HASH_KEY"
_TRUE_VALUES = ("1", "t", "true", "y", "yes")  # what C-core's gpr_parse_bool_value reads as true

# The calls sent again after UNAVAILABLE (a replica gone, draining or still loading, the database down):
# the reads, and the two streams, which gRPC retries only until the first response arrives (a Generate
# or Score whose first event has reached the client fails instead). Writes are never sent twice: an
# UNAVAILABLE write may have been committed.
RETRIED_METHODS = (
    ("viper.v1.ProfileService", "GetProfile"),
    ("viper.v1.ProfileService", "ListProfiles"),
    ("viper.v1.ProfileService", "ListProfileVersions"),
    ("viper.v1.ProfileService", "ExportProfile"),
    ("viper.v1.MetricService", "Score"),
    ("viper.v1.GenerationService", "Generate"),
)
RETRY_POLICY = {
    "maxAttempts": 5,  # gRPC's ceiling
    "initialBackoff": "0.2s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


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


def split_targets(target: str | Sequence[str]) -> list[str]:
    """The targets of `target`: a list of "host:port", or one string of them separated by commas."""
    pieces = [target] if isinstance(target, str) else list(target)
    targets = [each.strip() for piece in pieces for each in piece.split(",")]
    if not targets or not all(targets):
        raise ValueError(f"no target, or an empty one, in {target!r}")
    return targets


def service_config(*, ring_hash: bool, retries: bool) -> dict:
    """The channel's gRPC service config: ring_hash keyed on the user header, and the retry policy."""
    config: dict = {}
    if ring_hash:
        config["loadBalancingConfig"] = [{"ring_hash_experimental": {"requestHashHeader": USER_HEADER}}]
    if retries:
        names = [{"service": service, "method": method} for service, method in RETRIED_METHODS]
        config["methodConfig"] = [{"name": names, "retryPolicy": RETRY_POLICY}]
    return config


def resolve_targets(targets: Sequence[str]) -> str:
    """One gRPC target naming every replica's address, in order: `ipv4:a:p,b:p` (or ipv6:), as ring_hash needs.

    Host names are resolved here, once: the first address of one family (IPv4 if every host has one)."""
    hosts = [_host_port(target) for target in targets]
    for family, scheme in ((socket.AF_INET, "ipv4"), (socket.AF_INET6, "ipv6")):
        try:
            addresses = [socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)[0][4][0] for host, port in hosts]
        except socket.gaierror:
            continue
        if family == socket.AF_INET6:
            addresses = [f"[{address}]" for address in addresses]
        return f"{scheme}:" + ",".join(f"{address}:{port}" for address, (_, port) in zip(addresses, hosts))
    raise ValueError(f"cannot resolve all of {', '.join(targets)} to addresses of one family (IPv4 or IPv6)")


def _host_port(target: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6 address]:port"."""
    host, colon, port = target.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # an IPv6 address needs its brackets
    if not colon or not host or not port.isdigit() or "/" in host:
        raise ValueError(f"each of several targets is host:port (or [IPv6]:port), got {target!r}")
    return host, int(port)


def enable_ring_hash() -> None:
    """Turns grpcio's request-hash-header switch on for this process, or says why it cannot."""
    value = os.environ.setdefault(RING_HASH_SWITCH, "true")
    if value.strip().lower() not in _TRUE_VALUES:
        raise ValueError(f"a client over several targets needs {RING_HASH_SWITCH}=true in the environment "
                         f"(grpcio routes by the user header only then), but it is {value!r}")


def create_channel(
    target: str | Sequence[str], *, max_message_bytes: int, tls: Tls | None = None, asynchronous: bool = False,
    retries: bool = True, call_credentials: grpc.CallCredentials | None = None,
) -> grpc.Channel | grpc.aio.Channel:
    """A channel (sync, or grpc.aio when asynchronous), TLS when tls is given, allowing messages up to
    max_message_bytes.

    Several targets (a list, or commas): one channel over all of them with the ring_hash policy, so each
    user's calls go to one of them (consistent hashing of the user header) and move to the next one on the
    ring while theirs is down. retries: the safe calls (RETRIED_METHODS) are retried after UNAVAILABLE.
    call_credentials go with every call: gRPC sends them over TLS, or in plaintext to loopback targets only.
    """
    targets = split_targets(target)
    several = len(targets) > 1
    if several:
        enable_ring_hash()
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.service_config", json.dumps(service_config(ring_hash=several, retries=retries))),
        ("grpc.enable_retries", int(retries)),
        # A request bigger than this is never retried (gRPC keeps a copy of it until the call is committed).
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
    ]
    if several:
        # The first target names the service, e.g. for TLS: the replicas' certificate must be valid for it.
        options.append(("grpc.default_authority", targets[0]))
    channel_target = resolve_targets(targets) if several else targets[0]
    api = grpc.aio if asynchronous else grpc
    if call_credentials is not None:
        return api.secure_channel(channel_target, _with_call_credentials(targets, tls, call_credentials),
                                  options=options)
    if tls is None:
        return api.insecure_channel(channel_target, options=options)
    return api.secure_channel(channel_target, tls.credentials(), options=options)


def _with_call_credentials(targets: list[str], tls: Tls | None,
                           call_credentials: grpc.CallCredentials) -> grpc.ChannelCredentials:
    if tls is not None:
        return grpc.composite_channel_credentials(tls.credentials(), call_credentials)
    if not all(is_loopback(target) for target in targets):
        # gRPC itself sends call credentials only over TLS or to a local peer: insecure=True cannot lift that.
        raise CleartextTokenError("a token callable goes over TLS, or in plaintext to a loopback address only, even "
                                  "with insecure=True: pass tls=Tls(...), or a fixed token")
    return grpc.composite_channel_credentials(grpc.local_channel_credentials(), call_credentials)


class CleartextTokenError(ValueError):
    """A token would go in plaintext to a host that is not this machine."""


def refuse_cleartext_token(target: str | Sequence[str], *, tls: Tls | None, insecure: bool) -> None:
    """Raises CleartextTokenError unless every target is loopback, the channel is TLS, or insecure is set."""
    if tls is not None or insecure:
        return
    for each in split_targets(target):
        if not is_loopback(each):
            raise CleartextTokenError(
                f"refusing to send a bearer token in cleartext to {each!r}, which is not a loopback address: "
                "use TLS (tls=Tls(...), the CLI's --tls), or insecure=True (the CLI's --insecure, "
                "env VIPER_INSECURE=1) on a network you trust")


def is_loopback(target: str) -> bool:
    """Whether a target is this machine: a loopback IP or localhost, or a Unix socket. Names are not resolved."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    target = target.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    host = target.rpartition(":")[0] if target.count(":") == 1 or target.startswith("[") else target
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


Metadata = tuple[tuple[str, str], ...]
# A bearer token: fixed, or a callable asked for a fresh one before every call (an end user's JWT that
# expires and is refreshed). A callable travels as gRPC call credentials.
TokenSource = str | Callable[[], str] | None


class BearerToken(grpc.AuthMetadataPlugin):
    """Call credentials that ask `source` for the token before every call (gRPC runs it off the event loop)."""

    def __init__(self, source: Callable[[], str]) -> None:
        self._source = source

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        try:
            token = self._source()
        except Exception as error:  # the call fails UNAVAILABLE with this error, instead of hanging
            callback((), error)
            return
        callback((("authorization", f"Bearer {token}"),), None)


@dataclass(frozen=True)
class Connection:
    """A channel, the service stubs on it, and the metadata every call carries (the bearer token if given)."""

    channel: grpc.Channel | grpc.aio.Channel
    profiles: profile_pb2_grpc.ProfileServiceStub
    generation: generation_pb2_grpc.GenerationServiceStub
    metric: metric_pb2_grpc.MetricServiceStub
    metadata: Metadata

    def metadata_for(self, user_id: str | None) -> Metadata:
        """A call's metadata: the connection's, plus the user id header for a per-user call, plus the caller's
        trace context (`traceparent`) when it uses OpenTelemetry."""
        metadata = self.metadata if user_id is None else (*self.metadata, (USER_HEADER, user_id))
        return inject_trace_context(metadata)


def connect(target: str | Sequence[str], *, max_message_bytes: int, token: TokenSource, tls: Tls | None,
            asynchronous: bool = False, retries: bool = True, insecure: bool = False) -> Connection:
    if token:
        refuse_cleartext_token(target, tls=tls, insecure=insecure)
    refreshed = grpc.metadata_call_credentials(BearerToken(token)) if callable(token) else None
    channel = create_channel(target, max_message_bytes=max_message_bytes, tls=tls, asynchronous=asynchronous,
                             retries=retries, call_credentials=refreshed)
    if callable(token):
        token = None
    return Connection(
        channel=channel,
        profiles=profile_pb2_grpc.ProfileServiceStub(channel),
        generation=generation_pb2_grpc.GenerationServiceStub(channel),
        metric=metric_pb2_grpc.MetricServiceStub(channel),
        metadata=(("authorization", f"Bearer {token}"),) if token else (),
    )
