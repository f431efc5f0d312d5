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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import PIL.Image
import torch
from transformers import DynamicCache, PreTrainedTokenizerBase, ProcessorMixin
from transformers.modeling_outputs import ModelOutput

from ..domain import ContextError, ScoringContext
from ..pixels import ProcessedImage, pixel_batch, processed
from .idefics2 import Idefics2Base
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


class ScoringCancelled(Exception):
    """should_stop returned True before every query was scored."""


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


def context_pairs(liked_count: int, disliked_count: int, max_pairs: int) -> int:
    """How many (disliked, liked) pairs a context gives the prompt: min(liked, disliked, max_pairs).

    The reference always has equal counts; with unequal ones the first images of the longer list are used.
    Raises ContextError when there is no pair.
    """
    if not liked_count or not disliked_count:
        raise ContextError(
            f"{liked_count} liked and {disliked_count} disliked images: scoring needs at least one of each"
        )
    return min(liked_count, disliked_count, max_pairs)


def interleave_pairs(liked: Sequence[PIL.Image.Image], disliked: Sequence[PIL.Image.Image]) -> list[PIL.Image.Image]:
    """Context images in prompt order: d0, l0, d1, l1, ..."""
    return [image for pair in zip(disliked, liked) for image in pair]


def reference_scores(
    idefics2: Idefics2Base,
    liked: Sequence[PIL.Image.Image],
    disliked: Sequence[PIL.Image.Image],
    queries: Sequence[PIL.Image.Image],
    *,
    adapter: str = "metric",
) -> list[float]:
    """The reference procedure: one forward pass over the whole prompt (all context images + query) per query.

    liked and disliked are the pairs to use: equally many."""
    if len(liked) != len(disliked) or not liked:
        raise ContextError(f"the reference procedure takes equal non-zero counts, not {len(liked)}, {len(disliked)}")
    processor = idefics2.processor
    input_ids = torch.tensor([metric_prompt_ids(processor, len(liked))], device=idefics2.device)
    plus, minus = resolve_score_token_ids(processor.tokenizer)
    context = interleave_pairs(liked, disliked)
    scores = []
    for query in queries:
        prompt_images = [*context, query]
        if any(isinstance(image, ProcessedImage) for image in prompt_images):  # processed by the engine already
            pixels = _Pixels.of(prompt_images)
            images = {"pixel_values": pixels.values, "pixel_attention_mask": pixels.mask}
        else:  # the transformers processor itself: the reference stays independent of pixels.py
            images = processor.image_processor(images=[prompt_images], return_tensors="pt")
        output = _forward(idefics2, adapter, input_ids, images, use_cache=False)
        scores.extend(_plus_probability(output.logits[:, -1], plus, minus))
    return scores


