"""Each RPC's request building and response reading, shared by the sync and async clients: the one place
the SDK's types and the protobuf messages meet."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from datetime import timezone
from pathlib import Path
from typing import TypedDict

import grpc
from google.protobuf import field_mask_pb2

from viper_client.errors import ViperError
from viper_client.images import ImageSource, encode_image
from viper_client.types import (
    GeneratedImage,
    GenerateEvent,
    Preview,
    Profile,
    ProfileImage,
    Progress,
    RatedImage,
    Rating,
    ScoreResult,
)
from viper_proto.v1 import generation_pb2, metric_pb2, profile_pb2

_RATING_TO_PROTO = {Rating.LIKED: profile_pb2.RATING_LIKED, Rating.DISLIKED: profile_pb2.RATING_DISLIKED}
_RATING_FROM_PROTO = {value: rating for rating, value in _RATING_TO_PROTO.items()}
_CHANGE_FROM_PROTO = {
    profile_pb2.PROFILE_CHANGE_EXTRACT: "extract",
    profile_pb2.PROFILE_CHANGE_ADD: "add",
    profile_pb2.PROFILE_CHANGE_REMOVE: "remove",
    profile_pb2.PROFILE_CHANGE_UPDATE: "update",
    profile_pb2.PROFILE_CHANGE_RESTORE: "restore",
    profile_pb2.PROFILE_CHANGE_IMPORT: "import",
}


class GenerateOptions(TypedDict, total=False):
    """Generate's options; each left out (or 0 / None) means the server's default."""

    negative_prompt: str
    num_images: int  # 1-8 (default 1)
    width: int  # multiples of 8 (default: the model's size, 1024 for SDXL, 64 for the tiny models)
    height: int
    steps: int  # denoising steps over base and refiner (default 40)
    guidance_scale: float | None  # above 1, at most 30 (default 5.0)
    preference_strength: float | None  # 0 = not personalized, up to 2 (default 0.85)
    refine: bool | None  # finish with the refiner (default True)
    seed: int  # 0 = random; the seed used comes with each image
    preview_every: int  # a preview every this many steps (default 0: none)
    # Best of N: generate this many candidates (seeds seed, seed+1, ...), score each with the user's metric and
    # send the best num_images, best first, each with its score (default 0 = num_images: no ranking)
    candidates: int
    score_images: bool  # each image with its metric score, also without ranking (default False)


def extract_request(user_id: str, images: Iterable[RatedImage]) -> profile_pb2.ExtractProfileRequest:
    return profile_pb2.ExtractProfileRequest(
        user_id=user_id,
        images=[
            profile_pb2.RatedImage(
                data=encode_image(rated.image),
                comment=rated.comment,
                rating=_RATING_TO_PROTO[Rating(rated.rating)],
            )
            for rated in images
        ],
    )


def get_request(user_id: str, version: int | None = None) -> profile_pb2.GetProfileRequest:
    return profile_pb2.GetProfileRequest(user_id=user_id, version=version or 0)


def rated_images(images: Iterable[RatedImage]) -> list[profile_pb2.RatedImage]:
    return [
        profile_pb2.RatedImage(data=encode_image(rated.image), comment=rated.comment,
                               rating=_RATING_TO_PROTO[Rating(rated.rating)])
        for rated in images
    ]


def add_ratings_request(user_id: str, images: Iterable[RatedImage],
                        expected_version: int | None) -> profile_pb2.AddRatingsRequest:
    return profile_pb2.AddRatingsRequest(user_id=user_id, images=rated_images(images),
                                         expected_version=expected_version or 0)


def remove_ratings_request(user_id: str, image_sha256: Iterable[str],
                           expected_version: int | None) -> profile_pb2.RemoveRatingsRequest:
    if isinstance(image_sha256, str):  # one sha256 would be sent as 64 one-character ones
        raise TypeError("image_sha256 is a list of sha256 strings, not one string")
    return profile_pb2.RemoveRatingsRequest(user_id=user_id, image_sha256=list(image_sha256),
                                            expected_version=expected_version or 0)


def list_versions_request(user_id: str, page_size: int) -> profile_pb2.ListProfileVersionsRequest:
    return profile_pb2.ListProfileVersionsRequest(user_id=user_id, page_size=page_size)


def restore_request(user_id: str, version: int,
                    expected_version: int | None) -> profile_pb2.RestoreProfileVersionRequest:
    return profile_pb2.RestoreProfileVersionRequest(user_id=user_id, version=version,
                                                    expected_version=expected_version or 0)


def import_request(user_id: str, archive: bytes | str | os.PathLike[str],
                   replace: bool) -> profile_pb2.ImportProfileRequest:
    """archive: the bytes export_profile returned, or a path to a file holding them."""
    data = archive if isinstance(archive, (bytes, bytearray)) else Path(archive).read_bytes()
    return profile_pb2.ImportProfileRequest(user_id=user_id, archive=bytes(data), replace=replace)


def list_request(page_size: int) -> profile_pb2.ListProfilesRequest:
    """The first page's request; the next page's is the same with next_page_token set."""
    return profile_pb2.ListProfilesRequest(page_size=page_size)


def update_request(
    user_id: str,
    liked_features: Sequence[str] | None,
    disliked_features: Sequence[str] | None,
    expected_version: int | None,
) -> profile_pb2.UpdateProfileRequest:
    """Replaces only the lists given: an empty update_mask would mean both, so it is never sent empty."""
    lists = {"liked_features": liked_features, "disliked_features": disliked_features}
    given = {name: values for name, values in lists.items() if values is not None}
    if not given:
        raise ValueError("update_profile needs liked_features or disliked_features")
    return profile_pb2.UpdateProfileRequest(
        user_id=user_id,
        update_mask=field_mask_pb2.FieldMask(paths=list(given)),
        expected_version=expected_version or 0,
        **given,
    )


def delete_request(user_id: str, expected_version: int | None) -> profile_pb2.DeleteProfileRequest:
    return profile_pb2.DeleteProfileRequest(user_id=user_id, expected_version=expected_version or 0)


def generate_request(user_id: str, prompt: str, options: GenerateOptions) -> generation_pb2.GenerateRequest:
    unknown = set(options) - set(GenerateOptions.__annotations__)
    if unknown:
        raise TypeError(f"unknown generate option(s): {', '.join(sorted(unknown))}")
    return generation_pb2.GenerateRequest(user_id=user_id, prompt=prompt, **options)


def score_request(
    user_id: str,
    images: Iterable[ImageSource],
    liked: Iterable[ImageSource] | None,
    disliked: Iterable[ImageSource] | None,
) -> metric_pb2.ScoreRequest:
    return metric_pb2.ScoreRequest(
        user_id=user_id,
        queries=[encode_image(image) for image in images],
        liked=[encode_image(image) for image in liked or ()],
        disliked=[encode_image(image) for image in disliked or ()],
    )


def profile_from_proto(message: profile_pb2.Profile) -> Profile:
    return Profile(
        user_id=message.user_id,
        liked_features=list(message.liked_features),
        disliked_features=list(message.disliked_features),
        raw_text=message.raw_text,
        version=message.version,
        liked_image_count=message.liked_image_count,
        disliked_image_count=message.disliked_image_count,
        created_at=message.create_time.ToDatetime(tzinfo=timezone.utc),
        updated_at=message.update_time.ToDatetime(tzinfo=timezone.utc),
        extractor_model=message.extractor_model,
        images=[
            ProfileImage(
                sha256=image.sha256,
                comment=image.comment,
                rating=_RATING_FROM_PROTO[image.rating],
                position=image.position,
            )
            for image in message.images
        ],
        change=_CHANGE_FROM_PROTO.get(message.change, ""),
    )


def event_from_proto(message: generation_pb2.GenerateEvent) -> GenerateEvent | None:
    """The typed event, or None for an event kind this SDK predates (a newer server's)."""
    kind = message.WhichOneof("event")
    if kind == "progress":
        p = message.progress
        return Progress(image_index=p.image_index, step=p.step, total_steps=p.total_steps)
    if kind == "preview":
        p = message.preview
        return Preview(image_index=p.image_index, step=p.step, png=p.png)
    if kind == "image":
        i = message.image
        return GeneratedImage(
            image_index=i.image_index,
            png=i.png,
            seed=i.seed,
            width=i.width,
            height=i.height,
            profile_version=i.profile_version,
            score=i.score if i.HasField("score") else None,
        )
    return None


def score_result_from_proto(message: metric_pb2.ScoreResult) -> ScoreResult:
    return ScoreResult(index=message.index, score=message.score, pairs_used=message.pairs_used)


def images_in_index_order(events: Iterable[GenerateEvent], num_images: int) -> list[GeneratedImage]:
    """The images of a whole Generate stream, by index; a stream that ended without all of them (a server or
    proxy that closed it early with OK) is an error, never a short list taken for the whole."""
    image_by_index = {event.image_index: event for event in events if isinstance(event, GeneratedImage)}
    if sorted(image_by_index) != list(range(num_images)):
        raise ViperError(
            grpc.StatusCode.DATA_LOSS,
            f"the stream ended after {len(image_by_index)} of {num_images} images (indexes {sorted(image_by_index)})",
        )
    return [image_by_index[index] for index in range(num_images)]


def scores_in_query_order(results: Iterable[ScoreResult], query_count: int) -> list[float]:
    score_by_index = {result.index: result.score for result in results}
    if sorted(score_by_index) != list(range(query_count)):
        raise ViperError(
            grpc.StatusCode.DATA_LOSS,
            f"expected scores for queries 0-{query_count - 1}, got {sorted(score_by_index)}",
        )
    return [score_by_index[index] for index in range(query_count)]
