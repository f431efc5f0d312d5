"""Where each model comes from: the real ViPer checkpoints or the tiny test ones."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class ModelSources:
    """A local folder or a hub id (resolved from the local HF cache) per model."""

    idefics2: str
    vpe_adapter: str
    metric_adapter: str
    sdxl_base: str
    sdxl_refiner: str
    # Recorded in each profile: which extractor made it.
    extractor_name: str
    vpe_max_new_tokens: int
    # Generated width and height when a request leaves them at 0.
    default_image_size: int
    # The metric's "+" / "-" token ids, checked at load; None = take the tokenizer's.
    metric_token_ids: tuple[int, int] | None = None


VIPER = ModelSources(
    idefics2="HuggingFaceM4/idefics2-8b",
    vpe_adapter="EPFL-VILAB/VPE-ViPer",
    metric_adapter="EPFL-VILAB/Metric-ViPer",
    sdxl_base="stabilityai/stable-diffusion-xl-base-1.0",
    sdxl_refiner="stabilityai/stable-diffusion-xl-refiner-1.0",
    extractor_name="EPFL-VILAB/VPE-ViPer",
    vpe_max_new_tokens=2000,
    default_image_size=1024,
    metric_token_ids=(648, 387),
)

# Folder names inside a tiny-models directory (written by models.tiny).
TINY_LAYOUT = {
    "idefics2": "idefics2",
    "vpe_adapter": "vpe-lora",
    "metric_adapter": "metric-lora",
    "sdxl_base": "sdxl-base",
    "sdxl_refiner": "sdxl-refiner",
}


def viper_sources(models_dir: Path | None = None) -> ModelSources:
    """The real models; a folder named like a repo (e.g. DIR/idefics2-8b) takes precedence over the HF cache."""
    if models_dir is None:
        return VIPER

    def local_or_id(model_id: str) -> str:
        folder = models_dir / model_id.split("/")[-1]
        return str(folder) if folder.is_dir() else model_id

    return replace(VIPER, **{name: local_or_id(getattr(VIPER, name)) for name in TINY_LAYOUT})


def tiny_sources(models_dir: Path) -> ModelSources:
    """The tiny random-weight checkpoints; their output is noise, their code path is the real one."""
    return ModelSources(
        **{name: str(models_dir / folder) for name, folder in TINY_LAYOUT.items()},
        extractor_name="tiny-vpe",
        vpe_max_new_tokens=64,
        default_image_size=64,
    )
