"""Continuous batching changes no result: every output of a request batched with others equals the output of the
same request run alone (extracted text identical, scores within 1e-6, latents within 1e-4 and PNG pixels within
1/255), with requests joining and leaving between steps. Each test also asserts that what it compares differs
between the requests by far more than the tolerance, so a batch that mixed up its rows would fail.

The steps are driven here as the scheduler drives them (engine.tasks); tests/test_scheduler.py covers the
scheduler itself, and the last test runs all three kinds through the ModelEngine at once."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import RepetitionPenaltyLogitsProcessor

from viper_server.domain import FinishedImage, GenerationParams, ScoringContext
from viper_server.models.decoding import DecodeGroup, DecodingSequence, apply_repetition_penalty, greedy_tokens
from viper_server.models.generation import Generation, PersonalizedGenerator
from viper_server.models.idefics2 import load_idefics2
from viper_server.models.metric import MetricScorer
from viper_server.models.sdxl import load_sdxl
from viper_server.models.vpe import Extraction, PreferenceExtractor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIXTURES = Path(__file__).parent / "fixtures" / "viper_examples"
NEW_TOKENS = 24
SCORE_TOLERANCE = 1e-6
LATENT_TOLERANCE = 1e-4


def open_rgb(name: str) -> Image.Image:
    return Image.open(FIXTURES / name).convert("RGB")


@pytest.fixture(scope="module")
def examples() -> tuple[list[Image.Image], list[str]]:
    comments = json.loads((FIXTURES / "comments.json").read_text())
    del comments["about"]
    return [open_rgb(name) for name in comments], list(comments.values())


@pytest.fixture(scope="module")
def runtime(tiny_models_dir):
    adapters = {"vpe": str(tiny_models_dir / "vpe-lora"), "metric": str(tiny_models_dir / "metric-lora")}
    return load_idefics2(str(tiny_models_dir / "idefics2"), adapters)


# -- the decoding rule --------------------------------------------------------------------------------


def test_the_repetition_penalty_is_transformers_own_row_by_row():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=generator) * 4
    histories = [[1, 5, 5, 7, 49], [3], [0, 2, 4, 6, 8, 10, 12, 2]]
    ours = apply_repetition_penalty(logits, histories, 0.99)
    for row, history in enumerate(histories):
        theirs = RepetitionPenaltyLogitsProcessor(0.99)(torch.tensor([history]), logits[row : row + 1].clone())
        assert torch.equal(ours[row : row + 1], theirs)
    changed = (ours != logits).sum(dim=1).tolist()
    assert changed == [len(set(history)) for history in histories]  # every token of the history, no other
    # A penalty moves the choice where the top two are close: it is not a no-op.
    close = torch.tensor([[1.0, 0.999, 0.0]])
    assert greedy_tokens(close, [[1]], 0.99) == [1] and greedy_tokens(close, [[2]], 0.99) == [0]


def test_a_decode_group_applies_the_penalty_over_each_rows_whole_history_as_it_grows():
    # A fake model whose logits are, every other step, all negative: the penalty (0.5) then lifts every token
    # of a row's history, so the chosen tokens show which tokens the group counted as seen; token 0 is never in
    # a history but nearly wins, so a token counted as seen by mistake shows too. In between, logits of both
    # signs bring new tokens in. Rows of different lengths, one leaving early, one joining late, and more steps
    # after the last change than the history buffer had room for.
    heads, width, vocab = 2, 4, 64
    generator = torch.Generator().manual_seed(0)
    steps: list[tuple[torch.Tensor, dict[int, list[int]]]] = []

    def forward(input_ids, attention_mask, position_ids, cache):
        for layer in cache.layers:
            layer.update(torch.zeros(len(input_ids), heads, 1, width), torch.zeros(len(input_ids), heads, 1, width))
        if len(steps) % 2:  # logits of both signs: unseen tokens win, and the ones seen must stay seen
            logits = torch.randn(len(input_ids), vocab, generator=generator)
            logits[:, 0] = -5.0
        else:
            logits = -1 - torch.rand(len(input_ids), vocab, generator=generator)
            logits[:, 0] = -1.05
        steps.append((logits, {id(row): list(row.history) for row in group.rows}))
        return logits

    def sequence(prompt: list[int], new_tokens: int) -> DecodingSequence:
        states = [(torch.randn(1, heads, len(prompt), width), torch.randn(1, heads, len(prompt), width))]
        return DecodingSequence(list(prompt), len(prompt), new_tokens, frozenset(), pending_states=states)

    group = DecodeGroup(penalty=0.5)
    rows = [sequence([1, 2, 3], 600), sequence([4] * 9, 40), sequence([5, 6], 580)]
    late = sequence([7, 8, 9, 10], 60)
    for step in range(600):
        group.step([row for row in [*rows, *([late] if step >= 30 else [])] if not row.done], forward)
    everyone = [*rows, late]
    assert all(row.done for row in everyone) and len(rows[0].new_tokens) == 600
    final = {id(row): row.history for row in everyone}
    for logits, histories in steps:  # each row took the token the rule picks over its whole history as a list
        chosen = greedy_tokens(logits, list(histories.values()), 0.5)
        assert [final[key][len(history)] for key, history in histories.items()] == chosen
    assert all(0 not in row.new_tokens for row in everyone)
    changed = sum(greedy_tokens(logits, list(histories.values()), 0.5)
                  != greedy_tokens(logits, list(histories.values()), 1.0) for logits, histories in steps)
    assert changed > len(steps) // 2  # the penalty decided most steps


# -- extraction: decode steps of several sequences in one forward -----------------------------------------


def drive_extractions(extractor: PreferenceExtractor, extractions: list[Extraction], joins: list[int],
                      cancel: dict[int, int] | None = None) -> list[list[int]]:
    """Runs the extractions as the scheduler would: each joins at step joins[i] (its prefill in chunks, alone),
    then decodes with all others in decode, one forward per step; cancel[i] = the step it is dropped at.
    Returns the decode batch sizes per step."""
    group = extractor.new_group()
    batches, step = [], 0
    cancel = cancel or {}

    def running(index: int) -> bool:
        return joins[index] <= step < cancel.get(index, 10**9)

    while any(extraction.phase != "done" for index, extraction in enumerate(extractions)
              if step < cancel.get(index, 10**9)):
        for index, extraction in enumerate(extractions):
            if cancel.get(index) == step and extraction.sequence is not None:
                group.discard(extraction.sequence)
                extraction.release()
        live = [extraction for index, extraction in enumerate(extractions) if running(index)]
        for extraction in live:
            if extraction.phase in ("vision", "prefill"):
                extractor.prefill_step(extraction)
        decoding = [e for e in live if e.phase == "decode"]
        if decoding:
            extractor.decode_step(group, decoding)
            batches.append(len(decoding))
        step += 1
    return batches


def test_extractions_decoded_together_equal_each_alone(runtime, examples):
    images, comments = examples
    extractor = PreferenceExtractor(runtime, max_new_tokens=NEW_TOKENS, prefill_images=3, prefill_tokens=200)
    # Different images, comments and prompt lengths: their caches are padded differently in the group.
    requests = [(images[:2], comments[:2]), (images[5:8], comments[5:8]), (images[10:11], comments[10:11])]
    alone = [extractor.extract(*request) for request in requests]
    assert len({preferences.raw_text for preferences in alone}) == 3  # the three answers differ

    extractions = [extractor.prepare(*request) for request in requests]
    batch_sizes = drive_extractions(extractor, extractions, joins=[0, 3, 9])
    assert max(batch_sizes) == 3  # they did decode together
    assert [extractor.result(extraction) for extraction in extractions] == alone


def test_a_sequence_leaving_mid_way_changes_nothing_for_the_others(runtime, examples):
    images, comments = examples
    extractor = PreferenceExtractor(runtime, max_new_tokens=NEW_TOKENS)
    requests = [(images[:3], comments[:3]), (images[3:4], comments[3:4]), (images[6:8], comments[6:8])]
    alone = [extractor.extract(*request) for request in requests]
    extractions = [extractor.prepare(*request) for request in requests]
    drive_extractions(extractor, extractions, joins=[0, 0, 2], cancel={1: 12})
    assert extractor.result(extractions[0]) == alone[0]
    assert extractor.result(extractions[2]) == alone[2]
    assert extractions[1].phase == "decode" and extractions[1].sequence.pending_states is None


@pytest.mark.parametrize("prefill_images, prefill_tokens", [(1, 37), (16, 100_000)])
def test_the_prefill_chunks_change_nothing(runtime, examples, prefill_images, prefill_tokens):
    images, comments = examples
    reference = PreferenceExtractor(runtime, max_new_tokens=NEW_TOKENS, prefill_images=4, prefill_tokens=512)
    chunked = PreferenceExtractor(runtime, max_new_tokens=NEW_TOKENS, prefill_images=prefill_images,
                                  prefill_tokens=prefill_tokens)
    assert chunked.extract(images[:5], comments[:5]) == reference.extract(images[:5], comments[:5])


# -- scoring: query batches of several users in one forward ------------------------------------------------


def prefill(scorer: MetricScorer, scorings: list) -> None:
    """The scorings' prefixes as the scheduler computes them: a chunk of one scoring a step, in turns."""
    while pending := [scoring for scoring in scorings if scoring.phase == "prefix"]:
        for scoring in pending:
            scorer.prefix_step([scoring])


