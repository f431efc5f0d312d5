"""ViPer's visual preference extraction (VPE): commented images -> liked / disliked art features."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import resources

import PIL.Image
import torch
from transformers import BatchFeature, ProcessorMixin, StoppingCriteria, StoppingCriteriaList

from ..domain import Preferences
from .idefics2 import Idefics2Base
from .prompt_ids import encode_as_trained, expand_image_tokens

# The prompt the VPE adapter was trained on; bytes must match the reference exactly.
# Read as bytes: text mode could translate line endings.
VPE_PROMPT_TEMPLATE: str = (
    resources.files(__package__).joinpath("vpe_prompt_template.txt").read_bytes().decode("utf-8")
)

# The reference decodes with this (below 1, it mildly favours repeats); kept for fidelity.
REPETITION_PENALTY = 0.99

ANSWER_MARKER = "\nAssistant:"
LIKED_MARKER = "Liked Art Features:"
DISLIKED_MARKER = "Disliked Art Features:"
FEATURE_SEPARATOR = ", "


class ExtractionCancelled(Exception):
    """should_stop returned True before extraction finished."""


def build_vpe_messages(comments: Sequence[str]) -> list[dict]:
    """The reference's single user message: the template, then per image an image part and its comment."""
    content: list[dict] = [{"type": "text", "text": VPE_PROMPT_TEMPLATE}]
    for number, comment in enumerate(comments, start=1):
        content.append({"type": "image"})
        content.append({"type": "text", "text": f"Comment {number}: {comment}"})
    return [{"role": "user", "content": content}]


def build_vpe_inputs(processor: ProcessorMixin, images: Sequence[PIL.Image.Image],
                     comments: Sequence[str]) -> BatchFeature:
    """Model inputs for one extraction, with the token ids the VPE adapter was trained on.

    The chat template renders the reference's text; its ids come from prompt_ids.encode_as_trained,
    not the transformers 5 processor, which drops a word marker before the final "\nAssistant:".
    """
    prompt = processor.apply_chat_template(build_vpe_messages(comments), add_generation_prompt=True)
    input_ids = torch.tensor([encode_as_trained(processor.tokenizer, expand_image_tokens(prompt, processor),
                                                add_bos=True)])
    pixels = processor.image_processor(images=[list(images)], return_tensors="pt")
    return BatchFeature({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **pixels})


def parse_preferences(decoded: str) -> Preferences:
    """Parses the decoded output (prompt + answer) like the reference, keeping the model's order.

    A feature named in both lists is dropped from both; a missing marker gives an empty list. NUL characters
    are dropped: text cannot carry them (PostgreSQL refuses them), and a model's NUL byte means nothing.
    """
    answer = decoded.replace("\x00", "").split(ANSWER_MARKER)[-1].strip()
    liked = _features(_section(answer, LIKED_MARKER, DISLIKED_MARKER))
    disliked = _features(_section(answer, DISLIKED_MARKER, LIKED_MARKER))
    contested = set(liked) & set(disliked)
    return Preferences(
        liked=[feature for feature in liked if feature not in contested],
        disliked=[feature for feature in disliked if feature not in contested],
        raw_text=answer,
    )


def _section(answer: str, marker: str, next_marker: str) -> str:
    """The text after `marker`, up to `next_marker` if that follows it; "" without `marker`."""
    start = answer.find(marker)
    if start < 0:
        return ""
    start += len(marker)
    end = answer.find(next_marker, start)
    return answer[start : end if end >= 0 else len(answer)]


def _features(section: str) -> list[str]:
    # dict.fromkeys drops repeats like the reference's sets do, but keeps the first-seen order.
    features = (feature.strip() for feature in section.split(FEATURE_SEPARATOR))
    return list(dict.fromkeys(feature for feature in features if feature))


class _Cancellation(StoppingCriteria):
    """Polls should_stop after every generated token and aborts generation when it says so."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def check(self) -> None:
        if self.should_stop():
            raise ExtractionCancelled()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        self.check()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class PreferenceExtractor:
    """Runs the VPE adapter of a shared IDEFICS2 base with the reference's prompt and decoding."""

    def __init__(self, idefics2: Idefics2Base, *, adapter: str = "vpe", max_new_tokens: int = 2000):
        self.idefics2 = idefics2
        self.adapter = idefics2.require_adapter(adapter)
        self.max_new_tokens = max_new_tokens

    @property
    def control_tokens(self) -> frozenset[str]:
        """The tokenizer's control tokens (<image>, <end_of_utterance>, <s>, ...): in a comment they would
        not be text but structure (encode_as_trained splits on them)."""
        tokenizer = self.idefics2.processor.tokenizer
        return frozenset(tokenizer.all_special_tokens) | frozenset(tokenizer.get_added_vocab())

    def extract(
        self,
        images: Sequence[PIL.Image.Image],
        comments: Sequence[str],
        *,
        should_stop: Callable[[], bool] | None = None,
    ) -> Preferences:
        """Runs the VPE on decoded RGB images and their comments (one comment per image, same order).

        Raises ExtractionCancelled as soon as should_stop() returns True (checked before the
        images are processed, once the model is ours, and after every generated token).
        """
        if len(images) != len(comments):
            raise ValueError(f"got {len(images)} images but {len(comments)} comments")
        if not images:
            raise ValueError("at least one commented image is required")
        cancellation = _Cancellation(should_stop or (lambda: False))
        cancellation.check()

        processor = self.idefics2.processor
        inputs = build_vpe_inputs(processor, images, comments)
        inputs = inputs.to(device=self.idefics2.device, dtype=self.idefics2.dtype)
        with self.idefics2.use_adapter(self.adapter) as model, torch.inference_mode():
            cancellation.check()  # waiting for the shared model may have taken a while
            generated = model.generate(
                **inputs,
                do_sample=False,
                repetition_penalty=REPETITION_PENALTY,
                max_new_tokens=self.max_new_tokens,
                stopping_criteria=StoppingCriteriaList([cancellation]),
            )
        decoded = processor.batch_decode(generated, skip_special_tokens=True)[0]
        return parse_preferences(decoded)
