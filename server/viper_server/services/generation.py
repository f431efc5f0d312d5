"""viper.v1.GenerationService: images guided by a stored profile, streamed as they are made."""

from __future__ import annotations

import asyncio

import grpc

from viper_profiles import ProfileStore
from viper_proto.v1 import generation_pb2, generation_pb2_grpc

from ..config import Limits
from ..models.generation import FinishedImage, GenerationParams, Preview, Progress
from ..runtime import ModelRuntime
from ..validation import check_generate_request, check_prompt_tokens


class GenerationService(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, store: ProfileStore, runtime: ModelRuntime, limits: Limits) -> None:
        self._store = store
        self._runtime = runtime
        self._limits = limits

    async def Generate(self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        settings = check_generate_request(request, self._limits, self._runtime.sources.default_image_size)
        for field in ("prompt", "negative_prompt"):
            check_prompt_tokens(field, self._runtime.prompt_token_count(getattr(settings, field)),
                                self._runtime.max_prompt_tokens)
        profile = await asyncio.to_thread(self._store.get, settings.user_id)
        params = GenerationParams(
            prompt=settings.prompt,
            negative_prompt=settings.negative_prompt,
            liked_features=profile.liked_features,
            disliked_features=profile.disliked_features,
            num_images=settings.num_images,
            width=settings.width,
            height=settings.height,
            steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            preference_strength=settings.preference_strength,
            refine=settings.refine,
            seed=settings.seed,
            preview_every=settings.preview_every,
        )
        async for event in self._runtime.generate(params):
            yield event_to_proto(event, profile.version)


def event_to_proto(event: Progress | Preview | FinishedImage, profile_version: int) -> generation_pb2.GenerateEvent:
    if isinstance(event, Progress):
        return generation_pb2.GenerateEvent(progress=generation_pb2.GenerateProgress(
            image_index=event.image_index, step=event.step, total_steps=event.total_steps))
    if isinstance(event, Preview):
        return generation_pb2.GenerateEvent(preview=generation_pb2.GeneratePreview(
            image_index=event.image_index, step=event.step, png=event.png))
    return generation_pb2.GenerateEvent(image=generation_pb2.GeneratedImage(
        image_index=event.image_index, png=event.png, seed=event.seed, width=event.width, height=event.height,
        profile_version=profile_version))
