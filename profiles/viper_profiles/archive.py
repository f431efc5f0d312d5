"""Profile archives (data portability): a zip with `profile.json` and `images/<sha256>.<ext>`.

`build_archive` writes one from the store (every kept version, through the facade); `read_archive`
reads one from an untrusted source, checking everything before anything is stored: its size, every
entry's name (no paths of its own: nothing is ever extracted to disk), the unpacked sizes (a zip bomb is
refused before it is inflated), the format version, every field's type, and each image's bytes
against its sha256. The format is documented in docs/profile-archive.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .records import Change, ImageRef, ProfileVersion, Rating, StoredProfile
from .store import ProfileStore
from .tenants import DEFAULT_TENANT

FORMAT = "viper-profile-archive"
FORMAT_VERSION = 1
PROFILE_JSON = "profile.json"
_IMAGE_NAME = re.compile(r"images/([0-9a-f]{64})\.(png|jpg|webp|bin)")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Bounds a reader applies unless told otherwise.
DEFAULT_MAX_ARCHIVE_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_UNPACKED_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_VERSIONS = 10_000
DEFAULT_MAX_IMAGES = 10_000
MAX_PROFILE_JSON_BYTES = 32 * 1024 * 1024
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the same profile always makes the same archive bytes


class InvalidArchive(ValueError):
    """The archive is truncated, too large, hostile or not one this code reads; nothing was stored."""


@dataclass(frozen=True)
class Archive:
    user_id: str  # whose profile it was exported from
    versions: list[ProfileVersion]  # oldest first
    images: dict[str, bytes] = field(repr=False)  # sha256 -> bytes


def build_archive(store: ProfileStore, user_id: str, *, tenant: str = DEFAULT_TENANT) -> bytes:
    """The user's profile, every kept version with its images, as archive bytes (ProfileNotFound if none)."""
    versions, images = store.export_versions(user_id, tenant=tenant)
    return write_archive(user_id, versions, images)


def import_archive(store: ProfileStore, user_id: str, archive: Archive, *, replace: bool = False,
                   tenant: str = DEFAULT_TENANT) -> StoredProfile:
    """Stores a read archive as the user's profile, every version kept (see ProfileStore.import_versions)."""
    return store.import_versions(user_id, archive.versions, archive.images, replace=replace, tenant=tenant)


def write_archive(user_id: str, versions: list[ProfileVersion], images: Mapping[str, bytes]) -> bytes:
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "user_id": user_id,
        "versions": [_version_json(version, images) for version in versions],
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(zipfile.ZipInfo(PROFILE_JSON, _FIXED_TIME),
                         json.dumps(document, indent=1, ensure_ascii=False).encode(), zipfile.ZIP_DEFLATED)
        for sha, data in sorted(images.items()):
            # Images are compressed already (PNG, JPEG, WebP): stored as they are.
            archive.writestr(zipfile.ZipInfo(f"images/{sha}.{_extension(data)}", _FIXED_TIME), data)
    return buffer.getvalue()


