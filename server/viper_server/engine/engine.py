"""ModelEngine: the one object the application layer calls for model work, with plain Python values.

It loads the preset (off the event loop), gates every call on readiness, and runs the model work on two
step schedulers (engine.scheduler): one for the IDEFICS2 base with its two adapters (extractions and scores),
one for SDXL (generations), so generation never blocks extraction or scoring, and on each model requests
take turns a step at a time and compatible steps share one forward pass (engine.tasks). Images are decoded
and processed by the Preprocessor (engine.preprocessing: worker processes and a content-keyed cache), prompts
tokenized off the event loop, before a request queues; stored images are processed only when the metric needs
them (not while the user's prefix is cached).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Protocol

import numpy as np
from PIL import Image

from viper_profiles import ImageRef, Rating, StoredImage

from .. import tracing
from ..domain import GenerationEvent, GenerationParams, Preferences, ScoredQuery, ScoringContext
from ..imaging import ImageDecodeError
from ..models.metric import context_pairs
from ..models.prefix_cache import CacheStats
from ..pixels import ProcessedImage, check_processor
from .errors import ContextChanged, ModelsNotReady, QueueFull, StoredImageUnreadable
from .loading import LoadedModels, LoadSettings, load_models
from .preprocessing import Preprocessor
from .presets import ModelPreset
from .scheduler import StepScheduler
from .tasks import Extractions, ExtractionTask, Generations, GenerationTask, Scorings, ScoringTask

log = logging.getLogger(__name__)

# Reads stored images' bytes by sha256 (blocking: the store); those it no longer has are left out.
ImageData = Callable[[Sequence[str]], Mapping[str, bytes]]


class EngineObserver(Protocol):
    """What the engine reports as it works (observability.Telemetry implements it)."""

    def generation_step(self) -> None: ...

    def work_waited(self, model: str, kind: str, seconds: float) -> None: ...

    def step_ran(self, model: str, step: str, batch_size: int, seconds: float) -> None: ...


class ModelEngine:
    def __init__(self, preset: ModelPreset, settings: LoadSettings, *, max_queue: int, max_image_pixels: int,
                 observer: EngineObserver, preprocessor: Preprocessor | None = None) -> None:
        """preprocessor: where images are processed (closed with the engine); None = in the calling thread."""
        self.preset = preset
        self._settings = settings
        self._observer = observer
        self.preprocessor = preprocessor or Preprocessor(0, max_pixels=max_image_pixels)
        self.idefics2_scheduler = self._scheduler(
            "idefics2", max_queue, {"extract": settings.extract_batch, "score": settings.score_batch}
        )
        self.sdxl_scheduler = self._scheduler("sdxl", max_queue, {"generate": settings.generate_batch})
        self._models: LoadedModels | None = None
        self._work: tuple[Extractions, Scorings, Generations] | None = None
        self._ready = threading.Event()
        self.load_error: BaseException | None = None

    def _scheduler(self, model: str, max_queue: int, slots: dict[str, int]) -> StepScheduler:
        return StepScheduler(
            model, max_queue=max_queue, slots=slots, policy=self._settings.scheduling_policy,
            on_step=lambda step, size, seconds: self._observer.step_ran(model, step, size, seconds),
            on_admit=lambda kind, seconds: self._observer.work_waited(model, kind, seconds),
            event_buffer=self._settings.stream_buffer,
        )

    # -- lifecycle ------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def load(self) -> None:
        """Loads every model (blocking: minutes for the real weights)."""
        started = time.monotonic()
        try:
            models = load_models(self.preset, self._settings)
            # The preprocessing reproduces this processor: refuse a checkpoint whose settings it does not.
            check_processor(models.extractor.idefics2.processor.image_processor)
            self._models = models
        except BaseException as exc:
            self.load_error = exc
            raise
        self._work = (
            Extractions(models.extractor, self._settings.extract_batch),
            Scorings(models.scorer, self._settings.score_batch),
            Generations(models.generator, self._settings.generate_batch),
        )
        self._ready.set()
        log.info("models (%s) loaded on %s in %.1f s; IDEFICS2 in %s", self.preset.name, self._models.device,
                 time.monotonic() - started, self.idefics2_dtype)

    def close(self) -> None:
        self.idefics2_scheduler.close()
        self.sdxl_scheduler.close()
        self.preprocessor.close()

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
        """Requests waiting per model (not counting the running ones)."""
        return {scheduler.name: scheduler.depth for scheduler in self._schedulers}

    @property
    def running(self) -> dict[tuple[str, str], int]:
        """Requests running per (model, kind of work)."""
        return {(scheduler.name, kind): count for scheduler in self._schedulers
                for kind, count in scheduler.running.items()}

    @property
    def _schedulers(self) -> tuple[StepScheduler, StepScheduler]:
        return self.idefics2_scheduler, self.sdxl_scheduler

    @property
    def cache_stats(self) -> CacheStats | None:
        return self._models.scorer.cache_stats if self._models is not None else None

    @property
    def vision_cache_stats(self) -> CacheStats | None:
        """The image features' cache; None before loading or when it is off."""
        cache = self._models.vision_cache if self._models is not None else None
        return cache.stats if cache is not None else None

    # -- model work -----------------------------------------------------------------------------------

    async def extract(self, images: Sequence[ProcessedImage], comments: Sequence[str], *,
                      user: str | None = None) -> Preferences:
        """Runs the VPE over the processed images and their comments (each image's sha256 keys its features in
        the vision cache). user: whose request it is (for fair turns)."""
        extractions, _, _ = self._loaded_work()
        self._check_room(self.idefics2_scheduler)
        with tracing.span("engine.prepare", images=len(images)):
            extraction = await asyncio.to_thread(extractions.extractor.prepare, images, comments)
        return await self.idefics2_scheduler.run(ExtractionTask(extractions, extraction, user))

    async def generate(self, params: GenerationParams, liked_features: Sequence[str],
                       disliked_features: Sequence[str], *, user: str | None = None) -> AsyncIterator[GenerationEvent]:
        """Yields Progress, Preview and FinishedImage events as they are made. user: whose request it is."""
        _, _, generations = self._loaded_work()
        task = GenerationTask(generations, params, liked_features, disliked_features, user,
                              on_denoising_step=self._observer.generation_step)
        async for event in self.sdxl_scheduler.stream(task):
            yield event

    async def generate_candidates(self, params: GenerationParams, liked_features: Sequence[str],
                                  disliked_features: Sequence[str], *,
                                  user: str | None = None) -> AsyncIterator[GenerationEvent]:
        """Best of N's images: exactly those of a plain Generate of params.candidates images (seeds seed, seed+1,
        ...), since they are made as one: one task, its images denoised together as a plain Generate's are (in
        groups of up to the step's image bound). Not as one-image requests batched together: a UNet or VAE
        call's floats depend on how many images share it and in which rows (pixels then move by 1/255). The
        caller has checked the queue's room (check_room): it queues even if it has filled since."""
        _, _, generations = self._loaded_work()
        task = GenerationTask(generations, replace(params, num_images=params.candidates), liked_features,
                              disliked_features, user, on_denoising_step=self._observer.generation_step)
        async for event in self.sdxl_scheduler.stream(task, reserved=True):
            yield event

    def check_room(self, *, generate: bool = False, score: bool = False) -> None:
        """QueueFull unless the named models' queues have room: a request that needs both (best of N) is
        checked for both before any work."""
        if generate:
            self._check_room(self.sdxl_scheduler)
        if score:
            self._check_room(self.idefics2_scheduler)

    def stored_context(self, user_id: str, version: int, images: Sequence[ImageRef],
                       image_data: ImageData) -> ScoringContext:
        """A user's stored images as a metric context: their bytes read (image_data) and decoded only if the
        prefix is not cached.

        user_id: the key that names the user in the caches (the application qualifies it with the tenant).
        The cache key names exactly the images the prompt uses, in order: two contexts share a cached
        prefix only if they are the same images. Raises ContextError when there is no pair to use."""
        liked = [image for image in images if image.rating is Rating.LIKED]
        disliked = [image for image in images if image.rating is Rating.DISLIKED]
        pairs = context_pairs(len(liked), len(disliked), self._settings.metric_max_pairs)
        used = [image.sha256 for pair in zip(disliked[:pairs], liked[:pairs]) for image in pair]
        digest = hashlib.sha256(" ".join(used).encode()).hexdigest()
        return ScoringContext(
            liked=_StoredImages(liked, self.preprocessor, image_data),
            disliked=_StoredImages(disliked, self.preprocessor, image_data),
            cache_key=(user_id, digest),
            version=version,
        )

    def process_uploads(self, uploads: Sequence[bytes]) -> list[ProcessedImage | ImageDecodeError]:
        """Uploaded images processed for the models (blocking: from a handler's thread); each a ProcessedImage or
        why its bytes are no acceptable image, for validation to name the field; none after the first bad one."""
        return self.preprocessor.process_uploads(uploads)

    async def process_stored(self, images: Sequence[StoredImage]) -> list[ProcessedImage]:
        """Stored images processed for the models (StoredImageUnreadable for one that cannot be)."""
        results = await self.preprocessor.process_async([(image.sha256, ("bytes", image.data)) for image in images])
        return [_readable(image, result) for image, result in zip(images, results)]

    def context_pairs(self, context: ScoringContext) -> int:
        """How many pairs of the context a score uses; ContextError (before any model work) when none."""
        return context_pairs(len(context.liked), len(context.disliked), self._settings.metric_max_pairs)

    async def score(self, context: ScoringContext, queries: Sequence[ProcessedImage | Image.Image], *,
                    user: str | None = None, reserved: bool = False) -> AsyncIterator[list[ScoredQuery]]:
        """Yields the queries' scores a batch at a time (a processed image's sha256 keys its features in the
        vision cache; a generation's pictures have none). user: whose request it is. reserved: the request
        was admitted already (check_room), the scoring queues even when the queue is full."""
        _, scorings, _ = self._loaded_work()
        if not reserved:
            self._check_room(self.idefics2_scheduler)
        with tracing.span("engine.prepare", queries=len(queries)):
            queries = await self._processed_pictures(queries)
            if isinstance(context.liked, _StoredImages) and not scorings.scorer.prefix_cached(context):
                context = await self._processed_context(context)
            scoring = await asyncio.to_thread(scorings.scorer.prepare, context, queries)
            tracing.annotate(prefix_cache=_prefix_cache_use(scoring))
        task = ScoringTask(scorings, scoring, user)
        async for batch in self.idefics2_scheduler.stream(task, reserved=reserved):
            yield batch

    async def _processed_pictures(self, images: Sequence[ProcessedImage | Image.Image]) -> list[ProcessedImage]:
        """Pictures (a generation's images, RGB) processed by the preprocessor; processed ones as they are."""
        pictures = [(index, image) for index, image in enumerate(images) if isinstance(image, Image.Image)]
        if not pictures:
            return list(images)
        done = await self.preprocessor.process_async(
            [(None, ("rgb", np.asarray(image.convert("RGB")))) for _, image in pictures])
        processed = list(images)
        for (index, _), result in zip(pictures, done):
            if isinstance(result, ImageDecodeError):
                raise result
            processed[index] = result
        return processed

    async def _processed_context(self, context: ScoringContext) -> ScoringContext:
        """A stored context with the images the prompt uses read and processed (off this process): on a
        prefix-cache miss."""
        pairs = self.context_pairs(context)
        liked, disliked = context.liked[:pairs], context.disliked[:pairs]
        stored = await asyncio.to_thread(liked.with_data, [*disliked.stored, *liked.stored])
        processed = await self.process_stored(stored)
        return replace(context, liked=processed[pairs:], disliked=processed[:pairs])

    def forget_user(self, user_id: str, version: int) -> None:
        """The user's profile changed (now at version) or was deleted: drop what is cached for them.

        user_id: the same (tenant-qualified) key that stored_context was given."""
        if self._models is not None:
            self._models.scorer.invalidate(user_id, version)

    @property
    def metric_max_pairs(self) -> int:
        return self._settings.metric_max_pairs

    @staticmethod
    def _check_room(scheduler: StepScheduler) -> None:
        """Refuses at once when the queue is full, before preparing the inputs (submitting checks again)."""
        if scheduler.depth >= scheduler.max_queue:
            raise QueueFull(scheduler.name, scheduler.depth)

    def _loaded_work(self) -> tuple[Extractions, Scorings, Generations]:
        self._loaded()
        return self._work

    def _loaded(self) -> LoadedModels:
        if self._models is None or not self.ready:
            if self.load_error is not None:
                raise ModelsNotReady(f"models failed to load: {self.load_error}")
            raise ModelsNotReady("models are still loading; retry shortly")
        return self._models