class MetricScorer:
    """Scores query images for a user's liked/disliked context, caching each context's prefix per cache_key."""

    def __init__(
        self,
        idefics2: Idefics2Base,
        *,
        adapter: str = "metric",
        max_pairs: int = DEFAULT_MAX_PAIRS,
        batch_size: int = 4,
        cache_bytes: int = 1 << 30,
        use_prefix_cache: bool = True,
        expected_token_ids: tuple[int, int] | None = None,
    ):
        if max_pairs < 1 or batch_size < 1:
            raise ValueError(f"max_pairs and batch_size must be positive, got {max_pairs} and {batch_size}")
        self.idefics2 = idefics2
        self.adapter = idefics2.require_adapter(adapter)
        self.max_pairs = max_pairs
        self.batch_size = batch_size
        self.use_prefix_cache = use_prefix_cache
        self.plus_token_id, self.minus_token_id = resolve_score_token_ids(idefics2.processor.tokenizer)
        if expected_token_ids is not None and (self.plus_token_id, self.minus_token_id) != tuple(expected_token_ids):
            raise ValueError(
                f'the tokenizer gives "+" / "-" the ids {self.plus_token_id} / {self.minus_token_id}, but the '
                f"metric adapter expects {expected_token_ids[0]} / {expected_token_ids[1]}: "
                "the tokenizer does not belong to the adapter's base model"
            )
        self._cache = PrefixCache(cache_bytes)
        processor = idefics2.processor
        self._suffix_ids = encode_as_trained(
            processor.tokenizer, expand_image_tokens(QUERY_SUFFIX, processor), add_bos=False
        )
        # Per pair count: the prompt's ids up to the query's image (the same for every user).
        self._prefix_ids = {
            num_pairs: metric_prompt_ids(processor, num_pairs)[: -len(self._suffix_ids)]
            for num_pairs in range(1, max_pairs + 1)
        }
        # A sliding-window layer keeps only its window's last tokens: a longer prefix would be cut short.
        window = idefics2.model.config.get_text_config().sliding_window
        prompt_length = len(self._prefix_ids[max_pairs]) + len(self._suffix_ids)
        if window is not None and prompt_length >= window:
            raise ValueError(
                f"max_pairs={max_pairs} makes a {prompt_length}-token prompt, "
                f"more than the text model's {window}-token attention window"
            )

    def pairs_for(self, context: ScoringContext) -> int:
        """How many pairs of context the prompt will use (ContextError when none)."""
        return context_pairs(len(context.liked), len(context.disliked), self.max_pairs)

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
        scoring = self.prepare(context, queries)
        while scoring.phase != "done":
            if should_stop():
                raise ScoringCancelled()
            if scoring.phase == "prefix":
                self.prefix_step([scoring])
            batch = self.query_step([scoring])[0]
            if on_batch is not None:
                on_batch(batch)
        return scoring.scores

    def invalidate(self, user_id: str, version: int) -> None:
        """Forgets every cached prefix of user_id, whose profile is now at version (changed or deleted):
        prefixes computed from older snapshots are not stored any more. Safe from any thread."""
        if dropped := self._cache.invalidate(user_id, version):
            log.info("metric cache dropped %s (%d cached contexts)", user_id, dropped)

    @property
    def cache_stats(self) -> CacheStats:
        return self._cache.stats

    def prefix_cached(self, context: ScoringContext) -> bool:
        """Whether the context's prefix is cached now (its images then need no processing)."""
        return self.use_prefix_cache and context.cache_key is not None and context.cache_key in self._cache

    # -- steps ----------------------------------------------------------------------------------------

    def prepare(self, context: ScoringContext, queries: Sequence[PIL.Image.Image | ProcessedImage]) -> Scoring:
        """A scoring's pixels (CPU work, no model: any thread may run it). The context's images are decoded
        and processed only when its prefix is not cached. Raises ContextError when there is no pair."""
        pairs = self.pairs_for(context)
        scoring = Scoring(context=context, pairs=pairs, queries=list(queries), use_prefix=self.use_prefix_cache)
        if not self.use_prefix_cache:
            return scoring
        scoring.query_pixels = [_Pixels.of([query]) for query in queries]
        if not self.prefix_cached(context):
            scoring.context_pixels = self._context_pixels(scoring)
        return scoring

    @torch.inference_mode()
    def prefix_step(self, scorings: Sequence[Scoring]) -> None:
        """Gives each scoring (all in phase prefix, with equal pair counts) its context's key/value states:
        from the cache, or computed, all missing contexts in one forward pass (each context once)."""
        missing: dict[object, list[Scoring]] = {}
        for scoring in scorings:
            key = scoring.context.cache_key
            cached = self._cache.get(key) if key is not None else None
            if cached is not None:
                scoring.prefix = cached
            else:
                missing.setdefault(key if key is not None else id(scoring), []).append(scoring)
        if not missing:
            return
        started = time.perf_counter()
        firsts = [group[0] for group in missing.values()]
        pairs = {scoring.pairs for scoring in firsts}
        if len(pairs) != 1:
            raise ValueError(f"one prefix step takes contexts of one length, not pair counts {sorted(pairs)}")
        for scoring in firsts:
            if scoring.context_pixels is None:  # its cached prefix was evicted since prepare
                scoring.context_pixels = self._context_pixels(scoring)
        input_ids = torch.tensor([self._prefix_ids[pairs.pop()]] * len(firsts), device=self.idefics2.device)
        output = _forward_embedded(self.idefics2, self.adapter, input_ids,
                                   [_Pixels.stack([scoring.context_pixels]) for scoring in firsts])
        layers = [(layer.keys, layer.values) for layer in output.cache.layers]
        elapsed_ms = (time.perf_counter() - started) * 1e3
        for row, group in enumerate(missing.values()):
            # Each context owns its states (a slice of the batch would keep the whole batch alive in the cache).
            prefix = tuple(
                (keys[row : row + 1].clone(), values[row : row + 1].clone()) if len(firsts) > 1 else (keys, values)
                for keys, values in layers
            )
            for scoring in group:
                scoring.prefix = prefix
                scoring.context_pixels = None
            context = group[0].context
            if context.cache_key is None:
                log.info("metric inline context computed in %.0f ms", elapsed_ms)
                continue
            log.info(
                "metric context computed for %s version %s in %.0f ms (%d tokens, %.1f MB, %d in the batch)",
                context.cache_key[0], context.version, elapsed_ms, input_ids.shape[1], kv_bytes(prefix) / 1e6,
                len(firsts),
            )
            self._cache.put(context.cache_key, prefix, version=context.version)

    @torch.inference_mode()
    def query_step(self, scorings: Sequence[Scoring]) -> list[list[tuple[int, float]]]:
        """Scores the next batch_size queries of each scoring (all in phase query, with equal pair counts)
        in one forward pass; returns each scoring's new (query index, score) pairs."""
        if not self.use_prefix_cache:
            return [self._reference_batch(scoring) for scoring in scorings]
        chunks = [scoring.next_chunk(self.batch_size) for scoring in scorings]
        rows = [len(chunk) for chunk in chunks]
        if len(scorings) == 1:  # a view of the one prefix, expanded over the rows
            prefix = [(keys.expand(rows[0], -1, -1, -1), values.expand(rows[0], -1, -1, -1))
                      for keys, values in scorings[0].prefix]
        else:
            prefix = [
                (torch.cat([s.prefix[n][0].expand(r, -1, -1, -1) for s, r in zip(scorings, rows)]),
                 torch.cat([s.prefix[n][1].expand(r, -1, -1, -1) for s, r in zip(scorings, rows)]))
                for n in range(len(scorings[0].prefix))
            ]
        # Each scoring's queries through the vision encoder on their own (as alone); the text of all rows at once.
        images = [_Pixels.stack([scoring.query_pixels[index] for index in chunk])
                  for scoring, chunk in zip(scorings, chunks)]
        scores = self._score_after_prefix(prefix, images, sum(rows))
        results = []
        for scoring, chunk in zip(scorings, chunks):
            mine, scores = scores[: len(chunk)], scores[len(chunk) :]
            scoring.scores.extend(mine)
            results.append(list(zip(chunk, mine)))
        return results

    def _reference_batch(self, scoring: Scoring) -> list[tuple[int, float]]:
        chunk = scoring.next_chunk(self.batch_size)
        pairs = scoring.pairs
        scores = reference_scores(
            self.idefics2, scoring.context.liked[:pairs], scoring.context.disliked[:pairs],
            [scoring.queries[index] for index in chunk], adapter=self.adapter,
        )
        scoring.scores.extend(scores)
        return list(zip(chunk, scores))

    def _context_pixels(self, scoring: Scoring) -> _Pixels:
        pairs = scoring.pairs
        images = interleave_pairs(scoring.context.liked[:pairs], scoring.context.disliked[:pairs])
        return _Pixels.of(images)

    def _score_after_prefix(self, prefix: list[tuple[torch.Tensor, torch.Tensor]],
                            images: list[dict[str, torch.Tensor]], rows: int) -> list[float]:
        # A fresh cache around the prefix tensors: the forward pass appends to the cache it gets
        # (by concatenation, so the stored tensors stay untouched).
        cache = DynamicCache(ddp_cache_data=prefix)
        input_ids = torch.tensor([self._suffix_ids], device=self.idefics2.device).expand(rows, -1)
        # The mask must cover prefix + suffix: one over the suffix alone is accepted but scores drift.
        prefix_length = prefix[0][0].shape[-2]
        attention_mask = torch.ones(
            rows, prefix_length + input_ids.shape[1], dtype=torch.long, device=self.idefics2.device
        )
        output = _forward_embedded(self.idefics2, self.adapter, input_ids, images, cache=cache,
                                   attention_mask=attention_mask)
        return _plus_probability(output.logits[:, -1], self.plus_token_id, self.minus_token_id)


