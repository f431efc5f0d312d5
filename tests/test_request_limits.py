"""Refusing before parsing (issue 25): per-method request size limits checked on the raw bytes, the number of
calls in flight, and connection idle limits, as gRPC server settings with flags."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from viper_proto.v1 import profile_pb2, profile_pb2_grpc
from viper_server.config import MiB, ServerConfig
from viper_server.rpc.wire import more_fields_than
from viper_server.server import connection_options, request_limits
from viper_server.testing import ServerProcess

from memory import MB, PeakMemory

EXTRACT = "/viper.v1.ProfileService/ExtractProfile"
CALL_TIMEOUT = 60.0


def test_each_method_has_a_limit_within_the_message_limit():
    limits = request_limits(ServerConfig(max_message_bytes=16 * MiB))
    assert limits[EXTRACT].max_bytes == 16 * MiB  # capped by --max-message-bytes
    assert limits["/viper.v1.ProfileService/GetProfile"].max_bytes == 1 * MiB
    assert limits["/viper.v1.MetricService/Score"].flag == "--max-score-bytes"
    assert len(limits) == 7


def test_connection_options_are_in_milliseconds_and_zero_means_none():
    options = dict(connection_options(ServerConfig(max_connection_idle=0, max_connection_age=60)))
    assert options == {"grpc.max_connection_age_ms": 60_000, "grpc.max_connection_age_grace_ms": 300_000}


@pytest.fixture(scope="module")
def server(tiny_models_dir, tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "profiles.db"
    with ServerProcess(db, tiny_models_dir, "--max-extract-bytes", str(MiB), "--max-concurrent-rpcs", "2",
                       "--max-connection-idle", "1") as process:
        yield process


def test_sixteen_megabytes_of_empty_images_are_refused_unparsed(server):
    wire_bytes = b"\x12\x00" * 8_000_000  # 8 million empty RatedImage entries: 16 MB
    with grpc.insecure_channel(server.target) as channel:
        raw = channel.unary_unary(EXTRACT)  # no serializer: the bytes go out as they are
        with PeakMemory(server.pid) as memory, pytest.raises(grpc.RpcError) as error:
            raw(wire_bytes, timeout=CALL_TIMEOUT)
    assert error.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.value.details() == (
        f"request: {len(wire_bytes)} bytes, more than this method accepts (--max-extract-bytes {MiB})"
    )
    # gRPC holds the 16 MB it received; the half a gigabyte their parse would make never exists.
    assert memory.growth <= 64 * MB, f"the server grew by {memory.growth / MB:.0f} MB"


def test_a_profile_call_over_its_limit_names_the_flag(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = profile_pb2_grpc.ProfileServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.GetProfile(profile_pb2.GetProfileRequest(user_id="u" * (2 * MiB)), timeout=CALL_TIMEOUT)
    assert error.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "(--max-profile-call-bytes 1048576)" in error.value.details()


def test_calls_beyond_the_concurrent_limit_are_resource_exhausted(server):
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watches = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(2)]  # two calls held open
        try:
            for watch in watches:
                next(watch)  # each one is in flight on the server
            with pytest.raises(grpc.RpcError) as error:
                profile_pb2_grpc.ProfileServiceStub(channel).GetProfile(
                    profile_pb2.GetProfileRequest(user_id="anyone"), timeout=CALL_TIMEOUT)
            assert error.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            for watch in watches:
                watch.cancel()


def test_an_idle_connection_is_closed_by_the_server(server):
    states: list[grpc.ChannelConnectivity] = []
    went_idle = threading.Event()

    def record(state: grpc.ChannelConnectivity) -> None:
        states.append(state)
        if state is grpc.ChannelConnectivity.IDLE and grpc.ChannelConnectivity.READY in states:
            went_idle.set()

    with grpc.insecure_channel(server.target) as channel:
        channel.subscribe(record)
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)
        started = time.monotonic()
        assert went_idle.wait(30), f"the connection stayed open; states {states}"
        channel.unsubscribe(record)
    assert time.monotonic() - started >= 0.5  # not closed at once: after its idle second


def test_counting_fields_stops_early_and_passes_valid_requests():
    valid = profile_pb2.ExtractProfileRequest(user_id="a", images=[
        profile_pb2.RatedImage(data=b"x" * 300, comment="c", rating=profile_pb2.RATING_LIKED)] * 64)
    assert not more_fields_than(valid.SerializeToString(), 4 * 64 + 16)
    started = time.monotonic()
    assert more_fields_than(b"\x12\x00" * 8_000_000, 272)
    assert time.monotonic() - started < 0.1  # a few hundred steps, not eight million
    assert not more_fields_than(b"\x12\xff\xff\xff\xff\x0f", 10)  # malformed: left to the parser


def test_far_too_many_entries_are_refused_unparsed_naming_the_limit(server):
    wire_bytes = b"\x12\x00" * 50_000  # 100 KB: under the byte limit, 50,000 empty images
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as error:
            channel.unary_unary(EXTRACT)(wire_bytes, timeout=CALL_TIMEOUT)
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == "request: more than 272 fields (images: at most 64 (--max-images))"