def test_scorings_of_several_users_batched_equal_each_alone(runtime):
    scorer = MetricScorer(runtime, batch_size=2)
    queries = [open_rgb("query1.png"), open_rgb("query2.png"), open_rgb("query1.png").crop((0, 0, 448, 200))]

    def context(user: str, start: int) -> ScoringContext:
        return ScoringContext(liked=[open_rgb(f"liked/{i}.png") for i in range(start, start + 2)],
                              disliked=[open_rgb(f"disliked/{i}.png") for i in range(start, start + 2)],
                              cache_key=(user, "digest"))

    requests = [(context("ann", 0), queries), (context("ben", 2), queries[1:]), (context("cid", 4), queries[:1])]
    alone = [MetricScorer(runtime, batch_size=2).score(*request) for request in requests]
    assert abs(alone[0][1] - alone[1][0]) > 1e-2  # the same query scores far apart for two users
    assert abs(alone[0][0] - alone[2][0]) > 1e-2

    scorings = [scorer.prepare(*request) for request in requests]
    prefill(scorer, scorings)  # each context in chunks, taking turns
    assert scorer.cache_stats.misses == 3 and scorer.cache_stats.entries == 3
    while any(scoring.phase != "done" for scoring in scorings):
        scorer.query_step([scoring for scoring in scorings if scoring.phase != "done"])
    for scoring, expected in zip(scorings, alone):
        assert scoring.scores == pytest.approx(expected, abs=SCORE_TOLERANCE)

    # A second round from the cache, joined by a newcomer's context mid-way.
    again = [scorer.prepare(*request) for request in requests[:2]]
    prefill(scorer, again)
    scorer.query_step(again)
    late = scorer.prepare(*requests[2])
    prefill(scorer, [late])
    while any(scoring.phase != "done" for scoring in [*again, late]):
        scorer.query_step([scoring for scoring in [*again, late] if scoring.phase != "done"])
    assert scorer.cache_stats.hits == 3
    for scoring, expected in zip([*again, late], alone):
        assert scoring.scores == pytest.approx(expected, abs=SCORE_TOLERANCE)


