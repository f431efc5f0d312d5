"""The proxy metric on the tiny IDEFICS2: reference-exact scores, the prefix cache, batching, adapter isolation."""

import json
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from viper_server.models.idefics2 import load_idefics2
from viper_server.models.metric import (
    ContextError,
    MetricScorer,
    ScoringCancelled,
    ScoringContext,
    build_metric_prompt,
    interleave_pairs,
    metric_prompt_ids,
    reference_scores,
)
from viper_server.models.prompt_ids import expand_image_tokens
from viper_server.models.vpe import PreferenceExtractor

FIXTURES = Path(__file__).parent / "fixtures" / "viper_examples"
# The service promises 1e-5; the tiny model's scores depend on their context by far more (see
# test_the_context_changes_scores_by_far_more_than_the_tolerance), so this bound can catch a wrong prefix.
TOLERANCE = 1e-6


def open_rgb(name: str) -> Image.Image:
    return Image.open(FIXTURES / name).convert("RGB")


def load_runtime(models_dir: Path):
    adapters = {"vpe": str(models_dir / "vpe-lora"), "metric": str(models_dir / "metric-lora")}
    return load_idefics2(str(models_dir / "idefics2"), adapters)


@pytest.fixture(scope="module")
def runtime(tiny_models_dir):
    return load_runtime(tiny_models_dir)


@pytest.fixture(scope="module")
def context():
    liked = [open_rgb(f"liked/{i}.png") for i in range(8)]
    disliked = [open_rgb(f"disliked/{i}.png") for i in range(8)]
    return ScoringContext(liked=liked, disliked=disliked, cache_key=("alice", 1))


@pytest.fixture(scope="module")
def queries():
    query1, query2 = open_rgb("query1.png"), open_rgb("query2.png")
    # Other aspect ratios: the processor resizes them differently and a batch pads them to a common size.
    return [query1, query2, query1.crop((0, 0, 448, 200)), query2.crop((100, 0, 250, 448))]


@pytest.fixture(scope="module")
def expected(runtime, context, queries):
    return reference_scores(runtime, context.liked, context.disliked, queries)


def small_context(cache_key, index=0) -> ScoringContext:
    return ScoringContext(liked=[open_rgb(f"liked/{index}.png")], disliked=[open_rgb(f"disliked/{index}.png")],
                          cache_key=cache_key)


def test_prompt_is_the_reference_text():
    turn = "User:<image>Score for this image?<end_of_utterance>\nAssistant: "
    pair = f"{turn}-<end_of_utterance>\n{turn}+<end_of_utterance>\n"
    assert build_metric_prompt(8) == pair * 8 + turn
    assert build_metric_prompt(8).count("<image>") == 17


def test_prompt_ids_have_no_space_after_an_image(runtime):
    processor = runtime.processor
    ids = metric_prompt_ids(processor, 1)
    text = expand_image_tokens(build_metric_prompt(1), processor)
    assert ids == processor.tokenizer(text).input_ids
    assert ids.count(processor.image_token_id) == 3 * processor.image_seq_len
    # transformers 5's processor would insert a space here; the adapter was trained without it.
    assert "<fake_token_around_image>Score for this image?" in processor.tokenizer.decode(ids)


def test_context_interleaves_pairs_disliked_first():
    assert interleave_pairs(["l0", "l1"], ["d0", "d1"]) == ["d0", "l0", "d1", "l1"]


def test_the_context_changes_scores_by_far_more_than_the_tolerance(runtime, context, queries, expected):
    swapped = reference_scores(runtime, context.disliked, context.liked, queries)
    assert max(abs(a - b) for a, b in zip(expected, swapped)) > 1e-2 > 1000 * TOLERANCE
    other_pairs = reference_scores(runtime, context.liked[4:], context.disliked[4:], queries)
    assert max(abs(a - b) for a, b in zip(expected, other_pairs)) > 1e-2


@pytest.mark.parametrize("batch_size", [1, 3])
def test_cached_scores_equal_the_reference(runtime, context, queries, expected, batch_size):
    scorer = MetricScorer(runtime, batch_size=batch_size)
    first = scorer.score(context, queries)
    again = scorer.score(context, queries)  # from the cached prefix
    assert first == pytest.approx(expected, abs=TOLERANCE)
    assert again == pytest.approx(expected, abs=TOLERANCE)
    assert all(0.0 <= score <= 1.0 for score in first)


