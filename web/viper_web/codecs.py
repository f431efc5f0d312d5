"""Message encodings: binary protobuf, or the proto3 JSON mapping (camelCase names, bytes as base64,
64-bit integers as strings)."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from .codes import RpcError
from .jsonlimits import DuplicateKey, JsonLimits, check_fields, load

# Request decoding and JSON encoding run here, never on the event loop: parsing megabytes of JSON there would
# stall every other request, the page's own files included. Two threads: the work holds the GIL anyway.
WORKERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="viper-web-codec")


class ProtoCodec:
    name = "proto"

    def decode(self, data: bytes, cls: type[Message]) -> Message:
        message = cls()
        try:
            message.ParseFromString(data)
        except DecodeError as exc:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"request: not a valid {cls.DESCRIPTOR.full_name} message ({exc})") from None
        return message

    def encode(self, data: bytes, cls: type[Message]) -> bytes:
        return data  # the back end's bytes as they came: nothing it sent is lost, even fields we do not know


_FAILED_FIELD = re.compile(r"Failed to parse (\w+) field")


def _failed_field(exc: Exception) -> str:
    """Which field could not be mapped, never its value: json_format quotes values it cannot parse ("Couldn't
    parse integer: ..."), and a value may be a comment or a prompt."""
    path = ".".join(_FAILED_FIELD.findall(str(exc)))
    return f"field {path}: wrong type or value" if path else "a value of the wrong type"


class JsonCodec:
    name = "json"

    def __init__(self, limits: JsonLimits | None = None) -> None:
        self.limits = limits or JsonLimits()

    def decode(self, data: bytes, cls: type[Message]) -> Message:
        """Counted (jsonlimits), then parsed: CPU work for a worker thread, never the event loop."""
        message = cls()
        if not data.strip():  # an empty body is the empty message, as in Connect's reference servers
            return message
        invalid = f"request: not a valid {cls.DESCRIPTOR.full_name} in JSON"
        try:
            document = load(data, self.limits)
        except DuplicateKey as exc:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"request JSON: {exc}") from None
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"{invalid} ({exc})") from None
        check_fields(document, cls.DESCRIPTOR, self.limits)
        try:
            # Unknown fields are skipped, as the Connect implementations do, so older gateways accept newer apps.
            json_format.ParseDict(document, message, ignore_unknown_fields=True)
        except Exception as exc:  # as json_format.Parse: any failure to map the document is a ParseError
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"{invalid} ({_failed_field(exc)})") from None
        return message

    def encode(self, data: bytes, cls: type[Message]) -> bytes:
        message = cls.FromString(data)
        # Fields at their default value are written too: apps need not know proto3's defaults.
        as_dict = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
        return json.dumps(as_dict, separators=(",", ":")).encode()


PROTO = ProtoCodec()
JSON = JsonCodec()
