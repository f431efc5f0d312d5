"""The toy IDEFICS2: the real architecture (SigLIP-style vision encoder, perceiver connector, Mistral text
model) and the real processor settings, at toy sizes, with a byte-level BPE tokenizer whose merges make
every toy-world word (colour words included) and every word of the ViPer prompts a single token.
"""

from __future__ import annotations

from transformers import GenerationConfig, Idefics2Config, Idefics2Processor

from ..models.tiny_idefics2 import build_idefics2_processor, idefics2_config
from ..models.vpe import VPE_PROMPT_TEMPLATE
from . import world

IMAGE_SEQ_LEN = 4  # <image> tokens per image == perceiver latents
VOCAB_SIZE = 2000  # an upper bound: the trainer stops once every corpus word is one token
END_OF_UTTERANCE = "<end_of_utterance>"

# Prompt words beside the template's: the base's own tasks, the VPE comments and answer, the metric turn.
CAPTION_QUESTION = "Which colour is this?"
CHECK_QUESTION = "Is this {}?"
LABEL_QUESTION = "Label?"
# The lexicon task (world.tones): a word or phrase alone, and its tone.
TONE_QUESTION = "Tone of {}?"
TONES = ("positive", "negative", "neutral")
SUMMARY_WORDS = ("likes", "dislikes")
# The two in-context labels of the base's few-shot task.
LABELS = ("yes", "no")
_PROMPT_TEXT = [
    "User: Assistant: Comment Score for this image?",
    CAPTION_QUESTION,
    CHECK_QUESTION.format(""),
    LABEL_QUESTION,
    TONE_QUESTION.format(""),
    *TONES,
    *LABELS,
    *SUMMARY_WORDS,
    "Liked Art Features: Disliked Art Features:",
    *(str(number) for number in range(1, 65)),
]


def _tokenizer_corpus() -> list[str]:
    words = world.vocabulary()
    # Each word alone, after a space and capitalised, often enough for BPE to merge it whole. The answers
    # "+" and "-" are never preceded by a space here, so " +" / " -" never become tokens of their own.
    lines = [VPE_PROMPT_TEMPLATE, *_PROMPT_TEXT]
    for word in words + " ".join(_PROMPT_TEXT).split() + VPE_PROMPT_TEMPLATE.split():
        for variant in (word, " " + word, " " + word[:1].upper() + word[1:]):
            lines.extend([variant] * 4)
    return lines


def build_processor() -> Idefics2Processor:
    return build_idefics2_processor(_tokenizer_corpus(), vocab_size=VOCAB_SIZE, image_seq_len=IMAGE_SEQ_LEN)


def build_config(processor: Idefics2Processor) -> Idefics2Config:
    return idefics2_config(
        processor,
        # 378 px (the processor's shortest edge) / 54 = 7x7 patches: the toy images are flat colour fields.
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2, patch_size=54),
        perceiver=dict(hidden_size=128, resampler_depth=1, resampler_n_heads=4, resampler_head_dim=32,
                       num_key_value_heads=2),
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2),
    )


def generation_config(processor: Idefics2Processor) -> GenerationConfig:
    """Like the real checkpoint's: generation ends at </s> or <end_of_utterance>."""
    tokenizer = processor.tokenizer
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE)],
        pad_token_id=tokenizer.pad_token_id,
    )
