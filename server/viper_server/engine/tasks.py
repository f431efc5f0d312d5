"""The scheduler's tasks for ViPer's three kinds of model work, each a model run (models/) seen as steps.

- extract (IDEFICS2 + VPE adapter): prefill steps (a few images through the vision encoder, those whose
  features are cached free, then a chunk of the prompt), alone; then a decode step per token, all running
  extractions in one forward pass.
- score (IDEFICS2 + metric adapter): the context's key/value states from the cache (no step of their own), or
  computed in prefill steps as an extraction's, alone; then a step per query batch, the batches of running
  scorings with equally long contexts in one forward pass, as many as --query-step-tokens holds.
- generate (SDXL): a request's images a group at a time, up to --generate-batch images in a group, side by side
  (best of N's candidates denoise together, and are exactly a plain Generate's images). A group takes an encode
  step (text embeddings, noise; the texts of all images starting together through each text encoder at once),
  a step per denoising step (base, then refiner; images of one stage and size in one UNet call), then the VAE
  decode (images of one size together). A generation step holds at most --generate-batch images, whoever's.

Step keys say what may share a forward pass; the batch bounds are the kinds' slot counts. A prefill step feeds at
most --prefill-tokens prompt tokens and encodes at most --prefill-images images; a query step batches the queries
of running scorings while their prompt tokens fit --query-step-tokens (one scoring's batch always runs). The two
budgets differ because the steps do: a prefill chunk is one long request's work that short ones wait behind, a
query step is short requests' work that all finish in it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..domain import GenerationEvent, GenerationParams, Preview, Progress, ScoredQuery
from ..models.generation import Generation, PersonalizedGenerator
from ..models.metric import MetricScorer, Scoring
from ..models.vpe import Extraction, PreferenceExtractor
from .scheduler import Step, Task

log = logging.getLogger(__name__)


class Extractions:
    """What every extraction task shares: the extractor, the one decode group, the batch bound."""

    def __init__(self, extractor: PreferenceExtractor, batch: int) -> None:
        self.extractor = extractor
        self.batch = batch
        self.group = extractor.new_group()

    def prefill(self, tasks: list[Task]) -> None:
        for task in tasks:
            self.extractor.prefill_step(task.extraction)
            task.finish_if_done()

    def decode(self, tasks: list[Task]) -> None:
        self.extractor.decode_step(self.group, [task.extraction for task in tasks])
        for task in tasks:
            task.finish_if_done()


class ExtractionTask(Task):
    def __init__(self, work: Extractions, extraction: Extraction, user: str | None) -> None:
        super().__init__("extract", user)
        self.work = work
        self.extraction = extraction

    def next_step(self) -> Step:
        if self.extraction.phase == "decode":
            return Step(("decode",), self.work.decode, limit=self.work.batch, label="decode")
        return Step(("prefill", self.seq), self.work.prefill, label="prefill")

    def finish_if_done(self) -> None:
        if self.extraction.phase == "done":
            self.finish(self.work.extractor.result(self.extraction))
            self.extraction.release()

    def abandon(self) -> None:
        if self.extraction.sequence is not None:
            self.work.group.discard(self.extraction.sequence)
        self.extraction.release()


@dataclass(frozen=True)
class Scorings:
    scorer: MetricScorer
    batch: int

    def prefix(self, tasks: list[Task]) -> None:
        self.scorer.prefix_step([task.scoring for task in tasks])

    def query(self, tasks: list[Task]) -> None:
        for task, batch in zip(tasks, self.scorer.query_step([task.scoring for task in tasks])):
            if batch:  # none while its queries are still being encoded
                task.emit([ScoredQuery(index, score) for index, score in batch])
            if task.scoring.phase == "done":
                task.finish(task.scoring.scores)
                task.scoring.release()


class ScoringTask(Task):
    def __init__(self, work: Scorings, scoring: Scoring, user: str | None) -> None:
        super().__init__("score", user)
        self.work = work
        self.scoring = scoring

    def next_step(self) -> Step:
        if not self.scoring.use_prefix:  # the reference procedure: a whole prompt per query, alone
            return Step(("reference", self.seq), self.work.query, label="query")
        scorer = self.work.scorer
        if not scorer.take_cached_prefix(self.scoring):  # scorings of one context compute it together, once
            key = self.scoring.context.cache_key
            return Step(("prefix", key if key is not None else self.seq), self.work.prefix, limit=self.work.batch,
                        label="prefix")
        return Step(("query", self.scoring.pairs), self.work.query, limit=self.work.batch, label="query",
                    cost=scorer.query_cost(self.scoring), budget=scorer.query_step_tokens)

    def abandon(self) -> None:
        self.scoring.release()


@dataclass(frozen=True)
class Generations:
    generator: PersonalizedGenerator
    batch: int

    def encode(self, tasks: list[Task]) -> None:
        self.generator.encode_step([task.generation for task in tasks])

    def denoise(self, tasks: list[Task]) -> None:
        self.generator.denoise_step([task.generation for task in tasks])
        for task in tasks:
            task.finish_if_done()

    def decode(self, tasks: list[Task]) -> None:
        self.generator.decode_step([task.generation for task in tasks])
        for task in tasks:
            task.finish_if_done()


class GenerationTask(Task):
    """A Generate request; its events go to the handler as they happen, and each denoising step is counted."""

    def __init__(self, work: Generations, params: GenerationParams, liked_features: Sequence[str],
                 disliked_features: Sequence[str], user: str | None, on_denoising_step: Callable[[], None]) -> None:
        super().__init__("generate", user)
        self.work = work
        self._on_denoising_step = on_denoising_step
        self.generation: Generation = work.generator.start(params, liked_features, disliked_features, self._emit,
                                                           together=work.batch)

    def next_step(self) -> Step:
        """Every step's cost is the images in it: one step holds at most work.batch images, and a request's
        group never needs more, so it always fits alone."""
        generation, work = self.generation, self.work
        phase = generation.phase
        if phase == "encode":
            return Step(("encode",), work.encode, limit=work.batch, label="encode", cost=generation.next_group,
                        budget=work.batch)
        height, width = generation.size
        images = len(generation.images)
        if phase == "decode":
            return Step(("vae", height, width), work.decode, limit=work.batch, label="vae", cost=images,
                        budget=work.batch)
        return Step((phase, height, width), work.denoise, limit=work.batch, label=phase, cost=images,
                    budget=work.batch)

    def finish_if_done(self) -> None:
        if self.generation.phase == "done":
            self.finish()

    def abandon(self) -> None:
        log.info("generation cancelled after %d denoising steps", self.generation.steps_done)
        self.generation.release()

    def supersedes(self, newer: GenerationEvent, older: GenerationEvent) -> bool:
        """A newer preview of an image replaces its older one still unread: a slow reader gets the latest."""
        return isinstance(newer, Preview) and isinstance(older, Preview) and newer.image_index == older.image_index

    def _emit(self, event: GenerationEvent) -> None:
        if isinstance(event, Progress) and event.step > 0:
            self._on_denoising_step()
        self.emit(event)
