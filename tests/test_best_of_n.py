"""Best of N through gRPC: a real `viper-server serve --models toy` on loopback, driven through the SDK.

The server runs with its default settings (--generate-batch 4: continuous batching on). A ranked generation
makes its candidates exactly as a plain Generate of that many images makes its images, byte for byte, so the
pick is checked against Score's argmax among the images of a plain Generate with the same seed; the
candidates differ from each other by far more than a pixel step, so a pick of the wrong one, or candidates
made otherwise (batched together, they move by 1/255), fail. tests/test_best_of_n_engine.py checks, in
process, how the candidates and their scorings share the models' steps with other requests.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import re
import struct
import time
from urllib.parse import urlsplit

import numpy as np
import pytest

from viper_client import AsyncViperClient, FailedPrecondition, InvalidArgument, NotFound, RatedImage, ViperClient, cli
from viper_client.types import GeneratedImage, Progress
from viper_server.testing import ServerProcess
from viper_server.toy import evaluate
from viper_web.testing import GatewayProcess

PROMPT = evaluate.GENERATION_PROMPT
# Unpersonalized images vary in colour from seed to seed, so the metric's scores of the candidates differ by
# far more than the 1e-4 the scores are compared within.
SMALL = dict(width=64, height=64, steps=10, preference_strength=0.0)
SEED = 1
TOLERANCE = 1e-4
MAX_CANDIDATES = 6


def rated_uploads(rated) -> list[RatedImage]:
    return [RatedImage(r.image, comment=r.comment, rating="liked" if r.liked else "disliked") for r in rated]


@pytest.fixture(scope="module")
def server(toy_models_dir, tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("db") / "profiles.db", toy_models_dir,
                       "--max-candidates", str(MAX_CANDIDATES), models="toy") as process:
        with ViperClient(process.target) as client:
            user = evaluate.held_out_users(2)[1]
            client.extract_profile("fan", rated_uploads(evaluate.rated_in_mixed_order(user, seed=1)))
            # Liked images only: a profile without a metric context.
            client.extract_profile("no-context", rated_uploads([r for r in user.rated if r.liked][:4]))
        yield process


@pytest.fixture
def client(server):
    with ViperClient(server.target) as client:
        yield client


def images_of(events) -> list[GeneratedImage]:
    return [event for event in events if isinstance(event, GeneratedImage)]


@pytest.fixture(scope="module")
def plain(server):
    """A plain Generate of MAX_CANDIDATES images with SEED, and Score's scores of their PNGs."""
    with ViperClient(server.target) as client:
        images = images_of(client.generate("fan", PROMPT, num_images=MAX_CANDIDATES, seed=SEED, **SMALL))
        scores = client.score("fan", [image.png for image in images])
    assert [image.score for image in images] == [None] * MAX_CANDIDATES, "a plain Generate scores nothing"
    ranked = sorted(scores, reverse=True)
    # The ranking is decided by far more than the tolerance: a wrong pick cannot pass as a rounding error.
    assert min(a - b for a, b in zip(ranked, ranked[1:4])) > 100 * TOLERANCE, scores
    # And the images differ by far more than a pixel step: an equal PNG is that image, not a near one.
    pixels = [np.asarray(image.image(), dtype=np.int16) for image in images]
    assert min(np.abs(a - b).max() for i, a in enumerate(pixels) for b in pixels[i + 1 :]) > 50
    return images, scores


def test_the_pick_is_scores_argmax_among_the_same_seeds(client, plain):
    images, scores = plain
    events = list(client.generate("fan", PROMPT, num_images=1, candidates=4, seed=SEED, **SMALL))
    [pick] = images_of(events)
    best = int(np.argmax(scores[:4]))
    assert pick.png == images[best].png
    assert pick.score == pytest.approx(scores[best], abs=TOLERANCE)
    assert (pick.image_index, pick.seed) == (0, SEED + best)
    assert pick.profile_version == images[best].profile_version
    # Progress covered every candidate, and the pick came after the last one (it is certain only then).
    progress = [event for event in events if isinstance(event, Progress)]
    assert {event.image_index for event in progress} == {0, 1, 2, 3}
    for index in range(4):
        steps = [event.step for event in progress if event.image_index == index]
        assert steps == list(range(progress[0].total_steps + 1))
    assert events[-1] is pick


