"""Personalized SDXL generation on tiny random-weight checkpoints: the production path against the
straightforward reference procedure, events, cancellation, loading."""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from viper_server.domain import FinishedImage, GenerationParams, Preview, Progress
from viper_server.models.generation import GenerationCancelled, PersonalizedGenerator, shuffled_features
from viper_server.models.preview import SDXL_LATENT_RGB_BIAS, latent_preview_png
from viper_server.models.sdxl import SdxlPipelines, load_sdxl
from viper_server.models.tiny_sdxl import build_tiny_sdxl
from viper_server.testing.reference_guidance import reference_generate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LIKED = ["soft pastel colors", "golden light", "dreamy mood", "watercolor texture", "airy brushwork"]
DISLIKED = ["dark shadows", "gloomy blue palette", "cluttered composition"]


def params(**overrides) -> GenerationParams:
    # 5 steps: 4 on the base, then 1 on the refiner (high_noise_frac 0.8).
    defaults = dict(prompt="a cat in the city", width=64, height=64, steps=5, seed=7)
    return GenerationParams(**{**defaults, **overrides})


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("tiny_sdxl")
    build_tiny_sdxl(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def pipelines(tiny_sdxl_dir) -> SdxlPipelines:
    loaded = load_sdxl(str(tiny_sdxl_dir / "sdxl-base"), str(tiny_sdxl_dir / "sdxl-refiner"))
    loaded.base.set_progress_bar_config(disable=True)
    loaded.refiner.set_progress_bar_config(disable=True)
    return loaded


@pytest.fixture(scope="session")
def generator(pipelines) -> PersonalizedGenerator:
    return PersonalizedGenerator(pipelines)


def generate(generator: PersonalizedGenerator, generation: GenerationParams, liked=LIKED, disliked=DISLIKED,
             **kwargs) -> list[object]:
    events: list[object] = []
    generator.generate(generation, liked, disliked, emit=events.append, **kwargs)
    return events


def finished_pngs(events: list[object]) -> list[bytes]:
    return [event.png for event in events if isinstance(event, FinishedImage)]


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png))).astype(np.int16)


@contextmanager
def recorded_calls(module: torch.nn.Module, record: Callable[[tuple], object]):
    """Calls record(positional args) before each forward of module."""

    def hook(_module, args) -> None:
        record(args)

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@pytest.fixture
def decoded_latents(pipelines, monkeypatch) -> list[torch.Tensor]:
    """The latents each VAE decode receives (base and refiner share the VAE), unscaled back."""
    vae = pipelines.base.vae
    decode = vae.decode
    latents: list[torch.Tensor] = []

    def recording_decode(z, *args, **kwargs):
        latents.append(z.clone() * vae.config.scaling_factor)
        return decode(z, *args, **kwargs)

    monkeypatch.setattr(vae, "decode", recording_decode)
    return latents


# -- tiny checkpoints and loading ---------------------------------------------------------------