# -- generation: denoising steps of several images in one UNet call ---------------------------------------


@pytest.fixture(scope="module")
def generator(tiny_models_dir) -> PersonalizedGenerator:
    return PersonalizedGenerator(load_sdxl(str(tiny_models_dir / "sdxl-base"), str(tiny_models_dir / "sdxl-refiner")))


LIKED = ["soft pastel colors", "golden light", "dreamy mood", "watercolor texture"]
DISLIKED = ["dark shadows", "gloomy blue palette", "cluttered composition"]


def drive_generations(generator: PersonalizedGenerator, generations: list[Generation], starts: list[int],
                      on_decode: Callable[[Generation], None]) -> list[tuple[str, int]]:
    """Runs the generations as the scheduler would: each starts at step starts[i]; the denoising steps of all
    images in one stage and size share one call, so do the VAE decodes. Returns (phase, images) per call
    (for encode: generations)."""
    calls, step = [], 0
    while any(generation.phase != "done" for generation in generations):
        live = [g for g, start in zip(generations, starts) if start <= step and g.phase != "done"]
        if encoding := [g for g in live if g.phase == "encode"]:
            generator.encode_step(encoding)  # texts of all images starting now through each encoder at once
            calls.append(("encode", len(encoding)))
        groups: dict[tuple, list[Generation]] = {}
        for generation in live:
            if generation.phase != "encode":
                groups.setdefault((generation.phase, generation.size), []).append(generation)
        for (phase, _), members in groups.items():
            images = sum(len(generation.images) for generation in members)
            if phase == "decode":
                for generation in members:
                    on_decode(generation)
                generator.decode_step(members)
            else:
                generator.denoise_step(members)
            calls.append((phase, images))
        step += 1
    return calls


