"""Model presets: which checkpoints a `--models` name means, and the settings that go with them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

# Folder names inside a directory of built checkpoints (written by models.tiny).
BUILT_LAYOUT = {
    "idefics2": "idefics2",
    "vpe_adapter": "vpe-lora",
    "metric_adapter": "metric-lora",
    "sdxl_base": "sdxl-base",
    "sdxl_refiner": "sdxl-refiner",
}


@dataclass(frozen=True)
class ModelPreset:
    """Where each checkpoint is (a local folder, or a hub id resolved in the local HF cache) and the
    settings that belong to those models."""

    name: str
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
    # Builds the checkpoints into a folder when they are missing (the presets the project makes itself).
    build: Callable[[], Path] | None = None
    # Makes the models in memory instead of loading checkpoints: (device, IDEFICS2 dtype) ->
    # (models.idefics2.Idefics2Base with the "vpe" and "metric" adapters, models.sdxl.SdxlPipelines).
    in_memory: Callable[[str, object], tuple[object, object]] | None = None


VIPER = ModelPreset(
    name="viper",
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

def model_preset(name: str, models_dir: Path | None, built_models_root: Path) -> ModelPreset:
    """The preset called name (PRESETS); models_dir as given by --models-dir, or None."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r} (choose from {', '.join(PRESET_NAMES)})")
    return PRESETS[name](models_dir, built_models_root)


def _viper(models_dir: Path | None) -> ModelPreset:
    if models_dir is None:
        return VIPER

    def local_or_id(model_id: str) -> str:
        folder = models_dir / model_id.split("/")[-1]
        return str(folder) if folder.is_dir() else model_id

    return replace(VIPER, **{name: local_or_id(getattr(VIPER, name)) for name in BUILT_LAYOUT})


def _tiny(models_dir: Path) -> ModelPreset:
    """The tiny random-weight checkpoints; their output is noise, their code path is the real one."""
    # Imported here: this module is read by `--help` and the config, which should not wait for torch.
    from ..models.tiny import ensure_tiny_models

    return ModelPreset(
        name="tiny",
        **{name: str(models_dir / folder) for name, folder in BUILT_LAYOUT.items()},
        extractor_name="tiny-vpe",
        vpe_max_new_tokens=64,
        default_image_size=64,
        build=lambda: ensure_tiny_models(models_dir),
    )


def _toy(models_dir: Path) -> ModelPreset:
    """The toy models (viper_server.toy): the real architectures in the tiny models' layout, trained in a toy world of
    colours, so features, scores and images mean something (the committed weights, installed into models_dir)."""
    from ..toy import TOY_EXTRACTOR_NAME, TOY_IMAGE_SIZE, TOY_VPE_MAX_NEW_TOKENS, ensure_toy_models

    return ModelPreset(
        name="toy",
        **{name: str(models_dir / folder) for name, folder in BUILT_LAYOUT.items()},
        extractor_name=TOY_EXTRACTOR_NAME,
        vpe_max_new_tokens=TOY_VPE_MAX_NEW_TOKENS,
        default_image_size=TOY_IMAGE_SIZE,
        build=lambda: ensure_toy_models(models_dir),
    )


def _full_random(models_dir: Path | None) -> ModelPreset:
    """The real architectures at full size with random weights, made in memory (models.full_random): real-scale
    compute and memory for benchmarks on a GPU host, without any checkpoint. Outputs are noise."""

    def build(device: str, idefics2_dtype: object) -> tuple[object, object]:
        from ..models.full_random import build_full_random

        return build_full_random(device, idefics2_dtype)

    return ModelPreset(
        name="full-random",
        **{name: "(random weights)" for name in BUILT_LAYOUT},
        extractor_name="full-random (random weights)",
        vpe_max_new_tokens=2000,
        default_image_size=1024,
        in_memory=build,
    )


# --models NAME -> the preset, from (--models-dir or None, the root of built checkpoints). Add a preset here.
PRESETS: dict[str, Callable[[Path | None, Path], ModelPreset]] = {
    # tiny: checkpoints built into models_dir, by default built_models_root/tiny.
    "tiny": lambda models_dir, root: _tiny(models_dir or root / "tiny"),
    # toy: trained toy-world models, installed into models_dir, by default built_models_root/toy.
    "toy": lambda models_dir, root: _toy(models_dir or root / "toy"),
    # viper: folders of models_dir named like the repos (DIR/idefics2-8b) take precedence over the HF cache.
    "viper": lambda models_dir, root: _viper(models_dir),
    "full-random": lambda models_dir, root: _full_random(models_dir),
}
PRESET_NAMES = tuple(PRESETS)
