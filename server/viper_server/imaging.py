"""Decoding image bytes for the models: formats accepted, size limits, and RGB as IDEFICS2 sees it.

Used for uploads (rpc.validation: a bad one is the caller's INVALID_ARGUMENT) and for stored images
(engine: a bad one is the server's INTERNAL), so it raises its own ImageDecodeError and lets each
caller say whose fault it is.
"""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")


class ImageDecodeError(ValueError):
    """The bytes are not an acceptable image; the message says why."""


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decodes PNG / JPEG / WebP bytes to RGB (see to_rgb), refusing bombs and corrupt data."""
    if not data:
        raise ImageDecodeError("empty image")
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in ACCEPTED_FORMATS:
            raise ImageDecodeError(f"{image.format} images are not accepted (use PNG, JPEG or WebP)")
        width, height = image.size
        # The header's declared size, checked before any pixel is decoded.
        if width * height > max_pixels:
            raise ImageDecodeError(f"{width}x{height} image exceeds the limit of {max_pixels} pixels")
        image.load()
        return to_rgb(image)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own limit, hit by headers too large to even open
        raise ImageDecodeError(f"image exceeds the limit of {max_pixels} pixels ({exc})") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not a decodable PNG, JPEG or WebP image") from None
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's ways of saying truncated or corrupt
        raise ImageDecodeError(f"truncated or corrupt image ({exc})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the IDEFICS2 image processor makes it: transparent pixels composited onto white.

    The reference hands the processor images as decoded, and its RGB conversion composites onto white;
    a plain convert("RGB") would keep the colour stored under transparent pixels (often black).
    """
    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
