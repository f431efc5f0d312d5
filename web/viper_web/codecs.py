"""Message encodings: binary protobuf, or the proto3 JSON mapping (camelCase names, bytes as base64,
64-bit integers as strings)."""

from __future__ import annotations

import json

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from .codes import RpcError


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


class JsonCodec:
    name = "json"

    def decode(self, data: bytes, cls: type[Message]) -> Message:
        message = cls()
        if not data.strip():  # an empty body is the empty message, as in Connect's reference servers
            return message
        try:
            # Unknown fields are skipped, as the Connect implementations do, so older gateways accept newer apps.
            json_format.Parse(data.decode("utf-8"), message, ignore_unknown_fields=True)
        except (json_format.ParseError, UnicodeDecodeError, RecursionError) as exc:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"request: not a valid {cls.DESCRIPTOR.full_name} in JSON ({exc})") from None
        return message

    def encode(self, data: bytes, cls: type[Message]) -> bytes:
        message = cls.FromString(data)
        # Fields at their default value are written too: apps need not know proto3's defaults.
        as_dict = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
        return json.dumps(as_dict, separators=(",", ":")).encode()


PROTO = ProtoCodec()
JSON = JsonCodec()
