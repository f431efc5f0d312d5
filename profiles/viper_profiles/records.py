"""Immutable values going into and coming out of the profile store (the same for every backend)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime


class Rating(str, enum.Enum):
    LIKED = "liked"
    DISLIKED = "disliked"


@dataclass(frozen=True)
class SourceImage:
    """An uploaded image with the user's comment on it: the input of an extraction."""

    data: bytes = field(repr=False)
    comment: str
    rating: Rating


@dataclass(frozen=True)
class ImageRef:
    """A stored source image of a profile, without its bytes."""

    sha256: str  # hex digest of the bytes as uploaded
    comment: str
    rating: Rating
    position: int  # 0-based, in extraction order


@dataclass(frozen=True)
class StoredImage(ImageRef):
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class StoredProfile:
    user_id: str
    liked_features: tuple[str, ...]
    disliked_features: tuple[str, ...]
    raw_text: str
    version: int  # goes up on every change; never repeats for a user, even after a delete
    extractor_model: str
    created_at: datetime  # UTC; kept across re-extractions
    updated_at: datetime  # UTC
    images: tuple[ImageRef, ...]  # ordered by position

    @property
    def liked_image_count(self) -> int:
        return sum(image.rating is Rating.LIKED for image in self.images)

    @property
    def disliked_image_count(self) -> int:
        return sum(image.rating is Rating.DISLIKED for image in self.images)