def test_the_best_come_in_descending_order_with_their_own_seeds(client, plain):
    images, scores = plain
    ranked = images_of(client.generate("fan", PROMPT, num_images=3, candidates=MAX_CANDIDATES, seed=SEED, **SMALL))
    expected = sorted(range(MAX_CANDIDATES), key=lambda index: -scores[index])[:3]
    assert [image.image_index for image in ranked] == [0, 1, 2]
    assert [image.seed for image in ranked] == [SEED + index for index in expected]
    assert [image.png for image in ranked] == [images[index].png for index in expected]
    assert [image.score for image in ranked] == sorted((image.score for image in ranked), reverse=True)
    for image, index in zip(ranked, expected):
        assert image.score == pytest.approx(scores[index], abs=TOLERANCE)


def test_score_images_scores_a_plain_generation_in_its_own_order(client, plain):
    images, scores = plain
    scored = images_of(client.generate("fan", PROMPT, num_images=3, score_images=True, seed=SEED, **SMALL))
    assert [image.png for image in scored] == [image.png for image in images[:3]]
    assert [image.seed for image in scored] == [SEED, SEED + 1, SEED + 2]
    assert [image.score for image in scored] == pytest.approx(scores[:3], abs=TOLERANCE)


def test_the_sdk_returns_the_best_images_best_first(client, plain):
    images, scores = plain
    best = int(np.argmax(scores[:3]))
    [picture] = client.generate_images("fan", PROMPT, num_images=1, candidates=3, seed=SEED, **SMALL)
    assert np.array_equal(np.asarray(picture), np.asarray(images[best].image()))


def test_the_async_sdk_returns_the_best_images_best_first(server, plain):
    images, scores = plain
    best = int(np.argmax(scores[:3]))

    async def generate():
        async with AsyncViperClient(server.target) as client:
            return await client.generate_images("fan", PROMPT, num_images=1, candidates=3, seed=SEED, **SMALL)

    [picture] = asyncio.run(generate())
    assert np.array_equal(np.asarray(picture), np.asarray(images[best].image()))


def test_the_cli_keeps_the_best_and_prints_each_score(server, plain, tmp_path, capsys):
    images, scores = plain
    out = tmp_path / "out"
    code = cli.main(["--target", server.target, "generate", "--user", "fan", "--prompt", PROMPT, "--out", str(out),
                     "--num-images", "2", "--best-of", "4", "--seed", str(SEED), "--width", "64", "--height", "64",
                     "--steps", "10", "--preference-strength", "0"])
    assert code == 0
    best = sorted(range(4), key=lambda index: -scores[index])[:2]
    lines = capsys.readouterr().out.splitlines()
    assert [re.sub(r"score \d\.\d{4}", "score S", line) for line in lines] == [
        f"{out / str(rank)}.png  (seed {SEED + index}, score S)" for rank, index in enumerate(best)
    ]
    for line, index in zip(lines, best):
        assert float(re.search(r"score (\S+)\)", line).group(1)) == pytest.approx(scores[index], abs=TOLERANCE)
    assert sorted(path.name for path in out.iterdir()) == ["0.png", "1.png"]
    assert (out / "0.png").read_bytes() == images[best[0]].png


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(num_images=3, candidates=2), r"candidates: 2 is fewer than num_images \(3\)"),
        (dict(candidates=MAX_CANDIDATES + 1), rf"candidates: {MAX_CANDIDATES + 1}, at most {MAX_CANDIDATES} allowed"),
        (dict(candidates=-1), "candidates: must not be negative"),
    ],
)
def test_bad_candidates_are_invalid_argument(client, options, message):
    with pytest.raises(InvalidArgument, match=message):
        list(client.generate("fan", PROMPT, **SMALL, **options))


