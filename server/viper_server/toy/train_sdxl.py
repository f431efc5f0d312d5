"""Trains the toy SDXL base and refiner in the toy world.

The VAE starts as an exact colour pass-through (colour_passthrough_init) and learns detail on top. The base
UNet learns to denoise the images' latents given a caption that may name the image's colour (then the image
has that colour) or not (then any colour is right), so a prompt naming a colour draws that colour and ViPer's
liked / disliked feature terms pull towards one colour and away from another. The refiner learns the
low-noise end of the same task from text_encoder_2 alone, as SDXL's does. The text encoders keep their
seeded random weights (scaled up): each word still gets its own embedding.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from . import world
from .sdxl_arch import SUBJECTS, clip_text_config, clip_tokenizers, scheduler, unet, vae

log = logging.getLogger(__name__)

# The refiner takes over for the last 20% of the steps (timesteps below 200); it learns a margin beyond that.
REFINER_MAX_TIMESTEP = 300
AESTHETIC_SCORES = (6.0, 2.5)  # the img2img pipeline's defaults for the prompt and the negative prompt


@dataclass(frozen=True)
class SdxlSchedule:
    images_per_colour: int = 400
    vae_steps: int = 200
    vae_batch: int = 16
    vae_lr: float = 3e-4
    kl_weight: float = 1e-6
    base_steps: int = 2500
    refiner_steps: int = 500
    unet_batch: int = 32
    unet_lr: float = 1e-3
    caption_dropout: float = 0.15
    offset_noise: float = 0.1


def train_sdxl(out_dir: Path, *, seed: int = 0, schedule: SdxlSchedule = SdxlSchedule()) -> None:
    """Writes out_dir/"sdxl-base" and out_dir/"sdxl-refiner" (diffusers format)."""
    out_dir = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        tokenizer, tokenizer_2 = clip_tokenizers()
        text_encoder = _text_encoder(CLIPTextModel(clip_text_config(tokenizer)))
        text_encoder_2 = _text_encoder(CLIPTextModelWithProjection(clip_text_config(tokenizer)))
        autoencoder = vae()
        colour_passthrough_init(autoencoder)
        base = StableDiffusionXLPipeline(
            vae=autoencoder, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet(cross_attention_dim=2 * text_encoder.config.hidden_size, time_ids=6),
            scheduler=scheduler(), add_watermarker=False,
        )
        refiner = StableDiffusionXLImg2ImgPipeline(
            vae=autoencoder, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None,
            tokenizer_2=tokenizer_2, unet=unet(cross_attention_dim=text_encoder_2.config.hidden_size, time_ids=5),
            scheduler=scheduler(), requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
            add_watermarker=False,
        )

        pixels, colours = _image_pool(rng, schedule.images_per_colour)
        started = time.perf_counter()
        _train_vae(autoencoder, pixels, schedule)
        latents = _latent_distribution(autoencoder, pixels)
        log.info("vae trained in %.0f s (scaling factor %.4f)", time.perf_counter() - started,
                 autoencoder.config.scaling_factor)

        started = time.perf_counter()
        _train_unet(base, latents, colours, rng, schedule, refiner=False)
        log.info("base unet trained in %.0f s", time.perf_counter() - started)
        started = time.perf_counter()
        _train_unet(refiner, latents, colours, rng, schedule, refiner=True)
        log.info("refiner unet trained in %.0f s", time.perf_counter() - started)

    base.save_pretrained(out_dir / "sdxl-base")
    refiner.save_pretrained(out_dir / "sdxl-refiner")


def _text_encoder(model):
    """A frozen random encoder whose word embeddings are as large as a trained CLIP's (CLIP's initial 0.02
    would leave the UNet's cross-attention nearly blind to the words)."""
    embeddings = model.get_input_embeddings()
    positions = next(m for n, m in model.named_modules() if n.endswith("position_embedding"))
    with torch.no_grad():
        embeddings.weight.normal_(std=1.0)
        positions.weight.normal_(std=0.1)
    return model.eval().requires_grad_(False)


def caption(rng: np.random.Generator, colour: str | None) -> str:
    """A prompt for an image of `colour`; None: a prompt that names no colour (or the empty one)."""
    subject = SUBJECTS[rng.integers(len(SUBJECTS))]
    if colour is None:
        return subject
    words = world.COLOUR_WORDS[colour]
    word = words[0] if rng.random() < 0.5 else words[rng.integers(len(words))]
    frames = ("{c}", "{s}, {c}", "a {c} {s}", "{s} in {c}", "{s}, {c} tones", "{c} colors", "{s}, {c} palette",
              "a {c} painting of {s}")
    return frames[rng.integers(len(frames))].format(c=word, s=subject.removeprefix("a ").removeprefix("an "))


