"""The SDK against in-process fake servers: request building, result types, errors, streams, cancellation."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import grpc
import pytest
from google.protobuf import empty_pb2
from PIL import Image

import viper_client  # for its error classes
from viper_client import (
    AsyncViperClient,
    GeneratedImage,
    Preview,
    Profile,
    ProfileImage,
    Progress,
    RatedImage,
    Rating,
    ScoreResult,
    ViperClient,
    ViperError,
)
from viper_client.images import encode_image
from viper_proto.v1 import (
    generation_pb2,
    generation_pb2_grpc,
    metric_pb2,
    metric_pb2_grpc,
    profile_pb2,
    profile_pb2_grpc,
)

FIXTURES = Path(__file__).parent / "fixtures" / "viper_examples"
CREATED = datetime(2024, 7, 1, 12, 0, tzinfo=timezone.utc)
UPDATED = datetime(2024, 7, 2, 8, 30, 15, tzinfo=timezone.utc)


def profile_message(user_id: str, version: int = 1) -> profile_pb2.Profile:
    return profile_pb2.Profile(
        user_id=user_id,
        liked_features=["pastel pinks", "soft light"],
        disliked_features=["dark palette"],
        raw_text="Liked Art Features: pastel pinks, soft light\nDisliked Art Features: dark palette",
        version=version,
        liked_image_count=1,
        disliked_image_count=1,
        create_time=CREATED,
        update_time=UPDATED,
        extractor_model="EPFL-VILAB/VPE-ViPer",
        images=[
            profile_pb2.ProfileImage(sha256="ab" * 32, comment="lovely", rating=profile_pb2.RATING_LIKED),
            profile_pb2.ProfileImage(
                sha256="cd" * 32, comment="gloomy", rating=profile_pb2.RATING_DISLIKED, position=1
            ),
        ],
    )


def png_bytes(color: tuple[int, int, int], size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def progress(index: int, step: int, total: int = 4) -> generation_pb2.GenerateEvent:
    return generation_pb2.GenerateEvent(
        progress=generation_pb2.GenerateProgress(image_index=index, step=step, total_steps=total)
    )


def image_event(index: int, png: bytes) -> generation_pb2.GenerateEvent:
    return generation_pb2.GenerateEvent(
        image=generation_pb2.GeneratedImage(
            image_index=index, png=png, seed=1000 + index, width=8, height=8, profile_version=3
        )
    )


def generate_until_cancelled(ended: threading.Event) -> Callable:
    """A Generate handler that sends one event and never finishes: only a cancel (or a deadline) sets ended."""

    def generate(request, context):
        # The callback runs however the RPC ends; the server may stop iterating this
        # handler (when the cancel arrives mid-send), so a loop here cannot be relied on.
        context.add_callback(ended.set)
        yield progress(0, 1)
        while context.is_active():
            time.sleep(0.01)

    return generate


class FakeViper(
    profile_pb2_grpc.ProfileServiceServicer,
    generation_pb2_grpc.GenerationServiceServicer,
    metric_pb2_grpc.MetricServiceServicer,
):
    """All three services: records each request with its deadline, answers with handlers[method]."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, object]] = []
        self.time_remaining: list[float | None] = []
        self.handlers: dict[str, Callable[[object, grpc.ServicerContext], object]] = {
            "ExtractProfile": lambda request, context: profile_message(request.user_id),
            "GetProfile": lambda request, context: profile_message(request.user_id),
            "UpdateProfile": lambda request, context: profile_message(request.user_id, version=2),
            "DeleteProfile": lambda request, context: empty_pb2.Empty(),
            "Generate": lambda request, context: iter([progress(0, 1), image_event(0, png_bytes((255, 0, 0)))]),
            "Score": lambda request, context: (
                metric_pb2.ScoreResult(index=index, score=0.5) for index in range(len(request.queries))
            ),
        }

    def _handle(self, method: str, request: object, context: grpc.ServicerContext) -> object:
        self.requests.append((method, request))
        self.time_remaining.append(context.time_remaining())
        return self.handlers[method](request, context)

    def requests_to(self, method: str) -> list:
        return [request for name, request in self.requests if name == method]

    def ExtractProfile(self, request, context):
        return self._handle("ExtractProfile", request, context)

    def GetProfile(self, request, context):
        return self._handle("GetProfile", request, context)

    def ListProfiles(self, request, context):
        return self._handle("ListProfiles", request, context)

    def UpdateProfile(self, request, context):
        return self._handle("UpdateProfile", request, context)

    def DeleteProfile(self, request, context):
        return self._handle("DeleteProfile", request, context)

    def Generate(self, request, context):
        return self._handle("Generate", request, context)

    def Score(self, request, context):
        return self._handle("Score", request, context)


