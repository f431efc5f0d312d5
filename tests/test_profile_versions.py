"""A Score that read a profile before it was deleted and re-extracted never leaves its context cached."""

from __future__ import annotations

import asyncio
import hashlib
import threading

import pytest
from PIL import Image

from viper_profiles import Rating, open_store
from viper_server.access import UNAUTHENTICATED_CALLER as CALLER
from viper_server.application import ViperService
from viper_server.domain import RatedUpload
from viper_server.engine.engine import ModelEngine
from viper_server.engine.loading import LoadSettings
from viper_server.engine.presets import model_preset
from viper_server.models.metric import reference_scores
from viper_server.pixels import ProcessedImage, processed

from fixture_data import FIXTURES, QUERIES


class NoTelemetry:
    def generation_step(self) -> None:
        pass

    def work_waited(self, model: str, kind: str, seconds: float) -> None:
        pass

    def step_ran(self, model: str, step: str, batch_size: int, seconds: float) -> None:
        pass


def uploads(liked: list[int], disliked: list[int]) -> list[RatedUpload]:
    def upload(rating: Rating, index: int) -> RatedUpload:
        path = FIXTURES / rating.value / f"{index}.png"
        data = path.read_bytes()
        image = ProcessedImage(processed(Image.open(path)).values, sha256=hashlib.sha256(data).hexdigest())
        return RatedUpload(data=data, image=image, comment="noted", rating=rating)

    return [upload(Rating.LIKED, i) for i in liked] + [upload(Rating.DISLIKED, i) for i in disliked]


@pytest.fixture(scope="module")
def engine(tiny_models_dir, tmp_path_factory):
    engine = ModelEngine(model_preset("tiny", tiny_models_dir, tmp_path_factory.mktemp("unused")), LoadSettings(),
                         max_queue=8, max_image_pixels=36_000_000, observer=NoTelemetry())
    engine.load()
    yield engine
    engine.close()


def test_delete_then_re_extract_while_a_score_waits(engine, tmp_path):
    queries = [Image.open(path).convert("RGB") for path in QUERIES]
    images_a, images_b = uploads([0, 1], [0, 1]), uploads([4, 5], [4, 5])

    async def scenario():
        with open_store(str(tmp_path / "profiles.db")) as store:
            service = ViperService(store, engine)
            first = await service.extract_profile(CALLER, "u", images_a)
            assert first.version == 1

            # Hold the next extraction's first step (and so the IDEFICS2 scheduler) until the rest of the
            # interleaving has happened.
            started, gate = threading.Event(), threading.Event()
            extractor = engine._models.extractor
            prefill_step = extractor.prefill_step

            def held_prefill_step(*args, **kwargs):
                started.set()
                gate.wait(60)
                return prefill_step(*args, **kwargs)

            extractor.prefill_step = held_prefill_step
            try:
                extraction = asyncio.create_task(service.extract_profile(CALLER, "u", images_b))
                assert await asyncio.to_thread(started.wait, 60)
                scoring = await service.score(CALLER, "u", queries)  # reads snapshot v1 (images A) now
                stale = asyncio.create_task(collect(scoring.results))
                while engine.idefics2_scheduler.depth < 1:  # queued behind the extraction's step
                    await asyncio.sleep(0.01)
                await service.delete_profile(CALLER, "u", expected_version=None)
                gate.set()
                second = await extraction
                stale_scores = await stale
            finally:
                extractor.prefill_step = prefill_step

            # Versions never repeat: the new profile is not a second "version 1".
            assert second.version == 2
            # The stale Score answered from the snapshot it read, and did not cache that context.
            idefics2 = engine._models.scorer.idefics2
            context_a = [u.image for u in images_a]
            assert stale_scores == pytest.approx(reference_scores(idefics2, context_a[:2], context_a[2:], queries),
                                                 abs=1e-6)
            assert engine.cache_stats.entries == 0

            # Every later Score uses the new profile's images.
            fresh = await collect((await service.score(CALLER, "u", queries)).results)
            context_b = [u.image for u in images_b]
            expected = reference_scores(idefics2, context_b[:2], context_b[2:], queries)
            assert fresh == pytest.approx(expected, abs=1e-6)
            assert max(abs(a - b) for a, b in zip(fresh, stale_scores)) > 1e-3  # the contexts really differ

    asyncio.run(scenario())


async def collect(results) -> list[float]:
    return [result.score async for result in results]