def _image_pool(rng: np.random.Generator, per_colour: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, colours = [], []
    for index, colour in enumerate(world.COLOURS):
        for _ in range(per_colour):
            images.append(np.asarray(world.draw_image(rng, colour, "train")))
            colours.append(index)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, torch.tensor(colours)


def _cosine(step: int, total: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# The pass-through initialisation's channel layout: RGB, minus RGB, then +C and -C.
_RGB, _NEGATIVE_RGB, _CONSTANT = slice(0, 3), slice(3, 6), 6
_C = 20.0  # large against colours in [-1, 1], so GroupNorm's statistics hardly depend on the colour


def colour_passthrough_init(autoencoder) -> None:
    """Sets the VAE to an exact colour pass-through before training: the encoder averages each 8x8 block's
    colour into latent channels 0-2, the decoder repeats it back over the block.

    A VAE learning colours from scratch stalls (its GroupNorms normalise a flat image's colour away and the
    decoder settles on the mean colour), so it starts from this; every residual branch (conv2, attention
    output) starts at zero, so training adds detail on top. How the colour survives the GroupNorms: each
    colour channel has a negated twin and two constant channels +-C share its group, so the group's mean is
    0 and its deviation almost exactly C-dependent only; SiLU(a) - SiLU(-a) = a recovers the colour after it.
    """
    with torch.no_grad():
        for name, module in autoencoder.named_modules():
            if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
                if name.endswith(("conv2", "to_out.0")):
                    module.weight.zero_()
                    module.bias.zero_()
                elif name.endswith(("conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")):
                    module.weight.zero_()
                    module.bias.zero_()
                    centre = module.weight.shape[-1] // 2
                    for channel in range(min(module.weight.shape[:2])):
                        if name.endswith("downsamplers.0.conv"):  # the average of each 2x2 square
                            module.weight[channel, channel, :2, :2] = 0.25
                        else:
                            module.weight[channel, channel, centre, centre] = 1.0
        for part in (autoencoder.encoder, autoencoder.decoder):
            _spread_colour(part.conv_in, from_channels=range(3))
            norm = part.conv_norm_out
            group = norm.num_channels // norm.num_groups
            norm.weight.fill_(1.0)
            norm.weight[: _CONSTANT + 2] = math.sqrt(2 * _C**2 / group)  # undoes the group's deviation
            norm.bias.zero_()
            _gather_colour(part.conv_out)
        autoencoder.quant_conv.weight.zero_()
        autoencoder.quant_conv.bias.zero_()
        latent = autoencoder.config.latent_channels
        for channel in range(2 * latent):
            autoencoder.quant_conv.weight[channel, channel, 0, 0] = 1.0
        autoencoder.quant_conv.bias[latent:] = -8.0  # log-variance: near-deterministic latents
        autoencoder.post_quant_conv.weight.zero_()
        autoencoder.post_quant_conv.bias.zero_()
        for channel in range(latent):
            autoencoder.post_quant_conv.weight[channel, channel, 0, 0] = 1.0


def _spread_colour(conv: torch.nn.Conv2d, from_channels: range) -> None:
    """conv_in: colour channels c -> (c, -c), and the +-C constants."""
    conv.weight.zero_()
    conv.bias.zero_()
    centre = conv.weight.shape[-1] // 2
    for index, channel in enumerate(from_channels):
        conv.weight[_RGB.start + index, channel, centre, centre] = 1.0
        conv.weight[_NEGATIVE_RGB.start + index, channel, centre, centre] = -1.0
    conv.bias[_CONSTANT], conv.bias[_CONSTANT + 1] = _C, -_C


def _gather_colour(conv: torch.nn.Conv2d) -> None:
    """conv_out: SiLU(c) - SiLU(-c) = c into its first three outputs (the rest zero)."""
    conv.weight.zero_()
    conv.bias.zero_()
    centre = conv.weight.shape[-1] // 2
    for index in range(3):
        conv.weight[index, _RGB.start + index, centre, centre] = 1.0
        conv.weight[index, _NEGATIVE_RGB.start + index, centre, centre] = -1.0


def _train_vae(autoencoder, pixels: torch.Tensor, schedule: SdxlSchedule) -> None:
    autoencoder.train()
    optimiser = torch.optim.AdamW(autoencoder.parameters(), lr=schedule.vae_lr, weight_decay=0.0)
    running = None
    for step in range(schedule.vae_steps):
        for group in optimiser.param_groups:
            group["lr"] = _cosine(step, schedule.vae_steps, schedule.vae_lr)
        batch = pixels[torch.randint(len(pixels), (schedule.vae_batch,))]
        posterior = autoencoder.encode(batch).latent_dist
        reconstruction = autoencoder.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, batch) + schedule.kl_weight * posterior.kl().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 100 == 0 or step == schedule.vae_steps - 1:
            log.info("vae step %d/%d loss %.4f", step, schedule.vae_steps, running)
    autoencoder.eval().requires_grad_(False)


def _latent_distribution(autoencoder, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of every pool image's latent, scaled; sets the VAE's scaling factor to unit variance."""
    with torch.no_grad():
        parts = [autoencoder.encode(pixels[i : i + 256]).latent_dist for i in range(0, len(pixels), 256)]
    mean = torch.cat([p.mean for p in parts])
    std = torch.cat([p.std for p in parts])
    factor = float(1 / torch.sqrt((mean**2).mean() + (std**2).mean()))
    autoencoder.register_to_config(scaling_factor=factor)
    return mean * factor, std * factor


def _conditioning(pipeline, prompts: list[str], *, refiner: bool, size: int) -> dict:
    """The encoder states and added conditioning the pipeline itself gives the UNet for these prompts."""
    with torch.no_grad():
        embeds, _, pooled, _ = pipeline.encode_prompt(prompts, device=torch.device("cpu"),
                                                      do_classifier_free_guidance=False)
    if refiner:
        time_ids = [[size, size, 0, 0, AESTHETIC_SCORES[0]]] * len(prompts)
    else:
        time_ids = [[size, size, 0, 0, size, size]] * len(prompts)
    return dict(encoder_hidden_states=embeds,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": torch.tensor(time_ids, dtype=embeds.dtype)})


def _train_unet(pipeline, latents: tuple[torch.Tensor, torch.Tensor], colours: torch.Tensor,
                rng: np.random.Generator, schedule: SdxlSchedule, *, refiner: bool) -> None:
    model = pipeline.unet
    model.train()
    alphas = pipeline.scheduler.alphas_cumprod
    steps = schedule.refiner_steps if refiner else schedule.base_steps
    max_timestep = REFINER_MAX_TIMESTEP if refiner else len(alphas)
    optimiser = torch.optim.AdamW(model.parameters(), lr=schedule.unet_lr, weight_decay=0.01)
    mean, std = latents
    by_colour = [torch.nonzero(colours == index).flatten() for index in range(len(world.COLOURS))]
    running = None
    label = "refiner" if refiner else "base"
    for step in range(steps):
        for group in optimiser.param_groups:
            group["lr"] = _cosine(step, steps, schedule.unet_lr)
        indices, prompts = [], []
        for _ in range(schedule.unet_batch):
            colour = int(rng.integers(len(world.COLOURS)))
            candidates = by_colour[colour]
            indices.append(int(candidates[rng.integers(len(candidates))]))
            roll = rng.random()
            if roll < schedule.caption_dropout:
                prompts.append("")
            elif roll < schedule.caption_dropout + 0.2:
                prompts.append(caption(rng, None))
            else:
                prompts.append(caption(rng, world.COLOURS[colour]))
        index = torch.tensor(indices)
        clean = mean[index] + std[index] * torch.randn_like(std[index])
        # Offset noise: a shared per-channel shift in the noise teaches the UNet to decide an image's overall
        # colour from the prompt, not from the starting noise's mean (SDXL's schedule never fully drowns it).
        noise = torch.randn_like(clean) + schedule.offset_noise * torch.randn(len(clean), clean.shape[1], 1, 1)
        timesteps = torch.randint(0, max_timestep, (len(indices),))
        alpha = alphas[timesteps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * clean + (1 - alpha).sqrt() * noise
        predicted = model(noisy, timesteps, **_conditioning(pipeline, prompts, refiner=refiner,
                                                           size=world.IMAGE_SIZE)).sample
        loss = F.mse_loss(predicted, noise)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            log.info("%s unet step %d/%d loss %.4f", label, step, steps, running)
    model.eval().requires_grad_(False)