@pytest.fixture
def fake():
    servicer = FakeViper()
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    profile_pb2_grpc.add_ProfileServiceServicer_to_server(servicer, server)
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    metric_pb2_grpc.add_MetricServiceServicer_to_server(servicer, server)
    servicer.target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    yield servicer
    server.stop(grace=None)


@pytest.fixture
def client(fake):
    with ViperClient(fake.target, timeout=5, long_timeout=20) as client:
        yield client


def test_client_imports_without_torch_or_the_server():
    code = "import sys, viper_client, viper_client.cli; print(sorted({'torch', 'viper_server'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_extract_profile_sends_each_image_kind_with_comment_and_rating(fake, client):
    path = FIXTURES / "liked" / "0.png"
    raw = png_bytes((1, 2, 3))
    pil = Image.new("RGB", (4, 4), (200, 10, 30))
    profile = client.extract_profile(
        "alice",
        [
            RatedImage(path, "warm light", rating=Rating.LIKED),
            RatedImage(str(path), "same file", rating="liked"),
            RatedImage(raw, "too dark", rating="disliked"),
            RatedImage(pil, "harsh reds", rating=Rating.DISLIKED),
        ],
    )
    [request] = fake.requests_to("ExtractProfile")
    assert request.user_id == "alice"
    sent = list(request.images)
    assert [image.comment for image in sent] == ["warm light", "same file", "too dark", "harsh reds"]
    assert [image.rating for image in sent] == [profile_pb2.RATING_LIKED] * 2 + [profile_pb2.RATING_DISLIKED] * 2
    # Files and bytes go unchanged (the server hashes them); PIL images as PNG.
    assert sent[0].data == sent[1].data == path.read_bytes()
    assert sent[2].data == raw
    decoded = Image.open(io.BytesIO(sent[3].data))
    assert decoded.format == "PNG" and decoded.getpixel((0, 0)) == (200, 10, 30)
    assert profile.user_id == "alice"


def test_profile_results_are_plain_dataclasses(client):
    profile = client.get_profile("alice")
    assert profile == Profile(
        user_id="alice",
        liked_features=["pastel pinks", "soft light"],
        disliked_features=["dark palette"],
        raw_text="Liked Art Features: pastel pinks, soft light\nDisliked Art Features: dark palette",
        version=1,
        liked_image_count=1,
        disliked_image_count=1,
        created_at=CREATED,
        updated_at=UPDATED,
        extractor_model="EPFL-VILAB/VPE-ViPer",
        images=[
            ProfileImage(sha256="ab" * 32, comment="lovely", rating=Rating.LIKED, position=0),
            ProfileImage(sha256="cd" * 32, comment="gloomy", rating=Rating.DISLIKED, position=1),
        ],
    )
    assert profile.created_at.tzinfo == timezone.utc
    with pytest.raises(AttributeError):
        profile.version = 2  # type: ignore[misc]


def test_rated_image_rejects_an_unknown_rating():
    with pytest.raises(ValueError):
        RatedImage(b"x", "meh", rating="neutral")


def test_encode_image_converts_modes_png_cannot_hold_and_rejects_other_types():
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    assert Image.open(io.BytesIO(encode_image(cmyk))).mode == "RGB"
    with pytest.raises(TypeError):
        encode_image(42)  # type: ignore[arg-type]


def test_list_profiles_iterates_every_page_lazily(fake, client):
    pages = {
        "": profile_pb2.ListProfilesResponse(
            profiles=[profile_message("a"), profile_message("b")], next_page_token="t1"
        ),
        "t1": profile_pb2.ListProfilesResponse(profiles=[profile_message("c")], next_page_token="t2"),
        "t2": profile_pb2.ListProfilesResponse(profiles=[profile_message("d")]),
    }
    fake.handlers["ListProfiles"] = lambda request, context: pages[request.page_token]
    profiles = client.list_profiles(page_size=2)
    assert fake.requests_to("ListProfiles") == []
    assert [profile.user_id for profile in profiles] == ["a", "b", "c", "d"]
    requests = fake.requests_to("ListProfiles")
    assert [(r.page_size, r.page_token) for r in requests] == [(2, ""), (2, "t1"), (2, "t2")]


