"""The full-random preset: the real architectures at full size with random weights, for benchmarks on a GPU
host. Here only what a CPU can check: the full-size configurations have the real models' parameter counts
(built on the meta device: no memory), and a shrunken copy builds and runs through the same code and the
same loading path as `--models full-random`."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, Idefics2ForConditionalGeneration

from viper_server.config import ServerConfig, check_config
from viper_server.domain import FinishedImage, GenerationParams, ScoringContext
from viper_server.engine.loading import LoadSettings, load_models
from viper_server.engine.presets import PRESET_NAMES, model_preset
from viper_server.models.full_random import FULL, build_full_random, build_idefics2_processor, idefics2_config, shrunken

FIXTURES = Path(__file__).parent / "fixtures" / "viper_examples"


def parameters(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def test_the_full_size_configurations_are_the_real_models():
    with torch.device("meta"):
        counts = {
            "idefics2": parameters(Idefics2ForConditionalGeneration._from_config(
                idefics2_config(FULL, build_idefics2_processor()))),
            "base unet": parameters(UNet2DConditionModel(**FULL.base_unet)),
            "refiner unet": parameters(UNet2DConditionModel(**FULL.refiner_unet)),
            "vae": parameters(AutoencoderKL(**FULL.vae)),
            "text encoder": parameters(CLIPTextModel(CLIPTextConfig(**FULL.text_encoder))),
            "text encoder 2": parameters(CLIPTextModelWithProjection(CLIPTextConfig(**FULL.text_encoder_2))),
        }
    # The published models' parameter counts.
    assert counts == {
        "idefics2": 8_402_768_112,
        "base unet": 2_567_463_684,
        "refiner unet": 2_259_526_660,
        "vae": 83_653_863,
        "text encoder": 123_060_480,
        "text encoder 2": 694_659_840,
    }


def test_full_random_is_a_preset_and_a_setting(tmp_path):
    assert "full-random" in PRESET_NAMES
    check_config(ServerConfig(models="full-random"))
    preset = model_preset("full-random", None, tmp_path)
    assert preset.in_memory is not None and preset.build is None
    assert (preset.default_image_size, preset.vpe_max_new_tokens) == (1024, 2000)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """The shrunken architecture through the loading path of --models full-random."""
    preset = replace(
        model_preset("full-random", None, tmp_path_factory.mktemp("root")),
        in_memory=lambda device, dtype: build_full_random(device, dtype, architecture=shrunken()),
    )
    return load_models(preset, LoadSettings(device="cpu", vpe_max_new_tokens=6))


def test_a_shrunken_copy_builds_and_runs_through_the_same_code(loaded):
    images = [Image.open(FIXTURES / f"liked/{n}.png").convert("RGB") for n in range(2)]
    preferences = loaded.extractor.extract(images, ["soft pinks", "too dark"])
    assert preferences.raw_text is not None
    assert loaded.idefics2_dtype == torch.float32 and {"vpe", "metric"} <= set(loaded.extractor.idefics2.adapter_names)

    scores = loaded.scorer.score(ScoringContext(liked=images[:1], disliked=images[1:]), images)
    assert len(scores) == 2 and all(0 <= score <= 1 for score in scores)

    events = []
    loaded.generator.generate(GenerationParams(prompt="a cat", width=64, height=64, steps=3, seed=1), ["pastel"],
                              ["dark"], emit=events.append)
    image = Image.open(io.BytesIO(next(event for event in events if isinstance(event, FinishedImage)).png))
    assert image.size == (64, 64)


def test_the_shrunken_copy_keeps_every_kind_of_block():
    small = shrunken()
    for name in ("down_block_types", "up_block_types", "addition_embed_type", "use_linear_projection"):
        assert small.base_unet[name] == FULL.base_unet[name]
        assert small.refiner_unet[name] == FULL.refiner_unet[name]
    assert small.idefics2["text_config"]["sliding_window"] == FULL.idefics2["text_config"]["sliding_window"]
    assert small.idefics2["perceiver_config"]["resampler_n_latents"] == 64
    assert small.base_unet["cross_attention_dim"] == small.text_encoder["hidden_size"] + small.text_encoder_2[
        "hidden_size"]
