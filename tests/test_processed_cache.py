"""The processed-input cache (engine.preprocessing) with the toy models, in process, CPU float32: an extraction
and a scoring from cached inputs give exactly what they give from new ones (the text identical, scores within
1e-6), the hits come from the cache (the same arrays), and what the cache holds moves the output by far more
than the tolerance (the same keys holding another user's images change the answer)."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from viper_profiles import ImageRef, Rating
from viper_server.domain import ScoringContext
from viper_server.engine.engine import ModelEngine
from viper_server.engine.errors import ContextChanged
from viper_server.engine.loading import LoadSettings
from viper_server.engine.preprocessing import Preprocessor, cache_key
from viper_server.engine.presets import model_preset
from viper_server.toy import evaluate

from imagedata import png

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_PIXELS = 10**8
TOLERANCE = 1e-6


class Quiet:
    def __getattr__(self, name):
        return lambda *args: None


@pytest.fixture(scope="module")
def engine(toy_models_dir):
    engine = ModelEngine(model_preset("toy", toy_models_dir, toy_models_dir.parent), LoadSettings(), max_queue=16,
                         max_image_pixels=MAX_PIXELS, observer=Quiet(),
                         preprocessor=Preprocessor(1, max_pixels=MAX_PIXELS))
    engine.load()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def users():
    """Two users who like and dislike other colours."""
    first, *others = evaluate.held_out_users()
    second = next(user for user in others if {user.liked_colour, user.disliked_colour}.isdisjoint(
        {first.liked_colour, first.disliked_colour}))
    return first, second


def poisoned(engine: ModelEngine, uploads: list[bytes], others: list[bytes]) -> list:
    """uploads as a pool answers them whose cache holds, under their keys, the pixels of `others`."""
    pool = Preprocessor(0, max_pixels=MAX_PIXELS)
    for upload, other in zip(engine.process_uploads(uploads), engine.process_uploads(others)):
        pool.cache.put(cache_key(upload.sha256), other)
    return pool.process_uploads(uploads)


def test_an_extraction_from_cached_inputs_is_the_one_from_new_inputs(engine, users):
    user, other = users
    uploads, comments = [png(rated.image) for rated in user.rated], [rated.comment for rated in user.rated]
    hits = engine.preprocessor.cache.stats.hits
    missed = engine.process_uploads(uploads)
    first = asyncio.run(engine.extract(missed, comments))
    cached = engine.process_uploads(uploads)
    assert all(hit is miss for hit, miss in zip(cached, missed))  # from the cache, not processed again
    assert engine.preprocessor.cache.stats.hits == hits + len(uploads)
    assert asyncio.run(engine.extract(cached, comments)).raw_text == first.raw_text
    # What the cache holds is what the model sees: the other user's pixels under these keys change the answer.
    changed = asyncio.run(engine.extract(poisoned(engine, uploads, [png(r.image) for r in other.rated]), comments))
    assert changed.raw_text != first.raw_text
    assert evaluate.names_colours(user, first.liked, first.disliked)


def test_a_scoring_from_cached_inputs_is_the_one_from_new_inputs(engine, users):
    user, other = users
    liked, disliked = evaluate.held_out_queries(user, per_side=2)
    queries = [png(image) for image in [*liked, *disliked]]
    context = ScoringContext(liked=engine.process_uploads([png(r.image) for r in user.liked]),
                             disliked=engine.process_uploads([png(r.image) for r in user.disliked]))

    def scores(images) -> list[float]:
        async def run():
            return [result.score async for batch in engine.score(context, images) for result in batch]
        return asyncio.run(run())

    missed = scores(engine.process_uploads(queries))
    cached = engine.process_uploads(queries)
    assert all(image.sha256 is not None for image in cached)
    assert max(abs(a - b) for a, b in zip(scores(cached), missed)) <= TOLERANCE
    other_liked, other_disliked = evaluate.held_out_queries(other, per_side=2)
    moved = scores(poisoned(engine, queries, [png(image) for image in [*other_liked, *other_disliked]]))
    assert max(abs(a - b) for a, b in zip(moved, missed)) > 1000 * TOLERANCE


def test_a_stored_context_reads_its_images_bytes_only_on_a_prefix_cache_miss(engine, users):
    """Score on a stored profile: the images' bytes are read (by sha256) only when the context's prefix is not
    cached; gone by the time they are read (the profile changed), the call is ContextChanged (ABORTED)."""
    user, _ = users
    uploads = [png(rated.image) for rated in user.rated]
    shas = [hashlib.sha256(data).hexdigest() for data in uploads]
    refs = [ImageRef(sha, rated.comment, Rating.LIKED if rated.liked else Rating.DISLIKED, position)
            for position, (sha, rated) in enumerate(zip(shas, user.rated))]
    stored, reads = dict(zip(shas, uploads)), []

    def image_data(wanted):
        reads.append(sorted(wanted))
        return {sha: stored[sha] for sha in wanted if sha in stored}

    def scores(context: ScoringContext) -> list[float]:
        async def run():
            return [result.score async for batch in engine.score(context, queries) for result in batch]
        return asyncio.run(run())

    liked, disliked = evaluate.held_out_queries(user, per_side=1)
    queries = engine.process_uploads([png(liked[0]), png(disliked[0])])
    inline = ScoringContext(*(engine.process_uploads([data for data, ref in zip(uploads, refs) if ref.rating is rating])
                              for rating in (Rating.LIKED, Rating.DISLIKED)))
    missed = scores(engine.stored_context("stored-user", 1, refs, image_data))
    assert len(reads) == 1 and set(reads[0]) <= set(shas)  # the pairs the prompt uses, read once
    assert max(abs(a - b) for a, b in zip(missed, scores(inline))) <= TOLERANCE
    assert missed[0] - missed[1] > 0.5  # the context is used: the liked colour's query scores far higher
    hit = scores(engine.stored_context("stored-user", 1, refs, image_data))
    assert len(reads) == 1 and hit == missed  # the cached prefix: no bytes read
    engine.forget_user("stored-user", 2)
    stored.clear()
    with pytest.raises(ContextChanged):
        scores(engine.stored_context("stored-user", 2, refs, image_data))
