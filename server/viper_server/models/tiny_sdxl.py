"""Tiny random-weight SDXL base + refiner checkpoints, built offline for tests and benchmarks.

They have the real checkpoints' layout (diffusers on-disk format, two CLIP text encoders, a UNet with
SDXL's text-time conditioning, a VAE with 4 latent channels and an 8x downscale, Euler scheduler), so
`load_sdxl` reads them through the same code path as stabilityai/stable-diffusion-xl-*-1.0.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

CLIP_MAX_TOKENS = 77
TEXT_WIDTH = 32  # both text encoders; the base UNet attends to their concatenation
TIME_EMBED_DIM = 8
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Words merged into single tokens, so prompts cost about a token a word as with the real CLIP vocabulary.
COMMON_WORDS = (
    "a an the of in on with and by art painting photo portrait landscape city cat dog castle forest "
    "sea sky sunset light soft warm cold dark bright pastel color colors palette mood dreamy gloomy "
    "golden blue pink purple red green texture brushwork composition shadows detailed style "
    "realistic watercolor oil digital"
).split()


def build_tiny_sdxl(out_dir: Path, *, seed: int = 0) -> None:
    """Write out_dir/"sdxl-base" and out_dir/"sdxl-refiner"; the same seed gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with tempfile.TemporaryDirectory() as vocab_dir:
            tokenizer, tokenizer_2 = clip_tokenizers(Path(vocab_dir))
        text_encoder = CLIPTextModel(clip_text_config(tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(tokenizer))
        vae = sdxl_vae(block_out_channels=[8, 16, 16, 16], norm_num_groups=8, sample_size=1024,
                       scaling_factor=0.13025)
        scheduler = sdxl_scheduler()
        # The base attends to both encoders and its time ids are 6 numbers; the refiner attends to
        # text_encoder_2 alone and its time ids are 5 (the aesthetic score replaces the target size).
        base_unet = sdxl_unet(cross_attention_dim=2 * TEXT_WIDTH, time_ids=6)
        refiner_unet = sdxl_unet(cross_attention_dim=TEXT_WIDTH, time_ids=5)

    StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=base_unet,
        scheduler=scheduler,
        add_watermarker=False,
    ).save_pretrained(out_dir / "sdxl-base")
    StableDiffusionXLImg2ImgPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=text_encoder_2,
        tokenizer=None,
        tokenizer_2=tokenizer_2,
        unet=refiner_unet,
        scheduler=scheduler,
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    ).save_pretrained(out_dir / "sdxl-refiner")


def clip_tokenizers(vocab_dir: Path, words: Sequence[str] = COMMON_WORDS) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """CLIP BPE over the byte alphabet plus whole-word merges of words (written to vocab_dir); padded like
    SDXL's two tokenizers."""
    alphabet = sorted(ByteLevel.alphabet())
    tokens = alphabet + [char + "</w>" for char in alphabet]
    merges: list[str] = []
    for word in words:
        # Merge each word left to right; every intermediate piece is a token, so any text still encodes.
        pieces = [*word[:-1], word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            merges.append(f"{merged} {piece}")
            merged += piece
            tokens.append(merged)
    tokens = [*dict.fromkeys(tokens), BOS, EOS]
    merges = list(dict.fromkeys(merges))
    (vocab_dir / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (vocab_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    # transformers 5 builds a 3-token vocabulary from vocab_file=/merges_file=; from a folder it works.
    tokenizer = CLIPTokenizer.from_pretrained(vocab_dir, model_max_length=CLIP_MAX_TOKENS)
    tokenizer_2 = CLIPTokenizer.from_pretrained(vocab_dir, model_max_length=CLIP_MAX_TOKENS, pad_token="!")
    return tokenizer, tokenizer_2


def clip_text_config(tokenizer: CLIPTokenizer, *, intermediate_size: int = 37) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=intermediate_size,
        num_attention_heads=4,
        num_hidden_layers=2,  # SDXL reads the penultimate layer
        projection_dim=TEXT_WIDTH,
        max_position_embeddings=CLIP_MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def sdxl_vae(*, block_out_channels: list[int], norm_num_groups: int, sample_size: int,
             **settings: float) -> AutoencoderKL:
    """SDXL's VAE shape (4 latent channels, an 8x downscale) at a toy width."""
    return AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        norm_num_groups=norm_num_groups,
        latent_channels=4,
        sample_size=sample_size,
        **settings,
    )


def sdxl_scheduler() -> EulerDiscreteScheduler:
    """SDXL's own scheduler settings."""
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )


def sdxl_unet(*, cross_attention_dim: int, time_ids: int, sample_size: int = 128,
              cross_attention_only: bool = False, norm_num_groups: int = 8) -> UNet2DConditionModel:
    """SDXL's UNet conditioning (text-time embedding, time_ids numbers) at a toy size; cross_attention_only puts
    cross-attention in both blocks (the tiny models have it in one)."""
    down, up = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") if cross_attention_only else ("DownBlock2D", "UpBlock2D")
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=(down, "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", up),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=norm_num_groups,
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        # Pooled text_encoder_2 output plus the embedded time ids.
        projection_class_embeddings_input_dim=TEXT_WIDTH + time_ids * TIME_EMBED_DIM,
    )
