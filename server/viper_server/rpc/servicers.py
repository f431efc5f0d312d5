"""The gRPC servicers: each RPC is validation -> application -> conversion, and nothing else.

Errors are raised as domain exceptions and mapped to status codes by the interceptor.
"""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf import empty_pb2

from viper_proto.v1 import (
    generation_pb2,
    generation_pb2_grpc,
    metric_pb2,
    metric_pb2_grpc,
    profile_pb2,
    profile_pb2_grpc,
)

from .. import tracing
from ..application import InlineContext, ViperService
from ..config import Limits
from . import validation
from .context import count_items, current_caller
from .convert import (
    PageTokens,
    event_to_proto,
    profile_to_proto,
    profiles_page_to_proto,
    score_to_proto,
    versions_page_to_proto,
)


class ResponseTooLarge(Exception):
    """A response is larger than the server may send (--max-message-bytes): gRPC would fail it on the wire."""


class ProfileServicer(profile_pb2_grpc.ProfileServiceServicer):
    def __init__(self, service: ViperService, limits: Limits, page_tokens: PageTokens,
                 max_message_bytes: int | None = None) -> None:
        self._service = service
        self._limits = limits
        self._page_tokens = page_tokens
        self._max_message_bytes = max_message_bytes

    async def ExtractProfile(self, request: profile_pb2.ExtractProfileRequest,
                             context: grpc.aio.ServicerContext) -> profile_pb2.Profile:
        # Image work is CPU work: off the event loop (the decoding in the preprocessing workers). The headers and
        # the queue's room before any pixel is decoded.
        with tracing.span("validate"):
            user_id = await asyncio.to_thread(validation.check_extract_fields, request, self._limits)
            self._service.check_room("extract")
            uploads = await asyncio.to_thread(validation.decode_extract, request, self._limits, self._service,
                                              self._service)
        return profile_to_proto(await self._service.extract_profile(current_caller(), user_id, uploads))

    async def GetProfile(self, request: profile_pb2.GetProfileRequest,
                         context: grpc.aio.ServicerContext) -> profile_pb2.Profile:
        user_id, version = validation.check_get(request)
        return profile_to_proto(await self._service.get_profile(current_caller(), user_id, version))

    async def ListProfiles(self, request: profile_pb2.ListProfilesRequest,
                           context: grpc.aio.ServicerContext) -> profile_pb2.ListProfilesResponse:
        page_size, after = validation.check_list(request, self._page_tokens)
        return profiles_page_to_proto(*await self._service.list_profiles(current_caller(), page_size, after),
                                      self._page_tokens)

    async def UpdateProfile(self, request: profile_pb2.UpdateProfileRequest,
                            context: grpc.aio.ServicerContext) -> profile_pb2.Profile:
        update = validation.check_update(request)
        stored = await self._service.update_profile(
            current_caller(), update.user_id, liked_features=update.liked_features,
            disliked_features=update.disliked_features, expected_version=update.expected_version,
        )
        return profile_to_proto(stored)

    async def DeleteProfile(self, request: profile_pb2.DeleteProfileRequest,
                            context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        user_id, expected_version = validation.check_delete(request)
        await self._service.delete_profile(current_caller(), user_id, expected_version=expected_version)
        return empty_pb2.Empty()

    async def AddRatings(self, request: profile_pb2.AddRatingsRequest,
                         context: grpc.aio.ServicerContext) -> profile_pb2.Profile:
        with tracing.span("validate"):  # as ExtractProfile: headers, the queue's room, then the pixels
            user_id, expected = await asyncio.to_thread(validation.check_add_ratings_fields, request, self._limits)
            self._service.check_room("extract")
            uploads = await asyncio.to_thread(validation.decode_extract, request, self._limits, self._service,
                                              self._service)
        stored = await self._service.add_ratings(current_caller(), user_id, uploads, expected_version=expected)
        return profile_to_proto(stored)

    async def RemoveRatings(self, request: profile_pb2.RemoveRatingsRequest,
                            context: grpc.aio.ServicerContext) -> profile_pb2.Profile:
        user_id, shas, expected = validation.check_remove_ratings(request, self._limits)
        stored = await self._service.remove_ratings(current_caller(), user_id, shas, expected_version=expected)
        return profile_to_proto(stored)

    async def ListProfileVersions(self, request: profile_pb2.ListProfileVersionsRequest,
                                  context: grpc.aio.ServicerContext) -> profile_pb2.ListProfileVersionsResponse:
        user_id, page_size, before = validation.check_list_versions(request, self._page_tokens)
        page, more = await self._service.list_versions(current_caller(), user_id, page_size, before)
        return versions_page_to_proto(page, more, self._page_tokens)

    async def RestoreProfileVersion(self, request: profile_pb2.RestoreProfileVersionRequest,
                                    context: grpc.aio.ServicerContext) -> profile_pb2.Profile:
        user_id, version, expected = validation.check_restore(request)
        stored = await self._service.restore_version(current_caller(), user_id, version, expected_version=expected)
        return profile_to_proto(stored)

    async def ExportProfile(self, request: profile_pb2.ExportProfileRequest,
                            context: grpc.aio.ServicerContext) -> profile_pb2.ExportProfileResponse:
        user_id = validation.check_user_id(request.user_id)
        archive = await self._service.export_profile(current_caller(), user_id)
        # Checked here, not left to the transport (see ResponseTooLarge); a few bytes of framing spare.
        if self._max_message_bytes is not None and len(archive) + 64 > self._max_message_bytes:
            raise ResponseTooLarge(f"the profile's archive is {len(archive)} bytes, more than this server sends "
                                   f"(--max-message-bytes): lower --keep-versions, or remove images")
        return profile_pb2.ExportProfileResponse(archive=archive)

    async def ImportProfile(self, request: profile_pb2.ImportProfileRequest,
                            context: grpc.aio.ServicerContext) -> profile_pb2.Profile:
        with tracing.span("validate"):
            user_id, archive, replace = await asyncio.to_thread(validation.check_import, request, self._limits,
                                                                self._service, self._service)
        return profile_to_proto(await self._service.import_profile(current_caller(), user_id, archive,
                                                                   replace=replace))


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, service: ViperService, limits: Limits, max_message_bytes: int) -> None:
        self._service = service
        self._limits = limits
        self._max_message_bytes = max_message_bytes

    async def Generate(self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        with tracing.span("validate"):
            user_id, params = validation.check_generate(
                request, self._limits, default_size=self._service.default_image_size, vocabulary=self._service
            )
        generation = await self._service.generate(current_caller(), user_id, params)
        async for event in generation.events:
            message = event_to_proto(event, generation.profile_version)
            # Checked here, not left to the transport: it would fail the call with a traceback in the log.
            if (size := message.ByteSize()) > self._max_message_bytes:
                raise ResponseTooLarge(
                    f"a generated image makes a {size}-byte message, more than this server sends "
                    f"(--max-message-bytes {self._max_message_bytes}): ask for smaller images"
                )
            if message.HasField("image"):
                count_items()
            yield message


class MetricServicer(metric_pb2_grpc.MetricServiceServicer):
    def __init__(self, service: ViperService, limits: Limits) -> None:
        self._service = service
        self._limits = limits

    async def Score(self, request: metric_pb2.ScoreRequest, context: grpc.aio.ServicerContext):
        with tracing.span("validate"):
            await asyncio.to_thread(validation.check_score_fields, request, self._limits)
            self._service.check_room("score")
            checked = await asyncio.to_thread(validation.decode_score, request, self._limits,
                                              self._service.metric_max_pairs, self._service)
        inline = InlineContext(checked.liked, checked.disliked) if checked.liked is not None else None
        scoring = await self._service.score(current_caller(), checked.user_id, checked.queries, inline)
        async for result in scoring.results:
            count_items()
            yield score_to_proto(result, scoring.pairs_used)
