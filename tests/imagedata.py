"""Image bytes for tests: valid ones and hostile ones."""

import io
import random
import struct
import zlib

from PIL import Image


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png(image: Image.Image) -> bytes:
    return encode(image)


def png_bytes(size: tuple[int, int] = (16, 16), color=(10, 120, 200)) -> bytes:
    return encode(Image.new("RGB", size, color))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int) -> bytes:
    """A small, well-formed PNG whose header declares width x height: a decompression bomb's shape."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _chunk(b"IEND", b""))


def noise_png(side: int, seed: int = 0) -> bytes:
    """Random pixels: PNG cannot compress them, so the size in bytes is predictable (about 3 per pixel)."""
    return encode(Image.frombytes("RGB", (side, side), random.Random(seed).randbytes(side * side * 3)))


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) declares width x height."""
    data = bytearray(encode(Image.new("RGB", (8, 8)), "JPEG"))
    frame = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    data[frame + 5 : frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def corrupt_png() -> bytes:
    data = bytearray(png_bytes((64, 64)))
    data[data.index(b"IDAT") + 8] ^= 0xFF  # a byte inside the compressed pixel data
    return bytes(data)