def test_tiny_checkpoints_depend_only_on_the_seed(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        build_tiny_sdxl(tmp_path / name, seed=seed)
    weights = {
        name: (tmp_path / name / "sdxl-base" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
        for name in "abc"
    }
    assert weights["a"] == weights["b"]
    assert weights["a"] != weights["c"]


def test_refiner_shares_the_base_text_encoder_2_and_vae(pipelines):
    assert pipelines.refiner.text_encoder_2 is pipelines.base.text_encoder_2
    assert pipelines.refiner.vae is pipelines.base.vae
    assert pipelines.refiner.text_encoder is None
    assert pipelines.base.unet.dtype == torch.float32  # the default on CPU


def test_a_checkpoint_without_fp16_files_loads_in_fp16_from_the_full_weights(tiny_sdxl_dir):
    loaded = load_sdxl(str(tiny_sdxl_dir / "sdxl-base"), None, dtype=torch.float16)
    assert loaded.base.unet.dtype == torch.float16
    assert loaded.refiner is None


def test_missing_checkpoint_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="not available locally"):
        load_sdxl("viper-tests/no-such-sdxl", None)


# -- the production path equals the reference procedure ----------------------------------------


@pytest.mark.parametrize("refine", [True, False])
def test_production_matches_the_reference_procedure(pipelines, generator, decoded_latents, refine):
    generation = params(num_images=2, refine=refine)
    production = finished_pngs(generate(generator, generation))
    production_latents = list(decoded_latents)
    decoded_latents.clear()
    reference = reference_generate(pipelines, generation, LIKED, DISLIKED)

    assert len(production) == len(reference) == len(decoded_latents) == 2
    for ours, theirs in zip(production_latents, decoded_latents):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    for ours, theirs in zip(production, reference):
        assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1
    assert production[0] != production[1]  # own seed and feature order per image


def test_both_guidance_evaluations_run_as_one_batch_of_four(pipelines, generator):
    batch_sizes = []
    with recorded_calls(pipelines.base.unet, lambda args: batch_sizes.append(args[0].shape[0])):
        generate(generator, params())
    assert batch_sizes == [4] * 4  # one call per base step


def test_preferences_steer_the_image(generator):
    liked_first = finished_pngs(generate(generator, params()))
    swapped = finished_pngs(generate(generator, params(), liked=DISLIKED, disliked=LIKED))
    assert liked_first != swapped


# -- determinism and seeds ----------------------------------------------------------------------


def test_same_params_give_byte_identical_pngs(generator):
    generation = params(num_images=2)
    assert finished_pngs(generate(generator, generation)) == finished_pngs(generate(generator, generation))


def test_feature_order_is_shuffled_by_seed():
    features = [f"feature {i}" for i in range(8)]
    orders = {seed: shuffled_features(features, random.Random(seed)) for seed in range(5)}
    assert orders[3] == shuffled_features(features, random.Random(3))
    assert len(set(orders.values())) == 5
    assert all(sorted(order.split(", ")) == features for order in orders.values())


def test_each_image_reports_a_seed_that_reproduces_it(generator):
    events = generate(generator, params(num_images=2, seed=7))
    second = [event for event in events if isinstance(event, FinishedImage)][1]
    assert second.seed == 8
    assert finished_pngs(generate(generator, params(seed=8))) == [second.png]


# -- events -------------------------------------------------------------------------------------


def test_events_report_every_step_previews_and_images_in_order(generator):
    events = generate(generator, params(num_images=2, preview_every=2))

    expected = []
    for image in range(2):
        expected.append(("progress", image, 0))
        for step in range(1, 6):
            expected.append(("progress", image, step))
            if step % 2 == 0:
                expected.append(("preview", image, step))
        expected.append(("image", image, None))
    kinds = {Progress: "progress", Preview: "preview", FinishedImage: "image"}
    assert [(kinds[type(e)], e.image_index, getattr(e, "step", None)) for e in events] == expected
    assert {e.total_steps for e in events if isinstance(e, Progress)} == {5}
    previews = [e for e in events if isinstance(e, Preview)]
    assert all(Image.open(io.BytesIO(p.png)).size == (8, 8) for p in previews)  # latent resolution
    images = [e for e in events if isinstance(e, FinishedImage)]
    assert [(e.width, e.height) for e in images] == [(64, 64), (64, 64)]
    assert all(Image.open(io.BytesIO(e.png)).size == (64, 64) for e in images)


def test_preview_maps_latents_linearly_to_rgb():
    # Zero latents show the bias colour; a latent channel adds its RGB row.
    zero = pixels(latent_preview_png(torch.zeros(4, 2, 3)))
    assert zero.shape == (2, 3, 3)
    assert (zero == np.round((SDXL_LATENT_RGB_BIAS.numpy() + 1) * 127.5)).all()
    bright = torch.zeros(4, 2, 3)
    bright[0] = 1.0  # the first channel raises all of R, G and B
    assert (pixels(latent_preview_png(bright)) > zero).all()


# -- cancellation -------------------------------------------------------------------------------


@pytest.mark.parametrize("stop_at_step", [2, 9])  # 10 steps: 8 base then 2 refiner
def test_cancel_stops_within_a_unet_step_without_decoding(pipelines, generator, stop_at_step):
    generation = params(steps=10, num_images=2)
    uncancelled = finished_pngs(generate(generator, generation))
    stop = False
    unet_calls_after_stop = []
    vae_decodes = []

    def emit(event):
        nonlocal stop
        stop = stop or (isinstance(event, Progress) and event.step == stop_at_step)

    def record_unet_call(_args):
        if stop:
            unet_calls_after_stop.append(1)

    with (
        recorded_calls(pipelines.base.unet, record_unet_call),
        recorded_calls(pipelines.refiner.unet, record_unet_call),
        recorded_calls(pipelines.base.vae.decoder, vae_decodes.append),
        pytest.raises(GenerationCancelled),
    ):
        generator.generate(generation, LIKED, DISLIKED, emit=emit, should_stop=lambda: stop)
    assert stop
    assert len(unet_calls_after_stop) <= 1
    assert vae_decodes == []

    # The pipelines are reusable: the next request runs as if nothing had been cancelled.
    assert finished_pngs(generate(generator, generation)) == uncancelled


def test_cancel_before_an_image_starts_runs_nothing(pipelines, generator):
    unet_calls = []
    with recorded_calls(pipelines.base.unet, unet_calls.append), pytest.raises(GenerationCancelled):
        generator.generate(params(), LIKED, DISLIKED, emit=lambda event: None, should_stop=lambda: True)
    assert unet_calls == []


# -- requests -----------------------------------------------------------------------------------


def test_prompt_token_count_includes_start_and_end_tokens(generator):
    assert generator.max_prompt_tokens == 77
    assert generator.prompt_token_count("") == 2
    assert generator.prompt_token_count("cat " * 80) == 82
    assert generator.prompt_token_count("cat " * 80) > generator.max_prompt_tokens


def test_refining_needs_a_refiner(pipelines):
    base_only = PersonalizedGenerator(SdxlPipelines(base=pipelines.base, refiner=None))
    with pytest.raises(ValueError, match="refiner"):
        base_only.generate(params(refine=True), LIKED, DISLIKED, emit=lambda event: None)
    assert finished_pngs(generate(base_only, params(refine=False)))