def test_reference_mode_scorer_runs_the_reference_procedure(runtime, context, queries, expected):
    scorer = MetricScorer(runtime, use_prefix_cache=False, batch_size=3)
    batches = []
    assert scorer.score(context, queries, on_batch=batches.append) == pytest.approx(expected, abs=1e-12)
    assert [[index for index, _ in batch] for batch in batches] == [[0, 1, 2], [3]]
    assert scorer.cache_stats.entries == 0


def test_inline_context_is_not_cached(runtime, context, queries, expected):
    scorer = MetricScorer(runtime)
    inline = ScoringContext(liked=context.liked, disliked=context.disliked)
    assert scorer.score(inline, queries[:2]) == pytest.approx(expected[:2], abs=TOLERANCE)
    assert scorer.cache_stats.entries == 0


def test_second_call_hits_and_invalidate_forces_a_miss(runtime, queries):
    scorer = MetricScorer(runtime)
    query = queries[:1]
    scorer.score(small_context(("alice", 1)), query)
    scorer.score(small_context(("alice", 1)), query)
    stats = scorer.cache_stats
    assert (stats.hits, stats.misses, stats.entries) == (1, 1, 1) and stats.bytes > 0

    scorer.score(small_context(("alice", 2)), query)  # a new profile version is a new prefix
    scorer.score(small_context(("bob", 1)), query)
    assert (scorer.cache_stats.misses, scorer.cache_stats.entries) == (3, 3)

    invalidator = threading.Thread(target=scorer.invalidate, args=("alice", 0))
    invalidator.start()
    invalidator.join()
    assert scorer.cache_stats.entries == 1
    assert scorer.cache_stats.bytes == stats.bytes  # only bob's prefix is left, the same size as alice's
    scorer.score(small_context(("alice", 2)), query)
    scorer.score(small_context(("bob", 1)), query)
    assert (scorer.cache_stats.hits, scorer.cache_stats.misses) == (2, 4)


