"""The service's vocabulary: plain values passed between the layers (no gRPC, no torch).

The RPC layer turns requests into these, the application passes them on, the model code takes and
returns them. Each request kind has one shape: a GenerateRequest becomes one GenerationParams, checked
once (rpc.validation), and nothing below copies or re-checks it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image

from viper_profiles import Rating

from .pixels import ProcessedImage

# The share of the denoising steps the SDXL base runs before the refiner takes over (the reference's 0.8).
HIGH_NOISE_FRAC = 0.8


@dataclass(frozen=True)
class RatedUpload:
    """An uploaded image with the user's comment and rating: validated, processed for the models."""

    # As uploaded less its metadata (imaging.strip_metadata; the same pixel data): stored byte for byte.
    data: bytes = field(repr=False)
    image: ProcessedImage = field(repr=False)  # decoded and processed for the models (pixels.py)
    comment: str
    rating: Rating

    def __post_init__(self) -> None:
        if self.image.sha256 is None:
            raise ValueError("an upload's processed image carries the sha256 of its data")

    @property
    def sha256(self) -> str:
        """sha256 of data, hashed once where it was processed: the image's name in the store and the key of
        what the caches keep for it (processed inputs, image features)."""
        return self.image.sha256


@dataclass(frozen=True)
class Preferences:
    """What the VPE extracted: liked and disliked features, and its answer as generated."""

    liked: list[str]
    disliked: list[str]
    raw_text: str


@dataclass(frozen=True)
class GenerationParams:
    """One Generate request with its defaults filled in and every field in bounds."""

    prompt: str
    negative_prompt: str = ""
    num_images: int = 1
    width: int = 1024
    height: int = 1024
    steps: int = 40
    guidance_scale: float = 5.0
    preference_strength: float = 0.85
    refine: bool = True
    seed: int = 0
    preview_every: int = 0
    high_noise_frac: float = HIGH_NOISE_FRAC
    # Best of N: images generated (seeds seed, seed+1, ...), at least num_images; the best num_images are sent.
    candidates: int = 1
    score_images: bool = False  # score each image sent (always so when ranking)

    @property
    def ranked(self) -> bool:
        return self.candidates > self.num_images

    @property
    def scored(self) -> bool:
        return self.ranked or self.score_images


# Generation events, in the order a generation emits them per image.
@dataclass(frozen=True)
class Progress:
    image_index: int
    step: int  # steps done for this image, over base and refiner
    total_steps: int


@dataclass(frozen=True)
class Preview:
    image_index: int
    step: int
    png: bytes = field(repr=False)


@dataclass(frozen=True)
class FinishedImage:
    image_index: int
    png: bytes = field(repr=False)
    seed: int
    width: int
    height: int
    # The pixels the PNG holds (PNG is lossless): the metric scores these without decoding the PNG again.
    picture: Image.Image | None = field(default=None, repr=False, compare=False)
    score: float | None = None  # the user's metric score, when the request asked for it


GenerationEvent = Progress | Preview | FinishedImage


@dataclass(frozen=True)
class ScoringContext:
    """A user's liked and disliked images; the first min(liked, disliked, max_pairs) pairs are used."""

    liked: Sequence[Image.Image | ProcessedImage]
    disliked: Sequence[Image.Image | ProcessedImage]
    # Keys the cached prefix: (user_id, a digest naming exactly the images used, in order); None = not cached.
    cache_key: tuple[str, str] | None = None
    # The profile version the images were read at: a prefix from a snapshot older than one the cache
    # has already been told about (PrefixCache.invalidate) is never stored.
    version: int = 0


class ContextError(ValueError):
    """The liked/disliked context images cannot be scored (no pair of them)."""


@dataclass(frozen=True)
class ScoredQuery:
    index: int  # position of the query in the request
    score: float  # in [0, 1]; higher = liked more
