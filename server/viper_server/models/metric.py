"""ViPer's proxy metric: how much a user likes an image, from IDEFICS2 with the metric LoRA adapter.

A score follows the reference exactly: the user's disliked/liked images as answered examples, then
the query, in one plain-text prompt; score = exp(a) / (exp(a) + exp(b)) with a, b the logits of "+"
and "-" at the last position. Everything before the query's image is the same for all of a user's
queries, so MetricScorer runs it once, keeps its key/value states, and feeds each query as a suffix.
`reference_scores` keeps the whole-prompt procedure for cross-checks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import PIL.Image
import torch
from transformers import BatchFeature, DynamicCache, PreTrainedTokenizerBase, ProcessorMixin
from transformers.modeling_outputs import ModelOutput

from .idefics2 import Idefics2Runtime
from .prefix_cache import CacheStats, KVLayers, PrefixCache, kv_bytes
from .prompt_ids import encode_as_trained, expand_image_tokens

# One turn of the reference prompt; an example turn is followed by its answer and "<end_of_utterance>\n".
QUERY_TURN = "User:<image>Score for this image?<end_of_utterance>\nAssistant: "
LIKED_ANSWER = "+"
DISLIKED_ANSWER = "-"
# The query's own part of the prompt: from its image on. The rest is the user's cacheable prefix.
QUERY_SUFFIX = QUERY_TURN[QUERY_TURN.index("<image>") :]

DEFAULT_MAX_PAIRS = 8  # the reference uses 8 liked + 8 disliked images

log = logging.getLogger(__name__)


class ContextError(ValueError):
    """The liked/disliked context images cannot form the reference prompt."""


class ScoringCancelled(Exception):
    """should_stop returned True before every query was scored."""


@dataclass(frozen=True)
class ScoringContext:
    liked: Sequence[PIL.Image.Image]
    disliked: Sequence[PIL.Image.Image]
    # (user_id, profile_version) keys the cached prefix; None = an inline context, not cached.
    cache_key: tuple[str, int] | None = None


def build_metric_prompt(num_pairs: int) -> str:
    """The reference prompt: num_pairs (disliked, liked) example turns, then the query's turn."""
    pair = "".join(f"{QUERY_TURN}{answer}<end_of_utterance>\n" for answer in (DISLIKED_ANSWER, LIKED_ANSWER))
    return pair * num_pairs + QUERY_TURN


def metric_prompt_ids(processor: ProcessorMixin, num_pairs: int) -> list[int]:
    """Token ids of the reference prompt as the adapter was trained on them (see prompt_ids)."""
    text = expand_image_tokens(build_metric_prompt(num_pairs), processor)
    return encode_as_trained(processor.tokenizer, text, add_bos=True)


def resolve_score_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """(id of "+", id of "-"): the last id of each answer's encoding, as the reference takes them."""
    plus, minus = (tokenizer.encode(answer, add_special_tokens=False)[-1] for answer in (LIKED_ANSWER, DISLIKED_ANSWER))
    return plus, minus


def validate_pairs(liked: Sequence, disliked: Sequence, max_pairs: int | None = None) -> None:
    """Raises ContextError unless liked and disliked are equally many, at least one and at most max_pairs each."""
    if not liked and not disliked:
        raise ContextError("no context images: at least one liked and one disliked image are required")
    if len(liked) != len(disliked):
        fewer = "liked" if len(liked) < len(disliked) else "disliked"
        missing = abs(len(liked) - len(disliked))
        raise ContextError(
            f"{len(liked)} liked and {len(disliked)} disliked images: {missing} more {fewer} "
            f"image{'s' if missing > 1 else ''} needed (the counts must be equal)"
        )
    if max_pairs is not None and len(liked) > max_pairs:
        raise ContextError(f"{len(liked)} liked/disliked pairs: at most {max_pairs} are allowed")


def interleave_pairs(liked: Sequence[PIL.Image.Image], disliked: Sequence[PIL.Image.Image]) -> list[PIL.Image.Image]:
    """Context images in prompt order: d0, l0, d1, l1, ..."""
    return [image for pair in zip(disliked, liked) for image in pair]