def read_archive(data: bytes, *, max_archive_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES,
                 max_unpacked_bytes: int = DEFAULT_MAX_UNPACKED_BYTES, max_versions: int = DEFAULT_MAX_VERSIONS,
                 max_images: int = DEFAULT_MAX_IMAGES) -> Archive:
    """The archive's content, every part checked; InvalidArchive saying what is wrong otherwise."""
    if len(data) > max_archive_bytes:
        raise InvalidArchive(f"archive: {len(data)} bytes, at most {max_archive_bytes}")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            files = _read_entries(archive, max_unpacked_bytes, max_images)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, RuntimeError, NotImplementedError) as exc:
        raise InvalidArchive(f"archive: not a readable zip ({exc})") from None
    if PROFILE_JSON not in files:
        raise InvalidArchive(f"archive: no {PROFILE_JSON}")
    try:
        document = json.loads(files.pop(PROFILE_JSON).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArchive(f"{PROFILE_JSON}: not JSON ({exc})") from None
    images = _check_images(files)
    user_id, versions = _parse_document(document, max_versions)
    used = {image.sha256 for version in versions for image in version.images}
    if missing := used - images.keys():
        raise InvalidArchive(f"{PROFILE_JSON}: image {sorted(missing)[0]} is not in the archive")
    if unused := images.keys() - used:
        raise InvalidArchive(f"images/{sorted(unused)[0]}: not used by any version")
    return Archive(user_id=user_id, versions=versions, images=images)


def _read_entries(archive: zipfile.ZipFile, max_unpacked_bytes: int, max_images: int) -> dict[str, bytes]:
    entries = archive.infolist()
    if len(entries) > max_images + 1:
        raise InvalidArchive(f"archive: {len(entries)} entries, at most {max_images + 1}")
    names = [entry.filename for entry in entries]
    if len(set(names)) != len(names):
        raise InvalidArchive("archive: an entry name repeats")
    declared = 0
    for entry in entries:
        # Only these exact names: no directories, no "..", no absolute or backslashed paths.
        if entry.filename != PROFILE_JSON and not _IMAGE_NAME.fullmatch(entry.filename):
            raise InvalidArchive(f"archive: unexpected entry {entry.filename[:80]!r}")
        if entry.flag_bits & 0x1:
            raise InvalidArchive(f"{entry.filename}: encrypted")
        declared += entry.file_size
    if declared > max_unpacked_bytes:
        raise InvalidArchive(f"archive: unpacks to {declared} bytes, at most {max_unpacked_bytes}")
    files = {}
    for entry in entries:
        # Read no further than the size the entry declares (a lying header cannot make us inflate more);
        # zipfile checks the CRC at the end of each entry.
        with archive.open(entry) as member:
            content = member.read(entry.file_size + 1)
        if len(content) != entry.file_size:
            raise InvalidArchive(f"{entry.filename}: not the size its header declares")
        files[entry.filename] = content
    if len(files.get(PROFILE_JSON, b"")) > MAX_PROFILE_JSON_BYTES:
        raise InvalidArchive(f"{PROFILE_JSON}: larger than {MAX_PROFILE_JSON_BYTES} bytes")
    return files


def _check_images(files: dict[str, bytes]) -> dict[str, bytes]:
    images = {}
    for name, content in files.items():
        sha = _IMAGE_NAME.fullmatch(name).group(1)
        if sha in images:
            raise InvalidArchive(f"images/{sha}: stored twice")
        if hashlib.sha256(content).hexdigest() != sha:
            raise InvalidArchive(f"{name}: its bytes do not match its sha256")
        images[sha] = content
    return images


def _parse_document(document: Any, max_versions: int) -> tuple[str, list[ProfileVersion]]:
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise InvalidArchive(f"{PROFILE_JSON}: not a {FORMAT}")
    if document.get("format_version") != FORMAT_VERSION:
        raise InvalidArchive(f"{PROFILE_JSON}: unknown format_version {str(document.get('format_version'))[:20]!r} "
                             f"(this code reads {FORMAT_VERSION})")
    user_id = _typed(document, "user_id", str, "")
    versions = _typed(document, "versions", list, "")
    if not 1 <= len(versions) <= max_versions:
        raise InvalidArchive(f"versions: {len(versions)} given, 1 to {max_versions} allowed")
    parsed = [_parse_version(version, f"versions[{index}]") for index, version in enumerate(versions)]
    numbers = [version.version for version in parsed]
    if numbers != sorted(set(numbers)):
        raise InvalidArchive("versions: not in increasing version order")
    return user_id, parsed


def _parse_version(value: Any, where: str) -> ProfileVersion:
    if not isinstance(value, dict):
        raise InvalidArchive(f"{where}: not an object")
    images = _typed(value, "images", list, where)
    refs = [_parse_image(image, f"{where}.images[{index}]") for index, image in enumerate(images)]
    if [ref.position for ref in refs] != list(range(len(refs))):
        raise InvalidArchive(f"{where}.images: positions are not 0, 1, 2, ... in order")
    try:
        change = Change(_typed(value, "change", str, where))
    except ValueError:
        raise InvalidArchive(f"{where}.change: not one of {[c.value for c in Change]}") from None
    version = _typed(value, "version", int, where)
    if version < 1:
        raise InvalidArchive(f"{where}.version: must be at least 1")
    return ProfileVersion(
        user_id="",
        liked_features=_strings(value, "liked_features", where),
        disliked_features=_strings(value, "disliked_features", where),
        raw_text=_typed(value, "raw_text", str, where),
        version=version,
        extractor_model=_typed(value, "extractor_model", str, where),
        created_at=_time(value, "created_at", where),
        updated_at=_time(value, "updated_at", where),
        images=tuple(refs),
        change=change,
    )


def _parse_image(value: Any, where: str) -> ImageRef:
    if not isinstance(value, dict):
        raise InvalidArchive(f"{where}: not an object")
    sha = _typed(value, "sha256", str, where)
    if not _SHA256.fullmatch(sha):
        raise InvalidArchive(f"{where}.sha256: not a hex sha256")
    try:
        rating = Rating(_typed(value, "rating", str, where))
    except ValueError:
        raise InvalidArchive(f"{where}.rating: must be liked or disliked") from None
    return ImageRef(sha256=sha, comment=_typed(value, "comment", str, where), rating=rating,
                    position=_typed(value, "position", int, where))


def _typed(value: dict, key: str, kind: type, where: str) -> Any:
    item = value.get(key)
    # bool is an int in Python, never one here.
    if not isinstance(item, kind) or (kind is int and isinstance(item, bool)):
        raise InvalidArchive(f"{where + '.' if where else ''}{key}: missing or not a {kind.__name__}")
    return item


def _strings(value: dict, key: str, where: str) -> tuple[str, ...]:
    items = _typed(value, key, list, where)
    if not all(isinstance(item, str) for item in items):
        raise InvalidArchive(f"{where}.{key}: not a list of strings")
    return tuple(items)


def _time(value: dict, key: str, where: str) -> datetime:
    try:
        moment = datetime.fromisoformat(_typed(value, key, str, where))
    except ValueError:
        raise InvalidArchive(f"{where}.{key}: not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise InvalidArchive(f"{where}.{key}: has no time zone")
    return moment.astimezone(timezone.utc)


def _version_json(version: ProfileVersion, images: Mapping[str, bytes]) -> dict[str, Any]:
    return {
        "version": version.version,
        "change": version.change.value,
        "liked_features": list(version.liked_features),
        "disliked_features": list(version.disliked_features),
        "raw_text": version.raw_text,
        "extractor_model": version.extractor_model,
        "created_at": version.created_at.isoformat(timespec="microseconds"),
        "updated_at": version.updated_at.isoformat(timespec="microseconds"),
        "images": [
            {"sha256": image.sha256, "comment": image.comment, "rating": image.rating.value,
             "position": image.position, "file": f"images/{image.sha256}.{_extension(images[image.sha256])}"}
            for image in version.images
        ],
    }


def _extension(data: bytes) -> str:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "bin"
