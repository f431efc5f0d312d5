"""The toy SDXL: the real base + refiner architecture (two CLIP text encoders, a UNet with SDXL's text-time
conditioning, a 4-channel VAE with an 8x downscale, SDXL's Euler scheduler) at toy sizes, with CLIP
tokenizers in which the toy world's words (colour words included) are single tokens.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTokenizer

from ..models import tiny_sdxl
from . import world

LATENT_SIDE = world.IMAGE_SIZE // 8

# What the toy images "show" according to their captions (the images are colour fields: any subject
# goes with any colour). The last ones are held out of training, for evaluation.
SUBJECTS = (
    "a cat in the city", "a portrait of a woman", "a forest at dawn", "a bowl of fruit", "a mountain landscape",
    "a ship on the ocean", "a dog in a park", "a house in the hills", "flowers in a vase", "a city street at night",
    "an abstract composition", "a bird on a branch", "a quiet village", "a still life",
)
HELD_OUT_SUBJECTS = ("a castle by the sea", "a lighthouse on a cliff")

_EXTRA_WORDS = "painting photo art style colors color light mood texture".split()
# Beside the colour words, the comment words of the toy world the tokenizers were built with (issue 14): the
# comments have more words now, but the SDXL checkpoints keep their tokenizers (the captions use none of them).
_COMMENT_WORDS = (
    "deep soft bright pale rich warm cool vivid muted dark light tones hues shades colours palette love "
    "adore enjoy like cherish treasure beautiful gorgeous lovely stunning delightful wonderful charming "
    "pleasing make me happy feel so calming smile and inviting lift my mood alive hate dislike detest "
    "loathe resent despise ugly dull harsh unpleasant boring garish dreary awful leave flat uneasy cold "
    "lifeless put off bore heavy sad I these The What Such it here is how the Those are A piece they "
    "really in this one So much Honestly work All that to every bit of image those way uses Looking at "
    "them"
).split()


def clip_words() -> list[str]:
    colour_words = (w for words in world.COLOUR_WORDS.values() for w in words)
    words = [*world.COLOURS, *colour_words, *_COMMENT_WORDS, *_EXTRA_WORDS]
    for subject in (*SUBJECTS, *HELD_OUT_SUBJECTS):
        words.extend(subject.split())
    return list(dict.fromkeys(word.lower() for word in words))


def clip_tokenizers() -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """The tiny builders' CLIP tokenizers with every toy-world and caption word a single token."""
    with tempfile.TemporaryDirectory() as folder:
        return tiny_sdxl.clip_tokenizers(Path(folder), clip_words())


def clip_text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return tiny_sdxl.clip_text_config(tokenizer, intermediate_size=64)


def vae() -> AutoencoderKL:
    # Few, wide groups: a group of one or two channels normalises the colour of a flat image away.
    return tiny_sdxl.sdxl_vae(block_out_channels=[16, 32, 32, 32], norm_num_groups=2, sample_size=world.IMAGE_SIZE)


scheduler = tiny_sdxl.sdxl_scheduler


def unet(*, cross_attention_dim: int, time_ids: int) -> UNet2DConditionModel:
    """The base attends to both encoders and has 6 time ids; the refiner attends to text_encoder_2 alone and
    has 5 (the aesthetic score replaces the target size). Cross-attention in both blocks: the prompt's colour
    word has to reach every scale."""
    return tiny_sdxl.sdxl_unet(cross_attention_dim=cross_attention_dim, time_ids=time_ids, sample_size=LATENT_SIDE,
                               cross_attention_only=True, norm_num_groups=4)
