"""A model's scheduler running one-step jobs (FunctionTask): its thread, arrival order, the bounded queue,
cancellation, streaming. Step-level scheduling and batching: tests/test_scheduler.py."""

import asyncio
import threading

import pytest

from viper_server.engine.errors import QueueFull, WorkerClosed
from viper_server.engine.scheduler import FunctionTask, StepScheduler


class Worker:
    """The old ModelWorker's interface over a StepScheduler: jobs of one kind run one at a time."""

    def __init__(self, name: str, max_queue: int) -> None:
        self.scheduler = StepScheduler(name, max_queue=max_queue)

    def run(self, fn):
        return self.scheduler.run(FunctionTask(fn))

    def stream(self, fn):
        return self.scheduler.stream(FunctionTask(fn))

    def close(self, timeout=None):
        self.scheduler.close(timeout)


@pytest.fixture
def worker():
    worker = Worker("test", max_queue=2)
    yield worker
    worker.close(timeout=5)


def run(coro):
    return asyncio.run(coro)


def test_runs_jobs_on_its_own_thread_in_arrival_order():
    worker = Worker("test", max_queue=8)
    seen = []

    def job_for(n):
        def fn(job):
            seen.append((n, threading.current_thread().name))
            return n * 10

        return fn

    async def main():
        return await asyncio.gather(*(worker.run(job_for(n)) for n in range(3)))

    assert run(main()) == [0, 10, 20]
    worker.close(timeout=5)
    assert [n for n, _ in seen] == [0, 1, 2]
    assert {name for _, name in seen} == {"scheduler-test"}


def test_exceptions_reach_the_caller(worker):
    def fail(job):
        raise KeyError("boom")

    with pytest.raises(KeyError):
        run(worker.run(fail))


def test_full_queue_is_refused_at_once_with_its_depth(worker):
    started, release = threading.Event(), threading.Event()

    def block(job) -> bool:
        started.set()
        return release.wait(60)

    async def main():
        running = asyncio.ensure_future(worker.run(block))
        # The first job is running, the queue is empty (a fixed pause was too short on a loaded machine).
        assert await asyncio.to_thread(started.wait, 60)
        queued = [asyncio.ensure_future(worker.run(lambda job: None)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="2 requests waiting"):
            await worker.run(lambda job: None)
        release.set()
        await asyncio.gather(running, *queued)

    run(main())


def test_a_job_cancelled_while_queued_never_runs(worker):
    started, release = threading.Event(), threading.Event()
    ran = []

    def block(job) -> bool:
        started.set()
        return release.wait(60)

    async def main():
        blocker = asyncio.ensure_future(worker.run(block))
        assert await asyncio.to_thread(started.wait, 60)  # running: the next job queues behind it
        queued = asyncio.ensure_future(worker.run(lambda job: ran.append(1)))
        while worker.scheduler.depth == 0 and not queued.done():  # submitted (a turn of the loop, no pause)
            await asyncio.sleep(0)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        release.set()
        await blocker
        await worker.run(lambda job: None)  # the worker moved past the dropped job

    run(main())
    assert ran == []


def test_a_running_job_sees_should_stop_after_cancel(worker):
    steps_after_cancel = []
    started, cancelled, stopped = threading.Event(), threading.Event(), threading.Event()

    def long_job(job):
        for step in range(6000):  # a minute of 10 ms steps: far longer than any wait below
            if job.should_stop():
                stopped.set()
                return step
            if cancelled.is_set():
                steps_after_cancel.append(step)
            started.set()
            threading.Event().wait(0.01)
        return -1

    async def main():
        task = asyncio.ensure_future(worker.run(long_job))
        assert await asyncio.to_thread(started.wait, 60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The caller has seen the cancellation, so the job's flag is set: it stops at its next check, with at
        # most the step it was in finished after this point.
        cancelled.set()
        assert await asyncio.to_thread(stopped.wait, 60)
        # The worker is free again: the next job runs.
        return await asyncio.wait_for(worker.run(lambda job: "next"), timeout=60)

    assert run(main()) == "next"
    assert len(steps_after_cancel) <= 1


def test_stream_yields_events_in_order_then_the_error(worker):
    def producer(job):
        for n in range(3):
            job.emit(n)
        raise ValueError("after three")

    async def main():
        events = []
        with pytest.raises(ValueError, match="after three"):
            async for event in worker.stream(producer):
                events.append(event)
        return events

    assert run(main()) == [0, 1, 2]


def test_closing_a_stream_early_stops_the_job(worker):
    stopped = threading.Event()

    def producer(job):
        n = 0
        while not job.should_stop():
            job.emit(n)
            n += 1
            threading.Event().wait(0.005)
        stopped.set()

    async def main():
        stream = worker.stream(producer)
        async for event in stream:
            if event == 3:
                break
        await stream.aclose()

    run(main())
    assert stopped.wait(2)


def test_closed_worker_refuses_new_jobs():
    worker = Worker("closing", max_queue=1)
    worker.close(timeout=5)
    with pytest.raises(WorkerClosed):
        run(worker.run(lambda job: None))
