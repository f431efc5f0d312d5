"""The SDK's inputs and results: plain frozen dataclasses, free of protobuf."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

from PIL import Image

from viper_client.images import ImageSource, decode_image


class Rating(str, enum.Enum):
    LIKED = "liked"
    DISLIKED = "disliked"


@dataclass(frozen=True)
class RatedImage:
    """An image the user reacted to, with their comment; rating may be given as "liked"/"disliked"."""

    image: ImageSource
    comment: str = ""
    rating: Rating | str = field(kw_only=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rating", Rating(self.rating))


@dataclass(frozen=True)
class ProfileImage:
    """A source image of a stored profile (its bytes stay on the server)."""

    sha256: str
    comment: str
    rating: Rating
    position: int


@dataclass(frozen=True)
class Profile:
    user_id: str
    liked_features: list[str]
    disliked_features: list[str]
    raw_text: str
    version: int
    liked_image_count: int
    disliked_image_count: int
    created_at: datetime
    updated_at: datetime
    extractor_model: str
    images: list[ProfileImage]
    # What made this version ("extract", "add", "remove", "update", "restore", "import"): set on versions
    # from the history (list_profile_versions, get_profile(version=...)); "" otherwise or when not known.
    change: str = ""


@dataclass(frozen=True)
class ScoreResult:
    """The score of the query at position index of the request, in [0, 1]; higher is liked more.

    pairs_used: how many (disliked, liked) pairs of the user's images the score was computed with."""

    index: int
    score: float
    pairs_used: int = 0


@dataclass(frozen=True)
class Progress:
    """Steps done so far for an image, over base and refiner."""

    image_index: int
    step: int
    total_steps: int


@dataclass(frozen=True)
class Preview:
    """A cheap low-resolution look at an image being generated."""

    image_index: int
    step: int
    png: bytes

    def image(self) -> Image.Image:
        return decode_image(self.png)


@dataclass(frozen=True)
class GeneratedImage:
    image_index: int
    png: bytes
    seed: int
    width: int
    height: int
    # The profile version whose features guided the image.
    profile_version: int
    # The user's metric score of the image in [0, 1], with candidates (best of N) or score_images; else None.
    # With candidates, image_index is the image's rank (0 = the best) and seed its own.
    score: float | None = None

    def image(self) -> Image.Image:
        return decode_image(self.png)


GenerateEvent = Progress | Preview | GeneratedImage
