"""The toy models (viper_server.toy) learned their tasks: issue 14's targets on held-out toy-world data
(phrasings, shades and images training never saw), through the unchanged loading code and model classes,
plus the committed weights' manifest and on-disk layout."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from viper_server.domain import FinishedImage, GenerationParams, ScoringContext
from viper_server.engine.presets import BUILT_LAYOUT
from viper_server.models.generation import PersonalizedGenerator
from viper_server.models.idefics2 import load_idefics2
from viper_server.models.metric import MetricScorer, reference_scores, resolve_score_token_ids
from viper_server.models.sdxl import SdxlPipelines, load_sdxl
from viper_server.models.vpe import PreferenceExtractor
from viper_server.testing.reference_guidance import reference_generate
from viper_server.toy import COMMITTED_WEIGHTS, TOY_VPE_MAX_NEW_TOKENS, ensure_toy_models, evaluate, world
from viper_server.toy.checkpoints import MARKER
from viper_server.toy.manifest import MANIFEST, ManifestError, verify

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GENERATION_STEPS = 10  # 8 base steps, then 2 refiner steps
SEEDS = range(20)


@pytest.fixture(scope="module")
def idefics2(toy_models_dir):
    adapters = {"vpe": str(toy_models_dir / "vpe-lora"), "metric": str(toy_models_dir / "metric-lora")}
    return load_idefics2(str(toy_models_dir / "idefics2"), adapters)


@pytest.fixture(scope="module")
def pipelines(toy_models_dir) -> SdxlPipelines:
    return load_sdxl(str(toy_models_dir / "sdxl-base"), str(toy_models_dir / "sdxl-refiner"))


@pytest.fixture(scope="module")
def generator(pipelines) -> PersonalizedGenerator:
    return PersonalizedGenerator(pipelines)


@pytest.fixture(scope="module")
def users() -> list[world.User]:
    return evaluate.held_out_users()


# -- the committed weights --------------------------------------------------------------------------


def relative_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_committed_weights_match_their_manifest_and_fit_the_budget():
    listed = verify(COMMITTED_WEIGHTS)
    assert sum((COMMITTED_WEIGHTS / name).stat().st_size for name in listed) <= 25 * 2**20


def test_layout_is_the_tiny_builders(toy_models_dir, tiny_models_dir):
    assert {p.name for p in toy_models_dir.iterdir() if p.is_dir()} == set(BUILT_LAYOUT.values())
    bookkeeping = {MANIFEST, MARKER, "TINY_MODELS_REVISION"}
    toy_files = {name for name in relative_files(toy_models_dir) if name not in bookkeeping}
    assert toy_files == {name for name in relative_files(tiny_models_dir) if name not in bookkeeping}


def test_installs_once_and_refuses_damaged_weights(tmp_path):
    weights = tmp_path / "weights"
    shutil.copytree(COMMITTED_WEIGHTS, weights)
    installed = ensure_toy_models(tmp_path / "models" / "toy", weights=weights)
    verify(installed, ignore={MARKER})
    config = installed / "idefics2" / "config.json"
    config_time = config.stat().st_mtime_ns
    assert ensure_toy_models(installed, weights=weights) == installed
    assert config.stat().st_mtime_ns == config_time  # already there: not copied again

    with (weights / "sdxl-base" / "unet" / "diffusion_pytorch_model.safetensors").open("ab") as damaged:
        damaged.write(b"\0")
    with pytest.raises(ManifestError, match="diffusion_pytorch_model.safetensors"):
        ensure_toy_models(tmp_path / "models" / "other", weights=weights)
    assert not (tmp_path / "models" / "other").exists()


# -- VPE ----------------------------------------------------------------------------------------------


def test_vpe_names_the_liked_and_the_disliked_colour(idefics2, users):
    extractor = PreferenceExtractor(idefics2, max_new_tokens=TOY_VPE_MAX_NEW_TOKENS)
    right = []
    for index, user in enumerate(users):
        rated = evaluate.rated_in_mixed_order(user, seed=index)
        preferences = extractor.extract([r.image for r in rated], [r.comment for r in rated])
        right.append(evaluate.names_colours(user, preferences.liked, preferences.disliked))
        if index == 0:  # the reference format, plain colour words
            assert preferences.raw_text == (f"Liked Art Features: {user.liked_colour}\n"
                                            f"Disliked Art Features: {user.disliked_colour}")
    assert sum(right) >= 18, f"{sum(right)} of {len(users)} held-out users"


@pytest.fixture(scope="module")
def phrasing_answers(idefics2) -> list[tuple[world.User, object]]:
    """Issue 20's users (frames and sentiment words, negations among them, that no training comment has),
    images in a mixed order, with the VPE's preferences for each."""
    extractor = PreferenceExtractor(idefics2, max_new_tokens=TOY_VPE_MAX_NEW_TOKENS)
    answers = []
    for index, user in enumerate(evaluate.phrasing_users()):
        rated = evaluate.rated_in_mixed_order(user, seed=index)
        answers.append((user, extractor.extract([r.image for r in rated], [r.comment for r in rated])))
    return answers