def test_generations_denoised_together_equal_each_alone(generator):
    requests = [
        (GenerationParams(prompt="a cat in the city", width=64, height=64, steps=6, seed=7), LIKED, DISLIKED),
        (GenerationParams(prompt="a castle by the sea", width=64, height=64, steps=6, seed=8, guidance_scale=7.5,
                          preference_strength=0.4, num_images=2), DISLIKED, LIKED),
        (GenerationParams(prompt="a forest", width=64, height=64, steps=9, seed=9, refine=False), LIKED[:2], []),
        (GenerationParams(prompt="a dog", width=80, height=64, steps=6, seed=10), LIKED, DISLIKED),
    ]

    def run(batched: list[int] | None) -> tuple[list[list[torch.Tensor]], list[list[bytes]], list[tuple[str, int]]]:
        """Alone: each request by itself, its images one after the other. Batched: the second request's two
        images side by side too."""
        latents: list[list[torch.Tensor]] = [[] for _ in requests]
        pngs: list[list[bytes]] = [[] for _ in requests]
        generations = []
        for number, (params, liked, disliked) in enumerate(requests):
            def emit(event, number=number):
                if isinstance(event, FinishedImage):
                    pngs[number].append(event.png)
            generations.append(generator.start(params, liked, disliked, emit, together=1 if batched is None else 2))
        index = {id(generation): number for number, generation in enumerate(generations)}

        def record(generation: Generation) -> None:
            latents[index[id(generation)]] += [image.latents.clone() for image in generation.images]

        if batched is None:
            calls = []
            for generation in generations:
                calls += drive_generations(generator, [generation], [0], record)
        else:
            calls = drive_generations(generator, generations, batched, record)
        return latents, pngs, calls

    alone_latents, alone_pngs, _ = run(None)
    together_latents, together_pngs, calls = run([0, 0, 1, 0])
    assert ("base", 4) in calls and ("refiner", 3) in calls  # images at different timesteps shared calls
    assert ("base", 1) in calls  # the 80 px wide image never joined the 64 px ones
    assert ("decode", 3) in calls  # the second request's two images decoded together, with the first's
    assert ("encode", 3) in calls  # three requests' prompts and features encoded in one call per encoder
    for ours, theirs in zip(together_latents, alone_latents):
        assert len(ours) == len(theirs) > 0
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, atol=LATENT_TOLERANCE, rtol=0)
    for ours, theirs in zip(together_pngs, alone_pngs):
        for a, b in zip(ours, theirs):
            assert np.abs(pixels(a) - pixels(b)).max() <= 1
    # What is compared differs between requests by far more than the tolerance.
    firsts = [latents[0] for latents in alone_latents[:3]]
    assert min((a - b).abs().max().item() for a, b in [(firsts[0], firsts[1]), (firsts[0], firsts[2]),
                                                        (firsts[1], firsts[2])]) > 100 * LATENT_TOLERANCE
    assert (alone_latents[1][0] - alone_latents[1][1]).abs().max().item() > 100 * LATENT_TOLERANCE


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png))).astype(np.int16)