@pytest.mark.parametrize(
    ("liked", "disliked", "mask"),
    [
        (["a", "b"], None, ["liked_features"]),
        (None, ["c"], ["disliked_features"]),
        (["a"], [], ["liked_features", "disliked_features"]),
    ],
)
def test_update_profile_masks_the_lists_given(fake, client, liked, disliked, mask):
    profile = client.update_profile("alice", liked_features=liked, disliked_features=disliked)
    [request] = fake.requests_to("UpdateProfile")
    assert list(request.update_mask.paths) == mask
    assert list(request.liked_features) == (liked or [])
    assert list(request.disliked_features) == (disliked or [])
    assert request.expected_version == 0
    assert profile.version == 2


def test_update_profile_sends_expected_version(fake, client):
    client.update_profile("alice", liked_features=["a"], expected_version=7)
    assert fake.requests_to("UpdateProfile")[0].expected_version == 7


def test_update_profile_without_lists_fails_before_any_rpc(fake, client):
    with pytest.raises(ValueError):
        client.update_profile("alice")
    assert fake.requests == []


def test_delete_profile_sends_expected_version(fake, client):
    assert client.delete_profile("alice", expected_version=4) is None
    client.delete_profile("bob")
    assert [(r.user_id, r.expected_version) for r in fake.requests_to("DeleteProfile")] == [("alice", 4), ("bob", 0)]


ERROR_CLASSES = [
    (grpc.StatusCode.NOT_FOUND, viper_client.NotFound),
    (grpc.StatusCode.INVALID_ARGUMENT, viper_client.InvalidArgument),
    (grpc.StatusCode.ABORTED, viper_client.Conflict),
    (grpc.StatusCode.ALREADY_EXISTS, viper_client.Conflict),
    (grpc.StatusCode.FAILED_PRECONDITION, viper_client.FailedPrecondition),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, viper_client.ResourceExhausted),
    (grpc.StatusCode.UNAUTHENTICATED, viper_client.Unauthenticated),
    (grpc.StatusCode.PERMISSION_DENIED, viper_client.PermissionDenied),
    (grpc.StatusCode.UNAVAILABLE, viper_client.Unavailable),
    (grpc.StatusCode.DEADLINE_EXCEEDED, viper_client.DeadlineExceeded),
    (grpc.StatusCode.CANCELLED, viper_client.Cancelled),
    (grpc.StatusCode.INTERNAL, ViperError),
    (grpc.StatusCode.UNKNOWN, ViperError),
]


def abort_with(code: grpc.StatusCode, message: str) -> Callable:
    def handler(request, context):
        context.abort(code, message)

    return handler


@pytest.mark.parametrize(("code", "error_class"), ERROR_CLASSES)
def test_status_codes_map_to_error_classes(fake, client, code, error_class):
    fake.handlers["GetProfile"] = abort_with(code, f"failed with {code.name}")
    with pytest.raises(ViperError) as caught:
        client.get_profile("alice")
    assert type(caught.value) is error_class
    assert caught.value.code == code
    assert caught.value.message == f"failed with {code.name}"
    assert str(caught.value) == f"{code.name}: failed with {code.name}"


def test_an_error_mid_stream_is_mapped(fake, client):
    def generate(request, context):
        yield progress(0, 1)
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")

    fake.handlers["Generate"] = generate
    events = client.generate("alice", "a cat")
    assert next(events) == Progress(image_index=0, step=1, total_steps=4)
    with pytest.raises(viper_client.ResourceExhausted, match="queue full"):
        next(events)


def test_an_unreachable_server_is_unavailable():
    with ViperClient("127.0.0.1:1", timeout=5) as client, pytest.raises(viper_client.Unavailable):
        client.get_profile("alice")


def test_deadlines_default_per_kind_of_call_and_can_be_overridden(fake, client):
    client.get_profile("alice")
    client.extract_profile("alice", [RatedImage(b"x", "c", rating="liked")])
    client.get_profile("alice", timeout=None)
    short, long, unlimited = fake.time_remaining
    assert 0 < short < 10 < long < 21  # 5 s and 20 s, give or take clock skew
    assert unlimited > 1e6


def test_a_call_past_its_deadline_raises_deadline_exceeded(fake, client):
    def slow(request, context):
        time.sleep(0.5)
        return profile_message(request.user_id)

    fake.handlers["GetProfile"] = slow
    with pytest.raises(viper_client.DeadlineExceeded):
        client.get_profile("alice", timeout=0.05)


def test_messages_above_max_message_bytes_are_refused(fake):
    with ViperClient(fake.target, max_message_bytes=1024) as client:
        with pytest.raises(viper_client.ResourceExhausted):
            client.extract_profile("alice", [RatedImage(bytes(2048), "big", rating="liked")])
    assert fake.requests == []


