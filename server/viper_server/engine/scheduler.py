"""A step scheduler: one thread per model runs its requests a step at a time, batching compatible steps.

Model calls are blocking and own the accelerator, so each model has exactly one scheduler thread. A request
is a Task: a small state machine whose next_step() says what it needs next (a prefill chunk, a decode token,
a denoising step, ...) and which other requests may share that step's forward pass (equal step keys).
Between steps the scheduler admits waiting requests (up to a number of running requests per kind of work),
drops cancelled ones, orders the runnable requests by its policy (engine.policy) and runs one step for the
first of them together with the compatible others, up to the step's batch bound. A request therefore never
waits for another request's whole run: at most for the step in progress.

RPC handlers (asyncio) submit tasks and await their result or stream their events; the event loop never runs
model code. When the awaiting handler is cancelled (client gone, deadline passed) the task is flagged: a
waiting task is dropped before it starts, a running one is abandoned before its next step (its resources
freed, its slot given to the next request).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Hashable, Mapping
from typing import Any

from .. import tracing
from .errors import QueueFull, WorkerClosed
from .policy import SchedulingPolicy

log = logging.getLogger(__name__)

_END = object()
# A safety net only: readers and cancellations wake a scheduler whose running tasks are all paused.
_PAUSED_POLL_SECONDS = 1.0


class Step:
    """A request's next step. Steps with equal keys may run as one batch: `run(tasks)` runs the step for all
    of them at once (one forward pass), at most `limit` tasks a batch, and with a budget (> 0) only as many as
    fit their costs in it (the lead always runs: a request's own step is the bound). `label` names the step in
    metrics."""

    __slots__ = ("key", "run", "limit", "label", "cost", "budget")

    def __init__(self, key: Hashable, run: Callable[[list[Task]], None], *, limit: int = 1, label: str = "step",
                 cost: int = 0, budget: int = 0):
        self.key = key
        self.run = run
        self.limit = max(1, limit)
        self.label = label
        self.cost = cost
        self.budget = budget


class Task:
    """One request's work. Subclasses implement next_step() and, if they hold resources, abandon().

    The scheduler thread calls next_step(), the step runs, and finish() or fail() ends the task; emit() hands
    events to the awaiting handler. cancel() is called from the handler's side."""

    def __init__(self, kind: str, user: str | None = None) -> None:
        self.kind = kind
        self.user = user or ""  # "" = anonymous: replaced at submission by a name of its own
        self.seq = -1
        self.last_served = -1  # the policy's step count at its last step
        self.done = False
        self.submitted_at = 0.0
        self.trace: tracing.StepTrace | None = None  # its spans, when the request is traced
        self._outcome: tuple[Any, BaseException | None] = (None, None)
        self._cancelled = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: EventChannel | None = None
        self.result: asyncio.Future | None = None

    # -- the scheduler's side -------------------------------------------------------------------------

    def next_step(self) -> Step:
        """The step this task needs next (only called while it is not done)."""
        raise NotImplementedError

    def abandon(self) -> None:
        """The caller left while the task was running: free what it holds (called on the scheduler thread)."""

    def should_stop(self) -> bool:
        """True once the caller has gone; long steps may poll it."""
        return self._cancelled.is_set()

    def finish(self, value: Any = None) -> None:
        self.done = True
        self._outcome = (value, None)

    def fail(self, exc: BaseException) -> None:
        self.done = True
        self._outcome = (None, exc)

    def emit(self, event: Any) -> None:
        """Hands an event to the awaiting handler (thread-safe, never blocks)."""
        if self._events is not None:
            self._events.put(event, self.supersedes)

    def supersedes(self, newer: Any, older: Any) -> bool:
        """True when `newer` makes `older`, still unread, worthless (a newer preview of the same image): it
        then takes the older one's place in the event queue instead of queueing behind it."""
        return False

    def paused(self) -> bool:
        """True while the handler is behind on this task's events: the task takes no step until it reads."""
        return self._events is not None and self._events.behind()

    # -- the handler's side ---------------------------------------------------------------------------

    def cancel(self) -> None:
        self._cancelled.set()

    def _bind(self, loop: asyncio.AbstractEventLoop, events: EventChannel | None, seq: int) -> None:
        self._loop = loop
        self._events = events
        self.seq = seq
        self.user = self.user or f"~anonymous-{seq}"  # an anonymous request is a user of its own
        self.submitted_at = time.monotonic()
        self.result = loop.create_future()
        # Mark the outcome retrieved: a caller that left must not cause "never retrieved" noise.
        self.result.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _settle(self) -> None:
        """Delivers the outcome to the handler (thread-safe)."""
        value, exc = self._outcome
        self._call_soon(self._deliver, value, exc)

    def _call_soon(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop has closed: nobody is waiting any more
            pass

    def _deliver(self, value: Any, exc: BaseException | None) -> None:
        if self._events is not None:
            self._events.put(_END)
        if self.result.done():
            return
        if isinstance(exc, asyncio.CancelledError):
            self.result.cancel()
        elif exc is not None:
            self.result.set_exception(exc)
        else:
            self.result.set_result(value)


class EventChannel:
    """One streaming call's events, from the scheduler thread to its handler: `behind()` once `limit` are unread
    (the task then pauses between steps), and an event that supersedes an unread one takes its place at the end."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int, on_read: Callable[[], None]) -> None:
        self._loop = loop
        self._limit = max(1, limit)
        self._on_read = on_read  # wakes the scheduler when a paused task may go on
        self._items: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._ready = asyncio.Event()

    def put(self, event: Any, supersedes: Callable[[Any, Any], bool] | None = None) -> None:
        """Any thread; never blocks."""
        with self._lock:
            if supersedes is not None:
                for index, older in enumerate(self._items):
                    if older is not _END and supersedes(event, older):
                        del self._items[index]  # the newer one goes last: events stay in the order they were made
                        break
            self._items.append(event)
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the event loop has closed: nobody is reading any more
            pass

    def behind(self) -> bool:
        with self._lock:
            return len(self._items) >= self._limit

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    async def get(self) -> Any:
        """The oldest unread event (on the event loop)."""
        while True:
            with self._lock:
                if self._items:
                    was_behind = len(self._items) >= self._limit
                    event = self._items.popleft()
                    break
                self._ready.clear()  # set again by the next put, which runs after this on the loop
            await self._ready.wait()
        if was_behind:
            self._on_read()
        return event


class FunctionTask(Task):
    """A task of one step that calls fn(task): for model work that does not come in steps."""

    def __init__(self, fn: Callable[[FunctionTask], Any], kind: str = "job", user: str | None = None) -> None:
        super().__init__(kind, user)
        self._fn = fn

    def next_step(self) -> Step:
        return Step(("function", self.seq), _run_function, label=self.kind)


def _run_function(tasks: list[Task]) -> None:
    for task in tasks:
        try:
            task.finish(task._fn(task))
        except BaseException as exc:  # handed to the awaiting side, which re-raises it
            task.fail(exc)


StepObserver = Callable[[str, int, float], None]  # (step label, batch size, seconds)
AdmitObserver = Callable[[str, float], None]  # (kind, seconds waited)


class StepScheduler:
    """Runs tasks a step at a time on a dedicated thread, with at most `max_queue` waiting.

    `slots` bounds how many tasks of each kind run at once (kinds not named: one); a task waits in the queue
    until its kind has a free slot."""

    def __init__(self, name: str, *, max_queue: int, slots: Mapping[str, int] | None = None,
                 policy: str = "fair", on_step: StepObserver | None = None,
                 on_admit: AdmitObserver | None = None, event_buffer: int = 8) -> None:
        self.name = name
        self.max_queue = max_queue
        # Unread events per streaming call before its task pauses (README "Backpressure").
        self.event_buffer = event_buffer
        self._slots = dict(slots or {})
        self._policy = SchedulingPolicy(policy)
        self._on_step = on_step or (lambda label, size, seconds: None)
        self._on_admit = on_admit or (lambda kind, seconds: None)
        self._cond = threading.Condition()
        self._waiting: list[Task] = []
        self._running: list[Task] = []
        self._seq = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=f"scheduler-{name}", daemon=True)
        self._thread.start()

    @property
    def policy(self) -> str:
        return self._policy.name

    @property
    def depth(self) -> int:
        """Tasks waiting to be admitted (not counting the running ones)."""
        with self._cond:
            return len(self._waiting)

    @property
    def running(self) -> dict[str, int]:
        """Running tasks by kind."""
        with self._cond:
            return self._running_counts()

    async def run(self, task: Task) -> Any:
        """Runs the task to its end and returns its result."""
        self._submit(task, events=None)
        try:
            return await asyncio.shield(task.result)
        except asyncio.CancelledError:
            task.cancel()
            raise

    async def stream(self, task: Task, *, reserved: bool = False) -> AsyncIterator[Any]:
        """Runs the task, yielding what it emits as it emits it; raises whatever it failed with once its
        earlier events have been yielded. Closing the iterator early cancels the task.

        reserved: the task continues a request that already passed the queue bound (a later candidate of a
        best of N): it queues even when the queue is full, so an admitted request is not failed half done."""
        events = EventChannel(asyncio.get_running_loop(), self.event_buffer, self._wake)
        self._submit(task, events=events, reserved=reserved)
        try:
            while (event := await events.get()) is not _END:
                yield event
            await task.result
        finally:
            task.cancel()
            self._wake()  # a paused task is dropped at once, not when its reader would have caught up

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def close(self, timeout: float | None = None) -> None:
        """Takes no new tasks and ends the ones it has, each failing with WorkerClosed: the waiting ones at once,
        the running ones before their next step (the step in progress finishes). The server closes its engine once
        gRPC has stopped, when no caller is left: a stream whose handler was cancelled while it waited on a write
        leaves its task paused until the stream's generator is collected, which would hold this join forever."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            waiting, self._waiting = self._waiting, []
            self._cond.notify()
        for task in waiting:
            task.fail(WorkerClosed(f"{self.name} scheduler stopped"))
            task._settle()
        self._thread.join(timeout)

    # -- internals ------------------------------------------------------------------------------------

    def _submit(self, task: Task, events: EventChannel | None, reserved: bool = False) -> None:
        with self._cond:
            if self._closed:
                raise WorkerClosed(f"{self.name} scheduler stopped")
            if len(self._waiting) >= self.max_queue and not reserved:
                raise QueueFull(self.name, len(self._waiting))
            task._bind(asyncio.get_running_loop(), events, next(self._seq))
            task.trace = tracing.capture(self.name, task.kind)  # here: the caller's trace context is current
            self._waiting.append(task)
            self._cond.notify()

    def _serve(self) -> None:
        while True:
            try:
                if not self._serve_once():
                    return
            except Exception as exc:  # a bug: fail what is running rather than leave every caller waiting
                log.exception("%s scheduler: a step failed outside any request", self.name)
                for task in list(self._running):
                    if not task.done:
                        task.fail(exc)
                    self._end(task)

    def _serve_once(self) -> bool:
        """Admits, drops the cancelled, runs one step; False once closed (its running tasks ended)."""
        with self._cond:
            while not self._closed and not self._waiting and not self._has_work():
                self._cond.wait()
            closed = self._closed
        if closed:
            for task in list(self._running):
                if not task.done:
                    self._abandon(task, WorkerClosed(f"{self.name} scheduler stopped"))
                self._end(task)
            return False
        with self._cond:
            dropped = [task for task in self._waiting if task.should_stop()]
            self._waiting = [task for task in self._waiting if not task.should_stop()]
            admitted = self._admit()
        for task in dropped:  # the caller left while the task waited: it never starts
            task.fail(asyncio.CancelledError())
            self._end(task)
        now = time.monotonic()
        for task in admitted:
            self._notify(self._on_admit, task.kind, now - task.submitted_at)
            if task.trace is not None:
                task.trace.admitted()
        self._drop_cancelled()
        if not self._step() and not admitted and not dropped:
            with self._cond:  # every running task is paused (and nothing can be admitted): until a reader wakes us
                if not self._has_work():
                    self._cond.wait(_PAUSED_POLL_SECONDS)
        return True

    def _has_work(self) -> bool:
        """A running task can take a step, or must be dropped (lock held)."""
        return any(task.should_stop() or not task.paused() for task in self._running)

    def _notify(self, observer: Callable[..., None], *args: Any) -> None:
        try:
            observer(*args)
        except Exception:  # metrics must never stop the model work
            log.exception("%s scheduler: an observer failed", self.name)

    def _admit(self) -> list[Task]:
        """Moves waiting tasks whose kind has a free slot to the running set, in policy order (lock held)."""
        admitted = []
        running = self._running_counts()
        for task in self._policy.order(self._waiting):
            if running.get(task.kind, 0) < self._slots.get(task.kind, 1):
                running[task.kind] = running.get(task.kind, 0) + 1
                admitted.append(task)
        if admitted:
            chosen = set(map(id, admitted))
            self._waiting = [task for task in self._waiting if id(task) not in chosen]
            self._running.extend(admitted)
        return admitted

    def _running_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for task in self._running:
            counts[task.kind] = counts.get(task.kind, 0) + 1
        return counts

    def _drop_cancelled(self) -> None:
        for task in list(self._running):
            if task.should_stop() and not task.done:
                self._abandon(task, asyncio.CancelledError())
            if task.done:
                self._end(task)

    def _abandon(self, task: Task, exc: BaseException) -> None:
        """Frees what a running task holds and fails it with exc."""
        try:
            task.abandon()
        except Exception:  # freeing must not take the scheduler down
            log.exception("%s: abandoning a %s failed", self.name, task.kind)
        task.fail(exc)

    def _step(self) -> bool:
        """Runs one step of the first runnable task in policy order, with the compatible others; False when no
        task could step (none running, or all paused)."""
        steps: dict[int, Step] = {}
        for task in list(self._running):
            if task.paused():
                continue
            try:
                steps[id(task)] = task.next_step()
            except Exception as exc:
                task.fail(exc)
                self._end(task)
        if not steps:
            return False
        ordered = self._policy.order(task for task in self._running if id(task) in steps)
        lead = steps[id(ordered[0])]
        batch = _batch(lead, [task for task in ordered if steps[id(task)].key == lead.key], steps)
        started = time.perf_counter()
        try:
            lead.run(batch)
        except Exception as exc:  # the whole forward pass failed: so did every request in it
            log.debug("%s: %s step failed for %d requests", self.name, lead.label, len(batch), exc_info=True)
            for task in batch:
                if not task.done:
                    task.fail(exc)
        seconds = time.perf_counter() - started
        self._notify(self._on_step, lead.label, len(batch), seconds)
        for task in batch:
            if task.trace is not None:
                task.trace.stepped(lead.label, len(batch), seconds)
        self._policy.served(batch)
        for task in batch:
            if task.done:
                self._end(task)
        return True

    def _end(self, task: Task) -> None:
        """Removes a finished task and hands its outcome to its caller."""
        with self._cond:
            if task in self._running:
                self._running.remove(task)
            if not any(other.user == task.user for other in (*self._running, *self._waiting)):
                self._policy.forget(task.user)
        if task.trace is not None:
            task.trace.ended()
        task._settle()


def _batch(lead: Step, candidates: list[Task], steps: Mapping[int, Step]) -> list[Task]:
    """The lead's task and, in order, the compatible others while the batch bound and the budget hold."""
    batch, spent = candidates[:1], lead.cost
    for task in candidates[1:]:
        if len(batch) == lead.limit:
            break
        cost = steps[id(task)].cost
        if lead.budget and spent + cost > lead.budget:
            continue
        batch.append(task)
        spent += cost
    return batch
