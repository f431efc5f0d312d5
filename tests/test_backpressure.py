"""Backpressure on streams (issue 25): a bounded event queue per call, the task paused between steps while its
reader is behind, stale previews replaced, and a server-side limit on calls without a deadline."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import grpc
import pytest

from viper_client import RatedImage, ViperClient
from viper_proto.v1 import generation_pb2, generation_pb2_grpc
from viper_server.domain import Preview, Progress
from viper_server.engine.errors import WorkerClosed
from viper_server.engine.scheduler import EventChannel, Step, StepScheduler, Task
from viper_server.engine.tasks import GenerationTask
from viper_server.testing import ServerProcess

from imagedata import png_bytes

BUFFER = 4


class Counting(Task):
    """Emits its step number each step, for `steps` steps."""

    def __init__(self, steps: int) -> None:
        super().__init__("work")
        self.steps, self.done_steps = steps, 0

    def next_step(self) -> Step:
        return Step(("own", self.seq), run_counting, label="work")


def run_counting(tasks: list[Counting]) -> None:
    for task in tasks:
        task.done_steps += 1
        task.emit(task.done_steps)
        if task.done_steps == task.steps:
            task.finish()


def test_a_reader_that_stops_reading_pauses_its_task_and_loses_nothing():
    async def scenario() -> tuple[int, int, list[int]]:
        scheduler = StepScheduler("test", max_queue=4, event_buffer=BUFFER)
        try:
            task = Counting(steps=200)
            events = scheduler.stream(task)
            first = [await anext(events)]
            await asyncio.sleep(0.3)  # the reader is away: hundreds of steps' time
            while_away = task.done_steps
            rest = [event async for event in events]
            return while_away, task.done_steps, first + rest
        finally:
            scheduler.close()

    while_away, done, events = asyncio.run(scenario())
    assert while_away <= BUFFER + 2, f"{while_away} steps ran while nobody read"
    assert done == 200 and events == list(range(1, 201))


def test_a_paused_task_is_dropped_at_once_when_its_reader_leaves():
    async def scenario() -> Counting:
        scheduler = StepScheduler("test", max_queue=4, event_buffer=BUFFER)
        try:
            task = Counting(steps=10_000)
            events = scheduler.stream(task)
            await anext(events)
            await asyncio.sleep(0.1)  # paused now
            await events.aclose()
            deadline = time.monotonic() + 0.5  # well inside the paused scheduler's 1 s safety poll
            while scheduler.running and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert not scheduler.running, "the paused task kept its slot"
            return task
        finally:
            scheduler.close()

    task = asyncio.run(scenario())
    assert task.done_steps <= BUFFER + 2


def test_closing_ends_a_paused_task_whose_stream_was_left_open():
    # A handler cancelled while it waited on a write leaves its stream neither read nor closed (until the generator
    # is collected): the paused task must not hold the scheduler's close, and its reader, if any, hears why.
    async def scenario() -> Counting:
        scheduler = StepScheduler("test", max_queue=4, event_buffer=BUFFER)
        task = Counting(steps=10_000)
        events = scheduler.stream(task)
        await anext(events)
        await asyncio.sleep(0.1)  # paused now
        await asyncio.to_thread(scheduler.close, 5)
        assert not scheduler.running, "close waited for a task nobody reads"
        with pytest.raises(WorkerClosed, match="test scheduler stopped"):
            async for _ in events:
                pass
        return task

    task = asyncio.run(scenario())
    assert task.done_steps <= BUFFER + 2


def test_a_newer_preview_replaces_the_unread_one_of_its_image_and_events_keep_their_order():
    async def scenario() -> list:
        channel = EventChannel(asyncio.get_running_loop(), limit=BUFFER, on_read=lambda: None)
        supersedes = GenerationTask.supersedes
        made = [Progress(0, 1, 9), Preview(0, 1, b"a"), Preview(1, 1, b"b"), Progress(0, 2, 9), Preview(0, 2, b"c")]
        for event in made:
            channel.put(event, lambda newer, older: supersedes(None, newer, older))
        return [await channel.get() for _ in range(len(channel))]

    read = asyncio.run(scenario())
    assert read == [Progress(0, 1, 9), Preview(1, 1, b"b"), Progress(0, 2, 9), Preview(0, 2, b"c")]


# -- the server's limit on a call without a deadline ---------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_models_dir, tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "profiles.db"
    with ServerProcess(db, tiny_models_dir, "--max-call-seconds", "1") as process:
        with ViperClient(process.target) as client:
            client.extract_profile("slow-reader", [RatedImage(png_bytes(), rating="liked"),
                                                   RatedImage(png_bytes((20, 20)), rating="disliked")])
        yield process


def long_generation(**fields) -> generation_pb2.GenerateRequest:
    # 150 steps with a preview each: several seconds on the tiny models.
    return generation_pb2.GenerateRequest(user_id="slow-reader", prompt="a slow sea", width=64, height=64,
                                          steps=150, preview_every=1, **fields)


def test_a_call_without_a_deadline_is_ended_at_the_server_limit_and_its_work_cancelled(server):
    """Even while the client reads nothing (the server's writes wait on flow control), the limit ends the call
    with its status: the client is told, not left waiting for a status that never comes."""
    with grpc.insecure_channel(server.target) as channel:
        events = generation_pb2_grpc.GenerationServiceStub(channel).Generate(long_generation())
        watchdog = threading.Timer(120, events.cancel)  # a product that never ends the call fails, not hangs
        watchdog.start()
        started = time.monotonic()
        try:
            next(events)
            time.sleep(2)  # a reader that went away without a deadline
            with pytest.raises(grpc.RpcError) as error:
                for _ in events:
                    pass
        finally:
            watchdog.cancel()
    assert error.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED, error.value
    assert "(--max-call-seconds 1)" in error.value.details()
    assert time.monotonic() - started < 30
    line = server.wait_for_log(r"generation cancelled after \d+ denoising steps")
    assert int(re.search(r"after (\d+) denoising", line).group(1)) < 150


def test_a_client_deadline_takes_the_place_of_the_server_limit(server):
    with grpc.insecure_channel(server.target) as channel:
        events = list(generation_pb2_grpc.GenerationServiceStub(channel).Generate(
            long_generation(), timeout=120))  # longer than the server limit of 1 s
    assert events[-1].WhichOneof("event") == "image"
