"""The one place protobuf messages and domain values are converted into each other (server side)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from viper_profiles import Change, ProfileVersion, Rating, StoredProfile
from viper_proto.v1 import generation_pb2, metric_pb2, profile_pb2

from ..domain import FinishedImage, GenerationEvent, Preview, Progress, ScoredQuery

RATING_FROM_PROTO = {profile_pb2.RATING_LIKED: Rating.LIKED, profile_pb2.RATING_DISLIKED: Rating.DISLIKED}
_RATING_TO_PROTO = {rating: value for value, rating in RATING_FROM_PROTO.items()}
_CHANGE_TO_PROTO = {
    Change.EXTRACT: profile_pb2.PROFILE_CHANGE_EXTRACT,
    Change.ADD: profile_pb2.PROFILE_CHANGE_ADD,
    Change.REMOVE: profile_pb2.PROFILE_CHANGE_REMOVE,
    Change.UPDATE: profile_pb2.PROFILE_CHANGE_UPDATE,
    Change.RESTORE: profile_pb2.PROFILE_CHANGE_RESTORE,
    Change.IMPORT: profile_pb2.PROFILE_CHANGE_IMPORT,
    Change.UNKNOWN: profile_pb2.PROFILE_CHANGE_UNSPECIFIED,
}


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
                sha256=image.sha256, comment=image.comment, rating=_RATING_TO_PROTO[image.rating],
                position=image.position,
            )
            for image in profile.images
        ],
    )
    message.create_time.FromDatetime(profile.created_at)
    message.update_time.FromDatetime(profile.updated_at)
    if isinstance(profile, ProfileVersion):
        message.change = _CHANGE_TO_PROTO[profile.change]
    return message


def versions_page_to_proto(versions: list[ProfileVersion], more: bool,
                           tokens: PageTokens) -> profile_pb2.ListProfileVersionsResponse:
    return profile_pb2.ListProfileVersionsResponse(
        versions=[profile_to_proto(version) for version in versions],
        # The page token names the last version listed, signed: the next page starts below it.
        next_page_token=tokens.encode(str(versions[-1].version)) if more and versions else "",
    )


def profiles_page_to_proto(profiles: list[StoredProfile], more: bool,
                           tokens: PageTokens) -> profile_pb2.ListProfilesResponse:
    return profile_pb2.ListProfilesResponse(
        profiles=[profile_to_proto(profile) for profile in profiles],
        next_page_token=tokens.encode(profiles[-1].user_id) if more and profiles else "",
    )


class PageTokens:
    """ListProfiles page tokens: the page's last user id, signed (HMAC-SHA256), so only a token a server with
    the same key made is accepted; replicas sharing the key accept each other's (server.page_token_key)."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def encode(self, last_user_id: str) -> str:
        payload = _b64(last_user_id.encode())
        return f"{payload}.{_b64(self._mac(payload))}"

    def decode(self, token: str) -> str:
        """The last user id of the previous page; ValueError when the token is not one encode made."""
        payload, _, signature = token.partition(".")
        if not hmac.compare_digest(signature, _b64(self._mac(payload))):
            raise ValueError("not a signed page token")
        try:
            return base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode()
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise ValueError(str(exc)) from None

    def _mac(self, payload: str) -> bytes:
        return hmac.new(self._key, payload.encode(), hashlib.sha256).digest()[:16]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def event_to_proto(event: GenerationEvent, profile_version: int) -> generation_pb2.GenerateEvent:
    if isinstance(event, Progress):
        return generation_pb2.GenerateEvent(progress=generation_pb2.GenerateProgress(
            image_index=event.image_index, step=event.step, total_steps=event.total_steps))
    if isinstance(event, Preview):
        return generation_pb2.GenerateEvent(preview=generation_pb2.GeneratePreview(
            image_index=event.image_index, step=event.step, png=event.png))
    if isinstance(event, FinishedImage):
        return generation_pb2.GenerateEvent(image=generation_pb2.GeneratedImage(
            image_index=event.image_index, png=event.png, seed=event.seed, width=event.width, height=event.height,
            profile_version=profile_version, score=event.score))
    raise TypeError(f"not a generation event: {event!r}")


def score_to_proto(result: ScoredQuery, pairs_used: int) -> metric_pb2.ScoreResult:
    return metric_pb2.ScoreResult(index=result.index, score=result.score, pairs_used=pairs_used)