def test_generate_streams_typed_events_in_order(fake, client):
    red, blue, preview = png_bytes((255, 0, 0)), png_bytes((0, 0, 255)), png_bytes((9, 9, 9), size=2)
    fake.handlers["Generate"] = lambda request, context: iter(
        [
            progress(0, 1),
            generation_pb2.GenerateEvent(preview=generation_pb2.GeneratePreview(image_index=0, step=1, png=preview)),
            generation_pb2.GenerateEvent(),  # a kind of event this SDK does not know
            image_event(0, red),
            progress(1, 1),
            image_event(1, blue),
        ]
    )
    events = list(
        client.generate(
            "alice",
            "a cat",
            negative_prompt="blurry",
            num_images=2,
            width=64,
            height=48,
            steps=4,
            guidance_scale=0.0,
            refine=False,
            seed=2**40,
            preview_every=1,
        )
    )
    assert events == [
        Progress(image_index=0, step=1, total_steps=4),
        Preview(image_index=0, step=1, png=preview),
        GeneratedImage(image_index=0, png=red, seed=1000, width=8, height=8, profile_version=3),
        Progress(image_index=1, step=1, total_steps=4),
        GeneratedImage(image_index=1, png=blue, seed=1001, width=8, height=8, profile_version=3),
    ]
    assert events[2].image().getpixel((0, 0)) == (255, 0, 0)
    assert events[1].image().size == (2, 2)
    [request] = fake.requests_to("Generate")
    assert (request.user_id, request.prompt, request.negative_prompt) == ("alice", "a cat", "blurry")
    assert (request.num_images, request.width, request.height, request.steps) == (2, 64, 48, 4)
    assert (request.seed, request.preview_every) == (2**40, 1)
    # Optional fields: set when given, even to a zero value; unset (server default) when None.
    assert request.HasField("guidance_scale") and request.guidance_scale == 0.0
    assert request.HasField("refine") and not request.refine
    assert not request.HasField("preference_strength")


def test_closing_generate_cancels_the_rpc_on_the_server(fake, client):
    cancelled = threading.Event()
    fake.handlers["Generate"] = generate_until_cancelled(cancelled)
    events = client.generate("alice", "a cat")
    assert isinstance(next(events), Progress)
    events.close()
    assert cancelled.wait(5)
    assert list(events) == []


def test_generate_starts_the_rpc_only_when_iterated(fake, client):
    client.generate("alice", "a cat").close()
    assert fake.requests_to("Generate") == []


def test_generate_images_returns_pil_images_in_index_order(fake, client):
    fake.handlers["Generate"] = lambda request, context: iter(
        [progress(1, 4), image_event(1, png_bytes((0, 0, 255))), image_event(0, png_bytes((255, 0, 0)))]
    )
    images = client.generate_images("alice", "a cat", num_images=2)
    assert [image.getpixel((0, 0)) for image in images] == [(255, 0, 0), (0, 0, 255)]
    assert fake.requests_to("Generate")[0].num_images == 2


def reversed_scores(request, context):
    # Results arrive as computed, here last query first; score = index / 10.
    for index in reversed(range(len(request.queries))):
        yield metric_pb2.ScoreResult(index=index, score=index / 10)


def test_score_returns_scores_in_query_order(fake, client):
    fake.handlers["Score"] = reversed_scores
    query = FIXTURES / "query1.png"
    liked, disliked = png_bytes((255, 200, 200)), png_bytes((0, 0, 40))
    scores = client.score("alice", [query, b"q2", Image.new("RGB", (2, 2))], liked=[liked], disliked=[disliked])
    assert scores == [0.0, 0.1, 0.2]
    [request] = fake.requests_to("Score")
    assert request.user_id == "alice"
    assert request.queries[0] == query.read_bytes() and request.queries[1] == b"q2"
    assert (list(request.liked), list(request.disliked)) == ([liked], [disliked])


def test_score_stream_yields_results_as_they_arrive(fake, client):
    fake.handlers["Score"] = reversed_scores
    results = list(client.score_stream("alice", [b"a", b"b"]))
    assert results == [ScoreResult(index=1, score=0.1), ScoreResult(index=0, score=0.0)]
    assert list(fake.requests_to("Score")[0].liked) == []


def test_score_raises_when_the_server_skips_a_query(fake, client):
    fake.handlers["Score"] = lambda request, context: iter([metric_pb2.ScoreResult(index=0, score=0.3)])
    with pytest.raises(ViperError) as caught:
        client.score("alice", [b"a", b"b"])
    assert caught.value.code == grpc.StatusCode.DATA_LOSS


