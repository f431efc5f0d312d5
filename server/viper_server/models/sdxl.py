"""Loads SDXL base + refiner the way ViPer's reference does (the refiner shares the base's
text_encoder_2 and VAE), for the real stabilityai checkpoints and the tiny test ones alike."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline


@dataclass
class SdxlPipelines:
    base: StableDiffusionXLPipeline
    refiner: StableDiffusionXLImg2ImgPipeline | None


def load_sdxl(
    base: str,
    refiner: str | None,
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
    vae_tiling: bool = False,
) -> SdxlPipelines:
    """Load from local directories or hub ids in the local HF cache (never downloads); raises
    FileNotFoundError when weights are not on disk."""
    if dtype is None:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    options = {"dtype": dtype, "local_files_only": True}
    base_pipeline = _from_pretrained(StableDiffusionXLPipeline, base, **options)
    refiner_pipeline = None
    if refiner is not None:
        refiner_pipeline = _from_pretrained(
            StableDiffusionXLImg2ImgPipeline,
            refiner,
            text_encoder_2=base_pipeline.text_encoder_2,
            vae=base_pipeline.vae,
            **options,
        )
    if vae_tiling:
        base_pipeline.vae.enable_tiling()  # the refiner decodes with this same VAE
    for pipeline in (base_pipeline, refiner_pipeline):
        if pipeline is None:
            continue
        if cpu_offload:
            pipeline.enable_model_cpu_offload(device=device)
        else:
            pipeline.to(device)
    return SdxlPipelines(base=base_pipeline, refiner=refiner_pipeline)


def _from_pretrained(pipeline_class: type[DiffusionPipeline], name: str, **options) -> DiffusionPipeline:
    try:
        if options["dtype"] == torch.float16:
            try:
                # The stabilityai repos ship fp16 weight files: half the download and load time.
                return pipeline_class.from_pretrained(name, variant="fp16", **options)
            except ValueError:
                pass  # no fp16 files (e.g. a local fp32 checkpoint): load the full ones and cast
        return pipeline_class.from_pretrained(name, **options)
    except OSError as error:
        raise FileNotFoundError(
            f"SDXL checkpoint {name!r} is not available locally; download it first "
            f"(huggingface-cli download {name}) or pass a local diffusers directory"
        ) from error