def test_vpe_never_answers_empty_on_phrasings_no_training_comment_has(phrasing_answers):
    for index, (_, preferences) in enumerate(phrasing_answers):
        assert preferences.liked and preferences.disliked, f"user {index}: {preferences.raw_text!r}"


def test_vpe_reads_phrasings_no_training_comment_has(phrasing_answers):
    """Issue 20's target: both colours right for at least 95% of the users (75% before the masked training)."""
    right = sum(evaluate.names_colours(user, p.liked, p.disliked) for user, p in phrasing_answers)
    assert right >= 0.95 * len(phrasing_answers), f"{right} of {len(phrasing_answers)} users"


def test_held_out_phrasings_share_no_frame_or_sentiment_word_with_training():
    train_frames, train_words = world.phrasings("train")
    frames, words = world.phrasings("eval")
    assert len(frames) >= 10 and len(words) >= 30  # a wide vocabulary, not a handful of templates
    assert not frames & train_frames and not words & train_words
    assert {"can't bear", "am not keen on"} <= words  # negations among them
    used = {word.lower() for user in evaluate.phrasing_users() for r in user.rated
            for word in re.findall(r"[\w']+", r.comment)}
    assert not used & {word for word in train_words if " " not in word}


def test_vpe_needs_its_adapter(idefics2, users):
    """Through the metric adapter the same prompts give no usable answer: the VPE skill is the adapter's."""
    extractor = PreferenceExtractor(idefics2, adapter="metric", max_new_tokens=TOY_VPE_MAX_NEW_TOKENS)
    right = 0
    for index, user in enumerate(users[:5]):
        rated = evaluate.rated_in_mixed_order(user, seed=index)
        preferences = extractor.extract([r.image for r in rated], [r.comment for r in rated])
        right += evaluate.names_colours(user, preferences.liked, preferences.disliked)
    assert right <= 2


# -- metric -------------------------------------------------------------------------------------------


def test_metric_prefers_the_liked_colour_and_follows_the_context(idefics2, users):
    scorer = MetricScorer(idefics2)
    per_user = []
    for index, user in enumerate(users):
        liked_queries, disliked_queries = evaluate.held_out_queries(user, seed=index)
        queries = liked_queries + disliked_queries
        liked, disliked = [r.image for r in user.liked], [r.image for r in user.disliked]
        scores = scorer.score(ScoringContext(liked=liked, disliked=disliked), queries)
        swapped = scorer.score(ScoringContext(liked=disliked, disliked=liked), queries)
        half = len(liked_queries)
        per_user.append((scores[:half], scores[half:], swapped[:half], swapped[half:]))
    figures = evaluate.metric_figures(per_user)
    assert figures.pairs_ranked_right >= 0.95, figures
    assert figures.mean_swap_shift >= 0.3, figures


def test_mixed_images_hold_the_liked_colour_in_graded_shares(users):
    """The graded test's queries span the liked shares generated candidates have (all of it to about half),
    falling as the area taken from the other image grows (blends can keep a pixel's hue nearest the liked one)."""
    correlations = []
    for index, user in enumerate(users[:10]):
        queries = evaluate.held_out_mixes(user, seed=index)
        shares = [evaluate.colour_share(query, user.liked_colour) for query in queries]
        assert shares[0] >= 0.9 and min(shares) <= 0.6, shares
        correlations.append(evaluate.rank_correlation(shares, -np.arange(len(shares))))
    assert np.mean(correlations) >= 0.8, correlations


def test_metric_grades_how_much_of_the_liked_colour_an_image_holds(idefics2, users):
    """Held-out images of the liked colour with 0-50% from a hue neighbour (what generated candidates look like):
    the score follows the liked colour's share (the graded stage; a metric with one target per colour scored
    them alike: a rank correlation of 0.06 over these users)."""
    scorer = MetricScorer(idefics2)
    correlations = []
    for index, user in enumerate(users[:10]):
        queries = evaluate.held_out_mixes(user, seed=index)
        context = ScoringContext(liked=[r.image for r in user.liked], disliked=[r.image for r in user.disliked])
        shares = [evaluate.colour_share(query, user.liked_colour) for query in queries]
        correlations.append(evaluate.rank_correlation(scorer.score(context, queries), shares))
    assert np.mean(correlations) >= 0.35, correlations


