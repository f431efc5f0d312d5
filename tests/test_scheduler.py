"""The step scheduler with fake model work: batching of compatible steps, batch bounds, slots, turns between
users and kinds (the policies), cancellation freeing a slot within one step. No models: each step is logged.
ViPer's real steps batched: tests/test_batching.py."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from viper_server.engine.errors import QueueFull
from viper_server.engine.policy import SchedulingPolicy
from viper_server.engine.scheduler import Step, StepScheduler, Task


class Log:
    """The batches the scheduler ran, in order, each a tuple of task names."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, ...]] = []
        self.lock = threading.Lock()

    def add(self, batch: tuple[str, ...]) -> None:
        with self.lock:
            self.batches.append(batch)

    def steps_of(self, name: str) -> list[int]:
        return [index for index, batch in enumerate(self.batches) if name in batch]


class FakeTask(Task):
    """`steps` steps; tasks with the same `key` may share a step (up to `limit`); `gate` holds its steps."""

    def __init__(self, name: str, log: Log, *, kind: str = "work", user: str | None = None, steps: int = 1,
                 key: object = None, limit: int = 8, gate: threading.Event | None = None, seconds: float = 0,
                 first_alone: bool = False, cost: int = 0, budget: int = 0) -> None:
        super().__init__(kind, user)
        self.cost, self.budget = cost, budget
        self.name, self.log, self.remaining, self.key, self.limit, self.gate = name, log, steps, key, limit, gate
        self.seconds, self.first_alone, self.steps = seconds, first_alone, steps
        self.abandoned = False

    def next_step(self) -> Step:
        key = self.key if self.key is not None else ("own", self.seq)
        if self.first_alone and self.remaining == self.steps:
            key = ("first", self.seq)  # like a generation's encode step before its shared denoising steps
        return Step(key, run_fake, limit=self.limit, label=self.kind, cost=self.cost, budget=self.budget)

    def abandon(self) -> None:
        self.abandoned = True


def run_fake(tasks: list[FakeTask]) -> None:
    tasks[0].log.add(tuple(task.name for task in tasks))
    for task in tasks:
        if task.gate is not None:
            task.gate.wait(10)
        time.sleep(task.seconds)
        if task.name.startswith("bad"):
            raise RuntimeError(f"{task.name} broke the batch")
        task.remaining -= 1
        if task.remaining == 0:
            task.finish(task.name)


@pytest.fixture
def log() -> Log:
    return Log()


def scheduler(**options) -> StepScheduler:
    return StepScheduler("test", **{"max_queue": 64, "slots": {"work": 8, "other": 8}, **options})


async def held_then_released(sched: StepScheduler, log: Log, tasks: list[FakeTask], *,
                             return_exceptions: bool = False) -> list[object]:
    """Runs tasks submitted while a blocker step holds the scheduler, so all of them are waiting when it picks."""
    gate = threading.Event()
    blocker = asyncio.ensure_future(sched.run(FakeTask("blocker", log, kind="block", gate=gate)))
    while not log.batches:
        await asyncio.sleep(0.005)
    runs = [asyncio.ensure_future(sched.run(task)) for task in tasks]
    await asyncio.sleep(0.05)
    gate.set()
    await blocker
    return await asyncio.gather(*runs, return_exceptions=return_exceptions)


def test_compatible_steps_run_as_one_batch_and_others_alone(log):
    sched = scheduler()
    tasks = [FakeTask(f"same{n}", log, user=f"u{n}", steps=3, key="shared") for n in range(3)]
    tasks += [FakeTask("alone", log, user="u9", steps=2)]
    assert asyncio.run(held_then_released(sched, log, tasks)) == ["same0", "same1", "same2", "alone"]
    sched.close(5)
    batches = log.batches[1:]
    assert batches.count(("same0", "same1", "same2")) == 3  # every step of the three together
    assert batches.count(("alone",)) == 2
    assert len(batches) == 5


