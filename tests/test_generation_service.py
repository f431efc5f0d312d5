"""GenerationService end to end: a real server on loopback, toy SDXL, driven through the SDK."""

from __future__ import annotations

import io
import re
import time

import pytest
from PIL import Image

from viper_client import InvalidArgument, NotFound, ViperClient
from viper_client.types import GeneratedImage, Preview, Progress
from viper_server.testing import ServerProcess

from fixture_data import fixture_images

SIZE = 64


@pytest.fixture(scope="module")
def server(toy_models_dir, tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("db") / "profiles.db", toy_models_dir, models="toy") as process:
        with ViperClient(process.target) as client:
            client.extract_profile("painter", fixture_images())
        yield process


@pytest.fixture
def client(server):
    with ViperClient(server.target) as client:
        yield client


def test_streams_progress_previews_then_images_and_repeats_exactly(client):
    request = dict(num_images=2, width=SIZE, height=SIZE + 16, steps=10, seed=1234, preview_every=3)
    events = list(client.generate("painter", "a castle by the sea", **request))

    images = [event for event in events if isinstance(event, GeneratedImage)]
    assert [image.image_index for image in images] == [0, 1]
    for index, image in enumerate(images):
        mine = [event for event in events if event.image_index == index]
        progress = [event.step for event in mine if isinstance(event, Progress)]
        total = mine[0].total_steps
        assert progress == list(range(total + 1)), "progress before the first step and after every step"
        assert total >= 10  # base + refiner steps
        previews = [event.step for event in mine if isinstance(event, Preview)]
        assert previews == [step for step in range(1, total + 1) if step % 3 == 0]
        assert mine[-1] is image, "the image closes its own events"
        decoded = Image.open(io.BytesIO(image.png))
        assert decoded.format == "PNG" and decoded.size == (SIZE, SIZE + 16)
        assert (image.width, image.height) == (SIZE, SIZE + 16)
        assert image.profile_version == 1
    assert [image.seed for image in images] == [1234, 1235]
    assert isinstance(events[0], Progress) and events[0].step == 0

    again = [event.png for event in client.generate("painter", "a castle by the sea", **request)
             if isinstance(event, GeneratedImage)]
    assert again == [image.png for image in images]


def test_seed_zero_picks_a_seed_and_reports_it(client):
    first = client.generate_images  # the helper returns just the PIL images
    images = first("painter", "a cat", width=SIZE, height=SIZE, steps=2)
    assert len(images) == 1 and images[0].size == (SIZE, SIZE)
    seeds = {event.seed for event in client.generate("painter", "a cat", width=SIZE, height=SIZE, steps=2)
             if isinstance(event, GeneratedImage)}
    assert seeds and 0 not in seeds


def test_cancelling_mid_stream_stops_the_unet_and_frees_the_worker(server, client):
    stream = client.generate("painter", "a long one", width=SIZE, height=SIZE, steps=150, seed=5)
    seen = 0
    for event in stream:
        if isinstance(event, Progress) and event.step >= 5:
            seen = event.step
            break
    stream.close()  # cancels the RPC
    line = server.wait_for_log(r"generation cancelled after \d+ denoising steps", timeout=30)
    steps_done = int(re.search(r"after (\d+) denoising", line).group(1))
    # It stopped right after the cancel reached it, nowhere near the 150+ steps asked for.
    assert seen <= steps_done < seen + 20

    started = time.monotonic()
    next_events = client.generate("painter", "next", width=SIZE, height=SIZE, steps=2, seed=1)
    assert isinstance(next(next_events), Progress)
    assert time.monotonic() - started < 10, "the next request starts at once"
    assert any(isinstance(event, GeneratedImage) for event in next_events)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(prompt=""), "prompt: must not be empty"),
        (dict(prompt="word " * 100), r"prompt: \d+ tokens, the text encoders take at most 77"),
        (dict(negative_prompt="word " * 100), r"negative_prompt: \d+ tokens"),
        (dict(num_images=9), r"num_images: 9 is out of range \[1, 8\]"),
        (dict(width=60), "width: 60 is out of range"),
        (dict(height=100), "height: 100 is not a multiple of 8"),
        (dict(width=4096), "width: 4096 is out of range"),
        (dict(steps=1000), "steps: 1000 is out of range"),
        (dict(guidance_scale=1.0), "guidance_scale"),
        (dict(preference_strength=-1.0), "preference_strength"),
        (dict(preview_every=-1), "preview_every"),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(client, options, message):
    request = dict(prompt="a cat", width=SIZE, height=SIZE, steps=2) | options
    with pytest.raises(InvalidArgument, match=message):
        list(client.generate("painter", request.pop("prompt"), **request))


def test_unknown_user_is_not_found(client):
    with pytest.raises(NotFound, match="nobody"):
        list(client.generate("nobody", "a cat", width=SIZE, height=SIZE, steps=2))