def reference_scores(
    runtime: Idefics2Runtime,
    liked: Sequence[PIL.Image.Image],
    disliked: Sequence[PIL.Image.Image],
    queries: Sequence[PIL.Image.Image],
    *,
    adapter: str = "metric",
) -> list[float]:
    """The reference procedure: one forward pass over the whole prompt (all context images + query) per query."""
    validate_pairs(liked, disliked)
    processor = runtime.processor
    input_ids = torch.tensor([metric_prompt_ids(processor, len(liked))], device=runtime.device)
    plus, minus = resolve_score_token_ids(processor.tokenizer)
    context = interleave_pairs(liked, disliked)
    scores = []
    for query in queries:
        images = processor.image_processor(images=[[*context, query]], return_tensors="pt")
        output = _forward(runtime, adapter, input_ids, images, use_cache=False)
        scores.extend(_plus_probability(output.logits[:, -1], plus, minus))
    return scores


class MetricScorer:
    """Scores query images for a user's liked/disliked context, caching each context's prefix per cache_key."""

    def __init__(
        self,
        runtime: Idefics2Runtime,
        *,
        adapter: str = "metric",
        max_pairs: int = DEFAULT_MAX_PAIRS,
        batch_size: int = 4,
        cache_bytes: int = 1 << 30,
        use_prefix_cache: bool = True,
        expected_token_ids: tuple[int, int] | None = None,
    ):
        if adapter not in runtime.adapter_names:
            raise ValueError(f"unknown adapter {adapter!r}; loaded: {runtime.adapter_names}")
        if max_pairs < 1 or batch_size < 1:
            raise ValueError(f"max_pairs and batch_size must be positive, got {max_pairs} and {batch_size}")
        self.runtime = runtime
        self.adapter = adapter
        self.max_pairs = max_pairs
        self.batch_size = batch_size
        self.use_prefix_cache = use_prefix_cache
        self.plus_token_id, self.minus_token_id = resolve_score_token_ids(runtime.processor.tokenizer)
        if expected_token_ids is not None and (self.plus_token_id, self.minus_token_id) != tuple(expected_token_ids):
            raise ValueError(
                f'the tokenizer gives "+" / "-" the ids {self.plus_token_id} / {self.minus_token_id}, but the '
                f"metric adapter expects {expected_token_ids[0]} / {expected_token_ids[1]}: "
                "the tokenizer does not belong to the adapter's base model"
            )
        self._cache = PrefixCache(cache_bytes)
        processor = runtime.processor
        self._suffix_ids = encode_as_trained(
            processor.tokenizer, expand_image_tokens(QUERY_SUFFIX, processor), add_bos=False
        )
        # Per pair count: the prompt's ids up to the query's image (the same for every user).
        self._prefix_ids = {
            num_pairs: metric_prompt_ids(processor, num_pairs)[: -len(self._suffix_ids)]
            for num_pairs in range(1, max_pairs + 1)
        }
        # A sliding-window layer keeps only its window's last tokens: a longer prefix would be cut short.
        window = runtime.model.config.get_text_config().sliding_window
        prompt_length = len(self._prefix_ids[max_pairs]) + len(self._suffix_ids)
        if window is not None and prompt_length >= window:
            raise ValueError(
                f"max_pairs={max_pairs} makes a {prompt_length}-token prompt, "
                f"more than the text model's {window}-token attention window"
            )

    def check_context(self, context: ScoringContext) -> None:
        validate_pairs(context.liked, context.disliked, self.max_pairs)

    def score(
        self,
        context: ScoringContext,
        queries: Sequence[PIL.Image.Image],
        *,
        on_batch: Callable[[list[tuple[int, float]]], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> list[float]:
        """Scores in [0, 1] (higher = liked more), in query order, computed batch_size queries at a time.

        on_batch receives each batch's (query index, score) pairs as soon as it is done; should_stop is
        polled before every batch and raises ScoringCancelled when it returns True.
        """
        self.check_context(context)
        prefix: KVLayers | None = None
        scores: list[float] = []
        for start in range(0, len(queries), self.batch_size):
            if should_stop():
                raise ScoringCancelled()
            batch = queries[start : start + self.batch_size]
            if not self.use_prefix_cache:
                batch_scores = reference_scores(
                    self.runtime, context.liked, context.disliked, batch, adapter=self.adapter
                )
            else:
                if prefix is None:
                    prefix = self._prefix(context)
                batch_scores = self._score_after_prefix(prefix, batch)
            scores.extend(batch_scores)
            if on_batch is not None:
                on_batch(list(enumerate(batch_scores, start)))
        return scores

    def invalidate(self, user_id: str) -> None:
        """Forgets every cached prefix of user_id (e.g. after their profile changed). Safe from any thread."""
        if dropped := self._cache.invalidate(user_id):
            log.info("metric cache dropped %s (%d cached contexts)", user_id, dropped)

    @property
    def cache_stats(self) -> CacheStats:
        return self._cache.stats

    def _prefix(self, context: ScoringContext) -> KVLayers:
        if context.cache_key is not None:
            cached = self._cache.get(context.cache_key)
            if cached is not None:
                return cached
        started = time.perf_counter()
        input_ids = torch.tensor([self._prefix_ids[len(context.liked)]], device=self.runtime.device)
        images = self.runtime.processor.image_processor(
            images=[interleave_pairs(context.liked, context.disliked)], return_tensors="pt"
        )
        output = _forward(self.runtime, self.adapter, input_ids, images, use_cache=True)
        prefix = tuple((layer.keys, layer.values) for layer in output.cache.layers)
        if context.cache_key is None:
            log.info("metric inline context computed in %.0f ms", (time.perf_counter() - started) * 1e3)
            return prefix
        user_id, version = context.cache_key
        log.info(
            "metric context computed for %s version %s in %.0f ms (%d tokens, %.1f MB)",
            user_id, version, (time.perf_counter() - started) * 1e3, input_ids.shape[1], kv_bytes(prefix) / 1e6,
        )
        self._cache.put(context.cache_key, prefix)
        return prefix

    def _score_after_prefix(self, prefix: KVLayers, queries: Sequence[PIL.Image.Image]) -> list[float]:
        rows = len(queries)
        # A fresh cache around the shared prefix tensors: the forward pass appends to the cache it gets
        # (by concatenation, so the stored tensors stay untouched).
        cache = DynamicCache(
            ddp_cache_data=[(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1)) for keys, values in prefix]
        )
        input_ids = torch.tensor([self._suffix_ids], device=self.runtime.device).expand(rows, -1)
        # The mask must cover prefix + suffix: one over the suffix alone is accepted but scores drift.
        prefix_length = prefix[0][0].shape[-2]
        attention_mask = torch.ones(
            rows, prefix_length + input_ids.shape[1], dtype=torch.long, device=self.runtime.device
        )
        images = self.runtime.processor.image_processor(images=[[query] for query in queries], return_tensors="pt")
        output = _forward(
            self.runtime, self.adapter, input_ids, images, use_cache=True, cache=cache, attention_mask=attention_mask
        )
        return _plus_probability(output.logits[:, -1], self.plus_token_id, self.minus_token_id)


def _forward(
    runtime: Idefics2Runtime,
    adapter: str,
    input_ids: torch.Tensor,
    images: BatchFeature,
    *,
    use_cache: bool,
    cache: DynamicCache | None = None,
    attention_mask: torch.Tensor | None = None,
) -> ModelOutput:
    """One forward pass with `adapter` active (logits of the last position only)."""
    with runtime.use_adapter(adapter) as model, torch.inference_mode():
        return model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=images["pixel_values"].to(device=runtime.device, dtype=runtime.dtype),
            pixel_attention_mask=images["pixel_attention_mask"].to(device=runtime.device),
            cache=cache,
            use_cache=use_cache,
            logits_to_keep=1,
        )


def _plus_probability(logits: torch.Tensor, plus: int, minus: int) -> list[float]:
    """exp(a) / (exp(a) + exp(b)) per row, a and b the logits of "+" and "-"."""
    pair = logits[:, [plus, minus]].double()
    return torch.softmax(pair, dim=-1)[:, 0].tolist()