def test_lru_evicts_least_recently_used_by_bytes(runtime, queries):
    probe = MetricScorer(runtime)
    probe.score(small_context(("probe", 1)), queries[:1])
    entry_bytes = probe.cache_stats.bytes

    scorer = MetricScorer(runtime, cache_bytes=2 * entry_bytes + entry_bytes // 2)  # room for two prefixes
    for user in ("a", "b"):
        scorer.score(small_context((user, 1)), queries[:1])
    scorer.score(small_context(("a", 1)), queries[:1])  # a is now more recently used than b
    scorer.score(small_context(("c", 1)), queries[:1])  # evicts b
    assert (scorer.cache_stats.entries, scorer.cache_stats.bytes) == (2, 2 * entry_bytes)
    misses = scorer.cache_stats.misses
    scorer.score(small_context(("a", 1)), queries[:1])
    assert scorer.cache_stats.misses == misses
    scorer.score(small_context(("b", 1)), queries[:1])
    assert scorer.cache_stats.misses == misses + 1

    too_small = MetricScorer(runtime, cache_bytes=entry_bytes - 1)
    too_small.score(small_context(("a", 1)), queries[:1])
    assert too_small.cache_stats.entries == 0


@pytest.mark.parametrize("liked, disliked", [(0, 1), (1, 0), (0, 0)])
def test_a_context_without_a_pair_is_refused_before_any_model_work(runtime, queries, liked, disliked):
    image = queries[0]
    scorer = MetricScorer(runtime)
    context = ScoringContext(liked=[image] * liked, disliked=[image] * disliked, cache_key=("alice", "digest"))
    with pytest.raises(ContextError, match=f"{liked} liked and {disliked} disliked images: scoring needs"):
        scorer.pairs_for(context)
    with pytest.raises(ContextError):
        scorer.score(context, queries)
    assert scorer.cache_stats.misses == 0


@pytest.mark.parametrize("liked, disliked, max_pairs, pairs", [(3, 2, 8, 2), (2, 3, 8, 2), (3, 3, 2, 2), (1, 1, 8, 1)])
def test_the_first_min_liked_disliked_max_pairs_pairs_are_used(runtime, context, queries, liked, disliked,
                                                               max_pairs, pairs):
    scorer = MetricScorer(runtime, max_pairs=max_pairs)
    longer = ScoringContext(liked=context.liked[:liked], disliked=context.disliked[:disliked])
    assert scorer.pairs_for(longer) == pairs
    expected = reference_scores(runtime, context.liked[:pairs], context.disliked[:pairs], queries[:1])
    assert scorer.score(longer, queries[:1]) == pytest.approx(expected, abs=TOLERANCE)


def test_on_batch_reports_progress_and_should_stop_cancels(runtime, context, queries, expected):
    scorer = MetricScorer(runtime, batch_size=2)
    batches = []
    scores = scorer.score(context, [*queries, queries[0]], on_batch=batches.append)
    assert [[index for index, _ in batch] for batch in batches] == [[0, 1], [2, 3], [4]]
    assert [score for batch in batches for _, score in batch] == scores

    batches.clear()
    with pytest.raises(ScoringCancelled):
        scorer.score(context, queries, on_batch=batches.append, should_stop=lambda: len(batches) == 1)
    assert len(batches) == 1
    assert scorer.score(context, queries[:1]) == pytest.approx(expected[:1], abs=TOLERANCE)


def test_token_ids_come_from_the_tokenizer_and_are_checked(runtime):
    scorer = MetricScorer(runtime)
    tokenizer = runtime.processor.tokenizer
    assert scorer.plus_token_id == tokenizer("+").input_ids[-1]
    assert scorer.minus_token_id == tokenizer("-").input_ids[-1]
    MetricScorer(runtime, expected_token_ids=(scorer.plus_token_id, scorer.minus_token_id))
    with pytest.raises(ValueError, match="648 / 387"):
        MetricScorer(runtime, expected_token_ids=(648, 387))


def test_unknown_adapter_is_rejected(runtime):
    with pytest.raises(ValueError, match="unknown adapter"):
        MetricScorer(runtime, adapter="nope")


def test_the_metric_adapter_is_the_one_applied(tiny_models_dir, context, queries, expected):
    runtime = load_runtime(tiny_models_dir)  # its own: this test switches the global adapter on purpose
    assert MetricScorer(runtime, adapter="vpe").score(context, queries) != pytest.approx(expected, abs=1e-3)

    # The same scores as peft's ordinary (global) adapter selection, i.e. a dedicated metric model.
    input_ids = torch.tensor([metric_prompt_ids(runtime.processor, len(context.liked))])
    tokenizer = runtime.processor.tokenizer
    plus, minus = tokenizer("+").input_ids[-1], tokenizer("-").input_ids[-1]
    with runtime.use_adapter("metric") as model, torch.inference_mode():
        for query, score in zip(queries, expected):
            images = runtime.processor.image_processor(
                images=[[*interleave_pairs(context.liked, context.disliked), query]], return_tensors="pt"
            )
            logits = model(input_ids=input_ids, **images).logits[0, -1]
            assert torch.softmax(logits[[plus, minus]].double(), dim=0)[0].item() == pytest.approx(score, abs=TOLERANCE)


def test_metric_calls_leave_vpe_results_alone(runtime, context, queries):
    comments = json.loads((FIXTURES / "comments.json").read_text())
    del comments["about"]
    images = [open_rgb(name) for name in comments]
    extractor = PreferenceExtractor(runtime, max_new_tokens=8)
    before = extractor.extract(images, list(comments.values()))

    scorer = MetricScorer(runtime)
    scorer.score(context, queries)
    assert extractor.extract(images, list(comments.values())) == before

    # Concurrent calls on the shared model take turns: neither sees the other's adapter.
    concurrent = {}
    worker = threading.Thread(target=lambda: concurrent.update(vpe=extractor.extract(images, list(comments.values()))))
    worker.start()
    concurrent_scores = scorer.score(context, queries, should_stop=lambda: False)
    worker.join()
    assert concurrent["vpe"] == before
    assert concurrent_scores == pytest.approx(scorer.score(context, queries), abs=TOLERANCE)


def test_both_adapters_share_one_copy_of_the_base_weights(runtime, tiny_models_dir, context, queries):
    def base_parameters():
        return {name: p for name, p in runtime.model.named_parameters(remove_duplicate=False) if "lora_" not in name}

    pointers = {name: p.data_ptr() for name, p in base_parameters().items()}
    MetricScorer(runtime).score(context, queries[:1])
    assert {name: p.data_ptr() for name, p in base_parameters().items()} == pointers  # nothing merged or copied
    plain = AutoModelForImageTextToText.from_pretrained(tiny_models_dir / "idefics2")
    assert sum(p.numel() for p in base_parameters().values()) == sum(p.numel() for p in plain.parameters())
    assert len(set(pointers.values())) == len(pointers)
    assert {"vpe", "metric"} <= set(runtime.model.peft_config)
