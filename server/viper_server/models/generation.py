"""Personalized SDXL generation (ViPer): the base pipeline steered by a user's liked / disliked
features, then the stock refiner. Reports each step through events and stops on request."""

from __future__ import annotations

import copy
import random
import threading
from collections.abc import Callable, Sequence

import torch
from diffusers import StableDiffusionXLPipeline

from ..domain import FinishedImage, GenerationEvent, GenerationParams, Preview, Progress
from .guidance import ViperGuidedUNet, preference_kwargs
from .preview import latent_preview_png, png_bytes
from .sdxl import SdxlPipelines

SEED_RANGE = 2**64  # seeds are uint64 on the wire


class GenerationCancelled(Exception):
    """should_stop() turned true: generation stopped before decoding the current image."""


def image_seed(params: GenerationParams, image_index: int) -> int:
    """Image i uses seed + i; with that seed alone it is generated again as image 0."""
    return (params.seed + image_index) % SEED_RANGE


def shuffled_features(features: Sequence[str], rng: random.Random) -> str:
    """ViPer feeds each image the features in a new random order, joined as its VPE wrote them."""
    order = list(features)
    rng.shuffle(order)
    return ", ".join(order)


class PersonalizedGenerator:
    """Generates one image at a time. Not reentrant (the pipelines' schedulers hold the step state):
    concurrent calls wait for each other."""

    def __init__(self, pipelines: SdxlPipelines):
        base = pipelines.base
        # The same components, with the UNet wrapped so the stock loop applies ViPer guidance.
        self._base = StableDiffusionXLPipeline(
            **{**base.components, "unet": ViperGuidedUNet(base.unet)},
            add_watermarker=base.watermark is not None,
        )
        self._refiner = pipelines.refiner
        for pipeline in (self._base, self._refiner):
            if pipeline is not None:
                pipeline.set_progress_bar_config(disable=True)  # progress goes out as events
        # A private copy for counting: a fast tokenizer keeps padding state that encode_prompt sets per
        # call, so sharing one with a generation running on another thread corrupts its padding.
        self._counting_tokenizer = copy.deepcopy(base.tokenizer_2)
        self._counting_lock = threading.Lock()
        self.max_prompt_tokens: int = self._counting_tokenizer.model_max_length
        self._lock = threading.Lock()

    def prompt_token_count(self, text: str) -> int:
        """Tokens CLIP sees for text, start and end tokens included; above max_prompt_tokens it truncates.

        Safe to call from any thread, also while a generation runs."""
        with self._counting_lock:
            return len(self._counting_tokenizer(text).input_ids)

    def generate(
        self,
        params: GenerationParams,
        liked_features: Sequence[str],
        disliked_features: Sequence[str],
        *,
        emit: Callable[[GenerationEvent], None],
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        """Emit, per image: Progress(step 0), Progress after every step with a Preview every
        preview_every steps, then FinishedImage. Raises GenerationCancelled once should_stop() is true.

        params are taken as checked (rpc.validation checks every bound once)."""
        if params.refine and self._refiner is None:
            raise ValueError("refine=True needs a refiner pipeline")
        with self._lock, torch.inference_mode():
            prompt_embeds = self._encode(params.prompt, params.negative_prompt)
            for image_index in range(params.num_images):
                if should_stop():
                    raise GenerationCancelled()
                seed = image_seed(params, image_index)
                rng = random.Random(seed)
                features = shuffled_features(liked_features, rng), shuffled_features(disliked_features, rng)
                steps = _StepEvents(image_index, params, emit, should_stop)
                png = self._generate_image(params, prompt_embeds, features, seed, steps)
                emit(FinishedImage(image_index, png, seed, params.width, params.height))

    def _generate_image(
        self,
        params: GenerationParams,
        prompt_embeds: tuple[torch.Tensor, ...],
        features: tuple[str, str],
        seed: int,
        steps: _StepEvents,
    ) -> bytes:
        embeds, negative_embeds, pooled_embeds, negative_pooled_embeds = prompt_embeds
        # V+ and V- come from one encoder call, as the prompt and negative prompt do; pooled ones unused.
        liked_embeds, disliked_embeds, _, _ = self._encode(*features)
        strength = params.preference_strength
        generator = torch.Generator(self._base._execution_device).manual_seed(seed)
        steps.started()
        base_output = self._base(
            prompt_embeds=embeds + strength * liked_embeds,
            negative_prompt_embeds=negative_embeds + strength * disliked_embeds,
            pooled_prompt_embeds=pooled_embeds,
            negative_pooled_prompt_embeds=negative_pooled_embeds,
            cross_attention_kwargs=preference_kwargs(disliked_embeds, liked_embeds, strength),
            width=params.width,
            height=params.height,
            num_inference_steps=params.steps,
            guidance_scale=params.guidance_scale,
            denoising_end=params.high_noise_frac if params.refine else None,
            output_type="latent" if params.refine else "pil",
            generator=generator,
            callback_on_step_end=steps,
        ).images
        if not params.refine:
            return png_bytes(base_output[0])
        # The refiner gets the plain prompt: no preference terms, as in the reference.
        image = self._refiner(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            image=base_output,
            num_inference_steps=params.steps,
            denoising_start=params.high_noise_frac,
            guidance_scale=params.guidance_scale,
            generator=generator,
            callback_on_step_end=steps,
        ).images[0]
        return png_bytes(image)

    def _encode(self, prompt: str, negative_prompt: str) -> tuple[torch.Tensor, ...]:
        """(embeds, negative embeds, pooled, negative pooled); the negative prompt is encoded even
        when it is "", as the reference does, rather than zeroed."""
        return self._base.encode_prompt(
            prompt,
            negative_prompt=negative_prompt,
            device=self._base._execution_device,
            do_classifier_free_guidance=True,
        )


class _StepEvents:
    """callback_on_step_end of one image's base and refiner runs: counts steps over both, emits
    Progress / Preview, and raises GenerationCancelled (before any VAE decode) when asked to stop."""

    def __init__(
        self,
        image_index: int,
        params: GenerationParams,
        emit: Callable[[GenerationEvent], None],
        should_stop: Callable[[], bool],
    ):
        self._image_index = image_index
        # Euler is first order: the base and the refiner split the schedule's steps between them.
        self._total_steps = params.steps
        self._preview_every = params.preview_every
        self._emit = emit
        self._should_stop = should_stop
        self._step = 0

    def started(self) -> None:
        self._emit(Progress(self._image_index, 0, self._total_steps))

    def __call__(self, pipeline, step_index: int, timestep, tensors: dict[str, torch.Tensor]) -> dict:
        self._step += 1
        self._emit(Progress(self._image_index, self._step, self._total_steps))
        if self._preview_every and self._step % self._preview_every == 0:
            self._emit(Preview(self._image_index, self._step, latent_preview_png(tensors["latents"][0])))
        if self._should_stop():
            raise GenerationCancelled()
        return tensors
