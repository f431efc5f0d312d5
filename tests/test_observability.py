"""Prometheus metrics, request ids in logs, and the step counter stopping when a client goes away."""

from __future__ import annotations

import re
import socket
import time
import urllib.request

import grpc
import pytest

from viper_client import DeadlineExceeded, NotFound, Progress, ViperClient
from viper_proto.v1 import profile_pb2, profile_pb2_grpc
from viper_server.testing import ServerProcess

from fixture_data import QUERIES, fixture_images


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_models_dir, tmp_path_factory):
    metrics_port = free_port()
    db = tmp_path_factory.mktemp("db") / "profiles.db"
    with ServerProcess(db, tiny_models_dir, "--metrics-port", str(metrics_port)) as process:
        process.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        with ViperClient(process.target) as client:
            client.extract_profile("watched", fixture_images())
        yield process


def scrape(server) -> dict[str, float]:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def steps(server) -> float:
    return scrape(server).get("viper_generation_steps_total", 0.0)


def test_rpcs_profiles_and_queues_are_exported(server):
    with ViperClient(server.target) as client:
        with pytest.raises(NotFound):
            client.get_profile("absent")
    # The server counts a call once its handler has finished, which may be just after the client heard back.
    not_found = 'viper_rpcs_total{code="NOT_FOUND",method="/viper.v1.ProfileService/GetProfile"}'
    deadline = time.monotonic() + 10
    while not_found not in (samples := scrape(server)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert samples[not_found] >= 1
    assert samples['viper_rpcs_total{code="OK",method="/viper.v1.ProfileService/ExtractProfile"}'] == 1
    assert samples['viper_rpc_latency_seconds_count{method="/viper.v1.ProfileService/GetProfile"}'] >= 1
    assert samples["viper_profiles"] == 1
    assert samples['viper_queue_depth{model="sdxl"}'] == 0
    assert samples['viper_queue_wait_seconds_count{model="idefics2"}'] >= 1


def test_generation_steps_and_metric_cache_are_counted(server):
    before = steps(server)
    with ViperClient(server.target) as client:
        list(client.generate("watched", "a cat", width=64, height=64, steps=4, refine=False, seed=2))
        client.score("watched", QUERIES)
        client.score("watched", QUERIES)
    samples = scrape(server)
    assert samples["viper_generation_steps_total"] - before == 4
    assert samples["viper_metric_cache_misses_total"] >= 1
    assert samples["viper_metric_cache_hits_total"] >= 1
    assert samples["viper_metric_cache_bytes"] > 0
    # The queries' image features: computed for the first Score, taken from the cache for the second.
    assert samples["viper_vision_cache_misses_total"] >= len(QUERIES)
    assert samples["viper_vision_cache_hits_total"] >= len(QUERIES)
    assert samples["viper_vision_cache_bytes"] > 0 and samples["viper_vision_cache_entries"] >= len(QUERIES)


def test_scheduler_steps_batch_sizes_and_waits_are_exported(server):
    with ViperClient(server.target) as client:
        list(client.generate("watched", "a cat", width=64, height=64, steps=3, seed=4))
        client.score("watched", QUERIES)
    samples = scrape(server)
    # Steps per model and kind of step (rate() of the counter is steps per second), one batch size per step.
    for model, step in (("sdxl", "encode"), ("sdxl", "base"), ("sdxl", "refiner"), ("sdxl", "vae"),
                        ("idefics2", "prefill"), ("idefics2", "decode"), ("idefics2", "query")):
        ran = samples[f'viper_steps_total{{model="{model}",step="{step}"}}']
        assert ran >= 1
        assert samples[f'viper_step_batch_size_count{{model="{model}",step="{step}"}}'] == ran
    assert samples['viper_steps_total{model="sdxl",step="base"}'] >= 2  # 3 steps: base, base, refiner
    for model, kind in (("sdxl", "generate"), ("idefics2", "extract"), ("idefics2", "score")):
        assert samples[f'viper_work_queue_wait_seconds_count{{kind="{kind}",model="{model}"}}'] >= 1


def test_a_client_request_id_is_logged(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = profile_pb2_grpc.ProfileServiceStub(channel)
        with pytest.raises(grpc.RpcError):
            stub.GetProfile(profile_pb2.GetProfileRequest(user_id="absent"),
                            metadata=(("x-request-id", "trace-4711"),))
    server.wait_for_log(r"rpc method=/viper.v1.ProfileService/GetProfile user=absent status=NOT_FOUND .*"
                        r"request_id=trace-4711")


def assert_steps_stop(server) -> None:
    """The generation is dropped (none runs or waits: a step counts before its request ends), and the counter
    then stays put."""
    deadline = time.monotonic() + 60
    while sdxl_busy(samples := scrape(server)):
        assert time.monotonic() < deadline, "a generation still runs a minute after its caller left"
        time.sleep(0.05)
    assert steps(server) == samples.get("viper_generation_steps_total", 0.0)


def sdxl_busy(samples: dict[str, float]) -> float:
    """Generations running or waiting on the sdxl scheduler."""
    return samples['viper_queue_depth{model="sdxl"}'] + sum(
        value for name, value in samples.items() if name.startswith("viper_running{") and 'model="sdxl"' in name)


def test_disconnect_mid_stream_stops_the_step_counter(server):
    before = steps(server)
    with ViperClient(server.target) as client:
        stream = client.generate("watched", "long", width=64, height=64, steps=150, num_images=4, seed=9)
        for event in stream:
            if isinstance(event, Progress) and event.step >= 3:
                break
        stream.close()
    assert_steps_stop(server)
    assert steps(server) - before < 150


def test_deadline_expiry_stops_the_step_counter(server):
    before = steps(server)
    with ViperClient(server.target) as client:
        with pytest.raises(DeadlineExceeded):
            list(client.generate("watched", "long", width=64, height=64, steps=150, num_images=4, seed=9,
                                 timeout=1.0))
    assert_steps_stop(server)
    assert steps(server) - before < 600
    line = server.wait_for_log(r"status=CANCELLED|status=DEADLINE_EXCEEDED")
    assert re.search(r"Generate", line)
