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


class Change(str, enum.Enum):
    """What made a version of a profile."""

    EXTRACT = "extract"
    ADD = "add"
    REMOVE = "remove"
    UPDATE = "update"
    RESTORE = "restore"
    IMPORT = "import"
    UNKNOWN = "unknown"  # versions stored before history was kept (the profile_versions migration)


@dataclass(frozen=True)
class ProfileVersion(StoredProfile):
    """One kept version of a profile: its content as it was, and what made it.

    updated_at is when this version was made; created_at the profile's, as it was then.
    """

    change: Change = Change.UNKNOWN


# --- what the operator's commands (viper-profiles) read about a database as a whole


@dataclass(frozen=True)
class AppliedMigration:
    version: int  # 1-based: the schema version this migration brought the database to
    name: str


@dataclass(frozen=True)
class SchemaStatus:
    """A database's migrations against this code's."""

    applied: tuple[str, ...]  # the migrations the database has had, in order ("#N" where it cannot name them)
    known: tuple[str, ...]  # this code's migrations, in order

    @property
    def version(self) -> int:
        return len(self.applied)

    @property
    def latest(self) -> int:
        return len(self.known)

    @property
    def pending(self) -> tuple[str, ...]:
        return self.known[len(self.applied):]

    @property
    def current(self) -> bool:
        return self.applied == self.known

    def refusal(self) -> str | None:
        """Why this code must not open (or migrate) the database: a newer schema, or other migrations."""
        if self.version > self.latest:
            return (f"schema version {self.version} is newer than this code's ({self.latest}): "
                    "upgrade viper-serve-profiles")
        if self.applied != self.known[: self.version]:
            return f"the database's migrations {list(self.applied)} are not this code's {list(self.known)}"
        return None

    def problem(self) -> str | None:
        if refusal := self.refusal():
            return refusal
        if self.pending:
            return (f"schema version {self.version} of {self.latest}: {len(self.pending)} migration(s) pending "
                    f"({', '.join(self.pending)}); run `viper-profiles migrate`")
        return None


@dataclass(frozen=True)
class RowCheck:
    """Rows that break the store's invariants (each count 0 in a healthy database)."""

    orphaned_images: int  # image rows no profile or kept version references (a delete or re-extraction removes them)
    orphaned_image_bytes: int
    stray_references: int  # image references of users without a profile (a deleted user's leftovers)
    stray_users: int  # the users those belong to
    missing_images: int  # image references whose image row is gone
    unversioned_profiles: int  # profiles whose last given version is missing or below theirs: versions may repeat

    def problems(self) -> list[str]:
        problems = []
        if self.orphaned_images:
            problems.append(f"{self.orphaned_images} orphaned image(s), {self.orphaned_image_bytes} bytes: "
                            "stored images no profile or kept version references")
        if self.stray_references:
            problems.append(f"{self.stray_references} stray image reference(s) of {self.stray_users} user(s) "
                            "without a profile (rows left behind by deleted users)")
        if self.missing_images:
            problems.append(f"{self.missing_images} image reference(s) to an image that is not stored")
        if self.unversioned_profiles:
            problems.append(f"{self.unversioned_profiles} profile(s) above their user's last given version "
                            "(last_versions): a later version could repeat")
        return problems


@dataclass(frozen=True)
class StoreStats:
    users: int  # users with a profile
    deleted_users: int  # users who had one (their last version is kept) and have none now
    versions: int  # versions given so far, all users together, deletes included
    images: int  # distinct stored images (content-addressed)
    image_bytes: int
    image_references: int  # (profile, image) pairs
    shared_images: int  # images used by more than one profile
    database_bytes: int  # the database's size on disk (SQLite: the main file, without its WAL)
