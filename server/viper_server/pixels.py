"""IDEFICS2's image processor without torch: an image -> the pixel values the vision encoder takes.

Exactly what transformers' Idefics2ImageProcessorPil makes with ViPer's settings (no splitting; a test holds
the arrays bit for bit equal): RGB with transparency on white (imaging.to_rgb), resized to the model's size
(imaging.model_size, bilinear), rescaled by 1/255 in float64, then normalized in float32. Padding a prompt's
images to the largest of them (pixel_batch) is the processor's too. The preprocessing workers import only
this, imaging, PIL and numpy: no torch, so they start in a fraction of a second and stay small.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .imaging import ImageDecodeError, decode_image, model_size, to_rgb

RESCALE_FACTOR = 1 / 255
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
# Names everything that shapes the values from the bytes: part of the processed-input cache's key.
SETTINGS_KEY = "idefics2-pil/448-378/bilinear/1:255/mean0.5/std0.5/v1"

__all__ = ["ImageDecodeError", "ProcessedImage", "SETTINGS_KEY", "check_processor", "pixel_batch", "process_bytes",
           "process_rgb", "processed"]


@dataclass(frozen=True, eq=False)
class ProcessedImage:
    """One image as the vision encoder takes it: float32 [3, H, W], H and W the model's size for it."""

    values: np.ndarray = field(repr=False)
    # The sha256 of the bytes it came from (stored images and uploads); None for pixels of no stored bytes.
    sha256: str | None = None

    @property
    def nbytes(self) -> int:
        return self.values.nbytes


def normalize(image: Image.Image) -> np.ndarray:
    """An RGB image at the model's size -> float32 [3, H, W], with the processor's arithmetic."""
    channels_first = np.moveaxis(np.asarray(image), -1, 0)
    rescaled = (channels_first.astype(np.float64) * RESCALE_FACTOR).astype(np.float32)
    mean, std = np.array(IMAGE_MEAN, dtype=np.float32), np.array(IMAGE_STD, dtype=np.float32)
    return np.ascontiguousarray(((rescaled.T - mean) / std).T)


def process_rgb(image: Image.Image) -> np.ndarray:
    """A decoded image (any size, any mode) -> its pixel values: RGB on white, the model's size, normalized."""
    # The processor's rule for what has transparency (imaging.decode_image's images are RGB already).
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = to_rgb(image)
    else:
        image = image.convert("RGB")
    size = model_size(*image.size)
    if image.size != size:
        image = image.resize(size, resample=Image.Resampling.BILINEAR)
    return normalize(image)


def process_bytes(data: bytes, *, max_pixels: int) -> np.ndarray:
    """PNG / JPEG / WebP bytes -> pixel values (ImageDecodeError for bytes that are no acceptable image)."""
    return process_rgb(decode_image(data, max_pixels=max_pixels))


def processed(image: Image.Image | ProcessedImage) -> ProcessedImage:
    """A decoded PIL image processed here (in this thread); a processed one as it is."""
    if isinstance(image, ProcessedImage):
        return image
    return ProcessedImage(process_rgb(image))


def pixel_batch(images: Sequence[ProcessedImage]) -> tuple[np.ndarray, np.ndarray]:
    """One prompt's images as the processor gives them: pixel values [1, n, 3, H, W] (float32) zero-padded at the
    bottom and right to the largest, and the attention mask [1, n, H, W] (int64, 1 on each image's pixels)."""
    height = max(image.values.shape[1] for image in images)
    width = max(image.values.shape[2] for image in images)
    values = np.zeros((1, len(images), 3, height, width), dtype=np.float32)
    mask = np.zeros((1, len(images), height, width), dtype=np.int64)
    for index, image in enumerate(images):
        _, h, w = image.values.shape
        values[0, index, :, :h, :w] = image.values
        mask[0, index, :h, :w] = 1
    return values, mask


def check_processor(image_processor) -> None:
    """ValueError unless a loaded IDEFICS2 image processor has the settings this module reproduces."""
    expected = dict(do_image_splitting=False, do_resize=True, do_rescale=True, do_normalize=True, do_pad=True,
                    rescale_factor=RESCALE_FACTOR, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD),
                    longest_edge=448, shortest_edge=378, resample=int(Image.Resampling.BILINEAR))
    size = image_processor.size
    found = dict(do_image_splitting=bool(image_processor.do_image_splitting), do_resize=image_processor.do_resize,
                 do_rescale=image_processor.do_rescale, do_normalize=image_processor.do_normalize,
                 do_pad=image_processor.do_pad, rescale_factor=image_processor.rescale_factor,
                 image_mean=list(image_processor.image_mean), image_std=list(image_processor.image_std),
                 longest_edge=size["longest_edge"], shortest_edge=size["shortest_edge"],
                 resample=int(image_processor.resample))
    if differing := {key: found[key] for key in expected if found[key] != expected[key]}:
        raise ValueError(f"the IDEFICS2 image processor's settings {differing} differ from those the preprocessing "
                         f"reproduces ({ {key: expected[key] for key in differing} })")
