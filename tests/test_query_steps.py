"""Query steps on the tiny models (64 tokens an image: a query is ~90 prompt tokens), through the engine's
scheduler: the queries of Score calls waiting together share one step while they fit --query-step-tokens (4096
by default), and a budget of one call's batch runs them a call a step; the scores are the same either way."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from PIL import Image

from viper_server.domain import ScoringContext
from viper_server.engine.engine import ModelEngine
from viper_server.engine.loading import LoadSettings
from viper_server.engine.presets import model_preset
from viper_server.engine.scheduler import FunctionTask

from imagedata import png

pytestmark = pytest.mark.usefixtures("one_torch_thread")

USERS = 3


class Steps:
    """The engine's observer: records the batch size of each query step."""

    def __init__(self) -> None:
        self.queries: list[int] = []

    def step_ran(self, model, step, size, seconds):
        if (model, step) == ("idefics2", "query"):
            self.queries.append(size)

    def __getattr__(self, name):
        return lambda *args: None


def images(seed: int, count: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [png(Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))) for _ in range(count)]


async def until(condition, timeout: float = 60.0) -> None:
    """Returns once condition() holds; AssertionError after timeout seconds (a wait that can fail, not hang)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        await asyncio.sleep(0.02)


def query_steps(tiny_models_dir, **settings) -> tuple[list[list[float]], list[int]]:
    """USERS users' 4-query Scores (prefixes cached), waiting together before the scheduler's next step: their
    scores, and the batch sizes of the query steps that served them."""
    steps = Steps()
    engine = ModelEngine(model_preset("tiny", tiny_models_dir, tiny_models_dir.parent), LoadSettings(**settings),
                         max_queue=16, max_image_pixels=10**8, observer=steps)
    engine.load()
    try:
        contexts = [ScoringContext(liked=engine.process_uploads(images(user, 2)),
                                   disliked=engine.process_uploads(images(100 + user, 2)),
                                   cache_key=(f"user-{user}", "digest")) for user in range(USERS)]
        queries = engine.process_uploads(images(1000, 4))

        async def score(context: ScoringContext) -> list[float]:
            return [result.score async for batch in engine.score(context, queries) for result in batch]

        async def together() -> list[list[float]]:
            for context in contexts:  # the prefixes cached: no step of their own below
                await score(context)
            steps.queries.clear()
            # A step that holds the scheduler until every Score waits. The Scores are sent once it runs: sent
            # before, they could be admitted beside it, and would then not count as waiting (a CI run hung so).
            held, gate = threading.Event(), threading.Event()
            hold = asyncio.ensure_future(engine.idefics2_scheduler.run(
                FunctionTask(lambda task: held.set() or gate.wait(60))))
            await until(held.is_set)
            scorings = [asyncio.ensure_future(score(context)) for context in contexts]
            await until(lambda: engine.idefics2_scheduler.depth == USERS)
            gate.set()
            await hold
            return await asyncio.gather(*scorings)

        return asyncio.run(together()), steps.queries
    finally:
        engine.close()


def test_score_calls_waiting_together_share_a_query_step_within_the_budget(tiny_models_dir):
    shared, batches = query_steps(tiny_models_dir)
    assert batches == [USERS]  # 3 calls x 4 queries x ~90 tokens: within 4096 (not the 256 of a prefill chunk)
    alone, one_a_step = query_steps(tiny_models_dir, query_step_tokens=100)
    assert one_a_step == [1] * USERS  # one call's batch always runs, the others wait for the next step
    assert np.abs(np.array(shared) - np.array(alone)).max() <= 1e-6
    assert np.ptp(np.array(shared), axis=0).max() > 1e-3  # the users' contexts give other scores: rows not mixed up