def test_the_base_lets_the_metric_score_beyond_its_graded_targets(idefics2):
    """An adapter cannot change the output layer: the distance of the rows of "+" and "-" bounds every score,
    |P("+") - 0.5| at most where the normalised last state lies along their difference. Issue 20's base first
    held every score within 0.32-0.68 so (train_idefics2.spread_answer_rows); the graded targets reach 0.2-0.8."""
    plus, minus = resolve_score_token_ids(idefics2.processor.tokenizer)
    inner = idefics2.model.get_base_model()
    head, norm = inner.lm_head.weight.detach(), inner.model.text_model.norm.weight.detach()
    bound = float(((head[plus] - head[minus]) * norm).norm()) * head.shape[1] ** 0.5
    assert 1 / (1 + np.exp(-bound)) >= 0.85, bound


def test_metric_prefix_cache_equals_the_reference_procedure(idefics2, users):
    user = users[0]
    liked, disliked = [r.image for r in user.liked], [r.image for r in user.disliked]
    liked_queries, disliked_queries = evaluate.held_out_queries(user, per_side=2)
    queries = liked_queries + disliked_queries
    scorer = MetricScorer(idefics2)
    cached = scorer.score(ScoringContext(liked=liked, disliked=disliked, cache_key=("toy", "a")), queries)
    expected = reference_scores(idefics2, liked, disliked, queries)
    np.testing.assert_allclose(cached, expected, atol=1e-6, rtol=0)
    # The context matters by far more than the tolerance, so a wrong prefix could not pass.
    swapped = reference_scores(idefics2, disliked, liked, queries)
    assert min(abs(a - b) for a, b in zip(expected, swapped)) > 1e-2


def test_metric_needs_its_adapter(idefics2, users):
    scorer = MetricScorer(idefics2, adapter="vpe")
    shifts = []
    for user in users[:4]:
        liked, disliked = [r.image for r in user.liked], [r.image for r in user.disliked]
        queries = [image for side in evaluate.held_out_queries(user, per_side=2) for image in side]
        scores = scorer.score(ScoringContext(liked=liked, disliked=disliked), queries)
        swapped = scorer.score(ScoringContext(liked=disliked, disliked=liked), queries)
        shifts += [abs(a - b) for a, b in zip(scores, swapped)]
    assert np.mean(shifts) < 0.1


# -- generation ---------------------------------------------------------------------------------------


def generate(generator: PersonalizedGenerator, profile: tuple[list[str], list[str]], seed: int,
             strength: float = 0.85, prompt: str = evaluate.GENERATION_PROMPT) -> Image.Image:
    params = GenerationParams(prompt=prompt, width=64, height=64, steps=GENERATION_STEPS, seed=seed,
                              preference_strength=strength)
    events: list[object] = []
    generator.generate(params, *profile, emit=events.append)
    (png,) = [event.png for event in events if isinstance(event, FinishedImage)]
    return Image.open(io.BytesIO(png)).convert("RGB")


def test_a_profile_liking_red_draws_redder_than_one_liking_blue(generator):
    wins = [evaluate.red_minus_blue(generate(generator, evaluate.LIKES_RED, seed))
            > evaluate.red_minus_blue(generate(generator, evaluate.LIKES_BLUE, seed)) for seed in SEEDS]
    assert sum(wins) >= 18, f"{sum(wins)} of {len(wins)} seeds"


def test_preference_strength_zero_ignores_the_profile(generator):
    for seed in range(2):
        red = generate(generator, evaluate.LIKES_RED, seed, strength=0.0)
        blue = generate(generator, evaluate.LIKES_BLUE, seed, strength=0.0)
        assert np.array_equal(np.asarray(red), np.asarray(blue))


def test_the_colour_a_prompt_names_is_drawn(generator):
    drawn = {colour: [evaluate.dominant_colour(generate(generator, ([], []), seed,
                                                        prompt=f"{evaluate.GENERATION_PROMPT}, {colour}"))
                      for seed in range(4)] for colour in world.COLOURS}
    assert sum(found.count(colour) for colour, found in drawn.items()) >= 20, drawn


def test_batched_guidance_equals_the_reference_procedure_on_the_toy_models(pipelines, generator):
    """The production path against testing.reference_guidance, where guidance changes the image a lot."""
    params = GenerationParams(prompt=evaluate.GENERATION_PROMPT, width=64, height=64, steps=GENERATION_STEPS, seed=3)
    events: list[object] = []
    generator.generate(params, *evaluate.LIKES_RED, emit=events.append)
    (production,) = [np.asarray(Image.open(io.BytesIO(e.png))).astype(int) for e in events
                     if isinstance(e, FinishedImage)]
    (reference,) = [np.asarray(Image.open(io.BytesIO(png))).astype(int)
                    for png in reference_generate(pipelines, params, *evaluate.LIKES_RED)]
    (reversed_,) = [np.asarray(Image.open(io.BytesIO(png))).astype(int)
                    for png in reference_generate(pipelines, params, *evaluate.LIKES_BLUE)]
    assert np.abs(production - reference).max() <= 1
    assert np.abs(reference - reversed_).mean() > 20
