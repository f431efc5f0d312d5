"""Personalized SDXL generation (ViPer): the base denoising loop steered by a user's liked / disliked
features, then the stock refiner, then the VAE decode; a step at a time, any number of images per step.

The loop is the stock SDXL pipelines' (`StableDiffusionXLPipeline` with `denoising_end`, then
`StableDiffusionXLImg2ImgPipeline` with `denoising_start`), written out so that one UNet call can serve
several images: each image has its own scheduler (its own timesteps and step index), generator, latents,
guidance scale, preference strength and embeddings; rows of one call are per image, so the batch changes no
image beyond float rounding (tests/test_batching.py). A request's images are made a group at a time (up to
`together`, the step's image bound), denoised together in lockstep. Each base step evaluates ViPer's four
predictions per image in one call (guidance.py); the images' events (progress, previews, the PNG) go out as
they happen.
"""

from __future__ import annotations

import copy
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from diffusers.utils.torch_utils import randn_tensor

from ..domain import FinishedImage, GenerationEvent, GenerationParams, Preview, Progress
from .guidance import cfg_rows, preference_rows, viper_noise
from .preview import latent_preview_png, png_bytes
from .sdxl import SdxlPipelines

SEED_RANGE = 2**64  # seeds are uint64 on the wire
# The refiner's aesthetic-score conditioning: the img2img pipeline's defaults, which the reference keeps.
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5


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


@dataclass(eq=False)
class _Stage:
    """One image's denoising on one UNet (base or refiner): its scheduler, timesteps and conditioning rows."""

    scheduler: object = field(repr=False)
    timesteps: torch.Tensor = field(repr=False)
    encoder_states: torch.Tensor = field(repr=False)  # the UNet's rows for this image
    text_embeds: torch.Tensor = field(repr=False)
    time_ids: torch.Tensor = field(repr=False)
    position: int = 0

    @property
    def finished(self) -> bool:
        return self.position >= len(self.timesteps)


@dataclass(eq=False)
class _Image:
    """The image of a generation being made now."""

    index: int
    generator: torch.Generator = field(repr=False)
    latents: torch.Tensor = field(repr=False)
    base: _Stage
    refiner: _Stage | None
    steps_done: int = 0


@dataclass(eq=False)
class Generation:
    """One Generate request between steps: its images a group at a time, at most `together` in a group, denoised
    side by side (a group's images share every step, so they stay in one phase). Built by
    PersonalizedGenerator.start; its events go to emit as they happen."""

    params: GenerationParams
    liked_features: Sequence[str]
    disliked_features: Sequence[str]
    emit: Callable[[GenerationEvent], None] = field(repr=False)
    together: int = 1
    prompt_embeds: tuple[torch.Tensor, ...] | None = field(default=None, repr=False)
    refiner_embeds: tuple[torch.Tensor, ...] | None = field(default=None, repr=False)
    next_index: int = 0  # the next image to start
    images: list[_Image] = field(default_factory=list)  # the group being made now

    @property
    def phase(self) -> str:
        """encode (the next group's texts and noise), base, refiner (a denoising step a step), decode (the VAE),
        then done."""
        if not self.images:
            return "done" if self.next_index >= self.params.num_images else "encode"
        image = self.images[0]
        if not image.base.finished:
            return "base"
        if image.refiner is not None and not image.refiner.finished:
            return "refiner"
        return "decode"

    @property
    def next_group(self) -> int:
        """How many images the next encode step starts."""
        return min(self.together, self.params.num_images - self.next_index)

    @property
    def size(self) -> tuple[int, int]:
        return self.params.height, self.params.width

    @property
    def steps_done(self) -> int:
        """Denoising steps run for all its images so far."""
        finished = self.next_index - len(self.images)
        return finished * self.params.steps + sum(image.steps_done for image in self.images)

    def release(self) -> None:
        self.images, self.prompt_embeds, self.refiner_embeds = [], None, None


