"""The gRPC back ends and which one serves a user.

One back end: every call goes there. Several (replicas on one profile database): a user's calls go to
the same replica, chosen by rendezvous hashing of (back end, user id), so that replica's per-user caches
pay off and a replica joining or leaving moves only about 1/N of the users. Calls without a user
(ListProfiles) take turns.
"""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import grpc
import grpc.aio


def parse_targets(values: list[str]) -> list[str]:
    """HOST:PORT values, each possibly comma-separated, in order, without repeats."""
    targets: list[str] = []
    for value in values:
        for target in value.split(","):
            target = target.strip()
            if not target:
                continue
            host, sep, port = target.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"back end {target!r}: expected HOST:PORT")
            if target not in targets:
                targets.append(target)
    if not targets:
        raise ValueError("no back end given (--backend HOST:PORT)")
    return targets


class Backend:
    def __init__(self, target: str, max_message_bytes: int,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.target = target
        self._credentials = credentials  # None: plaintext
        self._options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self._channel: grpc.aio.Channel | None = None

    def channel(self) -> grpc.aio.Channel:
        # Made on first use, inside the server's event loop, which grpc.aio channels belong to.
        if self._channel is None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
            else:
                self._channel = grpc.aio.secure_channel(self.target, self._credentials, options=self._options)
        return self._channel

    def unary_unary(self, path: str):
        # No serializers: the gateway hands over protobuf bytes and gets bytes back.
        return self.channel().unary_unary(path)

    def unary_stream(self, path: str):
        return self.channel().unary_stream(path)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


def tls_credentials(ca: Path | None, cert: Path | None, key: Path | None) -> grpc.ChannelCredentials:
    """TLS to the back ends: `ca` verifies them (None: the system's roots); `cert` + `key` for mutual TLS."""
    if (cert is None) != (key is None):
        raise ValueError("--backend-cert and --backend-key go together")
    return grpc.ssl_channel_credentials(root_certificates=_read(ca), private_key=_read(key),
                                        certificate_chain=_read(cert))


def _read(path: Path | None) -> bytes | None:
    return None if path is None else path.read_bytes()


def _weight(target: str, user_id: str) -> int:
    digest = hashlib.blake2b(f"{target}\0{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class Backends:
    def __init__(self, targets: list[str], max_message_bytes: int,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.all = [Backend(target, max_message_bytes, credentials) for target in targets]
        self._turns = itertools.count()

    def order(self, user_id: str) -> list[Backend]:
        """The back ends to try for a call, best first: the user's own, then the next by the same hash."""
        if not user_id:
            start = next(self._turns) % len(self.all)
            return self.all[start:] + self.all[:start]
        return sorted(self.all, key=lambda backend: _weight(backend.target, user_id), reverse=True)

    async def close(self) -> None:
        for backend in self.all:
            await backend.close()
