"""ProfileStore: users' preference profiles and their source images, in SQLite or PostgreSQL.

The facade holds what the operations mean (validation, versions, optimistic concurrency); a backend
(sqlite/, postgres/) holds how its database stores rows and isolates transactions. `open_store(url)`
picks the backend from the URL.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .backend import Backend, Transaction
from .errors import InvalidText, ProfileExists, ProfileNotFound, VersionConflict, VersionNotFound
from .records import (
    AppliedMigration,
    Change,
    ProfileVersion,
    Rating,
    RowCheck,
    SchemaStatus,
    SourceImage,
    StoredImage,
    StoredProfile,
    StoreStats,
)
from .tenants import DEFAULT_TENANT, validate_tenant
from .user_ids import validate_user_id

# How long an operation waits for the database (SQLite: another process's write lock; PostgreSQL: a
# pooled connection or a row lock) before raising StoreUnavailable.
DEFAULT_TIMEOUT = 5.0
# Most PostgreSQL connections one store opens (SQLite: always one).
DEFAULT_POOL_SIZE = 10
# Where the server and viper-profiles read the database URL from when --db is not given, and its default.
DB_ENV = "VIPER_DB"
DEFAULT_DB = "var/profiles.db"

_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def open_store(url: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT,
               pool_size: int = DEFAULT_POOL_SIZE, migrate: bool = True,
               keep_versions: int | None = None) -> ProfileStore:
    """Opens (creating and migrating if needed) the store at url.

    - a plain path, or `sqlite:///relative/path`, `sqlite:////absolute/path` -> SQLite;
    - `postgresql://user:password@host:port/dbname` (or `postgres://`, any libpq URL) -> PostgreSQL.

    migrate=False opens the database as it is, for inspection: nothing is created or migrated (a missing
    SQLite file raises StoreNotFound), and only the operator's reads (schema_status, integrity_problems,
    check_rows, stats, backup) are meant for a database whose schema_status is not current.

    keep_versions: how many versions of each profile the history keeps (None: all of them).

    Raises StoreUnavailable if the database cannot be reached within `timeout` seconds, StoreError if
    its schema is newer than this code, ValueError for a URL of another kind.
    """
    return ProfileStore(url, timeout=timeout, pool_size=pool_size, migrate=migrate, keep_versions=keep_versions)


def _open_backend(url: str | os.PathLike[str], *, timeout: float, pool_size: int, migrate: bool = True) -> Backend:
    if isinstance(url, os.PathLike) or not (match := _URL_SCHEME.match(url)):
        return _sqlite(Path(url), timeout, migrate)
    scheme = match.group(1).lower()
    if scheme == "sqlite":
        # As SQLAlchemy spells it: the path is what follows the third slash.
        parts = urlsplit(url)
        if parts.netloc or len(parts.path) < 2:
            raise ValueError("a SQLite URL is sqlite:///relative/path or sqlite:////absolute/path")
        return _sqlite(Path(unquote(parts.path[1:])), timeout, migrate)
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresBackend  # psycopg is imported only when used

        return PostgresBackend(url, timeout=timeout, pool_size=pool_size, migrate_schema=migrate)
    raise ValueError(f"unsupported database URL scheme {scheme!r}: use a path, sqlite:/// or postgresql://")


def _sqlite(path: Path, timeout: float, migrate: bool = True) -> Backend:
    from .sqlite import SqliteBackend

    return SqliteBackend(path, timeout=timeout, migrate_schema=migrate)


class ProfileStore:
    """Stores one profile per user, with the images it was extracted from.

    Every method is one transaction, and safe to call from several threads and processes at once.
    A user's versions only ever go up, across deletes and processes: after a delete, the next
    extraction continues above the last version the user was given, so a version (and an
    expected_version) always names one content. Database unreachable -> StoreUnavailable.
    Every operation on a profile acts in one tenant (`tenant=`, default DEFAULT_TENANT): a tenant's
    profiles, versions and listing are its own.
    Every write appends the version it makes to the profile's history (a ProfileVersion: its content, its
    images by reference, and what made it), keeping the newest `keep_versions` (None: all); an image's bytes
    are stored once, and kept while any profile or kept version uses them. A delete erases the history too.
    `ProfileStore(url)` is `open_store(url)`.
    """

    def __init__(self, url: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT,
                 pool_size: int = DEFAULT_POOL_SIZE, migrate: bool = True, keep_versions: int | None = None) -> None:
        if keep_versions is not None and keep_versions < 1:
            raise ValueError(f"keep_versions must be at least 1, got {keep_versions}")
        self._keep_versions = keep_versions
        self._backend = _open_backend(url, timeout=timeout, pool_size=pool_size, migrate=migrate)

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> ProfileStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def ping(self, timeout: float | None = None) -> None:
        """Raises StoreUnavailable unless the database answers a trivial query; for health checks.

        timeout: how long to wait for a pooled PostgreSQL connection (default: the store's timeout).
        """
        self._backend.ping(timeout)

    def save_extraction(
        self,
        user_id: str,
        *,
        liked_features: Sequence[str],
        disliked_features: Sequence[str],
        raw_text: str,
        extractor_model: str,
        images: Sequence[SourceImage],
        tenant: str = DEFAULT_TENANT,
        change: Change = Change.EXTRACT,
        expected_version: int | None = None,
    ) -> StoredProfile:
        """Creates the user's profile, or replaces all of it (features, text, images).

        The version goes one above the last the user was ever given; created_at is kept from the
        first save of the current profile. change: what the history records as having made it.
        expected_version: VersionConflict unless the current version is this (0: unless there is no profile).
        """
        validate_user_id(user_id)
        validate_tenant(tenant)
        liked, disliked = _feature_list(liked_features, "liked"), _feature_list(disliked_features, "disliked")
        _check_text(raw_text, "raw_text")
        _check_text(extractor_model, "extractor_model")
        # Hash outside the transaction: it is the only per-byte work of a save.
        stored = [
            StoredImage(
                sha256=hashlib.sha256(image.data).hexdigest(),
                comment=_check_text(image.comment, f"images[{position}].comment"),
                rating=Rating(image.rating),
                position=position,
                data=bytes(image.data),
            )
            for position, image in enumerate(images)
        ]
        now = _utc_now()

        def save(tx: Transaction) -> StoredProfile:
            # Claimed first: it locks the user even when no row exists yet, so the check below sees every
            # write of this user committed before (raising rolls the claim back).
            version = tx.claim_version(user_id)
            previous = tx.find_profile(user_id)
            if expected_version is not None and (current := previous.version if previous else 0) != expected_version:
                raise VersionConflict(user_id, expected=expected_version, actual=current)
            tx.put_profile(
                user_id,
                liked_features=liked,
                disliked_features=disliked,
                raw_text=raw_text,
                version=version,
                extractor_model=extractor_model,
                created_at=previous.created_at if previous else now,
                updated_at=now,
            )
            tx.replace_images(user_id, stored)
            return self._record(tx, user_id, change)

        return self._backend.write(save, tenant)

    def get(self, user_id: str, *, tenant: str = DEFAULT_TENANT) -> StoredProfile:
        validate_user_id(user_id)
        return self._backend.read(lambda tx: _found(tx.find_profile(user_id), user_id), validate_tenant(tenant))

    def list(self, *, page_size: int, after: str | None = None, tenant: str = DEFAULT_TENANT) -> list[StoredProfile]:
        """Up to page_size profiles of the tenant in byte order of user_id, starting after the given user_id."""
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        # `after` is only a bound to compare with, so it needs no user_id validation.
        return self._backend.read(lambda tx: tx.list_profiles(after, page_size), validate_tenant(tenant))

    def update_features(
        self,
        user_id: str,
        *,
        liked_features: Sequence[str] | None = None,
        disliked_features: Sequence[str] | None = None,
        expected_version: int | None = None,
        tenant: str = DEFAULT_TENANT,
    ) -> StoredProfile:
        """Replaces the given feature lists (None keeps one); the version goes up by one."""
        validate_user_id(user_id)
        validate_tenant(tenant)
        liked = None if liked_features is None else _feature_list(liked_features, "liked")
        disliked = None if disliked_features is None else _feature_list(disliked_features, "disliked")
        now = _utc_now()

        def update(tx: Transaction) -> StoredProfile:
            _checked_version(tx, user_id, expected_version)
            tx.update_profile(
                user_id,
                version=tx.claim_version(user_id),
                updated_at=now,
                liked_features=liked,
                disliked_features=disliked,
            )
            return self._record(tx, user_id, Change.UPDATE)

        return self._backend.write(update, tenant)

    def delete(self, user_id: str, *, expected_version: int | None = None, tenant: str = DEFAULT_TENANT) -> int:
        """Erases the profile with every kept version, and every image of them that no other profile or version
        uses; returns the deleted version. The backend then scrubs what it can of the deleted bytes (SQLite:
        secure_delete zeroes the freed pages, and the WAL is checkpointed and truncated)."""
        validate_user_id(user_id)
        validate_tenant(tenant)

        def delete(tx: Transaction) -> int:
            version = _checked_version(tx, user_id, expected_version)
            tx.delete_profile(user_id)
            return version

        deleted = self._backend.write(delete, tenant)
        self._backend.scrub()
        return deleted

    # --- history

    def list_versions(self, user_id: str, *, page_size: int, before: int | None = None,
                      tenant: str = DEFAULT_TENANT) -> list[ProfileVersion]:
        """Up to page_size kept versions, newest first, below the version `before` if given.

        ProfileNotFound if the user has no profile (a deleted profile has no history)."""
        validate_user_id(user_id)
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")

        def read(tx: Transaction) -> list[ProfileVersion]:
            if tx.find_version(user_id) is None:
                raise ProfileNotFound(user_id)
            return tx.list_profile_versions(user_id, before, page_size)

        return self._backend.read(read, validate_tenant(tenant))

    def get_version(self, user_id: str, version: int, *, tenant: str = DEFAULT_TENANT) -> ProfileVersion:
        """A kept version; ProfileNotFound without a profile, VersionNotFound if that version is not kept."""
        validate_user_id(user_id)
        return self._backend.read(lambda tx: _kept(tx, user_id, version), validate_tenant(tenant))

    def restore_version(self, user_id: str, version: int, *, expected_version: int | None = None,
                        tenant: str = DEFAULT_TENANT) -> StoredProfile:
        """Makes a new version with a kept version's features, text, extractor and images (no re-extraction)."""
        validate_user_id(user_id)
        validate_tenant(tenant)
        now = _utc_now()

        def restore(tx: Transaction) -> StoredProfile:
            _checked_version(tx, user_id, expected_version)
            old = _kept(tx, user_id, version)
            images = tx.read_version_images(user_id, version)
            created_at = tx.find_profile(user_id).created_at
            self._put(tx, user_id, old, images, created_at=created_at, updated_at=now)
            return self._record(tx, user_id, Change.RESTORE)

        return self._backend.write(restore, tenant)

    def export_versions(self, user_id: str, *,
                        tenant: str = DEFAULT_TENANT) -> tuple[list[ProfileVersion], dict[str, bytes]]:
        """Every kept version (oldest first) and the bytes of every image they use, from one snapshot."""
        validate_user_id(user_id)

        def read(tx: Transaction) -> tuple[list[ProfileVersion], dict[str, bytes]]:
            if tx.find_version(user_id) is None:
                raise ProfileNotFound(user_id)
            versions = tx.list_profile_versions(user_id, None, 2**62)[::-1]
            return versions, tx.read_image_data({image.sha256 for v in versions for image in v.images})

        return self._backend.read(read, validate_tenant(tenant))

    def import_versions(self, user_id: str, versions: Sequence[ProfileVersion], images: Mapping[str, bytes], *,
                        replace: bool = False, tenant: str = DEFAULT_TENANT) -> StoredProfile:
        """Creates the profile from versions (oldest first; their own version numbers are not kept: each gets
        the user's next one) whose images' bytes are in `images`. The last becomes the current profile,
        recorded as made by an import. ProfileExists if the user has a profile, unless replace (which erases
        it first, history included)."""
        validate_user_id(user_id)
        validate_tenant(tenant)
        if not versions:
            raise ValueError("an import needs at least one version")
        # Each image hashed once, however many versions use it.
        matching = {sha for sha, data in images.items() if hashlib.sha256(data).hexdigest() == sha}
        checked = [_checked_import(version, images, matching) for version in versions]
        now = _utc_now()

        def write(tx: Transaction) -> StoredProfile:
            tx.lock_user(user_id)
            current = tx.find_version(user_id)
            if current is not None and not replace:
                raise ProfileExists(user_id, current)
            if current is not None:
                tx.delete_profile(user_id)
            for number, (version, stored) in enumerate(checked, start=1):
                last = number == len(checked)
                self._put(tx, user_id, version, stored, created_at=version.created_at,
                          updated_at=now if last else version.updated_at)
                profile = self._record(tx, user_id, Change.IMPORT if last else version.change)
            return profile

        profile = self._backend.write(write, tenant)
        if replace:
            self._backend.scrub()
        return profile

    def _put(self, tx: Transaction, user_id: str, content: StoredProfile, images: Sequence[StoredImage], *,
             created_at: datetime, updated_at: datetime) -> None:
        tx.put_profile(
            user_id, liked_features=content.liked_features, disliked_features=content.disliked_features,
            raw_text=content.raw_text, version=tx.claim_version(user_id), extractor_model=content.extractor_model,
            created_at=created_at, updated_at=updated_at,
        )
        tx.replace_images(user_id, images)

    def _record(self, tx: Transaction, user_id: str, change: Change) -> StoredProfile:
        """Appends the version a write just made to the history (trimmed to keep_versions); returns it."""
        tx.append_version(user_id, change)
        if self._keep_versions is not None:
            tx.prune_versions(user_id, self._keep_versions)
        return tx.find_profile(user_id)

    def get_with_images(self, user_id: str, *, tenant: str = DEFAULT_TENANT) -> tuple[StoredProfile, list[StoredImage]]:
        """The profile and its images (with their bytes, by position) from one snapshot: the images are
        exactly those of that version."""
        validate_user_id(user_id)
        return self._backend.read(
            lambda tx: (_found(tx.find_profile(user_id), user_id), tx.read_images(user_id)), validate_tenant(tenant)
        )

    def image_data(self, user_id: str, shas: Iterable[str], *, tenant: str = DEFAULT_TENANT) -> dict[str, bytes]:
        """The bytes of the user's current images named by shas (ProfileNotFound without a profile). A sha256
        names its bytes exactly, so bytes read after the profile row are those of the images it listed; one the
        profile no longer has (it changed since) is left out."""
        validate_user_id(user_id)

        def read(tx: Transaction) -> dict[str, bytes]:
            mine = {image.sha256 for image in _found(tx.find_profile(user_id), user_id).images}
            return tx.read_image_data(mine.intersection(shas))

        return self._backend.read(read, validate_tenant(tenant))

    def count(self) -> int:
        """Profiles in every tenant."""
        return self._backend.read(lambda tx: tx.count_profiles())

    # --- the operator's view of the whole database (viper-profiles)

    @property
    def applied_migrations(self) -> tuple[AppliedMigration, ...]:
        """The migrations opening this store applied, in order: none if the schema was current already (or
        another process migrated it first), or if it was opened with migrate=False."""
        return self._backend.applied_migrations

    def schema_status(self) -> SchemaStatus:
        return self._backend.schema_status()

    def integrity_problems(self) -> list[str]:
        """What the database's own checks find wrong (SQLite: integrity_check, foreign_key_check; PostgreSQL:
        foreign keys not enforced, checksum failures); [] if nothing."""
        return self._backend.read(lambda tx: tx.integrity_problems())

    def check_rows(self) -> RowCheck:
        """Rows breaking the store's invariants (orphaned images, stray rows of deleted users...); needs a
        current schema."""
        return self._backend.read(lambda tx: tx.check_rows())

    def stats(self) -> StoreStats:
        """Counts and sizes, from one snapshot; needs a current schema."""
        return self._backend.read(lambda tx: tx.stats())

    def backup(self, target: str | os.PathLike[str]) -> None:
        """Writes an online, consistent copy to target (replaced if it exists). SQLite only: PostgreSQL
        raises BackupNotSupported (use pg_dump)."""
        self._backend.backup(Path(target))


def _checked_version(tx: Transaction, user_id: str, expected_version: int | None) -> int:
    """Locks the user, then returns the stored version after checking it against expected_version."""
    tx.lock_user(user_id)
    version = tx.find_version(user_id)
    if version is None:
        raise ProfileNotFound(user_id)
    if expected_version is not None and expected_version != version:
        raise VersionConflict(user_id, expected=expected_version, actual=version)
    return version


def _kept(tx: Transaction, user_id: str, version: int) -> ProfileVersion:
    if tx.find_version(user_id) is None:
        raise ProfileNotFound(user_id)
    found = tx.list_profile_versions(user_id, None, 1, version=version)
    if not found:
        raise VersionNotFound(user_id, version)
    return found[0]


def _checked_import(version: ProfileVersion, images: Mapping[str, bytes],
                    matching: set[str]) -> tuple[ProfileVersion, list[StoredImage]]:
    """A version to import with its images' bytes; matching: the shas whose bytes hash to them."""
    _feature_list(version.liked_features, "liked")
    _feature_list(version.disliked_features, "disliked")
    _check_text(version.raw_text, "raw_text")
    _check_text(version.extractor_model, "extractor_model")
    stored = []
    for position, ref in enumerate(version.images):
        data = images.get(ref.sha256)
        if data is None or ref.sha256 not in matching:
            raise ValueError(f"image {ref.sha256[:16]}... is missing or does not match its sha256")
        stored.append(StoredImage(sha256=ref.sha256, comment=_check_text(ref.comment, "comment"),
                                  rating=Rating(ref.rating), position=position, data=bytes(data)))
    return version, stored


def _found(profile: StoredProfile | None, user_id: str) -> StoredProfile:
    if profile is None:
        raise ProfileNotFound(user_id)
    return profile


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _check_text(text: str, field: str) -> str:
    if "\x00" in text:
        raise InvalidText(field)
    return text


def _feature_list(features: Iterable[str], name: str) -> tuple[str, ...]:
    # A bare string is a Sequence[str] too; storing its characters would be a silent bug.
    if isinstance(features, str):
        raise TypeError("feature lists must be sequences of strings, not a string")
    features = tuple(features)
    for index, feature in enumerate(features):
        _check_text(feature, f"{name}_features[{index}]")
    return features
