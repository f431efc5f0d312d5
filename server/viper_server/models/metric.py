"""ViPer's proxy metric: how much a user likes an image, from IDEFICS2 with the metric LoRA adapter.

A score follows the reference exactly: the user's disliked/liked images as answered examples, then
the query, in one plain-text prompt; score = exp(a) / (exp(a) + exp(b)) with a, b the logits of "+"
and "-" at the last position. Everything before the query's image is the same for all of a user's
queries, so MetricScorer runs it once, keeps its key/value states, and feeds each query as a suffix.
`reference_scores` keeps the whole-prompt procedure for cross-checks.
"""

from __future__ import annotations

import logging
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
from .shared_prefix import SharedPrefix
from .vision import VisionCache, VisionEncoder

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
        prefill_images: int = 4,
        prefill_tokens: int = 512,
        query_step_tokens: int = 4096,
        vision_cache: VisionCache | None = None,
    ):
        if min(max_pairs, batch_size, prefill_images, prefill_tokens, query_step_tokens) < 1:
            raise ValueError(f"max_pairs, batch_size, the prefill chunks and the query step must be positive, got "
                             f"{max_pairs}, {batch_size}, {prefill_images}, {prefill_tokens} and {query_step_tokens}")
        self.idefics2 = idefics2
        self.adapter = idefics2.require_adapter(adapter)
        self.max_pairs = max_pairs
        self.batch_size = batch_size
        self.use_prefix_cache = use_prefix_cache
        self.prefill_images = prefill_images
        self.prefill_tokens = prefill_tokens
        self.query_step_tokens = query_step_tokens
        self.vision = VisionEncoder(idefics2, vision_cache)
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
        queries: Sequence[PIL.Image.Image | ProcessedImage],
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
                continue
            batch = self.query_step([scoring])[0]
            if on_batch is not None and batch:
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
        and processed only when its prefix is not cached (a cached one is taken now, so a later eviction cannot
        make the scheduler's thread do it); a query's pixels only when its features are not cached. A processed
        image's sha256 (query or context) keys its features in the vision cache. Raises ContextError when there
        is no pair."""
        pairs = self.pairs_for(context)
        scoring = Scoring(context=context, pairs=pairs, queries=list(queries), use_prefix=self.use_prefix_cache)
        if not self.use_prefix_cache:
            return scoring
        scoring.query_pixels = [None if self.vision.has(self.adapter, getattr(query, "sha256", None))
                                else _Pixels.of([query]) for query in queries]
        if not self.take_cached_prefix(scoring):
            scoring.context_pixels = self._context_pixels(scoring)
        return scoring

    def take_cached_prefix(self, scoring: Scoring) -> bool:
        """Gives a scoring that has not started computing its prefix the cached one, if there is one; True when
        it has its prefix. Counts a miss once per scoring. Cheap: the scheduler calls it before choosing the
        scoring's next step."""
        key = scoring.context.cache_key
        if scoring.prefix is None and not scoring.progress and key is not None:
            if not scoring.looked_up or key in self._cache:
                scoring.looked_up = True
                scoring.prefix = self._cache.get(key)
                if scoring.prefix is not None:
                    scoring.context_pixels = None
        return scoring.prefix is not None

    def query_cost(self, scoring: Scoring) -> int:
        """Prompt tokens its next query step feeds (rows x the query's tokens): what a step's budget counts."""
        return len(scoring.next_chunk(self.batch_size)) * len(self._suffix_ids)

    @torch.inference_mode()
    def prefix_step(self, scorings: Sequence[Scoring]) -> None:
        """The next chunk of the context states of the scorings (all in phase prefix): the next prefill_images
        context images whose features are not cached, or the next prefill_tokens tokens of the prefix; a chunk
        that finds every remaining image cached goes on to the first tokens. Scorings of one cached context
        compute it once: the furthest along computes, the others take its prefix when it is done."""
        groups: dict[object, list[Scoring]] = {}
        for scoring in scorings:
            if not self.take_cached_prefix(scoring):
                key = scoring.context.cache_key
                groups.setdefault(key if key is not None else id(scoring), []).append(scoring)
        for group in groups.values():
            scoring = max(group, key=lambda member: member.progress)
            with self.idefics2.use_adapter(self.adapter) as model:
                if len(scoring.context_features) < 2 * scoring.pairs:
                    if scoring.context_pixels is None:  # its cached prefix was evicted since prepare
                        scoring.context_pixels = self._context_pixels(scoring)
                    computed = self._encode_context(model, scoring)
                    if computed or len(scoring.context_features) < 2 * scoring.pairs:
                        continue
                self._prefill_chunk(model, scoring)
            if scoring.prefilled == len(self._prefix_ids[scoring.pairs]):
                self._prefix_done(scoring)
                for member in group:
                    member.prefix, member.context_pixels = scoring.prefix, None

    @torch.inference_mode()
    def query_step(self, scorings: Sequence[Scoring]) -> list[list[tuple[int, float]]]:
        """Scores the next batch_size queries of each scoring (all in phase query, with equal pair counts)
        in one forward pass; returns each scoring's new (query index, score) pairs. Their queries' features come
        from the cache, or are computed, at most prefill_images in the step; a scoring whose queries are not all
        encoded yet gets no score in this step (an empty list)."""
        if not self.use_prefix_cache:
            return [self._reference_batch(scoring) for scoring in scorings]
        chunks = [scoring.next_chunk(self.batch_size) for scoring in scorings]
        with self.idefics2.use_adapter(self.adapter) as model:
            budget = self.prefill_images
            for scoring, chunk in zip(scorings, chunks):
                budget -= self._encode_queries(model, scoring, chunk, budget)
            ready = [row for row, (scoring, chunk) in enumerate(zip(scorings, chunks))
                     if all(index in scoring.query_features for index in chunk)]
            scores = self._score_after_prefix(model, [scorings[row] for row in ready], [chunks[row] for row in ready])
        results: list[list[tuple[int, float]]] = [[] for _ in scorings]
        for row in ready:
            scoring, chunk = scorings[row], chunks[row]
            mine, scores = scores[: len(chunk)], scores[len(chunk) :]
            scoring.scores.extend(mine)
            for index in chunk:
                del scoring.query_features[index]
            results[row] = list(zip(chunk, mine))
        return results

    def _encode_context(self, model, scoring: Scoring) -> int:
        """The next context images' features (cached ones, up to prefill_images computed); how many computed."""
        start = len(scoring.context_features)
        pixels = scoring.context_pixels
        features, computed = self.vision.features(model, self.adapter, pixels.values[0, start:],
                                                  pixels.mask[0, start:], pixels.keys[start:],
                                                  self.prefill_images)
        scoring.context_features.extend(features)
        return computed

    def _encode_queries(self, model, scoring: Scoring, chunk: range, budget: int) -> int:
        """The chunk's query features not yet known: cached ones, up to `budget` computed; how many computed."""
        computed = 0
        for index in chunk:
            if index in scoring.query_features:
                continue
            pixels = scoring.query_pixels[index]
            if pixels is None:  # its features were cached at prepare
                query = scoring.queries[index]
                if (cached := self.vision.cached(self.adapter, query.sha256)) is not None:
                    scoring.query_features[index] = cached
                    continue
                pixels = scoring.query_pixels[index] = _Pixels.of([query])  # evicted since
            features, count = self.vision.features(model, self.adapter, pixels.values[0], pixels.mask[0],
                                                   pixels.keys, budget - computed)
            computed += count
            if not features:
                break
            scoring.query_features[index] = features[0]
        return computed

    def _prefill_chunk(self, model, scoring: Scoring) -> None:
        """Feeds the next prefill_tokens tokens of the context's prefix (the image features merged in first)."""
        device = self.idefics2.device
        if scoring.prefix_embeds is None:
            input_ids = torch.tensor([self._prefix_ids[scoring.pairs]], device=device)
            scoring.prefix_embeds = _merge_features(model, input_ids, scoring.context_features)
            scoring.context_features, scoring.context_pixels = [], None
            scoring.prefix_states = DynamicCache()
        start = scoring.prefilled
        end = min(start + self.prefill_tokens, scoring.prefix_embeds.shape[1])
        model(inputs_embeds=scoring.prefix_embeds[:, start:end],
              attention_mask=torch.ones(1, end, dtype=torch.long, device=device),
              position_ids=torch.arange(start, end, device=device).unsqueeze(0),
              cache=scoring.prefix_states, use_cache=True, logits_to_keep=1)
        scoring.prefilled = end

    def _prefix_done(self, scoring: Scoring) -> None:
        """Keeps the computed prefix (and caches it under the context's key, unless inline)."""
        prefix = tuple((layer.keys, layer.values) for layer in scoring.prefix_states.layers)
        scoring.prefix, scoring.prefix_states, scoring.prefix_embeds = prefix, None, None
        context = scoring.context
        if context.cache_key is None:
            log.info("metric inline context computed")
            return
        log.info("metric context computed for %s version %s (%d tokens, %.1f MB)", context.cache_key[0],
                 context.version, scoring.prefilled, kv_bytes(prefix) / 1e6)
        self._cache.put(context.cache_key, prefix, version=context.version)

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

    def _score_after_prefix(self, model, scorings: Sequence[Scoring], chunks: Sequence[range]) -> list[float]:
        """The scores of the chunks' queries, each after its scoring's prefix, all rows in one forward pass.
        The cached prefixes are read where they are (shared_prefix.py): no row gets a copy of its prefix."""
        rows = [len(chunk) for chunk in chunks]
        if not rows:
            return []
        shared = SharedPrefix([scoring.prefix for scoring in scorings], rows,
                              last_token_layer=model.config.text_config.num_hidden_layers - 1)
        input_ids = torch.tensor([self._suffix_ids], device=self.idefics2.device).expand(sum(rows), -1)
        # The suffix's positions follow the prefix's, as a cache of the prefix would number them.
        positions = torch.arange(shared.length, shared.length + input_ids.shape[1], device=self.idefics2.device)
        features = [scoring.query_features[index] for scoring, chunk in zip(scorings, chunks) for index in chunk]
        output = model(inputs_embeds=_merge_features(model, input_ids, features),
                       position_ids=positions.expand(sum(rows), -1), use_cache=False, logits_to_keep=1,
                       shared_prefix=shared)
        return _plus_probability(output.logits[:, -1], self.plus_token_id, self.minus_token_id)


@dataclass(eq=False)
class Scoring:
    """One Score request between steps: its context and queries, their pixels, the context's key/value
    states once known, and the scores so far. Built by MetricScorer.prepare."""

    context: ScoringContext
    pairs: int
    queries: list[PIL.Image.Image | ProcessedImage] = field(repr=False)
    use_prefix: bool = True
    query_pixels: list[_Pixels | None] = field(default_factory=list, repr=False)  # None: features cached
    context_pixels: _Pixels | None = field(default=None, repr=False)
    # The prefix being computed: the context images' features, then its embeddings and the states so far.
    looked_up: bool = False  # whether the prefix cache was asked
    context_features: list[torch.Tensor] = field(default_factory=list, repr=False)
    prefix_embeds: torch.Tensor | None = field(default=None, repr=False)
    prefix_states: DynamicCache | None = field(default=None, repr=False)
    prefilled: int = 0
    prefix: KVLayers | None = field(default=None, repr=False)
    query_features: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    scores: list[float] = field(default_factory=list)

    @property
    def progress(self) -> int:
        """How far the computation of its prefix has gone (0: not started)."""
        return len(self.context_features) + self.prefilled + (self.prefix_embeds is not None)

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
        self.context_features, self.prefix_embeds, self.prefix_states, self.query_features = [], None, None, {}


@dataclass(frozen=True)
class _Pixels:
    """One prompt's processed images: pixel values [1, images, 3, H, W] and mask [1, images, H, W], and each
    image's sha256 (None: a decoded image's), the key of its features in the vision cache."""

    values: torch.Tensor
    mask: torch.Tensor
    keys: tuple[str | None, ...]

    @classmethod
    def of(cls, images: Sequence[PIL.Image.Image | ProcessedImage]) -> _Pixels:
        """Decoded images processed here (pixels.py), or processed ones (engine.preprocessing) as they are."""
        images = [processed(image) for image in images]
        values, mask = pixel_batch(images)
        return cls(torch.from_numpy(values), torch.from_numpy(mask), tuple(image.sha256 for image in images))

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


def _merge_features(model, input_ids: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
    """The prompt's embeddings with the image features in place of the <image> tokens (what the model's own
    forward does with pixel values)."""
    inner = model.get_base_model()
    return inner.model.inputs_merger(
        input_ids=input_ids,
        inputs_embeds=inner.get_input_embeddings()(input_ids),
        image_hidden_states=torch.cat(list(features)).to(dtype=inner.model.dtype),
    )


def _plus_probability(logits: torch.Tensor, plus: int, minus: int) -> list[float]:
    """exp(a) / (exp(a) + exp(b)) per row, a and b the logits of "+" and "-"."""
    pair = logits[:, [plus, minus]].double()
    return torch.softmax(pair, dim=-1)[:, 0].tolist()
