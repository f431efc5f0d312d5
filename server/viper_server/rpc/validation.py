"""Request validation: untrusted request messages -> checked domain values, every bound checked here once.

Everything here raises InvalidRequest with a message naming the offending field; the interceptor maps
it to INVALID_ARGUMENT. Nothing is stored or sent to a model before validation has passed. The cheap checks
(counts, sizes, image headers) run here; the full decode and the image processor run where an ImageProcessing
says (the server's preprocessing workers), and a bad image comes back to be named here.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from viper_profiles import InvalidUserId, validate_user_id
from viper_profiles.archive import Archive, InvalidArchive, read_archive
from viper_proto.v1 import generation_pb2, metric_pb2, profile_pb2

from ..config import Limits
from ..domain import GenerationParams, RatedUpload
from ..imaging import ImageDecodeError, decode_image, read_header, strip_metadata
from ..pixels import ProcessedImage, process_bytes
from .convert import RATING_FROM_PROTO, PageTokens

UPDATABLE_FIELDS = ("liked_features", "disliked_features")
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_FEATURES = 256
MAX_FEATURE_CHARS = 200
MAX_SEED = 2**63 - 1
# Far above what fits in CLIP's 77 tokens; only there to bound the tokenizer's work.
MAX_PROMPT_CHARS = 2000
DEFAULT_STEPS = 40
DEFAULT_GUIDANCE_SCALE = 5.0
MAX_GUIDANCE_SCALE = 30.0
DEFAULT_PREFERENCE_STRENGTH = 0.85
MAX_PREFERENCE_STRENGTH = 2.0
_SHA256 = re.compile(r"[0-9a-f]{64}")


class InvalidRequest(ValueError):
    """A request field is missing, malformed or out of bounds."""


class Vocabulary(Protocol):
    """What the loaded models' tokenizers accept; read last, since it needs the models (UNAVAILABLE while
    they load) and a request that is wrong anyway should hear so first."""

    @property
    def control_tokens(self) -> frozenset[str]:
        """The IDEFICS2 tokenizer's special tokens: in a comment they would be read as prompt structure."""

    @property
    def max_prompt_tokens(self) -> int: ...

    def prompt_token_count(self, text: str) -> int:
        """The text encoders' token count, start and end tokens included."""


class ImageProcessing(Protocol):
    """Where uploaded images are decoded and processed (the application: the engine's preprocessing workers)."""

    def process_uploads(self, uploads: Sequence[bytes]) -> list[ProcessedImage | ImageDecodeError]:
        """Each image processed, or why its bytes are no acceptable image, up to the first bad one; blocking."""


class _InThisThread:
    """ImageProcessing in the calling thread (what validation does when given none)."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits

    def process_uploads(self, uploads: Sequence[bytes]) -> list[ProcessedImage | ImageDecodeError]:
        results = []
        for data in uploads:
            try:
                values = process_bytes(data, max_pixels=self._limits.max_image_pixels)
                results.append(ProcessedImage(values, sha256=hashlib.sha256(data).hexdigest()))
            except ImageDecodeError as exc:
                results.append(exc)
                break  # the request is refused for it: the rest need no work
        return results


def process_images(uploads: Sequence[bytes], fields: Sequence[str], limits: Limits,
                   processing: ImageProcessing | None) -> list[ProcessedImage]:
    """Uploaded images processed (all at once, by `processing`; None = here); the first bad one, in order, is
    refused naming its field as check_image would."""
    results = (processing or _InThisThread(limits)).process_uploads(uploads)
    for field, result in zip(fields, results):
        if isinstance(result, ImageDecodeError):
            raise InvalidRequest(f"{field}: {result}")
    return results


def check_user_id(user_id: str, field: str = "user_id") -> str:
    try:
        validate_user_id(user_id)
    except InvalidUserId as exc:
        raise InvalidRequest(f"{field}: {exc}") from None
    return user_id


def check_image(data: bytes, field: str, limits: Limits) -> Image.Image:
    """An uploaded image, decoded to RGB at the models' size (imaging.decode_image); a bad one is the caller's
    fault."""
    try:
        return decode_image(data, max_pixels=limits.max_image_pixels)
    except ImageDecodeError as exc:
        raise InvalidRequest(f"{field}: {exc}") from None


def header_pixels(data: bytes, field: str, limits: Limits) -> int:
    """An uploaded image's format and declared size, read without decoding a pixel; returns its pixel count."""
    try:
        width, height = read_header(data, max_pixels=limits.max_image_pixels).size
    except ImageDecodeError as exc:
        raise InvalidRequest(f"{field}: {exc}") from None
    return width * height