class _StoredImages(Sequence[ProcessedImage]):
    """Stored images, read and processed when the metric reads them (the engine does it before a scoring is
    prepared; this, in the reader's thread, only for a prefix evicted since); a slice stays unprocessed."""

    def __init__(self, images: Sequence[ImageRef], preprocessor: Preprocessor, image_data: ImageData) -> None:
        self.stored = images
        self._preprocessor = preprocessor
        self._image_data = image_data

    def __len__(self) -> int:
        return len(self.stored)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return _StoredImages(self.stored[index], self._preprocessor, self._image_data)
        [image] = self.with_data([self.stored[index]])
        return _readable(image, self._preprocessor.process([(image.sha256, ("bytes", image.data))])[0])

    def with_data(self, images: Sequence[ImageRef]) -> list[StoredImage]:
        """The images with their bytes (blocking: a store read); ContextChanged when the profile no longer has
        one of them."""
        found = self._image_data([image.sha256 for image in images])
        if any(image.sha256 not in found for image in images):
            raise ContextChanged("the profile's images changed while they were read; retry")
        return [StoredImage(image.sha256, image.comment, image.rating, image.position, found[image.sha256])
                for image in images]


def _readable(image: StoredImage, result: ProcessedImage | ImageDecodeError) -> ProcessedImage:
    if isinstance(result, ImageDecodeError):
        raise StoredImageUnreadable(
            f"stored image {image.sha256[:16]} (position {image.position}) cannot be decoded: {result}"
        ) from result
    return result


def _prefix_cache_use(scoring) -> str:
    """How a scoring meets the metric prefix cache: hit, miss (its context decoded), inline or off."""
    if not scoring.use_prefix:
        return "off"
    if scoring.context.cache_key is None:
        return "inline"
    return "miss" if scoring.context_pixels is not None else "hit"
