"""Hostile and malformed requests to every RPC, sent through the raw stubs (the SDK would refuse many).

Each is refused with its documented status and a message naming the field, and leaves the server
answering and the store exactly as it was. Complements the SDK-level cases of test_profile_service.py.
"""

from __future__ import annotations

import base64
import math
import re
import threading
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message
from PIL import Image

from viper_client import RatedImage, ViperClient
from viper_proto.v1 import (
    generation_pb2,
    generation_pb2_grpc,
    metric_pb2,
    metric_pb2_grpc,
    profile_pb2,
    profile_pb2_grpc,
)
from viper_server.testing import ServerProcess

from fixture_data import fixture_images
from imagedata import corrupt_png, encode, jpeg_claiming, noise_png, png_bytes, png_claiming

KNOWN_USER = "known"
CALL_TIMEOUT = 30.0
# The most a read may wait while a huge request is checked (the enormous prompt's test says why so wide).
READ_DEADLINE = 5.0
# Longer than the 16 KiB of metadata a gRPC client accepts, were the id echoed whole in the error.
HUGE_ID = "u" * 20_000

INVALID = grpc.StatusCode.INVALID_ARGUMENT
ABORTED = grpc.StatusCode.ABORTED
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


class Api:
    """The generated stubs of the three services, called by method name; streams are read to their end."""

    def __init__(self, channel: grpc.Channel) -> None:
        profiles = profile_pb2_grpc.ProfileServiceStub(channel)
        self._rpcs = {
            "ExtractProfile": profiles.ExtractProfile,
            "GetProfile": profiles.GetProfile,
            "ListProfiles": profiles.ListProfiles,
            "UpdateProfile": profiles.UpdateProfile,
            "DeleteProfile": profiles.DeleteProfile,
            "Generate": generation_pb2_grpc.GenerationServiceStub(channel).Generate,
            "Score": metric_pb2_grpc.MetricServiceStub(channel).Score,
        }

    def call(self, method: str, request: Message) -> Message | list[Message]:
        return self.call_within(method, request, CALL_TIMEOUT)

    def call_within(self, method: str, request: Message, timeout: float) -> Message | list[Message]:
        response = self._rpcs[method](request, timeout=timeout)
        return response if isinstance(response, Message) else list(response)

    def stored_profiles(self) -> list[profile_pb2.Profile]:
        """Every stored profile, whole: what a refused request must leave as it was."""
        page = self.call("ListProfiles", profile_pb2.ListProfilesRequest(page_size=1000))
        assert not page.next_page_token, "the store of this suite fits in one page"
        return list(page.profiles)

    def assert_unharmed(self, profiles_before: list[profile_pb2.Profile]) -> None:
        """The server still answers, and the store is unchanged."""
        known = self.call("GetProfile", profile_pb2.GetProfileRequest(user_id=KNOWN_USER))
        assert known.user_id == KNOWN_USER
        assert self.stored_profiles() == profiles_before


GOOD = png_bytes()
JPEG = encode(Image.new("RGB", (64, 64), (200, 30, 30)), "JPEG")
WEBP = encode(Image.new("RGB", (64, 64), (30, 200, 30)), "WEBP")
GIF = encode(Image.new("RGB", (8, 8)), "GIF")
PDF = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj << /Type /Catalog >> endobj\n"


def rated(data: bytes, rating: int = profile_pb2.RATING_LIKED, comment: str = "noted") -> profile_pb2.RatedImage:
    return profile_pb2.RatedImage(data=data, comment=comment, rating=rating)


def extract(*images: profile_pb2.RatedImage, user_id: str = "newcomer") -> profile_pb2.ExtractProfileRequest:
    return profile_pb2.ExtractProfileRequest(user_id=user_id, images=images)


def update(**fields) -> profile_pb2.UpdateProfileRequest:
    request = dict(user_id=KNOWN_USER, liked_features=["fine"], update_mask=FieldMask(paths=["liked_features"]))
    return profile_pb2.UpdateProfileRequest(**(request | fields))


def update_mask(*paths: str) -> profile_pb2.UpdateProfileRequest:
    return update(update_mask=FieldMask(paths=paths))


def generate(**fields) -> generation_pb2.GenerateRequest:
    request = dict(user_id=KNOWN_USER, prompt="a lighthouse at dusk", width=64, height=64, steps=2)
    return generation_pb2.GenerateRequest(**(request | fields))


