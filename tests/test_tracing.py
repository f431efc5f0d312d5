"""Traces: the span tree of Extract, Generate and Score in an in-process server with an in-memory exporter; the
caller's trace continued through the SDK; and tracing off costing nothing (no spans, no trace context)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from viper_client import ViperClient
from viper_server import tracing
from viper_server.config import ServerConfig
from viper_server.server import ViperServer

from fixture_data import QUERIES, fixture_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class InProcessServer:
    """A ViperServer on its own event loop thread, in this process, so that its spans reach our exporter."""

    def __init__(self, config: ServerConfig) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.server: ViperServer = self._run(self._make(config))
        self.port = self._run(self.server.start())
        self._run(self.server.load_models(), timeout=300)

    @staticmethod
    async def _make(config: ServerConfig) -> ViperServer:
        return ViperServer(config)  # grpc.aio wants the loop it will serve on to be running

    def _run(self, coroutine, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def close(self) -> None:
        self._run(self.server.stop_now())
        self.server.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture(scope="module")
def traced(tiny_models_dir, tmp_path_factory) -> Iterator[tuple[InProcessServer, InMemorySpanExporter, TracerProvider]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.configure(provider)
    db = tmp_path_factory.mktemp("db") / "profiles.db"
    server = InProcessServer(ServerConfig(port=0, db=str(db), models="tiny", models_dir=tiny_models_dir))
    try:
        yield server, exporter, provider
    finally:
        server.close()
        tracing.configure(None)


@pytest.fixture
def spans(traced) -> InMemorySpanExporter:
    _, exporter, _ = traced
    exporter.clear()
    return exporter


def rpc_span(finished: list[ReadableSpan], method: str) -> ReadableSpan:
    [span] = [span for span in finished if span.name == method]
    return span


def finished_with(exporter: InMemorySpanExporter, method: str, timeout: float = 30) -> list[ReadableSpan]:
    """The finished spans once the RPC's own has ended: the server may end it just after the client heard back
    (an error status goes out before the handler's last line runs)."""
    deadline = time.monotonic() + timeout
    while True:
        finished = list(exporter.get_finished_spans())
        if any(span.name == method for span in finished):
            return finished
        assert time.monotonic() < deadline, f"no span {method} within {timeout} s"
        time.sleep(0.01)


def children(finished: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return [span for span in finished if span.parent is not None and span.parent.span_id == parent.context.span_id]


def names(spans: list[ReadableSpan]) -> set[str]:
    return {span.name for span in spans}


def test_an_extraction_is_one_trace_from_the_caller_through_validation_the_queue_steps_and_the_store(traced, spans):
    server, _, provider = traced
    caller = provider.get_tracer("test")
    with caller.start_as_current_span("caller") as mine, ViperClient(f"127.0.0.1:{server.port}") as client:
        client.extract_profile("traced-alice", fixture_images())
    finished = finished_with(spans, "viper.v1.ProfileService/ExtractProfile")
    rpc = rpc_span(finished, "viper.v1.ProfileService/ExtractProfile")
    # The SDK passed our context: the server's span continues the caller's trace, as its child.
    assert rpc.context.trace_id == mine.get_span_context().trace_id
    assert rpc.parent.span_id == mine.get_span_context().span_id
    assert rpc.attributes["rpc.grpc.status_code"] == "OK"
    assert rpc.attributes["viper.user_id"] == "default/traced-alice"  # tenant-qualified
    below = children(finished, rpc)
    assert {"validate", "engine.prepare", "queue", "model.prefill", "model.decode",
            "store.save_extraction"} <= names(below)
    decode = next(span for span in below if span.name == "model.decode")
    assert decode.attributes["viper.steps"] >= 1
    assert decode.attributes["viper.batch_size.max"] >= 1
    assert decode.events and decode.events[0].attributes["batch_size"] >= 1
    # Every span of the call lies within the RPC's.
    assert all(rpc.start_time <= span.start_time <= span.end_time <= rpc.end_time for span in below)


def test_a_generation_shows_its_queue_wait_its_denoising_phases_with_batch_sizes_and_its_first_message(traced, spans):
    server, _, _ = traced
    with ViperClient(f"127.0.0.1:{server.port}") as client:
        client.extract_profile("traced-bob", fixture_images())
        spans.clear()
        client.generate_images("traced-bob", "a castle", num_images=2, steps=3, width=64, height=64, seed=1)
    finished = finished_with(spans, "viper.v1.GenerationService/Generate")
    rpc = rpc_span(finished, "viper.v1.GenerationService/Generate")
    below = children(finished, rpc)
    assert {"validate", "store.get", "queue", "model.encode", "model.base", "stream.first_response"} <= names(below)
    base = next(span for span in below if span.name == "model.base")
    assert base.attributes["viper.model"] == "sdxl"
    assert base.attributes["viper.steps"] >= 2  # one span for the phase, a step count, not a span a step
    # Batch sizes count requests sharing a step: this one alone (its two images go through one UNet call).
    assert base.attributes["viper.batch_size.max"] == 1
    assert {event.attributes["batch_size"] for event in base.events} == {1}
    assert len(base.events) == base.attributes["viper.steps"]
    first = next(span for span in below if span.name == "stream.first_response")
    assert first.start_time == rpc.start_time and first.end_time <= rpc.end_time
    queue = next(span for span in below if span.name == "queue")
    assert queue.end_time <= base.start_time


def test_a_score_says_whether_the_metric_prefix_came_from_the_cache(traced, spans):
    server, _, _ = traced
    with ViperClient(f"127.0.0.1:{server.port}") as client:
        client.extract_profile("traced-carol", fixture_images())
        spans.clear()
        client.score("traced-carol", QUERIES)
        first = finished_with(spans, "viper.v1.MetricService/Score")
        spans.clear()
        client.score("traced-carol", QUERIES)
        second = finished_with(spans, "viper.v1.MetricService/Score")

    def prefix_use(finished):
        rpc = rpc_span(finished, "viper.v1.MetricService/Score")
        below = children(finished, rpc)
        prepare = next(span for span in below if span.name == "engine.prepare")
        return prepare.attributes["viper.prefix_cache"], names(below), names(children(finished, prepare))

    assert prefix_use(first)[0] == "miss"
    assert {"validate", "store.get", "queue", "model.prefix", "model.query"} <= prefix_use(first)[1]
    assert "store.image_data" in prefix_use(first)[2]  # the images' bytes, read to compute the prefix
    assert prefix_use(second)[0] == "hit"
    assert "store.image_data" not in prefix_use(second)[2]  # a cached prefix: the bytes are not read


def test_spans_carry_no_comment_feature_or_image(traced, spans):
    server, _, _ = traced
    images = fixture_images()
    with ViperClient(f"127.0.0.1:{server.port}") as client:
        profile = client.extract_profile("traced-dave", images)
    texts = {str(value) for span in finished_with(spans, "viper.v1.ProfileService/ExtractProfile") for value in (
        *span.attributes.values(), *(v for event in span.events for v in event.attributes.values()))}
    secrets = [image.comment for image in images] + list(profile.liked_features) + list(profile.disliked_features)
    assert not [secret for secret in secrets if any(secret in text for text in texts if secret)]


def test_a_server_fault_carries_the_trace_id_in_its_message_and_marks_the_span(traced, spans, monkeypatch):
    server, _, _ = traced
    from viper_client import ViperError

    def broken(*args, **kwargs):
        raise RuntimeError("the disk is on fire")

    monkeypatch.setattr(server.server.store, "get", broken)
    with ViperClient(f"127.0.0.1:{server.port}") as client, pytest.raises(ViperError) as caught:
        client.get_profile("traced-erin")
    rpc = rpc_span(finished_with(spans, "viper.v1.ProfileService/GetProfile"), "viper.v1.ProfileService/GetProfile")
    assert f"trace_id {rpc.context.trace_id:032x}" in str(caught.value)
    assert rpc.status.status_code.name == "ERROR"
