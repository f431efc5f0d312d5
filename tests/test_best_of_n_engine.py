"""Best of N's scheduling, in process (ViperService over a ModelEngine with the toy models and a SQLite store):
the candidates of one request are one generation of that many images (denoised together, up to the step's
image bound, each byte for byte the image of a plain Generate), which shares UNet calls with other users'
generations as any Generate does,
and their scorings share the metric's query steps with another user's Score. tests/test_best_of_n.py covers
the feature through gRPC."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace

import pytest

from viper_profiles import Rating, SourceImage, open_store
from viper_server.access import UNAUTHENTICATED_CALLER as CALLER
from viper_server.application import ViperService
from viper_server.domain import FinishedImage, GenerationParams, Progress
from viper_server.engine.engine import ModelEngine
from viper_server.engine.loading import LoadSettings
from viper_server.engine.presets import model_preset
from viper_server.engine.scheduler import FunctionTask
from viper_server.toy import evaluate

from imagedata import png

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PARAMS = GenerationParams(prompt=evaluate.GENERATION_PROMPT, width=64, height=64, steps=6, seed=3,
                          preference_strength=0.0)


class Steps:
    """The engine's observer: records each step's (model, step, batch size)."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, str, int]] = []

    def step_ran(self, model, step, size, seconds):
        self.batches.append((model, step, size))

    def __getattr__(self, name):
        return lambda *args: None


@pytest.fixture(scope="module")
def service(toy_models_dir, tmp_path_factory):
    steps = Steps()
    # Room for the five queries' images in one step (generated images are never cached, and each step encodes
    # at most --prefill-images): what is tested here is how query steps batch, not that bound.
    engine = ModelEngine(model_preset("toy", toy_models_dir, toy_models_dir.parent),
                         LoadSettings(generate_batch=4, prefill_images=8),
                         max_queue=16, max_image_pixels=10**8, observer=steps)
    engine.load()
    store = open_store(tmp_path_factory.mktemp("db") / "profiles.db")
    for index, user in enumerate(evaluate.held_out_users(2)):
        store.save_extraction(
            f"user-{index}", liked_features=[user.liked_colour], disliked_features=[user.disliked_colour],
            raw_text="", extractor_model="test",
            images=[SourceImage(png(r.image), r.comment, Rating.LIKED if r.liked else Rating.DISLIKED)
                    for r in user.rated],
        )
    yield ViperService(store, engine), engine, steps
    engine.close()


async def ranked(service: ViperService, user_id: str, params: GenerationParams) -> list:
    generation = await service.generate(CALLER, user_id, params)
    return [event async for event in generation.events]


def pngs(events) -> list[bytes]:
    return [event.png for event in events if isinstance(event, FinishedImage)]


async def candidates(engine: ModelEngine, params: GenerationParams) -> list:
    return [event async for event in engine.generate_candidates(params, ["red"], ["blue"], user="user-0")]


async def plain(engine: ModelEngine, params: GenerationParams, user: str = "user-0") -> list:
    return [event async for event in engine.generate(params, ["red"], ["blue"], user=user)]


def unet_images(engine: ModelEngine) -> tuple[list[int], object]:
    """The images in each call of the base UNet from now on (ViPer's four rows an image), and the hook's handle."""
    calls: list[int] = []
    unet = engine._models.generator._base.unet
    handle = unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0] // 4))
    return calls, handle


@pytest.mark.parametrize("count", [4, 6])
def test_the_candidates_denoise_together_and_are_the_images_of_a_plain_generate(service, count):
    """With --generate-batch 4: 4 candidates in one UNet call a step; 6 in a group of 4, then one of 2."""
    _, engine, steps = service
    params = replace(PARAMS, num_images=1, candidates=count)
    calls, handle = unet_images(engine)
    try:
        made = asyncio.run(candidates(engine, params))
    finally:
        handle.remove()
    groups = [4] if count == 4 else [4, 2]
    assert calls == [size for size in groups for _ in range(len(calls) // len(groups))], f"UNet calls: {calls}"
    expected = pngs(asyncio.run(plain(engine, replace(params, num_images=count, candidates=count))))
    assert pngs(made) == expected and len(set(expected)) == count
    assert [event.seed for event in made if isinstance(event, FinishedImage)] == list(range(3, 3 + count))


def test_the_candidates_share_unet_calls_with_another_users_generation(service):
    _, engine, steps = service

    async def together():
        return await asyncio.gather(candidates(engine, replace(PARAMS, num_images=1, candidates=3)),
                                    plain(engine, replace(PARAMS, steps=30, seed=11), "user-1"))

    steps.batches.clear()
    made, other = asyncio.run(together())
    assert len(pngs(made)) == 3 and len(pngs(other)) == 1
    base = [size for model, step, size in steps.batches if (model, step) == ("sdxl", "base")]
    assert max(base) == 2, f"base steps' batch sizes: {base}"


def test_the_candidates_scorings_share_query_steps_with_another_users_score(service):
    service, engine, steps = service
    liked, _ = evaluate.held_out_queries(evaluate.held_out_users(2)[1])

    async def together():
        # The metric's scheduler is held by a step until the candidates' scorings and the other user's
        # Score all wait, so that they run side by side.
        gate = threading.Event()
        hold = asyncio.ensure_future(engine.idefics2_scheduler.run(FunctionTask(lambda task: gate.wait(60))))
        generation = asyncio.ensure_future(ranked(service, "user-0", replace(PARAMS, num_images=1, candidates=4)))
        scoring = await service.score(CALLER, "user-1", liked[:1])
        other = asyncio.ensure_future(anext(scoring.results))
        while engine.idefics2_scheduler.depth < 5 and not generation.done():
            await asyncio.sleep(0.05)
        gate.set()
        await hold
        return await generation, await other

    async def warm():
        # Both users' prefixes cached first: a cached prefix takes no step, so a scoring whose prefix is cached
        # would not wait for another's being computed, and could not meet it in a query step.
        for user in ("user-0", "user-1"):
            scoring = await service.score(CALLER, user, liked[:1])
            [result async for result in scoring.results]

    asyncio.run(warm())
    steps.batches.clear()
    events, other = asyncio.run(together())
    assert other.index == 0 and [type(event) for event in events].count(FinishedImage) == 1
    queries = [size for model, step, size in steps.batches if (model, step) == ("idefics2", "query")]
    assert queries == [5], f"query steps' batch sizes: {queries}"


def test_cancelling_stops_the_running_candidates_within_a_step_and_starts_no_other(service):
    service, engine, steps = service

    async def cancel_midway() -> int:
        generation = await service.generate(CALLER, "user-0", replace(PARAMS, steps=60, num_images=1, candidates=6))
        async for event in generation.events:
            if isinstance(event, Progress) and event.step >= 3:
                break
        await generation.events.aclose()  # what the servicer's cancellation does to the stream
        return len(steps.batches)

    steps.batches.clear()
    at_cancel = asyncio.run(cancel_midway())
    deadline = time.monotonic() + 30
    while (engine.running or engine.queue_depths["sdxl"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.running and not engine.queue_depths["sdxl"], "every candidate has left the scheduler"
    after = [step for model, step, _ in steps.batches[at_cancel:] if model == "sdxl"]
    assert len(after) <= 1, f"steps run after the cancel: {after}"
    encoded = sum(size for model, step, size in steps.batches if (model, step) == ("sdxl", "encode"))
    assert encoded == 1, "the candidates after the running group never started"