class PersonalizedGenerator:
    """Makes ViPer images with SDXL base (+ refiner) in steps: `start`, then `encode_step`, `denoise_step`
    (any number of generations in the same phase and size in one UNet call) and `decode_step` as their phases
    say, until done. `generate` runs one request alone. Only one thread may run steps at a time."""

    def __init__(self, pipelines: SdxlPipelines):
        self._base = pipelines.base
        self._refiner = pipelines.refiner
        for pipeline in (self._base, self._refiner):
            if pipeline is not None:
                pipeline.set_progress_bar_config(disable=True)  # progress goes out as events
        # A private copy for counting: a fast tokenizer keeps padding state that encode_prompt sets per
        # call, so sharing one with a generation running on another thread corrupts its padding.
        self._counting_tokenizer = copy.deepcopy(self._base.tokenizer_2)
        self._counting_lock = threading.Lock()
        self.max_prompt_tokens: int = self._counting_tokenizer.model_max_length
        self._device = self._base._execution_device

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
        preview_every steps, then FinishedImage. Raises GenerationCancelled once should_stop() is true
        (polled before every step, so no step runs after it).

        params are taken as checked (rpc.validation checks every bound once)."""
        generation = self.start(params, liked_features, disliked_features, emit)
        steps = {"encode": self.encode_step, "decode": self.decode_step}
        while (phase := generation.phase) != "done":
            if should_stop():
                generation.release()
                raise GenerationCancelled()
            if phase in steps:
                steps[phase]([generation])
            else:
                self.denoise_step([generation])

    # -- steps ----------------------------------------------------------------------------------------

    def start(self, params: GenerationParams, liked_features: Sequence[str], disliked_features: Sequence[str],
              emit: Callable[[GenerationEvent], None], *, together: int = 1) -> Generation:
        """together: how many of its images are denoised side by side (at most; the rest in later groups)."""
        if params.refine and self._refiner is None:
            raise ValueError("refine=True needs a refiner pipeline")
        return Generation(params, list(liked_features), list(disliked_features), emit, together=max(1, together))

    @torch.inference_mode()
    def encode_step(self, generations: Sequence[Generation]) -> None:
        """Starts each generation's next group of images: their features' embeddings, noise, timesteps (and,
        once per request, the prompt's embeddings). The texts of all of them go through each text encoder in one
        call: CLIP pads every text to its full length, so a row comes out as it would alone."""
        new = [generation for generation in generations if generation.prompt_embeds is None]
        starting = [(generation, generation.next_index + offset) for generation in generations
                    for offset in range(generation.next_group)]
        features = [self._image_features(generation.params, generation.liked_features,
                                         generation.disliked_features, index) for generation, index in starting]
        # The new requests' prompt / negative prompt rows, then every image's V+ / V- rows (pooled ones unused).
        rows = _rows(self._encode(self._base, [g.params.prompt for g in new] + [liked for liked, _ in features],
                                  [g.params.negative_prompt for g in new] + [disliked for _, disliked in features]))
        for generation, embeds in zip(new, rows):
            generation.prompt_embeds = embeds
        if refining := [generation for generation in new if generation.params.refine]:
            # The refiner gets the plain prompt: no preference terms, as in the reference.
            refiner_rows = _rows(self._encode(self._refiner, [g.params.prompt for g in refining],
                                              [g.params.negative_prompt for g in refining]))
            for generation, embeds in zip(refining, refiner_rows):
                generation.refiner_embeds = embeds
        for (generation, index), (liked_embeds, disliked_embeds, _, _) in zip(starting, rows[len(new) :]):
            self._start_image(generation, index, liked_embeds, disliked_embeds)
        for generation in generations:
            generation.next_index += len(generation.images)

    @torch.inference_mode()
    def denoise_step(self, generations: Sequence[Generation]) -> None:
        """One denoising step of each generation's images, all in one UNet call: all in phase base or all in
        phase refiner, all the same size."""
        phases = {generation.phase for generation in generations}
        if len(phases) != 1 or not phases <= {"base", "refiner"} or len({g.size for g in generations}) != 1:
            raise ValueError(f"one denoising step takes images of one stage and size, not {phases}")
        refining = phases == {"refiner"}
        unet = (self._refiner if refining else self._base).unet
        images = [(generation, image) for generation in generations for image in generation.images]
        stages = [image.refiner if refining else image.base for _, image in images]
        rows = 2 if refining else 4  # CFG pair; ViPer's four evaluations
        samples, timesteps = [], []
        for (_, image), stage in zip(images, stages):
            t = stage.timesteps[stage.position]
            samples.append(stage.scheduler.scale_model_input(image.latents, t).repeat(rows, 1, 1, 1))
            timesteps.append(t.reshape(1).expand(rows))
        noise = unet(
            torch.cat(samples),
            torch.cat(timesteps) if len(stages) > 1 else stages[0].timesteps[stages[0].position],
            encoder_hidden_states=torch.cat([stage.encoder_states for stage in stages]),
            added_cond_kwargs={
                "text_embeds": torch.cat([stage.text_embeds for stage in stages]),
                "time_ids": torch.cat([stage.time_ids for stage in stages]),
            },
            return_dict=False,
        )[0]
        for (generation, image), stage, image_noise in zip(images, stages, noise.split(rows)):
            params = generation.params
            if refining:
                uncond, text = image_noise.chunk(2)
                guided = uncond + params.guidance_scale * (text - uncond)
            else:
                guided = viper_noise(image_noise, params.guidance_scale, params.preference_strength)
            t = stage.timesteps[stage.position]
            image.latents = stage.scheduler.step(guided, t, image.latents, generator=image.generator,
                                                 return_dict=False)[0]
            stage.position += 1
            image.steps_done += 1
            generation.emit(Progress(image.index, image.steps_done, params.steps))
            if params.preview_every and image.steps_done % params.preview_every == 0:
                generation.emit(Preview(image.index, image.steps_done, latent_preview_png(image.latents[0])))

    @torch.inference_mode()
    def decode_step(self, generations: Sequence[Generation]) -> None:
        """The VAE decode of each generation's finished latents (all the same size) in one call; emits the PNGs."""
        vae = self._base.vae  # the refiner shares it
        images = [(generation, image) for generation in generations for image in generation.images]
        latents = torch.cat([image.latents for _, image in images])
        needs_upcasting = vae.dtype == torch.float16 and vae.config.force_upcast
        if needs_upcasting:  # the VAE overflows in float16: the pipelines decode in float32
            vae.to(dtype=torch.float32)
            latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        latents_mean = getattr(vae.config, "latents_mean", None)
        latents_std = getattr(vae.config, "latents_std", None)
        if latents_mean is not None and latents_std is not None:
            mean = torch.tensor(latents_mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(latents_std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        try:
            decoded = vae.decode(latents, return_dict=False)[0]
        finally:
            if needs_upcasting:
                vae.to(dtype=torch.float16)
        for generation in generations:
            generation.images = []
        for (generation, image), pixels in zip(images, decoded.split(1)):
            params = generation.params
            pipeline = self._refiner if params.refine else self._base
            if pipeline.watermark is not None:
                pixels = pipeline.watermark.apply_watermark(pixels)
            picture = pipeline.image_processor.postprocess(pixels, output_type="pil")[0]
            generation.emit(FinishedImage(image.index, png_bytes(picture), image_seed(params, image.index),
                                          params.width, params.height, picture=picture))

    # -- one image's set-up -----------------------------------------------------------------------------

    @staticmethod
    def _image_features(params: GenerationParams, liked: Sequence[str], disliked: Sequence[str],
                        index: int) -> tuple[str, str]:
        """Image index's liked and disliked features, each in the order its seed draws."""
        rng = random.Random(image_seed(params, index))
        return shuffled_features(liked, rng), shuffled_features(disliked, rng)

    def _start_image(self, generation: Generation, index: int, liked_embeds: torch.Tensor,
                     disliked_embeds: torch.Tensor) -> None:
        params = generation.params
        seed = image_seed(params, index)
        generator = torch.Generator(self._device).manual_seed(seed)
        base = self._base_stage(params, generation.prompt_embeds, liked_embeds, disliked_embeds)
        shape = (1, self._base.unet.config.in_channels,
                 params.height // self._base.vae_scale_factor, params.width // self._base.vae_scale_factor)
        latents = randn_tensor(shape, generator=generator, device=self._device, dtype=generation.prompt_embeds[0].dtype)
        latents = latents * base.scheduler.init_noise_sigma
        refiner = self._refiner_stage(params, generation.refiner_embeds) if params.refine else None
        generation.images.append(_Image(index, generator, latents, base, refiner))
        generation.emit(Progress(index, 0, params.steps))

    def _base_stage(self, params: GenerationParams, prompt_embeds: tuple[torch.Tensor, ...],
                    liked_embeds: torch.Tensor, disliked_embeds: torch.Tensor) -> _Stage:
        """StableDiffusionXLPipeline's set-up, with denoising_end when the refiner follows."""
        base = self._base
        embeds, negative_embeds, pooled, negative_pooled = prompt_embeds
        scheduler = type(base.scheduler).from_config(base.scheduler.config)
        scheduler.set_timesteps(params.steps, device=self._device)
        timesteps = scheduler.timesteps
        if params.refine:
            train_steps = scheduler.config.num_train_timesteps
            cutoff = int(round(train_steps - params.high_noise_frac * train_steps))
            timesteps = timesteps[: len(list(filter(lambda t: t >= cutoff, timesteps)))]
        scheduler.set_begin_index(0)
        time_ids = base._get_add_time_ids(
            (params.height, params.width), (0, 0), (params.height, params.width), dtype=embeds.dtype,
            text_encoder_projection_dim=base.text_encoder_2.config.projection_dim,
        ).to(self._device)
        strength = params.preference_strength
        return _Stage(
            scheduler, timesteps,
            encoder_states=preference_rows(embeds + strength * liked_embeds,
                                           negative_embeds + strength * disliked_embeds,
                                           liked_embeds, disliked_embeds),
            text_embeds=cfg_rows(pooled, negative_pooled).repeat(2, 1),
            time_ids=time_ids.repeat(4, 1),
        )

    def _refiner_stage(self, params: GenerationParams, prompt_embeds: tuple[torch.Tensor, ...]) -> _Stage:
        """StableDiffusionXLImg2ImgPipeline's set-up with denoising_start, on the base's latents."""
        refiner = self._refiner
        embeds, negative_embeds, pooled, negative_pooled = prompt_embeds
        scheduler = type(refiner.scheduler).from_config(refiner.scheduler.config)
        scheduler.set_timesteps(params.steps, device=self._device)
        train_steps = scheduler.config.num_train_timesteps
        cutoff = int(round(train_steps - params.high_noise_frac * train_steps))
        steps = int((scheduler.timesteps < cutoff).sum().item())
        if scheduler.order == 2 and steps % 2 == 0:
            steps += 1  # end after a second-order step's second half, as the pipeline does
        start = len(scheduler.timesteps) - steps
        scheduler.set_begin_index(start)
        size = (params.height, params.width)
        time_ids, negative_time_ids = refiner._get_add_time_ids(
            size, (0, 0), size, AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE, size, (0, 0), size,
            dtype=embeds.dtype, text_encoder_projection_dim=refiner.text_encoder_2.config.projection_dim,
        )
        return _Stage(
            scheduler, scheduler.timesteps[start:],
            encoder_states=cfg_rows(embeds, negative_embeds),
            text_embeds=cfg_rows(pooled, negative_pooled),
            time_ids=cfg_rows(time_ids, negative_time_ids).to(self._device),
        )

    def _encode(self, pipeline: StableDiffusionXLPipeline | StableDiffusionXLImg2ImgPipeline, prompts: list[str],
                negative_prompts: list[str]) -> tuple[torch.Tensor, ...]:
        """(embeds, negative embeds, pooled, negative pooled), a row per prompt; a negative prompt is encoded
        even when it is "", as the reference does, rather than zeroed."""
        return pipeline.encode_prompt(
            prompts,
            negative_prompt=negative_prompts,
            device=self._device,
            do_classifier_free_guidance=True,
        )


def _rows(embeds: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
    """encode_prompt's batched (embeds, negative embeds, pooled, negative pooled) as one such tuple per row."""
    return [tuple(tensor[row : row + 1] for tensor in embeds) for row in range(len(embeds[0]))]