def run_async(fake: FakeViper, scenario: Callable[[AsyncViperClient], object]):
    async def main():
        async with AsyncViperClient(fake.target, timeout=5, long_timeout=20) as client:
            return await scenario(client)

    return asyncio.run(main())


def test_async_profile_calls_build_the_same_requests(fake):
    pages = {
        "": profile_pb2.ListProfilesResponse(profiles=[profile_message("a")], next_page_token="t1"),
        "t1": profile_pb2.ListProfilesResponse(profiles=[profile_message("b")]),
    }
    fake.handlers["ListProfiles"] = lambda request, context: pages[request.page_token]

    async def scenario(client: AsyncViperClient):
        extracted = await client.extract_profile("alice", [RatedImage(b"img", "nice", rating="liked")])
        got = await client.get_profile("alice")
        listed = [profile.user_id async for profile in client.list_profiles(page_size=1)]
        updated = await client.update_profile("alice", disliked_features=["gloom"], expected_version=1)
        await client.delete_profile("alice", expected_version=2)
        return extracted, got, listed, updated

    extracted, got, listed, updated = run_async(fake, scenario)
    assert extracted == got and got.created_at == CREATED
    assert listed == ["a", "b"]
    assert updated.version == 2
    [extract] = fake.requests_to("ExtractProfile")
    assert (extract.images[0].data, extract.images[0].rating) == (b"img", profile_pb2.RATING_LIKED)
    assert [r.page_token for r in fake.requests_to("ListProfiles")] == ["", "t1"]
    [update] = fake.requests_to("UpdateProfile")
    assert (list(update.update_mask.paths), update.expected_version) == (["disliked_features"], 1)
    assert fake.requests_to("DeleteProfile")[0].expected_version == 2
    short, long = fake.time_remaining[1], fake.time_remaining[0]
    assert 0 < short < 10 < long < 21  # 5 s and 20 s, give or take clock skew


@pytest.mark.parametrize(("code", "error_class"), ERROR_CLASSES)
def test_async_status_codes_map_to_error_classes(fake, code, error_class):
    fake.handlers["DeleteProfile"] = abort_with(code, "nope")
    with pytest.raises(ViperError) as caught:
        run_async(fake, lambda client: client.delete_profile("alice"))
    assert type(caught.value) is error_class
    assert (caught.value.code, caught.value.message) == (code, "nope")


def test_async_generate_streams_events_and_maps_errors_mid_stream(fake):
    def generate(request, context):
        yield progress(0, 1)
        yield image_event(0, png_bytes((255, 0, 0)))
        context.abort(grpc.StatusCode.NOT_FOUND, "profile deleted")

    fake.handlers["Generate"] = generate
    received = []

    async def scenario(client: AsyncViperClient):
        async for event in client.generate("alice", "a cat", preference_strength=0.5):
            received.append(event)

    with pytest.raises(viper_client.NotFound, match="profile deleted"):
        run_async(fake, scenario)
    assert [type(event) for event in received] == [Progress, GeneratedImage]
    assert fake.requests_to("Generate")[0].preference_strength == 0.5


def test_async_closing_generate_cancels_the_rpc_on_the_server(fake):
    cancelled = threading.Event()
    fake.handlers["Generate"] = generate_until_cancelled(cancelled)

    async def scenario(client: AsyncViperClient):
        events = client.generate("alice", "a cat")
        first = await events.__anext__()
        await events.aclose()
        return first

    assert isinstance(run_async(fake, scenario), Progress)
    assert cancelled.wait(5)


def test_async_generate_images_and_scores(fake):
    fake.handlers["Score"] = reversed_scores
    fake.handlers["Generate"] = lambda request, context: iter(
        [image_event(1, png_bytes((0, 0, 255))), image_event(0, png_bytes((255, 0, 0)))]
    )

    async def scenario(client: AsyncViperClient):
        images = await client.generate_images("alice", "a cat", num_images=2)
        scores = await client.score("alice", [b"a", b"b", b"c"])
        streamed = [result async for result in client.score_stream("alice", [b"a", b"b"])]
        return images, scores, streamed

    images, scores, streamed = run_async(fake, scenario)
    assert [image.getpixel((0, 0)) for image in images] == [(255, 0, 0), (0, 0, 255)]
    assert scores == [0.0, 0.1, 0.2]
    assert streamed == [ScoreResult(index=1, score=0.1), ScoreResult(index=0, score=0.0)]
