"""Request validation: turns untrusted request fields into checked values.

Everything here raises InvalidRequest with a message naming the offending
field; the RPC layer maps it to INVALID_ARGUMENT. Nothing is stored or sent to
a model before validation has passed.
"""

from __future__ import annotations

import io
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from viper_profiles import InvalidUserId, Rating, validate_user_id
from viper_proto.v1 import generation_pb2, profile_pb2

from .config import Limits

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")


class InvalidRequest(ValueError):
    """A request field is missing, malformed or out of bounds."""


@dataclass(frozen=True)
class CheckedImage:
    data: bytes  # as uploaded: stored byte for byte
    image: Image.Image  # decoded, RGB
    comment: str
    rating: Rating


def check_user_id(user_id: str, field: str = "user_id") -> str:
    try:
        validate_user_id(user_id)
    except InvalidUserId as exc:
        raise InvalidRequest(f"{field}: {exc}") from None
    return user_id


def decode_image(data: bytes, field: str, limits: Limits) -> Image.Image:
    """Decodes PNG / JPEG / WebP bytes into an RGB image, refusing bombs and corrupt data."""
    if not data:
        raise InvalidRequest(f"{field}: empty image")
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in ACCEPTED_FORMATS:
            raise InvalidRequest(f"{field}: {image.format} images are not accepted (use PNG, JPEG or WebP)")
        width, height = image.size
        # The header's declared size, checked before any pixel is decoded.
        if width * height > limits.max_image_pixels:
            raise InvalidRequest(
                f"{field}: {width}x{height} image exceeds the limit of {limits.max_image_pixels} pixels"
            )
        image.load()
        return image.convert("RGB")
    except InvalidRequest:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own limit, hit by headers too large to even open
        raise InvalidRequest(f"{field}: image exceeds the limit of {limits.max_image_pixels} pixels ({exc})") from None
    except UnidentifiedImageError:
        raise InvalidRequest(f"{field}: not a decodable PNG, JPEG or WebP image") from None
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's ways of saying truncated or corrupt
        raise InvalidRequest(f"{field}: truncated or corrupt image ({exc})") from None


_RATINGS = {profile_pb2.RATING_LIKED: Rating.LIKED, profile_pb2.RATING_DISLIKED: Rating.DISLIKED}


def check_rated_images(images: Sequence[profile_pb2.RatedImage], limits: Limits) -> list[CheckedImage]:
    """Validates ExtractProfileRequest.images (RatedImage messages) in order."""
    if not images:
        raise InvalidRequest("images: at least one rated image is required")
    if len(images) > limits.max_images:
        raise InvalidRequest(f"images: {len(images)} given, at most {limits.max_images} allowed")
    checked = []
    for index, rated in enumerate(images):
        field = f"images[{index}]"
        if len(rated.comment) > limits.max_comment_chars:
            raise InvalidRequest(
                f"{field}.comment: {len(rated.comment)} characters, at most {limits.max_comment_chars} allowed"
            )
        rating = _RATINGS.get(rated.rating)
        if rating is None:
            raise InvalidRequest(f"{field}.rating: must be RATING_LIKED or RATING_DISLIKED")
        image = decode_image(rated.data, f"{field}.data", limits)
        checked.append(CheckedImage(data=rated.data, image=image, comment=rated.comment, rating=rating))
    return checked


MAX_FEATURES = 256
MAX_FEATURE_CHARS = 200


def check_features(features: list[str], field: str) -> list[str]:
    """Feature keywords as a user may edit them: non-empty, short, and not too many."""
    if len(features) > MAX_FEATURES:
        raise InvalidRequest(f"{field}: {len(features)} features, at most {MAX_FEATURES} allowed")
    cleaned = [feature.strip() for feature in features]
    for index, feature in enumerate(cleaned):
        if not feature:
            raise InvalidRequest(f"{field}[{index}]: empty feature")
        if len(feature) > MAX_FEATURE_CHARS:
            raise InvalidRequest(f"{field}[{index}]: longer than {MAX_FEATURE_CHARS} characters")
    return cleaned


@dataclass(frozen=True)
class GenerateSettings:
    """A GenerateRequest with its defaults filled in and every field in bounds."""

    user_id: str
    prompt: str
    negative_prompt: str
    num_images: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    preference_strength: float
    refine: bool
    seed: int
    preview_every: int


MAX_SEED = 2**63 - 1
# Far above what fits in CLIP's 77 tokens; only there to bound the tokenizer's work.
MAX_PROMPT_CHARS = 2000


def check_generate_request(request: generation_pb2.GenerateRequest, limits: Limits,
                           default_size: int) -> GenerateSettings:
    user_id = check_user_id(request.user_id)
    if not request.prompt.strip():
        raise InvalidRequest("prompt: must not be empty")
    # Cheap bounds before the tokenizer sees them (the token limit is checked after).
    for field in ("prompt", "negative_prompt"):
        if (length := len(getattr(request, field))) > MAX_PROMPT_CHARS:
            raise InvalidRequest(f"{field}: {length} characters, at most {MAX_PROMPT_CHARS}")
    num_images = request.num_images or 1
    _check_range("num_images", num_images, 1, limits.max_generate_images)
    width = request.width or default_size
    height = request.height or default_size
    for field, size in (("width", width), ("height", height)):
        _check_range(field, size, limits.min_generate_size, limits.max_generate_size)
        if size % 8:
            raise InvalidRequest(f"{field}: {size} is not a multiple of 8")
    steps = request.steps or 40
    _check_range("steps", steps, 1, limits.max_steps)
    guidance_scale = request.guidance_scale if request.HasField("guidance_scale") else 5.0
    # At or below 1 classifier-free guidance, which ViPer's terms ride on, is off.
    if not 1.0 < guidance_scale <= 30.0:
        raise InvalidRequest(f"guidance_scale: {guidance_scale:g} is out of range (1, 30]")
    strength = request.preference_strength if request.HasField("preference_strength") else 0.85
    _check_range("preference_strength", strength, 0.0, 2.0)
    _check_range("preview_every", request.preview_every, 0, steps * 2)
    _check_range("seed", request.seed, 0, MAX_SEED)
    return GenerateSettings(
        user_id=user_id,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        num_images=num_images,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=guidance_scale,
        preference_strength=strength,
        refine=request.refine if request.HasField("refine") else True,
        seed=request.seed or secrets.randbelow(MAX_SEED) + 1,
        preview_every=request.preview_every,
    )


def check_prompt_tokens(field: str, tokens: int, limit: int) -> None:
    """Over-long prompts are refused, never silently truncated."""
    if tokens > limit:
        raise InvalidRequest(f"{field}: {tokens} tokens, the text encoders take at most {limit}")


def check_score_queries(queries: Sequence[bytes], limits: Limits) -> list[Image.Image]:
    if not queries:
        raise InvalidRequest("queries: at least one image to score is required")
    return decode_images(queries, limits, "queries")


def decode_images(images: Sequence[bytes], limits: Limits, field: str) -> list[Image.Image]:
    """A repeated image field of a Score request, decoded; all of it checked before any scoring."""
    if len(images) > limits.max_score_queries:
        raise InvalidRequest(f"{field}: {len(images)} given, at most {limits.max_score_queries} allowed")
    return [decode_image(data, f"{field}[{index}]", limits) for index, data in enumerate(images)]


def _check_range(field: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise InvalidRequest(f"{field}: {value:g} is out of range [{low:g}, {high:g}]")