def check_request_pixels(total: int, limits: Limits) -> None:
    """The pixels of a request's images in all, from their headers, before any is decoded."""
    if total > limits.max_request_pixels:
        raise InvalidRequest(
            f"images: {total} pixels in all, at most {limits.max_request_pixels} per request (--max-request-pixels)"
        )


# -- ProfileService ---------------------------------------------------------------------------------


def check_extract(request: profile_pb2.ExtractProfileRequest, limits: Limits, vocabulary: Vocabulary,
                  processing: ImageProcessing | None = None) -> tuple[str, list[RatedUpload]]:
    """The user id and the rated images in order (check_extract_fields, then decode_extract)."""
    user_id = check_extract_fields(request, limits)
    return user_id, decode_extract(request, limits, vocabulary, processing)


def check_extract_fields(request: profile_pb2.ExtractProfileRequest, limits: Limits) -> str:
    """Everything but the pixels and the control tokens: cheap, so it runs before the queue-room check."""
    user_id = check_user_id(request.user_id)
    if not request.images:
        raise InvalidRequest("images: at least one rated image is required")
    if len(request.images) > limits.max_images:
        raise InvalidRequest(f"images: {len(request.images)} given, at most {limits.max_images} allowed")
    pixels = 0
    for index, rated in enumerate(request.images):
        field = f"images[{index}]"
        if len(rated.comment) > limits.max_comment_chars:
            raise InvalidRequest(
                f"{field}.comment: {len(rated.comment)} characters, at most {limits.max_comment_chars} allowed"
            )
        _check_no_nul(rated.comment, f"{field}.comment")
        if RATING_FROM_PROTO.get(rated.rating) is None:
            raise InvalidRequest(f"{field}.rating: must be RATING_LIKED or RATING_DISLIKED")
        pixels += header_pixels(rated.data, f"{field}.data", limits)
    check_request_pixels(pixels, limits)
    return user_id


def decode_extract(request: profile_pb2.ExtractProfileRequest, limits: Limits, vocabulary: Vocabulary,
                   processing: ImageProcessing | None = None) -> list[RatedUpload]:
    """The rated images decoded and processed (after check_extract_fields), then the comments' control tokens.
    Their metadata (EXIF with GPS, XMP, text) is stripped: kept are the bytes the models see, nothing more."""
    datas = [strip_metadata(rated.data) for rated in request.images]
    images = process_images(datas, [f"images[{index}].data" for index in range(len(datas))], limits, processing)
    uploads = [RatedUpload(data=data, image=image, comment=rated.comment, rating=RATING_FROM_PROTO[rated.rating])
               for data, image, rated in zip(datas, images, request.images)]
    control_tokens = sorted(vocabulary.control_tokens)
    for index, upload in enumerate(uploads):
        for token in control_tokens:
            if token in upload.comment:
                raise InvalidRequest(
                    f"images[{index}].comment: contains the control token {token!r}, which comments may not contain"
                )
    return uploads


def check_list(request: profile_pb2.ListProfilesRequest, tokens: PageTokens) -> tuple[int, str | None]:
    """(page size, the user id the page starts after)."""
    if request.page_size < 0:
        raise InvalidRequest("page_size: must not be negative")
    page_size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    if not request.page_token:
        return page_size, None
    try:
        after = tokens.decode(request.page_token)
        validate_user_id(after)
    except ValueError:
        raise InvalidRequest("page_token: not a token returned by ListProfiles") from None
    return page_size, after


