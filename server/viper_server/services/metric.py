"""viper.v1.MetricService: how much a user would like each query image (the ViPer proxy metric)."""

from __future__ import annotations

import asyncio

import grpc

from viper_client._proto.viper.v1 import metric_pb2, metric_pb2_grpc
from viper_profiles import ProfileStore, Rating

from ..config import Limits
from ..models.metric import ScoringContext
from ..runtime import ModelRuntime
from ..validation import check_query_images, check_user_id, decode_image


class MetricService(metric_pb2_grpc.MetricServiceServicer):
    def __init__(self, store: ProfileStore, runtime: ModelRuntime, limits: Limits) -> None:
        self._store = store
        self._runtime = runtime
        self._limits = limits

    async def Score(self, request: metric_pb2.ScoreRequest, context: grpc.aio.ServicerContext):
        # Every query is checked before any scoring work starts.
        queries = await asyncio.to_thread(check_query_images, request.queries, self._limits)
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
            liked=check_query_images(request.liked, self._limits, "liked"),
            disliked=check_query_images(request.disliked, self._limits, "disliked"),
        )

    def _stored_context(self, user_id: str) -> ScoringContext:
        """The user's stored liked and disliked images, keyed by profile version for the prefix cache."""
        profile = self._store.get(user_id)
        images = self._store.images(user_id)
        decoded = {
            rating: [decode_image(image.data, f"stored image {image.position}", self._limits)
                     for image in images if image.rating is rating]
            for rating in (Rating.LIKED, Rating.DISLIKED)
        }
        return ScoringContext(liked=decoded[Rating.LIKED], disliked=decoded[Rating.DISLIKED],
                              cache_key=(user_id, profile.version))
