"""Resource safety under hostile input (issue 25), measured: the server's resident memory sampled during the
call, not only the status code.

- 16 pixel bombs (PNGs of 5900 x 5900 at ~117 KB each) grow the server by at most 400 MB; a 12 MP phone
  photo is still accepted, within the same bound.
- A full queue refuses before any image is decoded; a request over the pixel budget before any is decoded.
- The shrink to the models' size gives the pixels IDEFICS2's processor would have made from the full image.
"""

from __future__ import annotations

import io
import random
import threading
import time

import grpc
import numpy as np
import pytest
from PIL import Image, ImageDraw
from transformers import Idefics2ImageProcessorPil

from viper_proto.v1 import metric_pb2, profile_pb2, profile_pb2_grpc
from viper_server import imaging
from viper_server.config import Limits
from viper_server.imaging import MODEL_LONGEST_EDGE, MODEL_SHORTEST_EDGE, decode_image, model_size, to_rgb
from viper_server.models.idefics2 import VIPER_PROCESSOR_SETTINGS
from viper_server.rpc.validation import InvalidRequest, check_score
from viper_server.testing import ServerProcess

from imagedata import corrupt_png, encode, png_bytes
from memory import MB, PeakMemory

BOMB_SIDE = 5900
BOMBS = 16
# The target: 16 bombs grew the server by 3,981 MB before bounded decoding.
MAX_GROWTH = 400 * MB
CALL_TIMEOUT = 300.0


def pixel_bomb() -> bytes:
    """A 5900 x 5900 PNG of ~117 KB: mostly one colour, which PNG compresses about a thousand times."""
    image = Image.new("RGB", (BOMB_SIDE, BOMB_SIDE), (200, 180, 150))
    draw = ImageDraw.Draw(image)
    for offset in range(0, BOMB_SIDE, 400):
        draw.rectangle((offset, offset, offset + 200, offset + 300), fill=(offset % 255, 40, 90))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=9)
    return buffer.getvalue()