@dataclass(frozen=True)
class ProfileUpdate:
    user_id: str
    liked_features: list[str] | None  # None: keep the stored list
    disliked_features: list[str] | None
    expected_version: int | None  # None: no check


def check_update(request: profile_pb2.UpdateProfileRequest) -> ProfileUpdate:
    user_id = check_user_id(request.user_id)
    paths = set(request.update_mask.paths) or set(UPDATABLE_FIELDS)
    unknown = paths - set(UPDATABLE_FIELDS)
    if unknown:
        raise InvalidRequest(
            f"update_mask: cannot update {', '.join(sorted(unknown))} (only {', '.join(UPDATABLE_FIELDS)})"
        )
    lists = {field: check_features(getattr(request, field), field) if field in paths else None
             for field in UPDATABLE_FIELDS}
    return ProfileUpdate(user_id=user_id, **lists, expected_version=check_expected_version(request.expected_version))


def check_delete(request: profile_pb2.DeleteProfileRequest) -> tuple[str, int | None]:
    return check_user_id(request.user_id), check_expected_version(request.expected_version)


def check_expected_version(version: int) -> int | None:
    if version < 0:
        raise InvalidRequest("expected_version: must not be negative")
    return version or None


def check_features(features: Sequence[str], field: str) -> list[str]:
    """Feature keywords as a user may edit them: non-empty, short, and not too many."""
    if len(features) > MAX_FEATURES:
        raise InvalidRequest(f"{field}: {len(features)} features, at most {MAX_FEATURES} allowed")
    cleaned = [feature.strip() for feature in features]
    for index, feature in enumerate(cleaned):
        if not feature:
            raise InvalidRequest(f"{field}[{index}]: empty feature")
        if len(feature) > MAX_FEATURE_CHARS:
            raise InvalidRequest(f"{field}[{index}]: longer than {MAX_FEATURE_CHARS} characters")
        _check_no_nul(feature, f"{field}[{index}]")
    return cleaned


# -- a profile's life (AddRatings, RemoveRatings, history, export and import) -------------------------


def check_get(request: profile_pb2.GetProfileRequest) -> tuple[str, int | None]:
    """(user id, the kept version asked for; None = the current one)."""
    if request.version < 0:
        raise InvalidRequest("version: must not be negative")
    return check_user_id(request.user_id), request.version or None


def check_add_ratings_fields(request: profile_pb2.AddRatingsRequest, limits: Limits) -> tuple[str, int | None]:
    """The user id and expected version (0 = no check), and the images' fields and headers as ExtractProfile's
    (check_extract_fields); decode_extract decodes them once the queue has room."""
    return check_extract_fields(request, limits), check_expected_version(request.expected_version)


def check_remove_ratings(request: profile_pb2.RemoveRatingsRequest,
                         limits: Limits) -> tuple[str, tuple[str, ...], int | None]:
    user_id = check_user_id(request.user_id)
    if not request.image_sha256:
        raise InvalidRequest("image_sha256: at least one image to remove is required")
    if len(request.image_sha256) > limits.max_profile_images:
        raise InvalidRequest(f"image_sha256: {len(request.image_sha256)} given, a profile holds at most "
                             f"{limits.max_profile_images}")
    for index, sha in enumerate(request.image_sha256):
        if not _SHA256.fullmatch(sha):
            raise InvalidRequest(f"image_sha256[{index}]: not a lowercase hex sha256")
    return user_id, tuple(dict.fromkeys(request.image_sha256)), check_expected_version(request.expected_version)


def check_list_versions(request: profile_pb2.ListProfileVersionsRequest,
                        tokens: PageTokens) -> tuple[str, int, int | None]:
    """(user id, page size, the version the page starts below)."""
    user_id = check_user_id(request.user_id)
    page_size, _ = check_list(profile_pb2.ListProfilesRequest(page_size=request.page_size), tokens)
    if not request.page_token:
        return user_id, page_size, None
    try:
        before = int(tokens.decode(request.page_token))
    except ValueError:
        raise InvalidRequest("page_token: not a token returned by ListProfileVersions") from None
    if before < 1:
        raise InvalidRequest("page_token: not a token returned by ListProfileVersions")
    return user_id, page_size, before


