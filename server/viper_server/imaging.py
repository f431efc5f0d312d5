"""Decoding image bytes for the models: formats accepted, size limits, and RGB as IDEFICS2 sees it.

Used for uploads (rpc.validation: a bad one is the caller's INVALID_ARGUMENT) and for stored images
(engine: a bad one is the server's INTERNAL), so it raises its own ImageDecodeError and lets each
caller say whose fault it is.

Decoding is bounded: headers are read (read_header) before any pixel is decoded, a process-wide number
of decodes run at once (limit_concurrent_decodes), and each image is shrunk to the size IDEFICS2's
processor gives it as soon as it is decoded, so no full-size frame outlives its own decode. The shrink is
the processor's own resize (same size, same filter, same input), so the models see the same pixels.
"""

from __future__ import annotations

import io
import struct
import threading

from PIL import Image, UnidentifiedImageError

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
# IDEFICS2's image processor as every preset sets it (models.idefics2.VIPER_PROCESSOR_SETTINGS, without image
# splitting; a test holds them equal). With splitting on, the processor would cut the full-size image first.
MODEL_LONGEST_EDGE = 448
MODEL_SHORTEST_EDGE = 378
# JPEGs are decoded at a reduced DCT scale (Image.draft) down to this many times the model's size: only images
# at least twice as large as that are affected, and they still reach the final resize well above its size.
JPEG_DRAFT_MARGIN = 2
# Rows converted at a time to RGB: a transparent frame is composited in strips, not in whole-frame copies.
_RGB_STRIP_ROWS = 256
DEFAULT_CONCURRENT_DECODES = 2


class ImageDecodeError(ValueError):
    """The bytes are not an acceptable image; the message says why."""


_decode_slots = threading.BoundedSemaphore(DEFAULT_CONCURRENT_DECODES)


def limit_concurrent_decodes(count: int) -> None:
    """Sets how many images this process decodes at once (the server's --max-concurrent-decodes)."""
    global _decode_slots
    if count < 1:
        raise ValueError(f"at least one decode must be allowed, not {count}")
    _decode_slots = threading.BoundedSemaphore(count)


