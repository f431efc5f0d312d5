"""Turning the image inputs callers have (paths, bytes, PIL images) into bytes, and back."""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

ImageSource = str | os.PathLike[str] | bytes | Image.Image

# Modes the PNG encoder writes as they are; others (CMYK, YCbCr, float...) are converted first.
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}


def encode_image(image: ImageSource) -> bytes:
    """File and byte inputs are sent unchanged (the server's sha256 then matches the file's); PIL images as PNG."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, Image.Image):
        if image.mode not in _PNG_MODES:
            image = image.convert("RGBA" if "A" in image.mode else "RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    raise TypeError(f"expected a path, bytes or PIL image, got {type(image).__name__}")


def decode_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()  # Decode now: the buffer is not kept.
    return image
