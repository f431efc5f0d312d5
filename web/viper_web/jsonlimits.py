"""Bounded JSON: a request body is counted before it is parsed, so a hostile one costs little.

A body of 2 million `{}` would take the JSON parser about a second and hundreds of MB; the scan below
stops at the first cap it crosses (values, nesting depth, elements of one array), having touched only
that many tokens. The parsed document is then checked against the message's descriptor: a field given
twice (as `userId` and `user_id`, or the same key twice) is ambiguous, and strings of `string` fields are
capped. Everything here is plain CPU work, run off the event loop (see codecs.JsonCodec).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from .codes import RpcError

# A JSON string, a structural character, or a run of anything else (numbers, true/false/null, junk that
# json.loads refuses later). The string pattern is the unrolled loop: one character class per run, so a
# long base64 string is matched at C speed.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},:]|[^\s\[\]{},:"]+', re.DOTALL)
_OPEN, _CLOSE, _COMMA = frozenset(b"{["), frozenset(b"}]"), ord(",")
_ARRAY = ord("[")


@dataclass(frozen=True)
class JsonLimits:
    # Values of any kind in one request (strings, numbers, objects, arrays...; object keys count too).
    max_values: int = 100_000
    max_depth: int = 32
    # Elements of one array: far above any list the API takes (images, queries, features).
    max_array: int = 4096
    # Characters of one `string` field's value, or of one object key (bytes fields: only the message limit).
    max_string_chars: int = 65_536


def _refuse(what: str) -> RpcError:
    return RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"request JSON: {what}")


def check_counts(data: bytes, limits: JsonLimits) -> None:
    """Raises RESOURCE_EXHAUSTED at the first cap `data` crosses, before anything is parsed."""
    values = 0
    # Per open container: -1 for an object, else the commas seen so far in the array.
    stack: list[int] = []
    for match in _TOKEN.finditer(data):
        first = data[match.start()]
        if first == _COMMA:
            if stack and stack[-1] >= 0:
                stack[-1] += 1
                if stack[-1] >= limits.max_array:
                    raise _refuse(f"an array of more than {limits.max_array} elements")
            continue
        if first in _CLOSE:
            if stack:
                stack.pop()
            continue
        if first == 0x3A:  # ':'
            continue
        values += 1
        if values > limits.max_values:
            raise _refuse(f"more than {limits.max_values} values")
        if first in _OPEN:
            stack.append(0 if first == _ARRAY else -1)
            if len(stack) > limits.max_depth:
                raise _refuse(f"nested deeper than {limits.max_depth}")


class DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(f"the key {key[:64]!r} appears twice in one object")
            seen.add(key)
    return result


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def load(data: bytes, limits: JsonLimits) -> object:
    """The parsed document of a body that check_counts accepted. Raises ValueError (bad or ambiguous JSON)."""
    check_counts(data, limits)
    return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)


@functools.cache
def _fields(descriptor: Descriptor) -> dict[str, FieldDescriptor]:
    """Every name a field answers to in JSON: its proto name and its JSON (lowerCamel) name."""
    names = {}
    for field in descriptor.fields:
        names[field.name] = field
        names[field.json_name] = field
    return names


def check_fields(value: object, descriptor: Descriptor, limits: JsonLimits, path: str = "") -> None:
    """INVALID_ARGUMENT for a field given under two names; RESOURCE_EXHAUSTED for an over-long string."""
    if not isinstance(value, dict) or descriptor.full_name.startswith("google.protobuf."):
        return  # not an object (json_format says what is wrong), or a well-known type with its own JSON form
    given: dict[FieldDescriptor, str] = {}
    for key, item in value.items():
        if len(key) > limits.max_string_chars:
            raise _refuse(f"an object key of more than {limits.max_string_chars} characters")
        field = _fields(descriptor).get(key)
        if field is None:
            continue  # unknown fields are skipped
        if field in given:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"request JSON: {path}{field.name} is given twice (as {given[field]!r} and {key!r})")
        given[field] = key
        items = item if isinstance(item, list) else [item]
        if field.type == FieldDescriptor.TYPE_STRING:
            if any(isinstance(each, str) and len(each) > limits.max_string_chars for each in items):
                raise _refuse(f"{path}{field.name}: a string of more than {limits.max_string_chars} characters")
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            for each in items:
                check_fields(each, field.message_type, limits, f"{path}{field.name}.")
