"""Token ids of IDEFICS2 prompts exactly as the ViPer adapters saw them in training (transformers ~4.40).

transformers 5 tokenizes the same prompt text differently, in two ways:
- its Idefics2Processor inserts a space after an image's closing <fake_token_around_image> when a word
  follows it (4.40 did not);
- its Llama tokenizer prepends the SentencePiece word marker "▁" to the first text piece only, where
  the 4.40 (legacy) tokenizer prepended it to every piece between special tokens.
The space makes the two agree after images, but after <end_of_utterance> the 4.40 ids carry a "▁"
before "\\n" that transformers 5 drops (tests/test_real_vocabulary.py shows it on the real vocabulary).

Encoding every text piece on its own reproduces the 4.40 ids with either tokenizer: a
transformers 5 SentencePiece tokenizer then marks each piece as its first, and byte-level
tokenizers (the tiny test ones) are unaffected by the split.
"""

from __future__ import annotations

import re

from transformers import PreTrainedTokenizerBase, ProcessorMixin


def expand_image_tokens(prompt: str, processor: ProcessorMixin) -> str:
    """Replaces each <image> with the image's token run, as the transformers 4.40 processor did.

    Adjacent images share their boundary token; no space is inserted after a closing boundary token.
    """
    fake, image = processor.fake_image_token, processor.image_token
    expanded = prompt.replace(image, f"{fake}{image * processor.image_seq_len}{fake}")
    return expanded.replace(fake + fake, fake)


def encode_as_trained(tokenizer: PreTrainedTokenizerBase, text: str, *, add_bos: bool) -> list[int]:
    """Token ids of `text` (special tokens already expanded) with each text piece encoded on its own."""
    # Added tokens (<image>, <end_of_utterance>, ...) are what the tokenizer itself splits text on.
    added_tokens = tokenizer.get_added_vocab()
    pattern = "|".join(re.escape(token) for token in sorted(added_tokens, key=len, reverse=True))
    ids = [tokenizer.bos_token_id] if add_bos else []
    for index, piece in enumerate(re.split(f"({pattern})", text)):
        if index % 2:  # re.split puts the captured separators at odd indices
            ids.append(added_tokens[piece])
        elif piece:
            ids.extend(tokenizer.encode(piece, add_special_tokens=False))
    return ids
