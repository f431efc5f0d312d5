"""Loading a model preset: checkpoints -> the three ready-to-call models."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..models.generation import PersonalizedGenerator
from ..models.idefics2 import load_idefics2
from ..models.metric import MetricScorer
from ..models.sdxl import load_sdxl
from ..models.vision import VisionCache
from ..models.vpe import PreferenceExtractor
from .presets import ModelPreset

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoadSettings:
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    torch_threads: int = 0  # the models' CPU threads (torch intra-op); 0 = torch's own default
    idefics2_dtype: str = "auto"  # auto = bfloat16 on CUDA, float32 elsewhere
    vpe_max_new_tokens: int | None = None  # None = the preset's
    cpu_offload: bool = False
    vae_tiling: bool = False
    metric_cache: bool = True
    metric_cache_bytes: int = 2 << 30
    metric_batch_size: int = 4
    metric_max_pairs: int = 8
    vision_cache_bytes: int = 1 << 30  # 0 = image features not cached
    # The step schedulers (engine.scheduler): how many requests of each kind run (and batch) at once,
    # who goes first (engine.policy), and how much of an extraction's prefill one step does.
    extract_batch: int = 8
    generate_batch: int = 4
    score_batch: int = 8
    scheduling_policy: str = "fair"
    prefill_images: int = 1
    prefill_tokens: int = 256
    query_step_tokens: int = 4096  # Score queries' prompt tokens batched into one step
    # Unread events a streaming call may have before its task pauses between steps.
    stream_buffer: int = 8


@dataclass(frozen=True)
class LoadedModels:
    extractor: PreferenceExtractor
    scorer: MetricScorer
    generator: PersonalizedGenerator
    device: str
    idefics2_dtype: torch.dtype
    vision_cache: VisionCache | None = None


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_idefics2_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return _DTYPES[name]


def load_models(preset: ModelPreset, settings: LoadSettings) -> LoadedModels:
    """Builds the preset's checkpoints if it makes its own, then loads them (blocking: minutes for the real weights)."""
    if settings.torch_threads:
        # Before any model work: threads that have run no torch op yet take the new count.
        torch.set_num_threads(settings.torch_threads)
    if preset.build is not None:
        preset.build()
    device = resolve_device(settings.device)
    dtype = resolve_idefics2_dtype(settings.idefics2_dtype, device)
    if preset.in_memory is not None:
        idefics2, pipelines = preset.in_memory(device, dtype)
    else:
        idefics2 = load_idefics2(
            preset.idefics2, {"vpe": preset.vpe_adapter, "metric": preset.metric_adapter}, device=device, dtype=dtype
        )
        pipelines = load_sdxl(
            preset.sdxl_base, preset.sdxl_refiner, device=device,
            cpu_offload=settings.cpu_offload, vae_tiling=settings.vae_tiling,
        )
    # One cache for both adapters (the key names the adapter): an image's features under each.
    vision_cache = VisionCache(settings.vision_cache_bytes) if settings.vision_cache_bytes > 0 else None
    chunks = dict(prefill_images=settings.prefill_images, prefill_tokens=settings.prefill_tokens,
                  vision_cache=vision_cache)
    extractor = PreferenceExtractor(
        idefics2, adapter="vpe", max_new_tokens=settings.vpe_max_new_tokens or preset.vpe_max_new_tokens, **chunks,
    )
    scorer = MetricScorer(
        idefics2,
        adapter="metric",
        max_pairs=settings.metric_max_pairs,
        batch_size=settings.metric_batch_size,
        cache_bytes=settings.metric_cache_bytes,
        use_prefix_cache=settings.metric_cache,
        expected_token_ids=preset.metric_token_ids,
        query_step_tokens=settings.query_step_tokens,
        **chunks,
    )
    generator = PersonalizedGenerator(pipelines)
    return LoadedModels(extractor=extractor, scorer=scorer, generator=generator, device=device, idefics2_dtype=dtype,
                        vision_cache=vision_cache)
