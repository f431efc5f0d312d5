"""Tiny random-weight IDEFICS2 checkpoints (base + two LoRA adapters) for tests and local runs.

They share the real checkpoints' layout, tokenizer special tokens, chat template and
processor settings, so `idefics2.load_idefics2` loads them through exactly the real code path.
Their outputs are noise.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Idefics2Config,
    Idefics2ForConditionalGeneration,
    Idefics2ImageProcessorPil,
    Idefics2Processor,
    PreTrainedTokenizerFast,
)

from .idefics2 import VIPER_PROCESSOR_SETTINGS
from .vpe import VPE_PROMPT_TEMPLATE

# The chat template shipped with HuggingFaceM4/idefics2-8b.
IDEFICS2_CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Ids 0..5 in this order, like the real vocabulary's <unk>/<s>/</s> followed by IDEFICS2's additions.
SPECIAL_TOKENS = [
    "<unk>",
    "<s>",
    "</s>",
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
]
VOCAB_SIZE = 400
IMAGE_SEQ_LEN = 64  # <image> tokens per image == perceiver latents

# Text the BPE merges are learned from: the prompts the service sends, so they tokenize compactly.
# Byte-level BPE still encodes any other text (including "+" and "-") byte by byte.
_TOKENIZER_CORPUS = [
    VPE_PROMPT_TEMPLATE,
    "User: Assistant: Comment Score for this image? + -",
    "Liked Art Features: Disliked Art Features: colors, style, mood, lighting, texture",
]

# The reference's LoRA configuration for both ViPer adapters.
VIPER_LORA_CONFIG = dict(
    r=8,
    lora_alpha=8,
    lora_dropout=0.1,
    target_modules=(
        r".*(text_model|modality_projection|perceiver_resampler)"
        r".*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$"
    ),
    init_lora_weights="gaussian",
)
# LoRA initialises lora_B to zero (a no-op adapter); random values make each adapter change outputs.
_LORA_B_STD = 0.02


def build_tiny_idefics2(out_dir: Path, *, seed: int = 0) -> None:
    """Writes out_dir/"idefics2" (model, processor, tokenizer), out_dir/"vpe-lora" and out_dir/"metric-lora"."""
    out_dir = Path(out_dir)
    processor = build_idefics2_processor()
    # fork_rng keeps the caller's global RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Idefics2ForConditionalGeneration(_build_config(processor)).eval()
        model.save_pretrained(out_dir / "idefics2")
        processor.save_pretrained(out_dir / "idefics2")
        for adapter_dir in ("vpe-lora", "metric-lora"):
            _save_random_lora(model, out_dir / adapter_dir)


def build_idefics2_processor(corpus: Sequence[str] = _TOKENIZER_CORPUS, *, vocab_size: int = VOCAB_SIZE,
                             image_seq_len: int = IMAGE_SEQ_LEN) -> Idefics2Processor:
    """The real processor settings and chat template, with a byte-level BPE tokenizer (the real special
    tokens, then merges learned from corpus, at most vocab_size tokens)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    # The real (Llama) tokenizer starts every sequence with <s>.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", SPECIAL_TOKENS.index("<s>"))]
    )
    fast_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    image_processor = Idefics2ImageProcessorPil(**VIPER_PROCESSOR_SETTINGS)
    return Idefics2Processor(
        image_processor, fast_tokenizer, image_seq_len=image_seq_len, chat_template=IDEFICS2_CHAT_TEMPLATE
    )


# Weights drawn wider than transformers' 0.02: with the default, attention is nearly uniform and a
# metric score barely depends on its context (swapping liked and disliked moved it by ~1e-6), so a test
# comparing two scoring paths could not tell a wrong context from the right one. At 0.35 the swap moves
# scores by ~0.5 and the query matters too.
INIT_STD = 0.35


def _build_config(processor: Idefics2Processor) -> Idefics2Config:
    return idefics2_config(
        processor,
        initializer_range=INIT_STD,
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=14),
        perceiver=dict(hidden_size=64, resampler_depth=1, resampler_n_heads=2, resampler_head_dim=32,
                       num_key_value_heads=1),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    )


def idefics2_config(processor: Idefics2Processor, *, vision: dict, perceiver: dict, text: dict,
                    initializer_range: float | None = None) -> Idefics2Config:
    """An IDEFICS2 config with the real model's special ids and fixed settings, sized by vision, perceiver and
    text (the three sub-configs' sizes); initializer_range (None: transformers' default) for all of them."""
    init = {} if initializer_range is None else dict(initializer_range=initializer_range)
    special_ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Idefics2Config(
        **init,
        # image_size is the real value: position buckets for images up to 980 px.
        vision_config=dict(**init, image_size=980, **vision),
        perceiver_config=dict(**init, rms_norm_eps=1e-5, resampler_n_latents=processor.image_seq_len, **perceiver),
        text_config=dict(
            model_type="mistral",
            **init,
            vocab_size=len(processor.tokenizer),
            max_position_embeddings=32768,
            rms_norm_eps=1e-5,
            **special_ids,
            **text,
        ),
        image_token_id=processor.image_token_id,
        **special_ids,
    )


def _save_random_lora(model: Idefics2ForConditionalGeneration, adapter_dir: Path) -> None:
    # get_peft_model injects layers in place: wrap a copy so every adapter is made on the plain base.
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**VIPER_LORA_CONFIG))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=_LORA_B_STD)
    peft_model.save_pretrained(adapter_dir)