@dataclass(eq=False)
class Scoring:
    """One Score request between steps: its context and queries, their pixels, the context's key/value
    states once known, and the scores so far. Built by MetricScorer.prepare."""

    context: ScoringContext
    pairs: int
    queries: list[PIL.Image.Image | ProcessedImage] = field(repr=False)
    use_prefix: bool = True
    query_pixels: list[_Pixels] = field(default_factory=list, repr=False)
    context_pixels: _Pixels | None = field(default=None, repr=False)
    prefix: KVLayers | None = field(default=None, repr=False)
    scores: list[float] = field(default_factory=list)

    @property
    def phase(self) -> str:
        """prefix (its context's states are needed), query (a batch of queries a step), then done."""
        if len(self.scores) == len(self.queries):
            return "done"
        return "prefix" if self.use_prefix and self.prefix is None else "query"

    def next_chunk(self, size: int) -> range:
        start = len(self.scores)
        return range(start, min(start + size, len(self.queries)))

    def release(self) -> None:
        self.prefix, self.context_pixels, self.query_pixels = None, None, []


@dataclass(frozen=True)
class _Pixels:
    """One prompt's processed images: pixel values [1, images, 3, H, W] and mask [1, images, H, W]."""

    values: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def of(cls, images: Sequence[PIL.Image.Image | ProcessedImage]) -> _Pixels:
        """Decoded images processed here (pixels.py), or processed ones (engine.preprocessing) as they are."""
        values, mask = pixel_batch([processed(image) for image in images])
        return cls(torch.from_numpy(values), torch.from_numpy(mask))

    @staticmethod
    def stack(prompts: Sequence[_Pixels]) -> dict[str, torch.Tensor]:
        """One batch of prompts' images, zero-padded at the bottom and right to the largest, as the image
        processor pads the images of one call."""
        height = max(p.values.shape[-2] for p in prompts)
        width = max(p.values.shape[-1] for p in prompts)

        def pad(tensor: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(tensor, (0, width - tensor.shape[-1], 0, height - tensor.shape[-2]))

        return {
            "pixel_values": torch.cat([pad(p.values) for p in prompts]),
            "pixel_attention_mask": torch.cat([pad(p.mask) for p in prompts]),
        }


def _forward(
    idefics2: Idefics2Base,
    adapter: str,
    input_ids: torch.Tensor,
    images: Mapping[str, torch.Tensor],
    *,
    use_cache: bool,
    cache: DynamicCache | None = None,
    attention_mask: torch.Tensor | None = None,
) -> ModelOutput:
    """One forward pass with `adapter` active (logits of the last position only)."""
    with idefics2.use_adapter(adapter) as model, torch.inference_mode():
        return model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=images["pixel_values"].to(device=idefics2.device, dtype=idefics2.dtype),
            pixel_attention_mask=images["pixel_attention_mask"].to(device=idefics2.device),
            cache=cache,
            use_cache=use_cache,
            logits_to_keep=1,
        )


