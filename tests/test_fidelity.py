"""What the models see matches the reference: transparency on white, the PIL image processor."""

from __future__ import annotations

import io

import numpy as np
import pytest
import transformers
from PIL import Image
from transformers import Idefics2ImageProcessorPil

from viper_server.imaging import decode_image
from viper_server.models.idefics2 import load_idefics2

from imagedata import png


def half_transparent(mode: str) -> Image.Image:
    """Red on the left half, and on the right a transparent half whose stored colour is black."""
    rgba = Image.new("RGBA", (40, 20), (200, 20, 20, 255))
    rgba.paste((0, 0, 0, 0), (20, 0, 40, 20))
    if mode == "RGBA":
        return rgba
    if mode == "LA":
        return rgba.convert("LA")
    # A palette image whose transparency is one palette entry.
    palette = rgba.convert("RGB").quantize(colors=4)
    black = palette.getpixel((30, 10))
    palette.info["transparency"] = black
    return palette


def on_white(image: Image.Image) -> np.ndarray:
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)
    alpha = rgba[..., 3:] / 255
    return np.round(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_reach_the_models_on_white(mode):
    original = half_transparent(mode)
    decoded = decode_image(png(original), max_pixels=10_000)
    pixels = np.asarray(decoded)
    assert decoded.mode == "RGB"
    assert (pixels[:, 30] == 255).all()  # the transparent half: white, not its stored black
    assert np.abs(pixels.astype(int) - on_white(Image.open(io.BytesIO(png(original))))).max() <= 1


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_the_processor_gets_the_pixels_of_the_image_composited_onto_white(mode):
    # The reference's processor (transformers 4.40) composited every non-RGB image onto white before resizing;
    # transformers 5's PIL processor still does for RGBA and LA, but drops a palette image's transparency.
    processor = Idefics2ImageProcessorPil(size={"longest_edge": 448, "shortest_edge": 378}, do_image_splitting=False)
    data = png(half_transparent(mode))
    composited = Image.fromarray(on_white(Image.open(io.BytesIO(data))))
    reference = processor(images=[[composited]], return_tensors="np")["pixel_values"]
    ours = processor(images=[[decode_image(data, max_pixels=10_000)]], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(ours, reference, atol=1e-2)
    # The colours stored under the transparency (black) would not.
    stored_colours = Image.fromarray(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    plain = processor(images=[[stored_colours]], return_tensors="np")["pixel_values"]
    assert np.abs(plain - reference).max() > 1


def adapters(models_dir):
    return {"vpe": str(models_dir / "vpe-lora"), "metric": str(models_dir / "metric-lora")}


def test_the_pil_image_processor_is_used(tiny_models_dir):
    idefics2 = load_idefics2(str(tiny_models_dir / "idefics2"), adapters(tiny_models_dir))
    assert type(idefics2.processor.image_processor) is Idefics2ImageProcessorPil


def test_the_pil_image_processor_is_used_where_torchvision_would_be_picked(tiny_models_dir, monkeypatch):
    # torchvision does not import here; stand in for the processor transformers picks when it does.
    class TorchvisionStandIn:
        pass

    load = transformers.AutoProcessor.from_pretrained

    def from_pretrained(*args, **kwargs):
        processor = load(*args, **kwargs)
        processor.image_processor = TorchvisionStandIn()
        return processor

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", from_pretrained)
    idefics2 = load_idefics2(str(tiny_models_dir / "idefics2"), adapters(tiny_models_dir))
    image_processor = idefics2.processor.image_processor
    assert type(image_processor) is Idefics2ImageProcessorPil
    assert (image_processor.size.longest_edge, image_processor.do_image_splitting) == (448, False)