def check_restore(request: profile_pb2.RestoreProfileVersionRequest) -> tuple[str, int, int | None]:
    user_id = check_user_id(request.user_id)
    if request.version < 1:
        raise InvalidRequest("version: the version to restore is required (at least 1)")
    return user_id, request.version, check_expected_version(request.expected_version)


def check_import(request: profile_pb2.ImportProfileRequest, limits: Limits, vocabulary: Vocabulary,
                 processing: ImageProcessing | None = None) -> tuple[str, Archive, bool]:
    """The archive read and every part of it checked as an extraction's would be: sizes, formats, features,
    comments, and each image decoded (and processed: the preprocessing's cache then holds it)."""
    user_id = check_user_id(request.user_id)
    if not request.archive:
        raise InvalidRequest("archive: required")
    try:
        archive = read_archive(request.archive, max_images=limits.max_profile_images * 64)
    except InvalidArchive as exc:
        raise InvalidRequest(f"archive: {exc}") from None
    control_tokens = sorted(vocabulary.control_tokens)
    for index, version in enumerate(archive.versions):
        where = f"archive: versions[{index}]"
        if len(version.images) > limits.max_profile_images:
            raise InvalidRequest(f"{where}: {len(version.images)} images, at most {limits.max_profile_images}")
        check_features(version.liked_features, f"{where}.liked_features")
        check_features(version.disliked_features, f"{where}.disliked_features")
        _check_no_nul(version.raw_text, f"{where}.raw_text")
        _check_no_nul(version.extractor_model, f"{where}.extractor_model")
        for position, image in enumerate(version.images):
            field = f"{where}.images[{position}].comment"
            if len(image.comment) > limits.max_comment_chars:
                raise InvalidRequest(f"{field}: more than {limits.max_comment_chars} characters")
            _check_no_nul(image.comment, field)
            if any(token in image.comment for token in control_tokens):
                raise InvalidRequest(f"{field}: contains a control token")
    process_images(list(archive.images.values()), [f"archive: images/{sha}" for sha in archive.images], limits,
                   processing)
    return user_id, archive, request.replace


def _check_no_nul(text: str, field: str) -> None:
    # Stored text: PostgreSQL cannot hold a NUL character, so no backend takes one.
    if "\x00" in text:
        raise InvalidRequest(f"{field}: contains a NUL character")


# -- GenerationService -----------------------------------------------------------------------------


def check_generate(request: generation_pb2.GenerateRequest, limits: Limits, *, default_size: int,
                   vocabulary: Vocabulary) -> tuple[str, GenerationParams]:
    """The user id and the generation's parameters, defaults filled in. Prompts over the text encoders'
    token limit are refused, never silently truncated."""
    user_id = check_user_id(request.user_id)
    if not request.prompt.strip():
        raise InvalidRequest("prompt: must not be empty")
    prompts = {"prompt": request.prompt, "negative_prompt": request.negative_prompt}
    for field, text in prompts.items():
        # The cheap bound first: the tokenizer only ever sees bounded text.
        if len(text) > MAX_PROMPT_CHARS:
            raise InvalidRequest(f"{field}: {len(text)} characters, at most {MAX_PROMPT_CHARS}")
    num_images = request.num_images or 1
    _check_range("num_images", num_images, 1, limits.max_generate_images)
    width = request.width or default_size
    height = request.height or default_size
    for field, size in (("width", width), ("height", height)):
        _check_range(field, size, limits.min_generate_size, limits.max_generate_size)
        if size % 8:
            raise InvalidRequest(f"{field}: {size} is not a multiple of 8")
    steps = request.steps or DEFAULT_STEPS
    _check_range("steps", steps, 1, limits.max_steps)
    guidance_scale = request.guidance_scale if request.HasField("guidance_scale") else DEFAULT_GUIDANCE_SCALE
    # At or below 1 the pipeline drops classifier-free guidance, which ViPer's terms ride on.
    if not 1.0 < guidance_scale <= MAX_GUIDANCE_SCALE:
        raise InvalidRequest(f"guidance_scale: {guidance_scale:g} is out of range (1, {MAX_GUIDANCE_SCALE:g}]")
    strength = (request.preference_strength if request.HasField("preference_strength")
                else DEFAULT_PREFERENCE_STRENGTH)
    _check_range("preference_strength", strength, 0.0, MAX_PREFERENCE_STRENGTH)
    _check_range("preview_every", request.preview_every, 0, steps * 2)
    candidates = _check_candidates(request.candidates, num_images, limits)
    _check_range("seed", request.seed, 0, MAX_SEED)
    for field, text in prompts.items():
        if (count := vocabulary.prompt_token_count(text)) > vocabulary.max_prompt_tokens:
            raise InvalidRequest(
                f"{field}: {count} tokens, the text encoders take at most {vocabulary.max_prompt_tokens}"
            )
    return user_id, GenerationParams(
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
        candidates=candidates,
        score_images=request.score_images,
    )