def test_a_batch_holds_at_most_its_limit(log):
    sched = scheduler()
    tasks = [FakeTask(f"t{n}", log, user=f"u{n}", steps=2, key="shared", limit=3) for n in range(5)]
    asyncio.run(held_then_released(sched, log, tasks))
    sched.close(5)
    # Full batches first: the tasks served longest ago lead, the others fill the batch up to its limit.
    assert [len(batch) for batch in log.batches[1:]] == [3, 3, 3, 1]
    assert sorted(name for batch in log.batches[1:] for name in batch) == sorted([f"t{n}" for n in range(5)] * 2)


def test_a_batch_holds_what_fits_its_budget_and_the_lead_always_runs(log):
    sched = scheduler()
    costs = {"big": 700, "a": 200, "b": 200, "c": 100, "d": 300}  # e.g. prompt tokens of each task's next step
    tasks = [FakeTask(name, log, user=f"u{n}", key="shared", cost=cost, budget=500)
             for n, (name, cost) in enumerate(costs.items())]
    asyncio.run(held_then_released(sched, log, tasks))
    sched.close(5)
    # The lead runs alone beyond the budget; then the others in order while they fit, one that does not waits.
    assert log.batches[1:] == [("big",), ("a", "b", "c"), ("d",)]


def test_slots_bound_the_running_tasks_of_a_kind(log):
    sched = scheduler(slots={"work": 2})
    tasks = [FakeTask(f"t{n}", log, user=f"u{n}", steps=2, key="shared") for n in range(5)]
    asyncio.run(held_then_released(sched, log, tasks))
    sched.close(5)
    assert max(len(batch) for batch in log.batches) == 2
    assert sorted(name for batch in log.batches[1:] for name in batch) == sorted([f"t{n}" for n in range(5)] * 2)


def test_a_newcomer_waits_for_at_most_the_step_in_progress(log):
    """A score arriving while three users' long work runs: its step comes right after the step running
    when it arrived (or the one the scheduler had just picked), never behind the others' whole runs."""
    sched = scheduler()
    waits: list[int] = []

    async def main():
        # Steps of a millisecond, like a decode step of the tiny model.
        long = [asyncio.ensure_future(sched.run(FakeTask(f"long{n}", log, user=f"u{n}", steps=10**9, seconds=1e-3)))
                for n in range(3)]
        for number in range(5):
            await asyncio.sleep(0.02)
            submitted_at = len(log.batches)  # batches started so far; the last may be in progress
            await sched.run(FakeTask(f"score{number}", log, kind="other", user="scorer"))
            waits.append(log.steps_of(f"score{number}")[0] - submitted_at)
        for long_task in long:
            long_task.cancel()

    asyncio.run(main())
    sched.close(5)
    assert all(wait <= 1 for wait in waits), waits


def test_round_robin_between_users_one_users_many_requests_do_not_starve_others(log):
    sched = scheduler()
    many = [FakeTask(f"a{n}", log, user="alice", steps=2) for n in range(6)]
    one = FakeTask("b0", log, user="bob", steps=2)
    asyncio.run(held_then_released(sched, log, [*many, one]))
    sched.close(5)
    order = [batch[0] for batch in log.batches[1:]]
    # bob's steps are the 2nd and the 4th: a turn every other step, however many requests alice has.
    assert log.steps_of("b0") == [2, 4]
    assert order[0] == "a0"
    assert sorted(order) == sorted([f"a{n}" for n in range(6)] * 2 + ["b0"] * 2)


def test_one_users_requests_take_turns_so_they_meet_in_a_batch(log):
    sched = scheduler()
    tasks = [FakeTask(f"g{n}", log, user="alice", steps=4, key="denoise", first_alone=True) for n in range(3)]
    asyncio.run(held_then_released(sched, log, tasks))
    sched.close(5)
    assert log.batches[1:] == [("g0",), ("g1",), ("g2",), ("g0", "g1", "g2"), ("g0", "g1", "g2"),
                               ("g0", "g1", "g2")]