def _forward_embedded(
    idefics2: Idefics2Base,
    adapter: str,
    input_ids: torch.Tensor,
    image_groups: Sequence[Mapping[str, torch.Tensor]],
    *,
    cache: DynamicCache | None = None,
    attention_mask: torch.Tensor | None = None,
) -> ModelOutput:
    """_forward for rows whose images come in groups (one per request): each group through the vision encoder
    on its own, as it would run alone, then the model on all rows at once with the image features in place of
    the <image> tokens (what the model's own forward does with pixel values)."""
    with idefics2.use_adapter(adapter) as model, torch.inference_mode():
        inner = model.get_base_model()
        features = [
            feature
            for images in image_groups
            for feature in inner.model.get_image_features(
                images["pixel_values"].to(device=idefics2.device, dtype=idefics2.dtype),
                images["pixel_attention_mask"].to(device=idefics2.device),
                return_dict=True,
            ).pooler_output
        ]
        inputs_embeds = inner.model.inputs_merger(
            input_ids=input_ids,
            inputs_embeds=inner.get_input_embeddings()(input_ids),
            image_hidden_states=torch.cat(features).to(dtype=inner.model.dtype),
        )
        return model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache, use_cache=True,
                     logits_to_keep=1)


def _plus_probability(logits: torch.Tensor, plus: int, minus: int) -> list[float]:
    """exp(a) / (exp(a) + exp(b)) per row, a and b the logits of "+" and "-"."""
    pair = logits[:, [plus, minus]].double()
    return torch.softmax(pair, dim=-1)[:, 0].tolist()