def phone_photo() -> bytes:
    """A 12 MP (4000 x 3000) JPEG with photo-like detail: noise over gradients, a few MB."""
    rng = random.Random(7)
    small = Image.frombytes("RGB", (400, 300), rng.randbytes(400 * 300 * 3))
    image = small.resize((4000, 3000), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def extract_request(*images: bytes, user_id: str = "bombed") -> profile_pb2.ExtractProfileRequest:
    return profile_pb2.ExtractProfileRequest(user_id=user_id, images=[
        profile_pb2.RatedImage(data=data, comment="noted", rating=profile_pb2.RATING_LIKED if index % 2 else
                               profile_pb2.RATING_DISLIKED)
        for index, data in enumerate(images)
    ])


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return pixel_bomb()


@pytest.fixture(scope="module")
def server(tiny_models_dir, tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("db") / "profiles.db", tiny_models_dir) as process:
        with grpc.insecure_channel(process.target) as channel:
            stub = profile_pb2_grpc.ProfileServiceStub(channel)
            # Warm: the first extraction's one-off allocations are not the bombs' doing.
            stub.ExtractProfile(extract_request(png_bytes((64, 64)), png_bytes((64, 64)), user_id="warm"),
                                timeout=CALL_TIMEOUT)
        yield process


@pytest.fixture(scope="module")
def profiles(server):
    with grpc.insecure_channel(server.target) as channel:
        yield profile_pb2_grpc.ProfileServiceStub(channel)


def test_sixteen_pixel_bombs_grow_the_server_by_at_most_400_mb(server, profiles, bomb):
    request = extract_request(*[bomb] * BOMBS)
    assert request.ByteSize() < 2 * MB  # a small request: the danger is in the pixels
    with PeakMemory(server.pid) as memory:
        profile = profiles.ExtractProfile(request, timeout=CALL_TIMEOUT)
    assert profile.liked_image_count + profile.disliked_image_count == BOMBS
    assert memory.growth <= MAX_GROWTH, f"the server grew by {memory.growth / MB:.0f} MB"


def test_a_12_mp_phone_photo_is_accepted_within_the_same_bound(server, profiles):
    photo = phone_photo()
    with PeakMemory(server.pid) as memory:
        profile = profiles.ExtractProfile(extract_request(photo, photo, user_id="photographer"), timeout=CALL_TIMEOUT)
    assert profile.liked_image_count == 1 and profile.disliked_image_count == 1
    assert memory.growth <= MAX_GROWTH, f"the server grew by {memory.growth / MB:.0f} MB"


def test_a_request_over_the_pixel_budget_is_refused_before_decoding(server, profiles, bomb):
    with PeakMemory(server.pid) as memory, pytest.raises(grpc.RpcError) as error:
        profiles.ExtractProfile(extract_request(*[bomb] * (BOMBS + 1)), timeout=CALL_TIMEOUT)
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 576000000 per request (--max-request-pixels)" in error.value.details()
    assert memory.growth <= 64 * MB, f"the server grew by {memory.growth / MB:.0f} MB"


def test_a_full_queue_refuses_before_any_image_is_decoded(tiny_models_dir, tmp_path, bomb):
    with ServerProcess(tmp_path / "profiles.db", tiny_models_dir, "--max-queue", "0") as process:
        with grpc.insecure_channel(process.target) as channel:
            stub = profile_pb2_grpc.ProfileServiceStub(channel)
            with PeakMemory(process.pid) as memory, pytest.raises(grpc.RpcError) as error:
                stub.ExtractProfile(extract_request(*[bomb] * BOMBS), timeout=CALL_TIMEOUT)
    assert error.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert memory.growth <= 64 * MB, f"the server grew by {memory.growth / MB:.0f} MB"


# -- the shrink keeps the models' pixels -------------------------------------------------------------------


def processed(image: Image.Image) -> np.ndarray:
    processor = Idefics2ImageProcessorPil(**VIPER_PROCESSOR_SETTINGS)
    return processor(images=[[image]], return_tensors="np")["pixel_values"]


def test_the_model_size_is_the_processor_s():
    assert VIPER_PROCESSOR_SETTINGS == dict(
        size={"longest_edge": MODEL_LONGEST_EDGE, "shortest_edge": MODEL_SHORTEST_EDGE}, do_image_splitting=False
    )


@pytest.mark.parametrize("size", [(1000, 700), (700, 1000), (2400, 300), (449, 449), (448, 300), (40, 30)])
@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_shrinking_at_decode_gives_the_processor_s_pixels(size, mode):
    rng = random.Random(size[0] * size[1])
    noise = Image.frombytes("RGBA", size, rng.randbytes(size[0] * size[1] * 4)).convert(mode)
    data = encode(noise, "PNG")
    decoded = decode_image(data, max_pixels=Limits().max_image_pixels)
    assert decoded.size == (model_size(*size) if max(size) > MODEL_LONGEST_EDGE else size)
    full_size = to_rgb(Image.open(io.BytesIO(data)))
    np.testing.assert_array_equal(processed(decoded), processed(full_size))


def test_a_large_jpeg_decodes_at_a_reduced_scale_to_the_model_size():
    decoded = decode_image(phone_photo(), max_pixels=Limits().max_image_pixels)
    assert decoded.size == model_size(4000, 3000) == (448, 378)


def test_only_the_inline_context_images_the_metric_uses_are_decoded():
    good = png_bytes((32, 32))
    request = metric_pb2.ScoreRequest(queries=[good], liked=[good, corrupt_png()], disliked=[good, good])
    checked = check_score(request, Limits(), max_context=1)  # the corrupt liked[1] lies beyond the pairs used
    assert len(checked.liked) == len(checked.disliked) == 1
    with pytest.raises(InvalidRequest, match=r"liked\[1\]: truncated"):
        check_score(request, Limits(), max_context=2)


@pytest.mark.parametrize("slots", [1, 3])
def test_at_most_the_configured_number_of_images_decode_at_once(monkeypatch, slots):
    inside, most, lock = 0, 0, threading.Lock()
    real_to_rgb = imaging.to_rgb

    def counting_to_rgb(image):
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        time.sleep(0.05)
        with lock:
            inside -= 1
        return real_to_rgb(image)

    monkeypatch.setattr(imaging, "to_rgb", counting_to_rgb)
    imaging.limit_concurrent_decodes(slots)
    try:
        data = encode(Image.new("RGBA", (32, 32)), "PNG")
        threads = [threading.Thread(target=decode_image, args=(data,), kwargs=dict(max_pixels=10_000))
                   for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        imaging.limit_concurrent_decodes(imaging.DEFAULT_CONCURRENT_DECODES)
    assert most == slots
