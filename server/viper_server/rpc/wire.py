"""A look at a request's raw bytes before they are parsed: how many top-level fields it has.

Parsing is what makes a small message expensive: 16 MB of empty repeated entries become half a gigabyte of
objects. Counting the top-level fields walks each one's tag and length and skips its body, so it costs one
step per field, whatever their size, and it stops as soon as the count passes its cap.
"""

from __future__ import annotations

_MAX_VARINT_BYTES = 10


def more_fields_than(data: bytes, cap: int) -> bool:
    """True when the protobuf message `data` has more than `cap` top-level fields (walking at most cap + 1 of
    them). Bytes that are no valid message say False: the parser refuses them with its own message."""
    position, count, end = 0, 0, len(data)
    try:
        while position < end:
            count += 1
            if count > cap:
                return True
            tag, position = _varint(data, position)
            wire_type = tag & 7
            if wire_type == 0:
                _, position = _varint(data, position)
            elif wire_type == 1:
                position += 8
            elif wire_type == 2:
                length, position = _varint(data, position)
                position += length
            elif wire_type == 5:
                position += 4
            else:  # groups (unused by proto3) and invalid types
                return False
    except IndexError:  # truncated
        return False
    return False


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 7 * _MAX_VARINT_BYTES, 7):
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
    raise IndexError("varint too long")
