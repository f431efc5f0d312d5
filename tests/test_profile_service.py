"""ProfileService end to end: a real server process on loopback, driven through the client SDK."""

from __future__ import annotations

import hashlib
import signal
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from viper_client import Conflict, InvalidArgument, NotFound, RatedImage, ViperClient
from viper_server.testing import ServerProcess

from fixture_data import fixture_images
from imagedata import png_bytes, png_claiming


@pytest.fixture(scope="module")
def server(toy_models_dir, tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("db") / "profiles.db", toy_models_dir, models="toy") as process:
        yield process


@pytest.fixture
def client(server):
    with ViperClient(server.target) as client:
        yield client


def test_profile_lifecycle_survives_a_restart(toy_models_dir, tmp_path):
    db_path = tmp_path / "profiles.db"
    images = fixture_images()
    with ServerProcess(db_path, toy_models_dir, models="toy") as first, ViperClient(first.target) as client:
        profile = client.extract_profile("alice", images)
        assert profile.user_id == "alice"
        assert profile.version == 1
        assert (profile.liked_image_count, profile.disliked_image_count) == (8, 8)
        assert profile.extractor_model == "toy-vpe (float32)"
        assert profile.raw_text.startswith("Liked Art Features: ")  # the reference format, kept as generated
        assert [image.sha256 for image in profile.images] == [
            hashlib.sha256(Path(image.image).read_bytes()).hexdigest() for image in images
        ]
        assert [image.comment for image in profile.images] == [image.comment for image in images]
        assert first.stop(signal.SIGTERM) == 0

    with ServerProcess(db_path, toy_models_dir, models="toy") as second, ViperClient(second.target) as client:
        assert client.get_profile("alice") == profile

        updated = client.update_profile(
            "alice", liked_features=["pastel colors", "soft light"], disliked_features=["gloom"], expected_version=1
        )
        assert (updated.version, updated.liked_features, updated.disliked_features) == (
            2, ["pastel colors", "soft light"], ["gloom"],
        )
        assert updated.created_at == profile.created_at
        assert updated.updated_at > profile.updated_at
        with pytest.raises(Conflict, match="version"):
            client.update_profile("alice", liked_features=["x"], expected_version=1)
        only_disliked = client.update_profile("alice", disliked_features=["murky"])
        assert (only_disliked.liked_features, only_disliked.disliked_features) == (["pastel colors", "soft light"],
                                                                                   ["murky"])

        again = client.extract_profile("alice", images[:2])
        assert again.version == 4
        assert (again.liked_image_count, again.disliked_image_count) == (2, 0)

        with pytest.raises(Conflict):
            client.delete_profile("alice", expected_version=3)
        client.delete_profile("alice", expected_version=4)
        for call in (lambda: client.get_profile("alice"), lambda: client.delete_profile("alice"),
                     lambda: client.update_profile("alice", liked_features=["x"])):
            with pytest.raises(NotFound, match="alice"):
                call()


def test_reflection_lists_every_service(server):
    with grpc.insecure_channel(server.target) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"viper.v1.ProfileService", "viper.v1.GenerationService", "viper.v1.MetricService",
            "grpc.health.v1.Health"} <= services


@pytest.mark.parametrize("service", ["", "viper.v1.ProfileService"])
def test_health_is_serving_once_models_are_loaded(server, service):
    with grpc.insecure_channel(server.target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_list_profiles_pages_through_every_user(client):
    small = [RatedImage(png_bytes(), comment="ok", rating="liked")]
    users = [f"pager-{n:02d}" for n in range(7)]
    for user in users:
        client.extract_profile(user, small)
    listed = [profile.user_id for profile in client.list_profiles(page_size=3)]
    assert [user for user in listed if user.startswith("pager-")] == users
    for user in users:
        client.delete_profile(user)


def test_start_up_says_which_models_and_precision(server):
    server.wait_for_log(r"models \(toy\) loaded on cpu in [0-9.]+ s; IDEFICS2 in float32")


def test_start_up_is_quiet(server):
    # The libraries' notices, warnings and loading bars: only with --log-level debug.
    noise = [line for line in server.logs
             if any(word in line for word in ("torchvision", "Warning", "Loading weights", "it/s]"))]
    assert noise == []


def test_each_rpc_is_logged_with_method_user_status_and_time(server, client):
    with pytest.raises(NotFound):
        client.get_profile("nobody-here")
    server.wait_for_log(r"rpc method=/viper.v1.ProfileService/GetProfile user=nobody-here status=NOT_FOUND ms=\d")


def liked(data: bytes, comment: str = "ok") -> RatedImage:
    return RatedImage(data, comment=comment, rating="liked")


BAD_EXTRACTIONS = {
    "no images": ("bad-1", [], "images: at least one"),
    "too many images": ("bad-2", [liked(png_bytes())] * 65, "at most 64"),
    "not an image": ("bad-3", [liked(b"hello, world")], r"images\[0\].data: not a decodable"),
    "truncated image": ("bad-4", [liked(png_bytes()[:50])], r"images\[0\].data: truncated"),
    "empty image": ("bad-5", [liked(png_bytes()), liked(b"")], r"images\[1\].data: empty"),
    "decompression bomb": ("bad-6", [liked(png_claiming(60_000, 60_000))], "exceeds the limit"),
    "over-long comment": ("bad-7", [liked(png_bytes(), "x" * 4001)], r"images\[0\].comment: 4001 characters"),
    "invalid user id": ("no spaces allowed", [liked(png_bytes())], "user_id"),
    "over-long user id": ("u" * 129, [liked(png_bytes())], "user_id"),
}


@pytest.mark.parametrize("case", BAD_EXTRACTIONS, ids=list(BAD_EXTRACTIONS))
def test_bad_extractions_are_invalid_argument_and_store_nothing(client, case):
    user_id, images, message = BAD_EXTRACTIONS[case]
    before = [profile.user_id for profile in client.list_profiles()]
    with pytest.raises(InvalidArgument, match=message):
        client.extract_profile(user_id, images)
    # The server is still up, and nothing was stored.
    assert [profile.user_id for profile in client.list_profiles()] == before


def test_unknown_users_are_not_found(client):
    with pytest.raises(NotFound):
        client.get_profile("ghost")
    with pytest.raises(NotFound):
        client.update_profile("ghost", liked_features=["x"])
    with pytest.raises(NotFound):
        client.delete_profile("ghost")


def test_bad_page_token_and_update_mask_are_invalid_argument(server):
    from viper_proto.v1 import profile_pb2, profile_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        stub = profile_pb2_grpc.ProfileServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.ListProfiles(profile_pb2.ListProfilesRequest(page_token="%%%"))
        assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        request = profile_pb2.UpdateProfileRequest(user_id="anyone")
        request.update_mask.paths.append("raw_text")
        with pytest.raises(grpc.RpcError) as error:
            stub.UpdateProfile(request)
        assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "raw_text" in error.value.details()
