"""ModelEngine: the one object the application layer calls for model work, with plain Python values.

It loads the preset (off the event loop), gates every call on readiness, and runs each model call on a
worker: one for the IDEFICS2 base with its two adapters (VPE and metric), one for SDXL, so generation
never blocks extraction or scoring. Stored images are decoded here, in the worker, and only when the
metric needs them (not while the user's prefix is cached).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from PIL import Image

from viper_profiles import Rating, StoredImage

from ..domain import GenerationEvent, GenerationParams, Preferences, Progress, ScoredQuery, ScoringContext
from ..imaging import ImageDecodeError, decode_image
from ..models.generation import GenerationCancelled
from ..models.metric import context_pairs
from ..models.prefix_cache import CacheStats
from .errors import ModelsNotReady, StoredImageUnreadable
from .loading import LoadedModels, LoadSettings, load_models
from .presets import ModelPreset
from .workers import Job, ModelWorker

log = logging.getLogger(__name__)


class EngineObserver(Protocol):
    """What the engine reports as it works (observability.Telemetry implements it)."""

    def queue_waited(self, model: str, seconds: float) -> None: ...

    def generation_step(self) -> None: ...


class ModelEngine:
    def __init__(self, preset: ModelPreset, settings: LoadSettings, *, max_queue: int, max_image_pixels: int,
                 observer: EngineObserver) -> None:
        self.preset = preset
        self._settings = settings
        self._max_image_pixels = max_image_pixels
        self._observer = observer
        self.idefics2_worker = ModelWorker("idefics2", max_queue, observe_wait=self._observe_wait("idefics2"))
        self.sdxl_worker = ModelWorker("sdxl", max_queue, observe_wait=self._observe_wait("sdxl"))
        self._models: LoadedModels | None = None
        self._ready = threading.Event()
        self.load_error: BaseException | None = None

    def _observe_wait(self, model: str):
        return lambda seconds: self._observer.queue_waited(model, seconds)

    # -- lifecycle ------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def load(self) -> None:
        """Loads every model (blocking: minutes for the real weights)."""
        started = time.monotonic()
        try:
            self._models = load_models(self.preset, self._settings)
        except BaseException as exc:
            self.load_error = exc
            raise
        self._ready.set()
        log.info("models (%s) loaded on %s in %.1f s; IDEFICS2 in %s", self.preset.name, self._models.device,
                 time.monotonic() - started, self.idefics2_dtype)

    def close(self) -> None:
        self.idefics2_worker.close()
        self.sdxl_worker.close()

    # -- facts about the loaded models ----------------------------------------------------------------

    @property
    def default_image_size(self) -> int:
        return self.preset.default_image_size

    @property
    def idefics2_dtype(self) -> str:
        return str(self._loaded().idefics2_dtype).removeprefix("torch.")

    @property
    def extractor_name(self) -> str:
        """Recorded in each profile: the extractor and the precision it ran in."""
        return f"{self.preset.extractor_name} ({self.idefics2_dtype})"

    @property
    def max_prompt_tokens(self) -> int:
        return self._loaded().generator.max_prompt_tokens

    def prompt_token_count(self, text: str) -> int:
        return self._loaded().generator.prompt_token_count(text)

    @property
    def control_tokens(self) -> frozenset[str]:
        """The IDEFICS2 tokenizer's special tokens: text containing one would steer the prompt."""
        return self._loaded().extractor.control_tokens

    @property
    def queue_depths(self) -> dict[str, int]:
        return {worker.name: worker.depth for worker in (self.idefics2_worker, self.sdxl_worker)}

    @property
    def cache_stats(self) -> CacheStats | None:
        return self._models.scorer.cache_stats if self._models is not None else None

    # -- model work -----------------------------------------------------------------------------------

    async def extract(self, images: Sequence[Image.Image], comments: Sequence[str]) -> Preferences:
        """Runs the VPE over the images and their comments."""
        extractor = self._loaded().extractor
        return await self.idefics2_worker.run(
            lambda job: extractor.extract(images, comments, should_stop=job.should_stop)
        )

    async def generate(self, params: GenerationParams, liked_features: Sequence[str],
                       disliked_features: Sequence[str]) -> AsyncIterator[GenerationEvent]:
        """Yields Progress, Preview and FinishedImage events as the worker makes them."""
        generator = self._loaded().generator

        def run(job: Job) -> None:
            steps_done = 0

            def emit(event: GenerationEvent) -> None:
                nonlocal steps_done
                if isinstance(event, Progress) and event.step > 0:
                    steps_done += 1
                    self._observer.generation_step()
                job.emit(event)

            try:
                generator.generate(params, liked_features, disliked_features, emit=emit, should_stop=job.should_stop)
            except GenerationCancelled:
                log.info("generation cancelled after %d denoising steps", steps_done)
                raise

        async for event in self.sdxl_worker.stream(run):
            yield event

    def stored_context(self, user_id: str, version: int, images: Sequence[StoredImage]) -> ScoringContext:
        """A user's stored images as a metric context, decoded only if the prefix is not cached.

        The cache key names exactly the images the prompt uses, in order: two contexts share a cached
        prefix only if they are the same images. Raises ContextError when there is no pair to use."""
        liked = [image for image in images if image.rating is Rating.LIKED]
        disliked = [image for image in images if image.rating is Rating.DISLIKED]
        pairs = context_pairs(len(liked), len(disliked), self._settings.metric_max_pairs)
        used = [image.sha256 for pair in zip(disliked[:pairs], liked[:pairs]) for image in pair]
        digest = hashlib.sha256(" ".join(used).encode()).hexdigest()
        return ScoringContext(
            liked=_StoredImages(liked, self._max_image_pixels),
            disliked=_StoredImages(disliked, self._max_image_pixels),
            cache_key=(user_id, digest),
            version=version,
        )

    def context_pairs(self, context: ScoringContext) -> int:
        """How many pairs of the context a score uses; ContextError (before any model work) when none."""
        return context_pairs(len(context.liked), len(context.disliked), self._settings.metric_max_pairs)

    async def score(self, context: ScoringContext, queries: Sequence[Image.Image]) -> AsyncIterator[list[ScoredQuery]]:
        """Yields the queries' scores a batch at a time."""
        scorer = self._loaded().scorer

        def run(job: Job) -> None:
            scorer.score(
                context, queries,
                on_batch=lambda batch: job.emit([ScoredQuery(index, score) for index, score in batch]),
                should_stop=job.should_stop,
            )

        async for batch in self.idefics2_worker.stream(run):
            yield batch

    def forget_user(self, user_id: str, version: int) -> None:
        """The user's profile changed (now at version) or was deleted: drop what is cached for them."""
        if self._models is not None:
            self._models.scorer.invalidate(user_id, version)

    def _loaded(self) -> LoadedModels:
        if self._models is None or not self.ready:
            if self.load_error is not None:
                raise ModelsNotReady(f"models failed to load: {self.load_error}")
            raise ModelsNotReady("models are still loading; retry shortly")
        return self._models


class _StoredImages(Sequence[Image.Image]):
    """Stored images, decoded when the metric reads them; a slice stays undecoded."""

    def __init__(self, images: Sequence[StoredImage], max_pixels: int) -> None:
        self._images = images
        self._max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return _StoredImages(self._images[index], self._max_pixels)
        image = self._images[index]
        try:
            return decode_image(image.data, max_pixels=self._max_pixels)
        except ImageDecodeError as exc:
            raise StoredImageUnreadable(
                f"stored image {image.sha256[:16]} (position {image.position}) cannot be decoded: {exc}"
            ) from exc
