"""The model runtime: loads the models and runs every model call on a worker.

The RPC layer talks to models only through this class, with plain Python
values; it never sees tensors, and model code never sees gRPC.
One IDEFICS2 base carries both LoRA adapters (VPE and metric) and has one
worker; SDXL has its own, so generation never blocks extraction or scoring.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

from PIL import Image
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .config import ServerConfig
from .models.catalog import ModelSources, tiny_sources, viper_sources
from .models.generation import GenerationCancelled, GenerationParams, PersonalizedGenerator, Progress
from .models.idefics2 import load_idefics2
from .models.metric import MetricScorer, ScoringContext
from .models.sdxl import load_sdxl
from .models.tiny import ensure_tiny_models
from .models.vpe import PreferenceExtractor, Preferences
from .observability import Metrics
from .worker import Job, ModelWorker

log = logging.getLogger(__name__)


class ModelsNotReady(Exception):
    """Models are still loading (or failed to load)."""


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class ModelRuntime:
    def __init__(self, config: ServerConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.sources: ModelSources = (
            tiny_sources(config.models_dir or Path("var/tiny-models"))
            if config.models == "tiny"
            else viper_sources(config.models_dir)
        )
        self.vision_worker = self._worker("idefics2")
        self.generation_worker = self._worker("sdxl")
        self._extractor = None
        self._scorer = None
        self._generator = None
        self._ready = threading.Event()
        self.load_error: BaseException | None = None

    def _worker(self, name: str) -> ModelWorker:
        worker = ModelWorker(name, self.config.max_queue, observe_wait=self.metrics.queue_wait.labels(name).observe)
        self.metrics.queue_depth.labels(name).set_function(lambda: worker.depth)
        return worker

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def extractor_name(self) -> str:
        return self.sources.extractor_name

    def load(self) -> None:
        """Loads every model (blocking: minutes for the real weights)."""
        started = time.monotonic()
        config, sources = self.config, self.sources
        try:
            if config.models == "tiny":
                ensure_tiny_models(Path(sources.idefics2).parent)
            device = resolve_device(config.device)
            idefics2 = load_idefics2(
                sources.idefics2, {"vpe": sources.vpe_adapter, "metric": sources.metric_adapter}, device=device
            )
            self._extractor = PreferenceExtractor(
                idefics2, adapter="vpe", max_new_tokens=config.vpe_max_new_tokens or sources.vpe_max_new_tokens
            )
            self._scorer = MetricScorer(
                idefics2,
                adapter="metric",
                max_pairs=config.metric_max_pairs,
                batch_size=config.metric_batch_size,
                cache_bytes=config.metric_cache_bytes,
                use_prefix_cache=config.metric_cache,
                expected_token_ids=sources.metric_token_ids,
            )
            self._generator = PersonalizedGenerator(load_sdxl(
                sources.sdxl_base, sources.sdxl_refiner, device=device,
                cpu_offload=config.cpu_offload, vae_tiling=config.vae_tiling,
            ))
        except BaseException as exc:
            self.load_error = exc
            raise
        log.info("models (%s) loaded on %s in %.1f s", config.models, device, time.monotonic() - started)
        self._ready.set()

    async def extract_preferences(self, images: Sequence[Image.Image], comments: Sequence[str]) -> Preferences:
        """Runs the VPE over the images and comments."""
        extractor = self._require(self._extractor)
        return await self.vision_worker.run(
            lambda job: extractor.extract(images, comments, should_stop=job.should_stop)
        )

    @property
    def max_prompt_tokens(self) -> int:
        return self._require(self._generator).max_prompt_tokens

    def prompt_token_count(self, text: str) -> int:
        return self._require(self._generator).prompt_token_count(text)

    async def generate(self, params: GenerationParams) -> AsyncIterator:
        """Yields models.generation events (Progress, Preview, FinishedImage) as the worker makes them."""
        generator = self._require(self._generator)

        def run(job: Job) -> None:
            steps_done = 0

            def emit(event: object) -> None:
                nonlocal steps_done
                if isinstance(event, Progress) and event.step > 0:
                    steps_done += 1
                    self.metrics.generation_steps.inc()
                job.emit(event)

            try:
                generator.generate(params, emit=emit, should_stop=job.should_stop)
            except GenerationCancelled:
                log.info("generation cancelled after %d denoising steps", steps_done)
                raise

        async for event in self.generation_worker.stream(run):
            yield event

    def check_scoring_context(self, context: ScoringContext) -> None:
        """Raises models.metric.ContextError before any model work if the context cannot be scored."""
        self._require(self._scorer).check_context(context)

    async def score(
        self, context: ScoringContext, queries: Sequence[Image.Image]
    ) -> AsyncIterator[list[tuple[int, float]]]:
        """Yields (query index, score) pairs a batch at a time."""
        scorer = self._require(self._scorer)
        async for batch in self.vision_worker.stream(
            lambda job: scorer.score(context, queries, on_batch=job.emit, should_stop=job.should_stop)
        ):
            yield batch

    def collect_metrics(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """The metric prefix cache's statistics, read at scrape time."""
        if self._scorer is None:
            return
        stats = self._scorer.cache_stats
        yield CounterMetricFamily("viper_metric_cache_hits", "metric prefix-cache hits", value=stats.hits)
        yield CounterMetricFamily("viper_metric_cache_misses", "metric prefix-cache misses", value=stats.misses)
        yield GaugeMetricFamily("viper_metric_cache_bytes", "bytes held by the metric prefix cache", value=stats.bytes)
        yield GaugeMetricFamily("viper_metric_cache_entries", "contexts in the metric prefix cache",
                                value=stats.entries)

    def forget_user(self, user_id: str) -> None:
        """Drops what the runtime caches for a user (their profile changed or was deleted)."""
        if self._scorer is not None:
            self._scorer.invalidate(user_id)

    def close(self) -> None:
        self.vision_worker.close()
        self.generation_worker.close()

    def _require(self, model):
        if not self.ready:
            if self.load_error is not None:
                raise ModelsNotReady(f"models failed to load: {self.load_error}")
            raise ModelsNotReady("models are still loading; retry shortly")
        return model
