"""A request's raw bytes checked before they are parsed (parsing is what costs: 8 million empty images in 16 MB
become half a gigabyte of objects): each method's size and field-count limit, and what stands for a message
refused unparsed or not parsable, for the interceptor to answer with its status."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from .validation import InvalidRequest
from .wire import more_fields_than


class RequestTooLarge(Exception):
    """A request message is larger than its method's limit (RequestLimit): refused before it is parsed."""


@dataclass(frozen=True)
class RequestLimit:
    """The most bytes a method's request may have, and the flag that says so; and the most top-level fields
    (0 = not counted), far above what a valid request has, so that validation names any moderate excess."""

    max_bytes: int
    flag: str
    max_fields: int = 0
    fields_hint: str = ""


class Undecodable:
    """Stands for a request message that did not parse, so the handler wrapper can answer INVALID_ARGUMENT
    (gRPC itself would answer UNKNOWN)."""

    def __init__(self, error: DecodeError) -> None:
        self.error = error


class Oversized:
    """Stands for a request message refused unparsed, with the error to answer."""

    def __init__(self, size: int, limit: RequestLimit, *, fields: bool = False) -> None:
        self.error = (InvalidRequest(f"request: more than {limit.max_fields} fields ({limit.fields_hint})") if fields
                      else RequestTooLarge(f"request: {size} bytes, more than this method accepts ({limit.flag} "
                                           f"{limit.max_bytes})"))


def tolerant(deserializer: Callable[[bytes], object] | None,
             limit: RequestLimit | None = None) -> Callable[[bytes], object] | None:
    """The deserializer, giving an Oversized for bytes over the limit (unparsed) and an Undecodable for bytes that
    do not parse, instead of raising."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> object:
        if limit is not None and len(data) > limit.max_bytes:
            return Oversized(len(data), limit)
        if limit is not None and limit.max_fields and more_fields_than(data, limit.max_fields):
            return Oversized(len(data), limit, fields=True)
        try:
            return deserializer(data)
        except DecodeError as error:
            return Undecodable(error)

    return deserialize


def unread(data: bytes) -> None:
    """The deserializer of a refused call: its bytes are never read."""
    return None
