"""ViPer's visual preference extraction (VPE): commented images -> liked / disliked art features."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources

import PIL.Image
import torch
from transformers import BatchFeature, DynamicCache, ProcessorMixin

from ..domain import Preferences
from ..pixels import ProcessedImage, pixel_batch, processed
from .decoding import DecodeGroup, DecodingSequence, greedy_tokens
from .idefics2 import Idefics2Base
from .prompt_ids import encode_as_trained, expand_image_tokens
from .vision import VisionCache, VisionEncoder

# The prompt the VPE adapter was trained on; bytes must match the reference exactly.
# Read as bytes: text mode could translate line endings.
VPE_PROMPT_TEMPLATE: str = (
    resources.files(__package__).joinpath("vpe_prompt_template.txt").read_bytes().decode("utf-8")
)

# The reference decodes greedily with this (below 1, it mildly favours repeats); kept for fidelity.
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


def build_vpe_inputs(processor: ProcessorMixin, images: Sequence[PIL.Image.Image | ProcessedImage],
                     comments: Sequence[str]) -> BatchFeature:
    """Model inputs for one extraction, with the token ids the VPE adapter was trained on.

    The chat template renders the reference's text; its ids come from prompt_ids.encode_as_trained,
    not the transformers 5 processor, which drops a word marker before the final "\nAssistant:". Images are
    processed by pixels.py (the processor's arithmetic without torch), unless they come processed already.
    """
    prompt = processor.apply_chat_template(build_vpe_messages(comments), add_generation_prompt=True)
    input_ids = torch.tensor([encode_as_trained(processor.tokenizer, expand_image_tokens(prompt, processor),
                                                add_bos=True)])
    values, mask = pixel_batch([processed(image) for image in images])
    return BatchFeature({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                         "pixel_values": torch.from_numpy(values), "pixel_attention_mask": torch.from_numpy(mask)})


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


class _Cancellation:
    """Polls should_stop and aborts the extraction when it says so."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def check(self) -> None:
        if self.should_stop():
            raise ExtractionCancelled()


@dataclass(eq=False)
class Extraction:
    """One extraction between steps: its inputs, the image features and key/value states computed so far,
    then the sequence being decoded. Built by PreferenceExtractor.prepare (no model work)."""

    input_ids: torch.Tensor = field(repr=False)  # [1, prompt length], on the CPU
    pixel_values: torch.Tensor = field(repr=False)  # [1, images, 3, H, W]
    pixel_attention_mask: torch.Tensor = field(repr=False)  # [1, images, H, W]
    # Per image, its ProcessedImage's sha256 (None: not cached): keys its features in the vision cache.
    image_keys: tuple[str | None, ...]
    image_features: list[torch.Tensor] = field(default_factory=list, repr=False)
    images_encoded: int = 0
    inputs_embeds: torch.Tensor | None = field(default=None, repr=False)
    prefilled: int = 0  # prompt tokens whose key/value states are cached
    cache: DynamicCache | None = field(default=None, repr=False)
    sequence: DecodingSequence | None = None

    @property
    def num_images(self) -> int:
        return self.pixel_values.shape[1]

    @property
    def phase(self) -> str:
        """vision (encoding images), prefill (the prompt's states), decode (a token a step), then done."""
        if self.images_encoded < self.num_images:
            return "vision"
        if self.sequence is None:
            return "prefill"
        return "done" if self.sequence.done else "decode"

    def release(self) -> None:
        """Drops the tensors it holds (finished or cancelled)."""
        self.image_features, self.inputs_embeds, self.cache = [], None, None
        if self.sequence is not None:
            self.sequence.pending_states = None


class PreferenceExtractor:
    """Runs the VPE adapter of a shared IDEFICS2 base with the reference's prompt and decoding.

    An extraction runs in steps (for the engine's scheduler): `prepare` (tokens and pixels, no model), then
    `prefill_step` until its phase is decode (a few images through the vision encoder a step, images whose
    features are cached costing nothing, then the prompt `prefill_tokens` tokens a step), then `decode_step`
    a token a step, decoding any number of extractions in one forward pass (a DecodeGroup), then `result`.
    `extract` runs all of it for one extraction."""

    def __init__(self, idefics2: Idefics2Base, *, adapter: str = "vpe", max_new_tokens: int = 2000,
                 prefill_images: int = 4, prefill_tokens: int = 512, vision_cache: VisionCache | None = None):
        if prefill_images < 1 or prefill_tokens < 1:
            raise ValueError(f"prefill chunks must be positive, got {prefill_images} images, {prefill_tokens} tokens")
        self.idefics2 = idefics2
        self.adapter = idefics2.require_adapter(adapter)
        self.max_new_tokens = max_new_tokens
        self.prefill_images = prefill_images
        self.prefill_tokens = prefill_tokens
        self.vision = VisionEncoder(idefics2, vision_cache)
        eos = idefics2.model.get_base_model().generation_config.eos_token_id
        self.eos_token_ids = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)

    @property
    def control_tokens(self) -> frozenset[str]:
        """The tokenizer's control tokens (<image>, <end_of_utterance>, <s>, ...): in a comment they would
        not be text but structure (encode_as_trained splits on them)."""
        tokenizer = self.idefics2.processor.tokenizer
        return frozenset(tokenizer.all_special_tokens) | frozenset(tokenizer.get_added_vocab())

    def extract(
        self,
        images: Sequence[PIL.Image.Image | ProcessedImage],
        comments: Sequence[str],
        *,
        should_stop: Callable[[], bool] | None = None,
    ) -> Preferences:
        """Runs the VPE on decoded RGB images (or processed ones) and their comments (one comment per image, same
        order).

        Raises ExtractionCancelled as soon as should_stop() returns True (checked before the
        images are processed, before the model runs, and after every generated token).
        """
        cancellation = _Cancellation(should_stop or (lambda: False))
        cancellation.check()
        extraction = self.prepare(images, comments)
        cancellation.check()
        while extraction.phase in ("vision", "prefill"):
            self.prefill_step(extraction)
        group = self.new_group()
        try:
            cancellation.check()  # after the first token
            while extraction.phase == "decode":
                self.decode_step(group, [extraction])
                cancellation.check()
        finally:
            extraction.release()
        return self.result(extraction)

    # -- steps ----------------------------------------------------------------------------------------

    def prepare(self, images: Sequence[PIL.Image.Image | ProcessedImage], comments: Sequence[str]) -> Extraction:
        """The extraction's token ids and pixels (CPU work, no model: any thread may run it). Images decoded
        (processed here) or processed already (engine.preprocessing); a processed image's sha256 keys its
        features in the vision cache (a decoded one's are not cached)."""
        if len(images) != len(comments):
            raise ValueError(f"got {len(images)} images but {len(comments)} comments")
        if not images:
            raise ValueError("at least one commented image is required")
        images = [processed(image) for image in images]
        inputs = build_vpe_inputs(self.idefics2.processor, images, comments)
        return Extraction(inputs["input_ids"], inputs["pixel_values"], inputs["pixel_attention_mask"],
                          tuple(image.sha256 for image in images))

    def new_group(self) -> DecodeGroup:
        return DecodeGroup(REPETITION_PENALTY)

    @torch.inference_mode()
    def prefill_step(self, extraction: Extraction) -> None:
        """Encodes the next prefill_images images whose features are not cached (taking the cached ones as they
        come), or feeds the next prefill_tokens prompt tokens; the last chunk picks the first new token. A step
        that finds every remaining image cached goes on to the first prompt chunk."""
        with self.idefics2.use_adapter(self.adapter) as model:
            if extraction.phase == "vision":
                computed = self._encode_images(model, extraction)
                if computed or extraction.phase == "vision":
                    return
            if extraction.phase != "prefill":
                raise ValueError(f"an extraction in phase {extraction.phase} has no prefill step")
            output = self._prefill_chunk(model, extraction)
        if extraction.prefilled < extraction.input_ids.shape[1]:
            return
        history = extraction.input_ids[0].tolist()
        sequence = DecodingSequence(history, len(history), self.max_new_tokens, self.eos_token_ids)
        sequence.append(greedy_tokens(output.logits[:, -1], [history], REPETITION_PENALTY)[0])
        if not sequence.done:
            sequence.pending_states = [(layer.keys, layer.values) for layer in extraction.cache.layers]
        extraction.sequence = sequence
        extraction.inputs_embeds, extraction.cache = None, None

    def _encode_images(self, model, extraction: Extraction) -> int:
        """The next images' features (the cached ones, and up to prefill_images computed); how many computed."""
        start = extraction.images_encoded
        features, computed = self.vision.features(
            model, self.adapter, extraction.pixel_values[0, start:], extraction.pixel_attention_mask[0, start:],
            extraction.image_keys[start:], self.prefill_images)
        extraction.image_features.extend(features)
        extraction.images_encoded += len(features)
        return computed

    def _prefill_chunk(self, model, extraction: Extraction):
        """Feeds the next prefill_tokens prompt tokens (the image features merged in first); the model's output."""
        device = self.idefics2.device
        inner = model.get_base_model()
        input_ids = extraction.input_ids.to(device)
        if extraction.inputs_embeds is None:
            # What the model's own forward does with pixel values: image features in place of <image> tokens.
            extraction.inputs_embeds = inner.model.inputs_merger(
                input_ids=input_ids,
                inputs_embeds=inner.get_input_embeddings()(input_ids),
                image_hidden_states=torch.cat(extraction.image_features).to(dtype=inner.model.dtype),
            )
            extraction.image_features = []
            extraction.cache = DynamicCache()  # full layers: the mask, not the storage, applies any window
        start = extraction.prefilled
        end = min(start + self.prefill_tokens, input_ids.shape[1])
        output = model(
            inputs_embeds=extraction.inputs_embeds[:, start:end],
            attention_mask=torch.ones(1, end, dtype=torch.long, device=device),
            position_ids=torch.arange(start, end, device=device).unsqueeze(0),
            cache=extraction.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        extraction.prefilled = end
        return output

    @torch.inference_mode()
    def decode_step(self, group: DecodeGroup, extractions: Sequence[Extraction]) -> None:
        """One new token for each extraction (all in phase decode), in one forward pass."""
        group.step([extraction.sequence for extraction in extractions], self._decode_forward)

    def result(self, extraction: Extraction) -> Preferences:
        """The parsed answer of a finished extraction."""
        if extraction.phase != "done":
            raise ValueError(f"the extraction is not done (phase {extraction.phase})")
        decoded = self.idefics2.processor.batch_decode([extraction.sequence.history], skip_special_tokens=True)[0]
        return parse_preferences(decoded)

    def _decode_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                        cache: DynamicCache) -> torch.Tensor:
        with self.idefics2.use_adapter(self.adapter) as model:
            output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           cache=cache, use_cache=True, logits_to_keep=1)
        return output.logits[:, -1]
