"""The preprocessing workers of a real server (tiny models): a worker killed with SIGKILL while it holds a
request's image fails that request with UNAVAILABLE and a message, is replaced, and the next request works;
the workers leave with the server, on SIGTERM and when the server itself is killed."""

from __future__ import annotations

import functools
import os
import signal
import socket
import urllib.request

import grpc
import psutil
import pytest
from waiting import wait_for

from viper_proto.v1 import profile_pb2, profile_pb2_grpc
from viper_server.testing import ServerProcess

from imagedata import noise_png

CALL_TIMEOUT = 300.0
WAIT = 120.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def workers_of(pid: int) -> list[int]:
    return [child.pid for child in psutil.Process(pid).children()
            if "viper_server.engine.preprocessing" in " ".join(child.cmdline())]


def metric(url: str, name: str) -> float:
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} in the metrics")


wait_until = functools.partial(wait_for, timeout=WAIT)


def request(user_id: str, seed: int) -> profile_pb2.ExtractProfileRequest:
    return profile_pb2.ExtractProfileRequest(user_id=user_id, images=[
        profile_pb2.RatedImage(data=noise_png(48, seed=seed + index), comment="noted",
                               rating=profile_pb2.RATING_LIKED if index % 2 else profile_pb2.RATING_DISLIKED)
        for index in range(2)
    ])


def gone(pids: list[int]) -> bool:
    return not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)


def test_a_killed_worker_fails_its_request_with_unavailable_and_is_replaced(tiny_models_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    with ServerProcess(tmp_path / "profiles.db", tiny_models_dir, "--preprocess-workers", "1",
                       "--metrics-port", str(port)) as server:
        (worker,) = workers_of(server.pid)
        with grpc.insecure_channel(server.target) as channel:
            stub = profile_pb2_grpc.ProfileServiceStub(channel)
            os.kill(worker, signal.SIGSTOP)  # it takes the request's first image and holds it
            call = stub.ExtractProfile.future(request("victim", 0), timeout=CALL_TIMEOUT)
            wait_until(lambda: metric(url, "viper_preprocess_in_flight") == 1)
            os.kill(worker, signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as error:
                call.result()
            assert error.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "preprocessing worker" in error.value.details() and "retry" in error.value.details()
            profile = stub.ExtractProfile(request("after", 10), timeout=CALL_TIMEOUT)
            assert profile.liked_image_count == 1
        replacements = workers_of(server.pid)
        assert len(replacements) == 1 and replacements != [worker]
        assert metric(url, "viper_preprocess_worker_restarts_total") == 1
        assert server.stop(signal.SIGTERM) == 0
    wait_until(lambda: gone(replacements))


def test_the_workers_leave_when_the_server_is_killed(tiny_models_dir, tmp_path):
    with ServerProcess(tmp_path / "profiles.db", tiny_models_dir, "--preprocess-workers", "2") as server:
        workers = workers_of(server.pid)
        assert len(workers) == 2
        server.kill()
    wait_until(lambda: gone(workers))
