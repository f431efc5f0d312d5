"""viper.v1.ProfileService: extract, read, edit and delete user profiles."""

from __future__ import annotations

import asyncio
import base64
import binascii

import grpc
from google.protobuf import empty_pb2

from viper_profiles import ProfileStore, SourceImage, StoredProfile
from viper_proto.v1 import profile_pb2, profile_pb2_grpc

from ..config import Limits
from ..runtime import ModelRuntime
from ..validation import InvalidRequest, check_features, check_rated_images, check_user_id

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_UPDATABLE_FIELDS = ("liked_features", "disliked_features")
_PROTO_RATING = {"liked": profile_pb2.RATING_LIKED, "disliked": profile_pb2.RATING_DISLIKED}


class ProfileService(profile_pb2_grpc.ProfileServiceServicer):
    def __init__(self, store: ProfileStore, runtime: ModelRuntime, limits: Limits) -> None:
        self._store = store
        self._runtime = runtime
        self._limits = limits

    async def ExtractProfile(self, request: profile_pb2.ExtractProfileRequest,
                             context: grpc.aio.ServicerContext) -> profile_pb2.Profile:
        user_id = check_user_id(request.user_id)
        # Decoding dozens of images is CPU work: keep it off the event loop.
        images = await asyncio.to_thread(check_rated_images, request.images, self._limits)
        preferences = await self._runtime.extract_preferences(
            [image.image for image in images], [image.comment for image in images]
        )
        stored = await asyncio.to_thread(
            self._store.save_extraction,
            user_id,
            liked_features=preferences.liked,
            disliked_features=preferences.disliked,
            raw_text=preferences.raw_text,
            extractor_model=self._runtime.extractor_name,
            images=[SourceImage(data=image.data, comment=image.comment, rating=image.rating) for image in images],
        )
        self._runtime.forget_user(user_id)
        return profile_to_proto(stored)

    async def GetProfile(self, request: profile_pb2.GetProfileRequest,
                         context: grpc.aio.ServicerContext) -> profile_pb2.Profile:
        user_id = check_user_id(request.user_id)
        return profile_to_proto(await asyncio.to_thread(self._store.get, user_id))

    async def ListProfiles(self, request: profile_pb2.ListProfilesRequest,
                           context: grpc.aio.ServicerContext) -> profile_pb2.ListProfilesResponse:
        if request.page_size < 0:
            raise InvalidRequest("page_size: must not be negative")
        page_size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = decode_page_token(request.page_token)
        # One extra row tells whether another page follows.
        rows = await asyncio.to_thread(self._store.list, page_size=page_size + 1, after=after)
        page = rows[:page_size]
        next_token = encode_page_token(page[-1].user_id) if len(rows) > page_size else ""
        return profile_pb2.ListProfilesResponse(
            profiles=[profile_to_proto(profile) for profile in page], next_page_token=next_token
        )

    async def UpdateProfile(self, request: profile_pb2.UpdateProfileRequest,
                            context: grpc.aio.ServicerContext) -> profile_pb2.Profile:
        user_id = check_user_id(request.user_id)
        paths = set(request.update_mask.paths) or set(_UPDATABLE_FIELDS)
        unknown = paths - set(_UPDATABLE_FIELDS)
        if unknown:
            raise InvalidRequest(
                f"update_mask: cannot update {', '.join(sorted(unknown))} (only {', '.join(_UPDATABLE_FIELDS)})"
            )
        if request.expected_version < 0:
            raise InvalidRequest("expected_version: must not be negative")
        liked = check_features(request.liked_features, "liked_features") if "liked_features" in paths else None
        disliked = (
            check_features(request.disliked_features, "disliked_features") if "disliked_features" in paths else None
        )
        stored = await asyncio.to_thread(
            self._store.update_features,
            user_id,
            liked_features=liked,
            disliked_features=disliked,
            expected_version=request.expected_version or None,
        )
        self._runtime.forget_user(user_id)
        return profile_to_proto(stored)

    async def DeleteProfile(self, request: profile_pb2.DeleteProfileRequest,
                            context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        user_id = check_user_id(request.user_id)
        if request.expected_version < 0:
            raise InvalidRequest("expected_version: must not be negative")
        await asyncio.to_thread(self._store.delete, user_id, expected_version=request.expected_version or None)
        self._runtime.forget_user(user_id)
        return empty_pb2.Empty()


def encode_page_token(last_user_id: str) -> str:
    return base64.urlsafe_b64encode(last_user_id.encode()).decode()


def decode_page_token(token: str) -> str | None:
    if not token:
        return None
    try:
        return check_user_id(base64.urlsafe_b64decode(token.encode()).decode(), "page_token")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidRequest("page_token: not a token returned by ListProfiles") from None


def profile_to_proto(profile: StoredProfile) -> profile_pb2.Profile:
    message = profile_pb2.Profile(
        user_id=profile.user_id,
        liked_features=profile.liked_features,
        disliked_features=profile.disliked_features,
        raw_text=profile.raw_text,
        version=profile.version,
        liked_image_count=profile.liked_image_count,
        disliked_image_count=profile.disliked_image_count,
        extractor_model=profile.extractor_model,
        images=[
            profile_pb2.ProfileImage(
                sha256=image.sha256, comment=image.comment, rating=_PROTO_RATING[image.rating.value],
                position=image.position,
            )
            for image in profile.images
        ],
    )
    message.create_time.FromDatetime(profile.created_at)
    message.update_time.FromDatetime(profile.updated_at)
    return message
