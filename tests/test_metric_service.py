"""MetricService end to end: a real server on loopback, the toy metric adapter, driven through the SDK."""

from __future__ import annotations

import pytest

from viper_client import FailedPrecondition, InvalidArgument, NotFound, ViperClient
from viper_server.testing import ServerProcess

from fixture_data import FIXTURES, QUERIES, fixture_images
from imagedata import png_bytes


@pytest.fixture(scope="module")
def server(toy_models_dir, tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("db") / "profiles.db", toy_models_dir, models="toy") as process:
        with ViperClient(process.target) as client:
            client.extract_profile("critic", fixture_images())
        yield process


@pytest.fixture
def client(server):
    with ViperClient(server.target) as client:
        yield client


def test_scores_stream_back_in_query_order_within_unit_interval(client):
    results = list(client.score_stream("critic", QUERIES))
    assert [result.index for result in results] == [0, 1]
    assert all(0.0 <= result.score <= 1.0 for result in results)
    assert client.score("critic", QUERIES) == pytest.approx([result.score for result in results], abs=1e-6)


def test_inline_context_scores_like_the_stored_one(client):
    liked = sorted((FIXTURES / "liked").glob("*.png"))
    disliked = sorted((FIXTURES / "disliked").glob("*.png"))
    inline = client.score("", QUERIES, liked=liked, disliked=disliked)
    assert inline == pytest.approx(client.score("critic", QUERIES), abs=1e-5)


def test_the_prefix_cache_is_reused_and_dropped_when_the_profile_changes(server, client):
    client.score("critic", QUERIES[:1])
    version = client.get_profile("critic").version
    # Cache keys are tenant-qualified: the unauthenticated server's callers are in the tenant "default".
    computed = f"metric context computed for default/critic version {version}"
    assert sum(computed in line for line in server.logs) == 1
    client.score("critic", QUERIES[:1])
    assert sum(computed in line for line in server.logs) == 1, "second call is a cache hit"

    client.update_profile("critic", liked_features=["pastels"])
    server.wait_for_log("metric cache dropped default/critic")
    client.score("critic", QUERIES[:1])
    server.wait_for_log(f"metric context computed for default/critic version {version + 1}")


def test_unequal_context_is_failed_precondition(client):
    client.extract_profile("lopsided", fixture_images()[:3])  # 3 liked, 0 disliked
    with pytest.raises(FailedPrecondition, match="disliked"):
        client.score("lopsided", QUERIES)
    with pytest.raises(FailedPrecondition):
        client.score("", QUERIES, liked=[QUERIES[0]], disliked=[])


def test_a_bad_query_fails_naming_its_index_before_any_scoring(server, client):
    with pytest.raises(InvalidArgument, match=r"queries\[1\]"):
        client.score("critic", [QUERIES[0], b"not an image"])


def test_unknown_user_is_not_found(client):
    with pytest.raises(NotFound):
        client.score("stranger", QUERIES)


def test_too_many_queries_are_refused(client):
    with pytest.raises(InvalidArgument, match="queries: 65 given, at most 64"):
        client.score("critic", [png_bytes()] * 65)


def test_no_queries_is_invalid_argument(client):
    with pytest.raises(InvalidArgument, match="queries: at least one image to score is required"):
        client.score("critic", [])


def test_unequal_counts_use_the_first_pairs_and_say_how_many(client):
    images = fixture_images()  # 8 liked, then 8 disliked
    liked, disliked = images[:8], images[8:]
    client.extract_profile("eight-and-three", liked + disliked[:3])
    results = list(client.score_stream("eight-and-three", QUERIES))
    assert [result.pairs_used for result in results] == [3, 3]
    first_pairs = client.score("", QUERIES, liked=[image.image for image in liked[:3]],
                               disliked=[image.image for image in disliked[:3]])
    assert [result.score for result in results] == pytest.approx(first_pairs, abs=1e-5)
    other_pairs = client.score("", QUERIES, liked=[image.image for image in liked[5:]],
                               disliked=[image.image for image in disliked[:3]])
    assert max(abs(a - b) for a, b in zip(first_pairs, other_pairs)) > 1e-3  # which pairs matters


def test_nine_pairs_like_the_reference_readme_are_scored_with_the_first_eight(client):
    images = fixture_images()
    liked, disliked = images[:8] + images[:1], images[8:] + images[8:9]
    client.extract_profile("nine-and-nine", liked + disliked)
    assert {result.pairs_used for result in client.score_stream("nine-and-nine", QUERIES)} == {8}
    assert {result.pairs_used for result in client.score_stream("critic", QUERIES)} == {8}
