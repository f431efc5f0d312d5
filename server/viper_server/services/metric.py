"""viper.v1.MetricService: how much a user would like each query image (the ViPer proxy metric)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
from PIL import Image

from viper_profiles import ProfileStore, Rating
from viper_proto.v1 import metric_pb2, metric_pb2_grpc

from ..config import Limits
from ..models.metric import ScoringContext
from ..runtime import ModelRuntime
from ..validation import check_score_queries, check_user_id, decode_image, decode_images


class MetricService(metric_pb2_grpc.MetricServiceServicer):
    def __init__(self, store: ProfileStore, runtime: ModelRuntime, limits: Limits) -> None:
        self._store = store
        self._runtime = runtime
        self._limits = limits

    async def Score(self, request: metric_pb2.ScoreRequest, context: grpc.aio.ServicerContext):
        # Every query is checked before any scoring work starts.
        queries = await asyncio.to_thread(check_score_queries, request.queries, self._limits)
        if request.liked or request.disliked:
            scoring_context = await asyncio.to_thread(self._inline_context, request)
        else:
            scoring_context = await asyncio.to_thread(self._stored_context, check_user_id(request.user_id))
        self._runtime.check_scoring_context(scoring_context)
        async for batch in self._runtime.score(scoring_context, queries):
            for index, score in batch:
                yield metric_pb2.ScoreResult(index=index, score=score)

    def _inline_context(self, request: metric_pb2.ScoreRequest) -> ScoringContext:
        return ScoringContext(
            liked=decode_images(request.liked, self._limits, "liked"),
            disliked=decode_images(request.disliked, self._limits, "disliked"),
        )

    def _stored_context(self, user_id: str) -> ScoringContext:
        """The user's stored liked and disliked images, keyed by profile version for the prefix cache."""
        profile, images = self._store.get_with_images(user_id)
        liked, disliked = (
            DecodedOnDemand([image.data for image in images if image.rating is rating], self._limits)
            for rating in (Rating.LIKED, Rating.DISLIKED)
        )
        return ScoringContext(liked=liked, disliked=disliked, cache_key=(user_id, profile.version))


class DecodedOnDemand(Sequence[Image.Image]):
    """Stored images, decoded only when the metric reads them: not at all while the user's prefix is cached."""

    def __init__(self, blobs: list[bytes], limits: Limits) -> None:
        self._blobs = blobs
        self._limits = limits

    def __len__(self) -> int:
        return len(self._blobs)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return decode_image(self._blobs[index], f"stored image {index}", self._limits)