@pytest.mark.parametrize("policy", ["fair", "kinds"])
def test_kinds_take_turns(log, policy):
    sched = scheduler(policy=policy)
    # Four users ask for "work", one for "other" (unbatchable steps).
    tasks = [FakeTask(f"w{n}", log, user=f"u{n}", steps=2) for n in range(4)]
    tasks.append(FakeTask("o", log, kind="other", user="v", steps=4))
    asyncio.run(held_then_released(sched, log, tasks))
    sched.close(5)
    other = log.steps_of("o")
    if policy == "kinds":
        assert other == [2, 4, 6, 8]  # every other step, as its kind gets half the turns
    else:
        assert other[0] <= 2 and other[-1] == len(log.batches) - 1  # a user among five: a turn per round


def test_fifo_runs_in_arrival_order(log):
    sched = scheduler(policy="fifo")
    tasks = [FakeTask("a0", log, user="alice", steps=2), FakeTask("a1", log, user="alice", steps=2),
             FakeTask("b0", log, user="bob", steps=2)]
    asyncio.run(held_then_released(sched, log, tasks))
    sched.close(5)
    assert [batch[0] for batch in log.batches[1:]] == ["a0", "a0", "a1", "a1", "b0", "b0"]


def test_cancelling_a_running_task_frees_its_slot_within_one_step(log):
    sched = scheduler(slots={"work": 1})
    endless = FakeTask("endless", log, user="alice", steps=10**9, seconds=1e-3)

    async def main():
        running = asyncio.ensure_future(sched.run(endless))
        while len(log.batches) < 3:
            await asyncio.sleep(0.001)
        waiting = asyncio.ensure_future(sched.run(FakeTask("next", log, user="bob")))
        await asyncio.sleep(0.01)
        assert sched.depth == 1  # no free slot: it waits
        steps_at_cancel = len(log.batches)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert await asyncio.wait_for(waiting, 5) == "next"
        return steps_at_cancel

    steps_at_cancel = asyncio.run(main())
    sched.close(5)
    assert endless.abandoned
    assert log.steps_of("endless")[-1] <= steps_at_cancel  # at most the step in progress ran after the cancel
    assert log.steps_of("next") == [log.steps_of("endless")[-1] + 1]


def test_a_waiting_task_cancelled_never_runs_and_the_queue_is_bounded(log):
    sched = scheduler(max_queue=2, slots={"work": 1})

    async def main():
        gate = threading.Event()
        blocker = asyncio.ensure_future(sched.run(FakeTask("blocker", log, user="a", gate=gate)))
        while not log.batches:
            await asyncio.sleep(0.001)
        queued = [asyncio.ensure_future(sched.run(FakeTask(f"q{n}", log, user="b"))) for n in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="2 requests waiting"):
            await sched.run(FakeTask("refused", log, user="c"))
        queued[0].cancel()
        await asyncio.sleep(0.01)  # the cancellation reaches the task
        gate.set()
        await blocker
        assert await queued[1] == "q1"
        with pytest.raises(asyncio.CancelledError):
            await queued[0]

    asyncio.run(main())
    sched.close(5)
    assert log.steps_of("q0") == [] and log.steps_of("refused") == []


def test_a_failing_batch_fails_its_tasks_and_the_others_go_on(log):
    sched = scheduler()

    async def main():
        bad = FakeTask("bad", log, user="a", key="shared")
        good = FakeTask("good", log, user="b", key="shared")
        other = FakeTask("other", log, user="c", steps=2)
        results = await held_then_released(sched, log, [bad, good, other], return_exceptions=True)
        return results

    results = asyncio.run(main())
    sched.close(5)
    assert [type(r).__name__ if isinstance(r, BaseException) else r for r in results] == [
        "RuntimeError", "RuntimeError", "other"]


def test_a_failing_observer_never_stops_the_model_work(log):
    def broken(*args):
        raise AttributeError("no such metric")

    sched = scheduler(on_step=broken, on_admit=broken)
    tasks = [FakeTask(f"t{n}", log, user=f"u{n}", steps=2) for n in range(2)]
    assert asyncio.run(held_then_released(sched, log, tasks)) == ["t0", "t1"]
    sched.close(5)


