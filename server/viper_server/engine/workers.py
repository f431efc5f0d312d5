"""A model worker: one thread that runs model jobs in arrival order.

Model calls are blocking and own the accelerator, so each model runtime gets
exactly one worker thread and a bounded queue in front of it. RPC handlers
(asyncio) submit jobs and await their results or stream their events; the
event loop never runs model code. When the awaiting handler is cancelled
(client gone, deadline passed) the job is flagged: a queued job is dropped
before it starts, a running one sees `should_stop()` and stops at its next
step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")
_END = object()


class QueueFull(Exception):
    """The worker's queue is at capacity; the caller should retry later."""

    def __init__(self, worker: str, depth: int) -> None:
        super().__init__(f"{worker} queue is full ({depth} requests waiting); retry later")
        self.depth = depth


class WorkerClosed(Exception):
    """The worker is shutting down and takes no new jobs."""


class Job(Generic[T]):
    """A unit of model work, as seen from the worker thread."""

    def __init__(self, fn: Callable[[Job[T]], T], loop: asyncio.AbstractEventLoop,
                 events: asyncio.Queue | None) -> None:
        self._fn = fn
        self._loop = loop
        self._events = events
        self._cancelled = threading.Event()
        self.result: asyncio.Future[T] = loop.create_future()
        # Mark the outcome retrieved: a caller that left must not cause "never retrieved" noise.
        self.result.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.enqueued_at = time.monotonic()

    def should_stop(self) -> bool:
        """Polled by model code between steps: true once the caller has gone."""
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def emit(self, event: Any) -> None:
        """Hands an event to the awaiting handler (thread-safe, never blocks)."""
        if self._events is not None:
            self._call_soon(self._events.put_nowait, event)

    def run(self) -> None:
        try:
            value = self._fn(self)
        except BaseException as exc:  # handed to the awaiting side, which re-raises it
            self.fail(exc)
        else:
            self._call_soon(self._settle, value, None)

    def fail(self, exc: BaseException) -> None:
        """Ends the job with exc without running it (thread-safe)."""
        self._call_soon(self._settle, None, exc)

    def _call_soon(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop has closed: nobody is waiting any more
            pass

    def _settle(self, value: Any, exc: BaseException | None) -> None:
        if self._events is not None:
            self._events.put_nowait(_END)
        if self.result.done():
            return
        if isinstance(exc, asyncio.CancelledError):
            self.result.cancel()
        elif exc is not None:
            self.result.set_exception(exc)
        else:
            self.result.set_result(value)


class ModelWorker:
    """Runs jobs one at a time on a dedicated thread, with at most `max_queue` waiting."""

    def __init__(self, name: str, max_queue: int,
                 observe_wait: Callable[[float], None] = lambda seconds: None) -> None:
        self.name = name
        self._observe_wait = observe_wait
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._serve, name=f"worker-{name}", daemon=True)
        self._closed = False
        self._thread.start()

    @property
    def depth(self) -> int:
        """Jobs waiting (not counting the one running)."""
        return self._queue.qsize()

    async def run(self, fn: Callable[[Job[T]], T]) -> T:
        """Runs fn(job) on the worker thread and returns its result."""
        job = self._submit(fn, events=None)
        try:
            return await asyncio.shield(job.result)
        except asyncio.CancelledError:
            job.cancel()
            raise

    async def stream(self, fn: Callable[[Job[T]], T]) -> AsyncIterator[Any]:
        """Runs fn(job) on the worker thread, yielding what it emits as it emits it.

        Raises whatever fn raised once its earlier events have been yielded.
        Closing the iterator early cancels the job.
        """
        events: asyncio.Queue = asyncio.Queue()
        job = self._submit(fn, events=events)
        try:
            while (event := await events.get()) is not _END:
                yield event
            await job.result
        finally:
            job.cancel()

    def close(self, timeout: float | None = None) -> None:
        """Takes no new jobs, lets the running one finish, drops the queued ones."""
        if self._closed:
            return
        self._closed = True
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.fail(WorkerClosed(f"{self.name} worker stopped"))
        self._queue.put(None)
        self._thread.join(timeout)

    def _submit(self, fn: Callable[[Job[T]], T], events: asyncio.Queue | None) -> Job[T]:
        if self._closed:
            raise WorkerClosed(f"{self.name} worker stopped")
        job = Job(fn, asyncio.get_running_loop(), events)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(self.name, self._queue.qsize()) from None
        return job

    def _serve(self) -> None:
        while (job := self._queue.get()) is not None:
            if job.should_stop():
                # The caller left while the job was queued: never start it.
                job.fail(asyncio.CancelledError())
                continue
            self._observe_wait(time.monotonic() - job.enqueued_at)
            job.run()
