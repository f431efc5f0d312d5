"""The image features' cache (models/vision.py): outputs with a hit equal those with a miss (extracted text
identical, scores within 1e-6), and what is cached really is what the models use: another image's features under
the same key move the output by far more than that. The cache keeps within its byte budget, and its key names the
adapter (the ViPer LoRAs touch the connector). The prefill chunks of a metric context change nothing either."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from viper_server.domain import ScoringContext
from viper_server.models.idefics2 import load_idefics2
from viper_server.models.metric import MetricScorer
from viper_server.models.prefix_cache import ByteLRU
from viper_server.models.vision import VisionCache, VisionEncoder, tensor_bytes
from viper_server.models.vpe import PreferenceExtractor
from viper_server.pixels import ProcessedImage, processed

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIXTURES = Path(__file__).parent / "fixtures" / "viper_examples"
NEW_TOKENS = 24
SCORE_TOLERANCE = 1e-6


def sha(name: str) -> str:
    return hashlib.sha256((FIXTURES / name).read_bytes()).hexdigest()


def open_rgb(name: str) -> Image.Image:
    return Image.open(FIXTURES / name).convert("RGB")


def load(name: str) -> ProcessedImage:
    """The image as the server has it: processed, carrying its bytes' sha256 (the vision cache's key)."""
    return ProcessedImage(processed(open_rgb(name)).values, sha256=sha(name))


def unkeyed(images: list[ProcessedImage]) -> list[ProcessedImage]:
    """The same pixels without a sha256: never cached."""
    return [ProcessedImage(image.values) for image in images]


@pytest.fixture(scope="module")
def runtime(tiny_models_dir):
    adapters = {"vpe": str(tiny_models_dir / "vpe-lora"), "metric": str(tiny_models_dir / "metric-lora")}
    return load_idefics2(str(tiny_models_dir / "idefics2"), adapters)


@pytest.fixture(scope="module")
def examples() -> tuple[list[str], list[ProcessedImage], list[str]]:
    comments = json.loads((FIXTURES / "comments.json").read_text())
    del comments["about"]
    names = list(comments)[:4]
    return names, [load(name) for name in names], [comments[name] for name in names]


def poison(cache: VisionCache, victim: tuple, donor: tuple) -> None:
    """Stores the donor's features under the victim's key."""
    cache.put(victim, cache.get(donor))


def test_a_hit_extracts_the_same_text_and_the_cached_features_are_the_ones_used(runtime, examples):
    names, images, comments = examples
    keys = [sha(name) for name in names]
    cache = VisionCache(1 << 30)
    extractor = PreferenceExtractor(runtime, max_new_tokens=NEW_TOKENS, prefill_images=2, vision_cache=cache)
    uncached = PreferenceExtractor(runtime, max_new_tokens=NEW_TOKENS, prefill_images=2)
    miss = extractor.extract(images, comments)
    assert (cache.stats.misses, cache.stats.hits, cache.stats.entries) == (4, 0, 4)
    assert miss == uncached.extract(images, comments)  # computed image by image: as without the cache
    # Another user, the same images under other comments, in another order: every image a hit.
    other = [f"{comment} (seen again)" for comment in comments[::-1]]
    assert extractor.extract(images[::-1], other) == uncached.extract(images[::-1], other)
    assert extractor.extract(images, comments) == miss
    assert (cache.stats.misses, cache.stats.hits) == (4, 8)
    # Pixels without a sha256 are computed, never cached (nor looked up).
    assert extractor.extract(unkeyed(images), comments) == miss
    assert (cache.stats.misses, cache.stats.hits, cache.stats.entries) == (4, 8, 4)
    # The cached features are what the model sees: the second image's under the first's key change the text.
    encoder = VisionEncoder(runtime, cache)
    poison(cache, encoder.key("vpe", keys[0]), encoder.key("vpe", keys[1]))
    assert extractor.extract(images, comments).raw_text != miss.raw_text


def test_a_hit_scores_the_same_and_the_cached_features_are_the_ones_used(runtime):
    liked, disliked = ["liked/0.png", "liked/1.png"], ["disliked/0.png", "disliked/1.png"]
    query_names = ["query1.png", "query2.png"]
    queries, query_keys = [load(name) for name in query_names], [sha(name) for name in query_names]

    def context(user: str) -> ScoringContext:
        return ScoringContext(liked=[load(name) for name in liked], disliked=[load(name) for name in disliked],
                              cache_key=(user, "digest"))

    cache = VisionCache(1 << 30)
    scorer = MetricScorer(runtime, vision_cache=cache)
    expected = MetricScorer(runtime).score(context("ann"), queries)
    assert scorer.score(context("ann"), queries) == pytest.approx(expected, abs=SCORE_TOLERANCE)
    assert cache.stats.misses == 6  # four context images, two queries
    # Another user with the same images (a metric cache miss): the context's images and the queries all hits.
    hits = scorer.score(context("ben"), queries)
    assert hits == pytest.approx(expected, abs=SCORE_TOLERANCE)
    assert (cache.stats.misses, cache.stats.hits) == (6, 6)

    encoder = VisionEncoder(runtime, cache)
    poison(cache, encoder.key("metric", query_keys[0]), encoder.key("metric", query_keys[1]))
    moved = abs(scorer.score(context("ann"), queries)[0] - expected[0])
    poison(cache, encoder.key("metric", sha(liked[0])), encoder.key("metric", sha(disliked[0])))
    poisoned = scorer.score(context("cid"), queries[1:])
    assert moved > 1e-2 and abs(poisoned[0] - expected[1]) > 1e-2


def test_what_is_cached_at_prepare_is_taken_then_and_an_eviction_since_changes_nothing(runtime):
    """A query whose features are cached gets no pixels at prepare (its features come from the cache in the
    step, or are computed from its pixels then if evicted since), and a cached prefix is taken at prepare."""
    liked, disliked = [load("liked/0.png")], [load("disliked/0.png")]
    queries = [load("query1.png"), load("query2.png")]
    context = ScoringContext(liked=liked, disliked=disliked, cache_key=("ann", "digest"))
    cache = VisionCache(1 << 30)
    scorer = MetricScorer(runtime, vision_cache=cache)
    expected = scorer.score(context, queries)
    scoring = scorer.prepare(context, queries)
    assert scoring.query_pixels == [None, None] and scoring.prefix is not None and scoring.context_pixels is None
    scorer.invalidate("ann", 2)  # the prefix and one query's features go after prepare
    encoder = VisionEncoder(runtime, cache)
    cache._discard(encoder.key("metric", sha("query1.png")))
    while scoring.phase != "done":
        scorer.query_step([scoring])
    assert scoring.scores == pytest.approx(expected, abs=SCORE_TOLERANCE)
    assert scoring.query_pixels[0] is not None and scoring.query_pixels[1] is None
    assert abs(expected[0] - expected[1]) > 1e-2  # the queries' features differ: the test can tell them apart


def test_the_key_names_the_adapter_whose_connector_made_the_features(runtime, examples):
    _, images, _ = examples
    cache = VisionCache(1 << 30)
    extractor = PreferenceExtractor(runtime, vision_cache=cache)
    pixels = extractor.prepare(images[:1], ["a comment"])
    encoder = VisionEncoder(runtime, cache)
    features = {}
    for adapter in ("vpe", "metric"):
        with runtime.use_adapter(adapter) as model:
            found, computed = encoder.features(model, adapter, pixels.pixel_values[0], pixels.pixel_attention_mask[0],
                                               ["same-image"], budget=1)
        features[adapter] = found[0]
        assert computed == 1  # the other adapter's entry is not this one's
    assert (features["vpe"] - features["metric"]).abs().max() > 1e-2
    assert {key[2] for key in cache._entries} == {"vpe", "metric"}


def test_the_cache_keeps_within_its_byte_budget_evicting_the_least_recently_used(runtime, examples):
    names, images, comments = examples
    keys = [sha(name) for name in names]
    probe = VisionCache(1 << 30)
    PreferenceExtractor(runtime, max_new_tokens=2, vision_cache=probe).extract(images[:1], comments[:1])
    entry = probe.stats.bytes
    cache = VisionCache(2 * entry + entry // 2)  # room for two images' features
    extractor = PreferenceExtractor(runtime, max_new_tokens=2, prefill_images=1, vision_cache=cache)
    extraction = extractor.prepare(images, comments)
    while extraction.phase == "vision":
        extractor.prefill_step(extraction)
        assert cache.stats.bytes <= cache.capacity_bytes
    assert cache.stats.entries == 2 and cache.stats.bytes == 2 * entry
    encoder = VisionEncoder(runtime, cache)
    assert [encoder.key("vpe", key) in cache for key in keys] == [False, False, True, True]


def test_byte_lru_refuses_an_entry_larger_than_its_budget_and_counts():
    lru = ByteLRU(100, len)
    assert lru.put("a", b"x" * 60) and lru.put("b", b"y" * 30)
    assert lru.get("a") == b"x" * 60  # now the most recently used
    assert lru.put("c", b"z" * 30)  # evicts b, not a
    assert "b" not in lru and "a" in lru and lru.stats.bytes == 90
    assert not lru.put("d", b"w" * 101) and "d" not in lru
    assert lru.get("b") is None and (lru.stats.hits, lru.stats.misses) == (1, 1)
    assert tensor_bytes(torch.zeros(64, 32)) == 64 * 32 * 4


def test_a_cold_context_prefilled_in_chunks_scores_as_in_one(runtime):
    liked = [open_rgb(f"liked/{i}.png") for i in range(4)]
    disliked = [open_rgb(f"disliked/{i}.png") for i in range(4)]
    queries = [open_rgb("query1.png"), open_rgb("query2.png")]
    steps = {}
    scores = {}
    for name, images, tokens in (("whole", 16, 100_000), ("chunked", 1, 37)):
        scorer = MetricScorer(runtime, prefill_images=images, prefill_tokens=tokens)
        scoring = scorer.prepare(ScoringContext(liked=liked, disliked=disliked, cache_key=("ann", "d")), queries)
        steps[name] = 0
        while scoring.phase == "prefix":
            scorer.prefix_step([scoring])
            steps[name] += 1
        while scoring.phase == "query":
            scorer.query_step([scoring])
            steps[name] += 1
        scores[name] = scoring.scores
    # Whole: the 8 images, the prompt, the queries; chunked: 8 image steps, ~20 of 37 tokens, then the queries.
    assert steps["whole"] == 3 and steps["chunked"] > 8 + 10
    assert scores["chunked"] == pytest.approx(scores["whole"], abs=SCORE_TOLERANCE)
    # What the chunks carry matters: another context scores these queries far apart.
    other = MetricScorer(runtime).score(ScoringContext(liked=disliked, disliked=liked), queries)
    assert max(abs(a - b) for a, b in zip(other, scores["whole"])) > 1e-2


def test_scorings_of_one_context_compute_its_prefix_once(runtime):
    def context() -> ScoringContext:
        return ScoringContext(liked=[open_rgb("liked/0.png")], disliked=[open_rgb("disliked/0.png")],
                              cache_key=("ann", "digest"))

    scorer = MetricScorer(runtime, prefill_images=1, prefill_tokens=64)
    alone = scorer.prepare(context(), [open_rgb("query1.png")])
    steps_alone = 0
    while alone.phase == "prefix":
        scorer.prefix_step([alone])
        steps_alone += 1
    scorer = MetricScorer(runtime, prefill_images=1, prefill_tokens=64)
    first, second = (scorer.prepare(context(), [open_rgb("query1.png")]) for _ in range(2))
    steps = 0
    while first.phase == "prefix" or second.phase == "prefix":
        scorer.prefix_step([first, second])  # as the scheduler batches them: one step key per context
        steps += 1
    assert steps == steps_alone > 2 and first.prefix is second.prefix
    assert (scorer.cache_stats.misses, scorer.cache_stats.entries) == (2, 1)