def _check_candidates(candidates: int, num_images: int, limits: Limits) -> int:
    """Best of N: how many images to generate; 0 means num_images (no ranking)."""
    if candidates < 0:
        raise InvalidRequest("candidates: must not be negative")
    if candidates and candidates < num_images:
        raise InvalidRequest(f"candidates: {candidates} is fewer than num_images ({num_images})")
    if candidates > limits.max_candidates:
        raise InvalidRequest(f"candidates: {candidates}, at most {limits.max_candidates} allowed")
    return candidates or num_images


# -- MetricService ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreCheck:
    user_id: str  # "" with an inline context
    queries: list[ProcessedImage]
    # The inline context, when given instead of the stored profile.
    liked: list[ProcessedImage] | None
    disliked: list[ProcessedImage] | None


def check_score(request: metric_pb2.ScoreRequest, limits: Limits, max_context: int | None = None,
                processing: ImageProcessing | None = None) -> ScoreCheck:
    """check_score_fields, then decode_score."""
    check_score_fields(request, limits)
    return decode_score(request, limits, max_context, processing)


def check_score_fields(request: metric_pb2.ScoreRequest, limits: Limits) -> None:
    """Counts, the user id and every image's header: cheap, so it runs before the queue-room check."""
    if not request.queries:
        raise InvalidRequest("queries: at least one image to score is required")
    pixels = 0
    for field in ("queries", "liked", "disliked"):
        given = getattr(request, field)
        if len(given) > limits.max_score_queries:
            raise InvalidRequest(f"{field}: {len(given)} given, at most {limits.max_score_queries} allowed")
        pixels += sum(header_pixels(data, f"{field}[{index}]", limits) for index, data in enumerate(given))
    if not (request.liked or request.disliked):
        check_user_id(request.user_id)
    check_request_pixels(pixels, limits)


def decode_score(request: metric_pb2.ScoreRequest, limits: Limits, max_context: int | None,
                 processing: ImageProcessing | None = None) -> ScoreCheck:
    """Every query processed before any scoring starts; of an inline context only the first max_context liked
    and disliked images (what the metric uses: its max pairs; None = all). The first bad image is named in the
    order queries, liked, disliked."""
    groups = {"queries": request.queries}
    if request.liked or request.disliked:
        groups.update(liked=request.liked[:max_context], disliked=request.disliked[:max_context])
    datas = [data for images in groups.values() for data in images]
    fields = [f"{field}[{index}]" for field, images in groups.items() for index in range(len(images))]
    processed = iter(process_images(datas, fields, limits, processing))
    checked = {field: [next(processed) for _ in images] for field, images in groups.items()}
    return ScoreCheck(user_id=request.user_id, queries=checked["queries"], liked=checked.get("liked"),
                      disliked=checked.get("disliked"))


def _check_range(field: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise InvalidRequest(f"{field}: {value:g} is out of range [{low:g}, {high:g}]")