def score(**fields) -> metric_pb2.ScoreRequest:
    return metric_pb2.ScoreRequest(**(dict(user_id=KNOWN_USER, queries=[GOOD]) | fields))


def page_token(text: bytes) -> str:
    return base64.urlsafe_b64encode(text).decode()


@dataclass(frozen=True)
class Refusal:
    method: str
    request: Message = field(repr=False)
    code: grpc.StatusCode
    # A regex the status message must contain: it names the offending field.
    message: str


REFUSALS = {
    # ExtractProfile: images are decoded and checked before anything runs or is stored.
    "extract corrupt png at index 1": Refusal(
        "ExtractProfile", extract(rated(GOOD), rated(corrupt_png())), INVALID,
        r"images\[1\]\.data: truncated or corrupt"),
    "extract truncated jpeg": Refusal(
        "ExtractProfile", extract(rated(JPEG[: len(JPEG) // 2])), INVALID, r"images\[0\]\.data: truncated or corrupt"),
    "extract truncated webp": Refusal(
        "ExtractProfile", extract(rated(WEBP[: len(WEBP) // 2])), INVALID, r"images\[0\]\.data: truncated or corrupt"),
    "extract png signature only": Refusal(
        "ExtractProfile", extract(rated(GOOD[:8])), INVALID, r"images\[0\]\.data: not a decodable"),
    "extract pdf bytes at index 2": Refusal(
        "ExtractProfile", extract(rated(GOOD), rated(GOOD), rated(PDF)), INVALID,
        r"images\[2\]\.data: not a decodable"),
    "extract gif": Refusal(
        "ExtractProfile", extract(rated(GIF)), INVALID, r"images\[0\]\.data: GIF images are not accepted"),
    "extract jpeg declaring 65535x65535": Refusal(
        "ExtractProfile", extract(rated(jpeg_claiming(65535, 65535))), INVALID,
        r"images\[0\]\.data: .*exceeds the limit"),
    "extract png one row over the pixel limit": Refusal(
        "ExtractProfile", extract(rated(png_claiming(6000, 6001))), INVALID,
        r"images\[0\]\.data: 6000x6001 image exceeds the limit of 36000000 pixels"),
    "extract png at the pixel limit without its pixels": Refusal(
        "ExtractProfile", extract(rated(png_claiming(6000, 6000))), INVALID, r"images\[0\]\.data: truncated"),
    "extract png declaring zero width": Refusal(
        "ExtractProfile", extract(rated(png_claiming(0, 16))), INVALID, r"images\[0\]\.data: not a decodable"),
    "extract unspecified rating": Refusal(
        "ExtractProfile", extract(rated(GOOD), rated(GOOD, profile_pb2.RATING_UNSPECIFIED)), INVALID,
        r"images\[1\]\.rating: must be RATING_LIKED or RATING_DISLIKED"),
    "extract unknown rating value": Refusal(
        "ExtractProfile", extract(rated(GOOD, 7)), INVALID, r"images\[0\]\.rating"),
    "extract empty user id": Refusal("ExtractProfile", extract(rated(GOOD), user_id=""), INVALID, "user_id"),
    "extract non-ascii user id": Refusal("ExtractProfile", extract(rated(GOOD), user_id="josé"), INVALID, "user_id"),
    # Control tokens would be read as prompt structure (a literal <image> breaks the image count).
    **{
        f"extract comment with {token}": Refusal(
            "ExtractProfile", extract(rated(GOOD), rated(GOOD, comment=f"so soft {token} and warm")), INVALID,
            rf"images\[1\]\.comment: contains the control token '{token}'")
        for token in ("<image>", "<end_of_utterance>", "<fake_token_around_image>", "<s>", "</s>", "<unk>")
    },
    "extract comment with a NUL character": Refusal(
        "ExtractProfile", extract(rated(GOOD, comment="a\x00b")), INVALID, r"images\[0\]\.comment: contains a NUL"),

    "get empty user id": Refusal("GetProfile", profile_pb2.GetProfileRequest(user_id=""), INVALID, "user_id"),
    "get path-like user id": Refusal(
        "GetProfile", profile_pb2.GetProfileRequest(user_id=f"../{KNOWN_USER}"), INVALID, "user_id"),
    "get huge user id": Refusal("GetProfile", profile_pb2.GetProfileRequest(user_id=HUGE_ID), INVALID, "user_id"),

    "list negative page size": Refusal(
        "ListProfiles", profile_pb2.ListProfilesRequest(page_size=-1), INVALID, "page_size: must not be negative"),
    "list unpadded page token": Refusal(
        "ListProfiles", profile_pb2.ListProfilesRequest(page_token="YQ"), INVALID, "page_token"),
    "list page token of non-utf8 bytes": Refusal(
        "ListProfiles", profile_pb2.ListProfilesRequest(page_token=page_token(b"\xff\xfe\xfd")), INVALID, "page_token"),
    "list page token naming an invalid user id": Refusal(
        "ListProfiles", profile_pb2.ListProfilesRequest(page_token=page_token(b"no spaces here")), INVALID,
        "page_token"),
    "list huge page token": Refusal(
        "ListProfiles", profile_pb2.ListProfilesRequest(page_token=page_token(HUGE_ID.encode())), INVALID,
        "page_token"),

    "update negative expected version": Refusal(
        "UpdateProfile", update(expected_version=-1), INVALID, "expected_version: must not be negative"),
    "update expected version ahead of the stored one": Refusal(
        "UpdateProfile", update(expected_version=2**62), ABORTED, "version"),
    "update mask naming version": Refusal("UpdateProfile", update_mask("version"), INVALID, "update_mask: .*version"),
    "update mask naming a nested path": Refusal(
        "UpdateProfile", update_mask("liked_features.0"), INVALID, r"update_mask: .*liked_features\.0"),
    "update mask with an empty path": Refusal("UpdateProfile", update_mask(""), INVALID, "update_mask"),
    "update blank feature": Refusal(
        "UpdateProfile", update(liked_features=["bold", "   "]), INVALID, r"liked_features\[1\]: empty feature"),
    "update over-long feature": Refusal(
        "UpdateProfile",
        update(disliked_features=["x" * 201], update_mask=FieldMask(paths=["disliked_features"])),
        INVALID, r"disliked_features\[0\]: longer than 200"),
    "update feature with a NUL character": Refusal(
        "UpdateProfile", update(liked_features=["soft\x00light"]), INVALID, r"liked_features\[0\]: contains a NUL"),
    "update too many features": Refusal(
        "UpdateProfile", update(liked_features=["f"] * 257), INVALID, "liked_features: 257 features"),
    "update invalid user id": Refusal("UpdateProfile", update(user_id="known user"), INVALID, "user_id"),

    "delete negative expected version": Refusal(
        "DeleteProfile", profile_pb2.DeleteProfileRequest(user_id=KNOWN_USER, expected_version=-3), INVALID,
        "expected_version: must not be negative"),
    "delete stale expected version": Refusal(
        "DeleteProfile", profile_pb2.DeleteProfileRequest(user_id=KNOWN_USER, expected_version=99), ABORTED, "version"),
    "delete invalid user id": Refusal(
        "DeleteProfile", profile_pb2.DeleteProfileRequest(user_id=f"{KNOWN_USER}*"), INVALID, "user_id"),

    "generate nan guidance": Refusal("Generate", generate(guidance_scale=math.nan), INVALID, "guidance_scale"),
    "generate infinite guidance": Refusal("Generate", generate(guidance_scale=math.inf), INVALID, "guidance_scale"),
    "generate negative guidance": Refusal("Generate", generate(guidance_scale=-5.0), INVALID, "guidance_scale"),
    "generate nan preference strength": Refusal(
        "Generate", generate(preference_strength=math.nan), INVALID, "preference_strength"),
    "generate infinite preference strength": Refusal(
        "Generate", generate(preference_strength=math.inf), INVALID, "preference_strength"),
    "generate negative image count": Refusal("Generate", generate(num_images=-1), INVALID, "num_images"),
    "generate negative width": Refusal("Generate", generate(width=-64), INVALID, "width"),
    "generate height above the maximum": Refusal("Generate", generate(height=2056), INVALID, "height: 2056"),
    "generate negative steps": Refusal("Generate", generate(steps=-5), INVALID, "steps"),
    "generate one step too many": Refusal("Generate", generate(steps=151), INVALID, r"steps: 151 is out of range"),
    "generate seed above int64": Refusal("Generate", generate(seed=2**64 - 1), INVALID, "seed"),
    "generate previews beyond the last step": Refusal(
        "Generate", generate(steps=2, preview_every=5), INVALID, "preview_every"),
    "generate blank prompt": Refusal("Generate", generate(prompt=" \t\n "), INVALID, "prompt: must not be empty"),
    "generate invalid user id": Refusal("Generate", generate(user_id="known/1"), INVALID, "user_id"),

    "score zero-byte query": Refusal("Score", score(queries=[b""]), INVALID, r"queries\[0\]: empty image"),
    "score truncated query at index 2": Refusal(
        "Score", score(queries=[GOOD, GOOD, JPEG[:100]]), INVALID, r"queries\[2\]: truncated or corrupt"),
    "score gif query at index 1": Refusal(
        "Score", score(queries=[GOOD, GIF]), INVALID, r"queries\[1\]: GIF images are not accepted"),
    "score query declaring a huge size": Refusal(
        "Score", score(queries=[png_claiming(60_000, 60_000)]), INVALID, r"queries\[0\]: .*exceeds the limit"),
    "score inline liked image corrupt at index 1": Refusal(
        "Score", score(liked=[GOOD, corrupt_png()], disliked=[GOOD, GOOD]), INVALID, r"liked\[1\]: truncated"),
    "score inline zero-byte disliked image": Refusal(
        "Score", score(liked=[GOOD], disliked=[b""]), INVALID, r"disliked\[0\]: empty image"),
    "score inline context too large": Refusal(
        "Score", score(liked=[GOOD] * 65, disliked=[GOOD] * 65), INVALID, "liked: 65 given, at most 64"),
    "score inline context without liked images": Refusal(
        "Score", score(disliked=[GOOD, GOOD]), FAILED_PRECONDITION,
        "0 liked and 2 disliked images: scoring needs at least one of each"),
    "score empty user id without inline context": Refusal("Score", score(user_id=""), INVALID, "user_id"),
    "score huge user id": Refusal("Score", score(user_id=HUGE_ID), INVALID, "user_id"),
}


@pytest.fixture(scope="module")
def server(tiny_models_dir, tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("db") / "profiles.db", tiny_models_dir) as process:
        images = fixture_images()
        with ViperClient(process.target) as client:
            client.extract_profile(KNOWN_USER, [images[0], images[-1]])  # one liked, one disliked: scoreable
        yield process


@pytest.fixture(scope="module")
def api(server):
    with grpc.insecure_channel(server.target) as channel:
        yield Api(channel)


@pytest.mark.parametrize("case", REFUSALS.values(), ids=list(REFUSALS))
def test_bad_requests_are_refused_naming_the_field_and_change_nothing(api, case):
    before = api.stored_profiles()
    with pytest.raises(grpc.RpcError) as error:
        api.call(case.method, case.request)
    assert error.value.code() is case.code, error.value.details()[:500]
    assert re.search(case.message, error.value.details()), error.value.details()[:500]
    api.assert_unharmed(before)


@pytest.mark.parametrize("method, wire_bytes", [
    ("GetProfile", b"\x0a\x02\xff\xfe"),  # user_id holding invalid UTF-8
    ("ExtractProfile", b"\x12\xff\xff\xff\xff\x0f"),  # images: a length running past the end
])
def test_undecodable_messages_are_invalid_argument(server, api, method, wire_bytes):
    before = api.stored_profiles()
    with grpc.insecure_channel(server.target) as channel:
        raw = channel.unary_unary(f"/viper.v1.ProfileService/{method}")  # no serializer: bytes go out as they are
        with pytest.raises(grpc.RpcError) as error:
            raw(wire_bytes, timeout=CALL_TIMEOUT)
    assert error.value.code() is INVALID
    assert error.value.details().startswith(f"request: not a valid /viper.v1.ProfileService/{method} message")
    api.assert_unharmed(before)


def test_an_enormous_prompt_is_refused_without_stalling_other_calls(api):
    """Counting the tokens of megabytes of prompt must not hold up the server's other calls. Reads go back to
    back from before the prompt is sent until after its refusal has come back, so any stall of the server while
    it holds the prompt lands on one of them; each must be answered within READ_DEADLINE, a wide margin over a
    read's milliseconds and still well under the 10+ s that counting the tokens of 4 MB takes."""
    before = api.stored_profiles()
    reading, refused = threading.Event(), threading.Event()
    reads: list[grpc.RpcError | None] = []

    def read_until_refused() -> None:
        while not refused.is_set():
            try:
                api.call_within("GetProfile", profile_pb2.GetProfileRequest(user_id=KNOWN_USER), READ_DEADLINE)
                reads.append(None)
            except grpc.RpcError as exc:
                reads.append(exc)
            reading.set()

    reader = threading.Thread(target=read_until_refused)
    reader.start()
    try:
        assert reading.wait(CALL_TIMEOUT)
        with pytest.raises(grpc.RpcError) as error:
            api.call("Generate", generate(prompt="word " * 800_000))
    finally:
        refused.set()
        reader.join(CALL_TIMEOUT)
    assert error.value.code() is INVALID, error.value
    assert re.search(r"prompt: 4000000 characters, at most 2000", error.value.details())
    late = [read for read in reads if read is not None]
    assert not late, f"{len(late)} of {len(reads)} reads failed or waited over {READ_DEADLINE} s: {late[0]}"
    api.assert_unharmed(before)


def test_hostile_user_ids_stay_inside_one_short_log_line(server, api):
    forged = f"rpc method=/viper.v1.ProfileService/DeleteProfile user={KNOWN_USER} status=OK"
    for user_id in (f"mallory\n{forged}", HUGE_ID):
        with pytest.raises(grpc.RpcError):
            api.call("GetProfile", profile_pb2.GetProfileRequest(user_id=user_id))
    # Log lines come in order: once this one is in, the two above are too.
    with pytest.raises(grpc.RpcError):
        api.call("GetProfile", profile_pb2.GetProfileRequest(user_id="log-sentinel"))
    server.wait_for_log("user=log-sentinel status=NOT_FOUND")
    assert not any(line.startswith(forged) for line in server.logs), "a user id forged a log line"
    longest = max(len(line) for line in server.logs if "GetProfile" in line)
    assert longest < 1_000, f"a {longest}-character log line"


# Messages above this are refused by gRPC itself (RESOURCE_EXHAUSTED) before any handler runs.
SMALL_LIMIT = 32 * 1024


@pytest.fixture(scope="module")
def small_limit_api(tiny_models_dir, tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "profiles.db"
    with ServerProcess(db, tiny_models_dir, "--max-message-bytes", str(SMALL_LIMIT)) as process:
        with ViperClient(process.target) as client:
            # Just under the limit: accepted, so the refusals below are the size and nothing else.
            just_under = noise_png(100)
            assert SMALL_LIMIT // 2 < len(just_under) < SMALL_LIMIT
            client.extract_profile(KNOWN_USER, [RatedImage(just_under, rating="liked"),
                                                RatedImage(GOOD, rating="disliked")])
        with grpc.insecure_channel(process.target) as channel:
            yield Api(channel)


OVERSIZED = {
    "extract": ("ExtractProfile", extract(rated(noise_png(120)))),
    "update": ("UpdateProfile", update(liked_features=["x" * 200] * 256)),  # within the feature limits
    "generate": ("Generate", generate(prompt="a " * 20_000)),
    "score": ("Score", score(queries=[noise_png(120)])),
}


def test_an_image_too_large_to_send_is_resource_exhausted_with_the_reason(small_limit_api):
    # 128 px of the tiny models' noise is a ~50 KB PNG: more than the 32 KiB this server may send.
    with pytest.raises(grpc.RpcError) as error:
        small_limit_api.call("Generate", generate(width=128, height=128))
    assert error.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"more than this server sends (--max-message-bytes {SMALL_LIMIT})" in error.value.details()
    assert len(small_limit_api.call("Generate", generate())) > 1  # 64 px still fits


@pytest.mark.parametrize("method, request_message", OVERSIZED.values(), ids=list(OVERSIZED))
def test_messages_above_the_size_limit_are_resource_exhausted(small_limit_api, method, request_message):
    assert request_message.ByteSize() > SMALL_LIMIT
    before = small_limit_api.stored_profiles()
    with pytest.raises(grpc.RpcError) as error:
        small_limit_api.call(method, request_message)
    assert error.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert re.search(rf"larger than max \(\d+ vs\. {SMALL_LIMIT}\)", error.value.details())
    small_limit_api.assert_unharmed(before)