def test_policy_orders_by_user_then_kind_then_arrival():
    class Request:
        def __init__(self, kind, user, seq):
            self.kind, self.user, self.seq, self.last_served = kind, user, seq, -1

    a_extract, a_score, b_extract = Request("extract", "a", 0), Request("score", "a", 1), Request("extract", "b", 2)
    fair = SchedulingPolicy("fair")
    assert fair.order([b_extract, a_score, a_extract]) == [a_extract, a_score, b_extract]
    fair.served([a_extract])  # a and extract were just served: b comes first, then a's score
    assert fair.order([a_extract, a_score, b_extract]) == [b_extract, a_score, a_extract]
    kinds = SchedulingPolicy("kinds")
    kinds.served([a_extract])
    assert kinds.order([a_extract, b_extract, a_score]) == [a_score, b_extract, a_extract]
    with pytest.raises(ValueError, match="unknown scheduling policy"):
        SchedulingPolicy("lottery")


def test_the_scheduler_settings_are_flags_checked_at_start_up():
    import argparse

    from viper_server.config import add_serve_arguments, config_from_args
    from viper_server.server import load_settings

    def parse(argv, environ=None):
        parser = argparse.ArgumentParser()
        add_serve_arguments(parser)
        return config_from_args(parser.parse_args(argv), environ or {})

    config = parse(["--scheduling-policy", "kinds", "--extract-batch", "16"], {"VIPER_GENERATE_BATCH": "2"})
    settings = load_settings(config)
    assert (settings.scheduling_policy, settings.extract_batch, settings.generate_batch, settings.score_batch) == (
        "kinds", 16, 2, 8)
    assert (settings.prefill_images, settings.prefill_tokens) == (config.prefill_images, config.prefill_tokens)
    assert (config.query_step_tokens, load_settings(parse(["--query-step-tokens", "512"])).query_step_tokens) == (
        4096, 512)
    with pytest.raises(ValueError, match="query_step_tokens must be at least 1"):
        parse([], {"VIPER_QUERY_STEP_TOKENS": "0"})

    assert parse(["--vision-cache-bytes", "12345"]).vision_cache_bytes == 12345
    assert load_settings(parse([], {"VIPER_VISION_CACHE_BYTES": "0"})).vision_cache_bytes == 0
    with pytest.raises(ValueError, match="vision_cache_bytes"):
        parse(["--vision-cache-bytes", "-1"])
    with pytest.raises(ValueError, match="score_batch must be at least 1"):
        parse(["--score-batch", "0"])
    with pytest.raises(SystemExit):  # argparse refuses a policy it does not know
        parse(["--scheduling-policy", "lottery"])


def test_the_models_threads_are_the_cores_the_preprocessing_workers_leave_unless_told():
    import argparse

    from viper_server.config import add_serve_arguments, config_from_args
    from viper_server.engine.preprocessing import available_cores
    from viper_server.server import torch_threads

    def parse(argv, environ=None):
        parser = argparse.ArgumentParser()
        add_serve_arguments(parser)
        return config_from_args(parser.parse_args(argv), environ or {})

    cores = available_cores()
    assert torch_threads(parse(["--preprocess-workers", "1"]), {}) == max(1, cores - 1)
    assert torch_threads(parse(["--preprocess-workers", str(cores + 4)]), {}) == 1
    assert torch_threads(parse(["--preprocess-workers", "0"]), {}) == cores
    assert torch_threads(parse([]), {"OMP_NUM_THREADS": "3"}) == 0  # torch reads it itself
    assert torch_threads(parse(["--torch-threads", "5"]), {"OMP_NUM_THREADS": "3"}) == 5
    assert torch_threads(parse([], {"VIPER_TORCH_THREADS": "2"}), {}) == 2
    with pytest.raises(ValueError, match="torch_threads must be at least 1"):
        parse(["--torch-threads", "0"])
