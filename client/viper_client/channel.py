"""Connection settings shared by the sync and async clients, and the one place channels are made."""

from __future__ import annotations

import enum
from typing import Literal

import grpc
import grpc.aio

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


def create_channel(
    target: str, *, max_message_bytes: int, asynchronous: bool = False
) -> grpc.Channel | grpc.aio.Channel:
    """An insecure channel (sync, or grpc.aio when asynchronous) allowing messages up to max_message_bytes."""
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
    api = grpc.aio if asynchronous else grpc
    return api.insecure_channel(target, options=options)