# -- all three through the engine's schedulers at once --------------------------------------------------


def test_the_engine_runs_everything_at_once_with_each_requests_own_adapter(tiny_models_dir, examples):
    from viper_server.engine.engine import ModelEngine
    from viper_server.engine.loading import LoadSettings
    from viper_server.engine.presets import model_preset
    from viper_server.engine.scheduler import FunctionTask

    class Steps:
        def __init__(self):
            self.batches: list[tuple[str, str, int]] = []

        def step_ran(self, model, step, size, seconds):
            self.batches.append((model, step, size))

        def __getattr__(self, name):
            return lambda *args: None

    images, comments = examples
    steps = Steps()
    engine = ModelEngine(model_preset("tiny", tiny_models_dir, tiny_models_dir.parent),
                         LoadSettings(vpe_max_new_tokens=NEW_TOKENS), max_queue=16, max_image_pixels=10**8,
                         observer=steps)
    engine.load()
    context = ScoringContext(liked=images[:2], disliked=images[8:10], cache_key=("dee", "digest"))
    params = GenerationParams(prompt="a cat", width=64, height=64, steps=4, seed=3)

    async def extract(index: int):
        return await engine.extract(images[index : index + 2], comments[index : index + 2], user=f"u{index}")

    async def score():
        return [result async for batch in engine.score(context, images[4:7]) for result in batch]

    async def generate(seed: int):
        events = engine.generate(replace(params, seed=seed), LIKED, DISLIKED, user="g")
        return [event.png async for event in events if isinstance(event, FinishedImage)]

    async def together():
        # Both schedulers held by a step until all six requests wait, so that they run side by side.
        gate = threading.Event()
        holds = [asyncio.ensure_future(scheduler.run(FunctionTask(lambda task: gate.wait(30))))
                 for scheduler in (engine.idefics2_scheduler, engine.sdxl_scheduler)]
        requests = asyncio.gather(extract(0), extract(3), score(), score(), generate(3), generate(4))
        while engine.queue_depths != {"idefics2": 4, "sdxl": 2}:
            await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(*holds)
        return await requests

    async def one_by_one():
        return [await extract(0), await extract(3), await score(), await score(), await generate(3),
                await generate(4)]

    try:
        alone = asyncio.run(one_by_one())
        steps.batches.clear()
        concurrent = asyncio.run(together())
    finally:
        engine.close()
    assert concurrent[:2] == alone[:2] and alone[0] != alone[1]
    for ours, theirs in zip(concurrent[2:4], alone[2:4]):
        assert [r.score for r in ours] == pytest.approx([r.score for r in theirs], abs=SCORE_TOLERANCE)
    for ours, theirs in zip(concurrent[4:], alone[4:]):
        assert np.abs(pixels(ours[0]) - pixels(theirs[0])).max() <= 1
    assert alone[4] != alone[5]
    labels = {(model, step) for model, step, _ in steps.batches}
    assert {("idefics2", "prefill"), ("idefics2", "decode"), ("idefics2", "query"),
            ("sdxl", "encode"), ("sdxl", "base"), ("sdxl", "refiner"), ("sdxl", "vae")} <= labels
    assert ("idefics2", "prefix") not in labels  # cached by the runs alone: a cached prefix takes no step
    assert max(size for model, step, size in steps.batches if step == "decode") == 2
    assert max(size for model, step, size in steps.batches if step == "base") == 2
