"""Cheap previews of SDXL latents mid-denoising: a linear latent-to-RGB map, no VAE decode."""

from __future__ import annotations

import io

import torch
from PIL import Image

# Linear fit of SDXL VAE decodes to its (scaled) latents, as ComfyUI's previews use:
# one RGB row per latent channel, plus a bias; the result is in [-1, 1].
SDXL_LATENT_RGB = torch.tensor(
    [
        [0.3651, 0.4232, 0.4341],
        [-0.2533, -0.0042, 0.1068],
        [0.1076, 0.1111, -0.0362],
        [-0.3165, -0.2492, -0.2188],
    ]
)
SDXL_LATENT_RGB_BIAS = torch.tensor([0.1084, -0.0175, -0.0011])


def latent_preview_png(latents: torch.Tensor) -> bytes:
    """PNG of one image's latents [4, h, w], at latent resolution (an eighth of the image side)."""
    rgb = torch.einsum("chw,cr->hwr", latents.detach().float().cpu(), SDXL_LATENT_RGB) + SDXL_LATENT_RGB_BIAS
    pixels = ((rgb + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)
    return png_bytes(Image.fromarray(pixels.numpy()))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
