"""IDEFICS2's image features (vision encoder + connector) image by image, and their cache.

The features of an image depend on the image alone, never on the text around it, so they are computed for each
image on its own (its pixels cropped to its own size: what the processor padded it with for the other images of a
call is gone) and cached under the image's sha256 with everything else they depend on: the model and its
revision, the adapter (the ViPer LoRAs touch the connector) and the dtype. A cached and a computed feature are
then the same tensor, whoever computed it and beside which images. The cache is used on the scheduler thread.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .idefics2 import Idefics2Base
from .prefix_cache import ByteLRU

# (image sha256, model revision, adapter, dtype)
VisionKey = tuple[str, str, str, str]


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class VisionCache(ByteLRU[VisionKey, torch.Tensor]):
    """Image features ([latents, hidden] per image, on the model's device), LRU within capacity_bytes."""

    def __init__(self, capacity_bytes: int):
        super().__init__(capacity_bytes, tensor_bytes)


class VisionEncoder:
    """Image features of one IDEFICS2 base, computed image by image or taken from the cache (None: no cache)."""

    def __init__(self, idefics2: Idefics2Base, cache: VisionCache | None = None):
        self.idefics2 = idefics2
        self.cache = cache

    def key(self, adapter: str, sha256: str | None) -> VisionKey | None:
        if self.cache is None or sha256 is None:
            return None
        return (sha256, self.idefics2.revision, adapter, str(self.idefics2.dtype).removeprefix("torch."))

    def has(self, adapter: str, sha256: str | None) -> bool:
        """Whether the image's features are cached now (counts no hit or miss)."""
        key = self.key(adapter, sha256)
        return key is not None and key in self.cache

    def cached(self, adapter: str, sha256: str | None) -> torch.Tensor | None:
        """The image's cached features (a hit), or None (a miss; also without a key or a cache)."""
        key = self.key(adapter, sha256)
        return None if key is None else self.cache.get(key)

    def features(self, model, adapter: str, pixel_values: torch.Tensor, pixel_masks: torch.Tensor,
                 keys: Sequence[str | None], budget: int) -> tuple[list[torch.Tensor], int]:
        """The features of the leading images (pixel_values [images, 3, H, W], masks [images, H, W], with
        `adapter` active in `model`), and how many were computed: every cached one taken, at most `budget`
        computed (and cached); stops before the first image that would be computed beyond the budget."""
        found: list[torch.Tensor] = []
        computed = 0
        for pixels, mask, sha256 in zip(pixel_values, pixel_masks, keys):
            key = self.key(adapter, sha256)
            if computed >= budget and (key is None or key not in self.cache):
                break
            feature = self.cache.get(key) if key is not None else None
            if feature is None:
                feature = self.compute(model, pixels, mask)
                computed += 1
                if key is not None:
                    self.cache.put(key, feature)
            found.append(feature)
        return found, computed

    @torch.inference_mode()
    def compute(self, model, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One image's features [latents, hidden], from its pixels [3, H, W] cropped to its mask [H, W] (the
        processor pads at the bottom and right)."""
        height = int(mask.any(dim=1).sum())
        width = int(mask.any(dim=0).sum())
        device, dtype = self.idefics2.device, self.idefics2.dtype
        inner = model.get_base_model()
        return inner.model.get_image_features(
            pixels[None, None, :, :height, :width].to(device=device, dtype=dtype),
            mask[None, None, :height, :width].to(device=device),
            return_dict=True,
        ).pooler_output[0]