def test_as_many_candidates_as_images_is_a_plain_generation(client, plain):
    images, _ = plain
    same = images_of(client.generate("fan", PROMPT, num_images=2, candidates=2, seed=SEED, **SMALL))
    assert [image.png for image in same] == [image.png for image in images[:2]]
    assert [image.score for image in same] == [None, None]


@pytest.mark.parametrize("options", [dict(candidates=2), dict(score_images=True)])
def test_without_a_metric_context_it_is_failed_precondition_before_any_work(client, options):
    events = []
    with pytest.raises(FailedPrecondition, match="4 liked and 0 disliked images"):
        events.extend(client.generate("no-context", PROMPT, **SMALL, **options))
    assert events == [], "refused before any image was started"
    with pytest.raises(NotFound):
        list(client.generate("nobody", PROMPT, **SMALL, **options))


def test_cancelling_mid_candidates_stops_them_and_frees_the_worker(server, client):
    logs = len(server.logs)
    stream = client.generate("fan", "a long one", num_images=1, candidates=MAX_CANDIDATES, seed=7,
                             width=64, height=64, steps=150)
    seen = 0
    for event in stream:
        if isinstance(event, Progress) and event.step >= 5:
            seen = event.step
            break
    stream.close()  # cancels the RPC
    line = server.wait_for_log(r"generation cancelled after \d+ denoising steps", timeout=30)
    steps_done = int(re.search(r"after (\d+) denoising", line).group(1))
    assert seen <= steps_done < seen + 20, "the running candidate stopped within a step or so of the cancel"

    started = time.monotonic()
    next_events = client.generate("fan", "next", width=64, height=64, steps=2, seed=1)
    assert isinstance(next(next_events), Progress)
    assert time.monotonic() - started < 10, "the next request starts at once: no candidate is left queued"
    assert images_of(next_events)
    cancelled = [entry for entry in server.logs[logs:] if "generation cancelled" in entry]
    assert len(cancelled) == 1, "the candidates are one request (made one after the other): it was cancelled"


def connect_json_stream(base: str, path: str, request: dict) -> tuple[list[dict], dict]:
    """A Connect server-streaming call in JSON: its messages and its end-of-stream message."""
    connection = http.client.HTTPConnection(urlsplit(base).netloc, timeout=120)
    try:
        body = json.dumps(request).encode()
        connection.request("POST", path, body=struct.pack(">BI", 0, len(body)) + body,
                           headers={"Content-Type": "application/connect+json"})
        response = connection.getresponse()
        assert response.status == 200
        data = response.read()
    finally:
        connection.close()
    messages = []
    while data:
        flags, length = struct.unpack_from(">BI", data)
        messages.append((flags, json.loads(data[5 : 5 + length])))
        data = data[5 + length :]
    assert [flags for flags, _ in messages] == [0] * (len(messages) - 1) + [2]
    return [message for _, message in messages[:-1]], messages[-1][1]


def test_the_gateway_forwards_candidates_and_scores(server, plain):
    images, scores = plain
    request = {"userId": "fan", "prompt": PROMPT, "numImages": 2, "candidates": 4, "seed": str(SEED), "width": 64,
               "height": 64, "steps": 10, "preferenceStrength": 0}
    with GatewayProcess(server.target) as gateway:
        messages, end = connect_json_stream(gateway.url, "/viper.v1.GenerationService/Generate", request)
        page = urlsplit(gateway.url)
        connection = http.client.HTTPConnection(page.netloc, timeout=30)
        connection.request("GET", "/")
        html = connection.getresponse().read().decode()
        connection.close()
    assert end == {}
    assert {message["progress"]["imageIndex"] for message in messages if "progress" in message} == {0, 1, 2, 3}
    ranked = [message["image"] for message in messages if "image" in message]
    best = sorted(range(4), key=lambda index: -scores[index])[:2]
    assert [image["seed"] for image in ranked] == [str(SEED + index) for index in best]
    assert [base64.b64decode(image["png"]) for image in ranked] == [images[index].png for index in best]
    assert [image["score"] for image in ranked] == pytest.approx([scores[index] for index in best], abs=TOLERANCE)
    assert 'id="best-of"' in html, "the page offers best of N"