def read_header(data: bytes, *, max_pixels: int) -> Image.Image:
    """Opens the image without decoding its pixels: format and declared size checked."""
    if not data:
        raise ImageDecodeError("empty image")
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise ImageDecodeError(_unaccepted(data)) from None
    except Image.DecompressionBombError as exc:  # PIL's own limit, hit by headers too large to even open
        raise ImageDecodeError(f"image exceeds the limit of {max_pixels} pixels ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"truncated or corrupt image ({exc})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError(f"{width}x{height} image exceeds the limit of {max_pixels} pixels")
    return image


def _unaccepted(data: bytes) -> str:
    """Names a format PIL knows but we refuse (GIF, ...), else says the bytes are no image."""
    try:
        other = Image.open(io.BytesIO(data)).format
    except Exception:  # anything PIL cannot identify
        other = None
    if other is not None:
        return f"{other} images are not accepted (use PNG, JPEG or WebP)"
    return "not a decodable PNG, JPEG or WebP image"


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decodes PNG / JPEG / WebP bytes to RGB (see to_rgb) at the size the models use (model_size),
    refusing bombs and corrupt data."""
    image = read_header(data, max_pixels=max_pixels)
    with _decode_slots:
        try:
            target = model_size(*image.size)
            if image.format == "JPEG":
                image.draft(image.mode, (target[0] * JPEG_DRAFT_MARGIN, target[1] * JPEG_DRAFT_MARGIN))
            image.load()
            return shrink(to_rgb(image))
        except Image.DecompressionBombError as exc:
            raise ImageDecodeError(f"image exceeds the limit of {max_pixels} pixels ({exc})") from None
        except (OSError, SyntaxError, ValueError) as exc:  # PIL's ways of saying truncated or corrupt
            raise ImageDecodeError(f"truncated or corrupt image ({exc})") from None


def model_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) IDEFICS2's processor resizes an image of this size to (its get_resize_output_image_size):
    the longest edge down to 448, then each edge up to at least 378."""
    aspect_ratio = width / height
    if width >= height and width > MODEL_LONGEST_EDGE:
        width, height = MODEL_LONGEST_EDGE, int(MODEL_LONGEST_EDGE / aspect_ratio)
    elif height > width and height > MODEL_LONGEST_EDGE:
        width, height = int(MODEL_LONGEST_EDGE * aspect_ratio), MODEL_LONGEST_EDGE
    return max(width, MODEL_SHORTEST_EDGE), max(height, MODEL_SHORTEST_EDGE)


def shrink(image: Image.Image) -> Image.Image:
    """An RGB image larger than the model's size, resized to it exactly as the processor would (bilinear from
    the same pixels: the processor then finds it at its size and keeps it); smaller ones unchanged."""
    if max(image.size) <= MODEL_LONGEST_EDGE:
        return image
    return image.resize(model_size(*image.size), resample=Image.Resampling.BILINEAR)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the IDEFICS2 image processor makes it: transparent pixels composited onto white.

    The reference hands the processor images as decoded, and its RGB conversion composites onto white;
    a plain convert("RGB") would keep the colour stored under transparent pixels (often black). Done in
    strips of rows (the result is per pixel, so the same), so a large frame is never copied whole as RGBA.
    """
    if image.mode == "RGB":
        return image
    width, height = image.size
    rgb = Image.new("RGB", image.size)
    white = Image.new("RGBA", (width, min(_RGB_STRIP_ROWS, height)), (255, 255, 255, 255))
    for top in range(0, height, _RGB_STRIP_ROWS):
        strip = image.crop((0, top, width, min(top + _RGB_STRIP_ROWS, height))).convert("RGBA")
        backdrop = white if strip.size == white.size else white.crop((0, 0, *strip.size))
        rgb.paste(Image.alpha_composite(backdrop, strip).convert("RGB"), (0, top))
    return rgb


# -- metadata -------------------------------------------------------------------------------------------------

# JPEG segments dropped: APP1 (EXIF, with GPS; XMP), APP13 (IPTC / Photoshop) and comments. Kept: APP0 (JFIF),
# APP2 (ICC colour profile), APP14 (Adobe: how to read the colours), the tables and frames.
_JPEG_DROPPED = {0xE1, 0xED, 0xFE}
_PNG_DROPPED = {b"eXIf", b"tEXt", b"zTXt", b"iTXt", b"tIME"}
_WEBP_DROPPED = {b"EXIF", b"XMP "}
_WEBP_METADATA_FLAGS = 0x08 | 0x04  # VP8X: EXIF and XMP present


def strip_metadata(data: bytes) -> bytes:
    """The image without its metadata (EXIF with GPS position and camera, XMP, IPTC, text, comments), rewritten
    at the container level: the compressed pixels are the same bytes, so the decoded pixels are too. Bytes of
    no known layout come back as they are (decoding refuses them)."""
    try:
        if data.startswith(b"\xff\xd8"):
            return _strip_jpeg(data)
        if data.startswith(b"\x89PNG\r\n\x1a\n"):
            return _strip_png(data)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _strip_webp(data)
    except (IndexError, struct.error):  # truncated: left for decoding to refuse
        pass
    return data


def _strip_jpeg(data: bytes) -> bytes:
    kept, position = [data[:2]], 2
    while position < len(data):
        if data[position] != 0xFF:
            raise IndexError("not a marker")
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0xDA or 0xD0 <= marker <= 0xD9 or marker == 0x01:  # scan data (the rest) or no length
            kept.append(data[position:])
            break
        end = position + 2 + struct.unpack(">H", data[position + 2 : position + 4])[0]
        if marker not in _JPEG_DROPPED:
            kept.append(data[position:end])
        position = end
    return b"".join(kept)


def _strip_png(data: bytes) -> bytes:
    kept, position = [data[:8]], 8
    while position < len(data):
        length = struct.unpack(">I", data[position : position + 4])[0]
        end = position + 12 + length
        if data[position + 4 : position + 8] not in _PNG_DROPPED:
            kept.append(data[position:end])
        position = end
    return b"".join(kept)


def _strip_webp(data: bytes) -> bytes:
    kept, position = [], 12
    while position + 8 <= len(data):
        fourcc = data[position : position + 4]
        size = struct.unpack("<I", data[position + 4 : position + 8])[0]
        end = position + 8 + size + (size & 1)
        chunk = data[position:end]
        if fourcc == b"VP8X":
            chunk = chunk[:8] + bytes([chunk[8] & ~_WEBP_METADATA_FLAGS & 0xFF]) + chunk[9:]
        if fourcc not in _WEBP_DROPPED:
            kept.append(chunk)
        position = end
    body = b"WEBP" + b"".join(kept)
    return b"RIFF" + struct.pack("<I", len(body)) + body
