"""What a database backend gives the store: transactions with a few row-level steps.

ProfileStore writes each operation once, against `Transaction`; a backend (sqlite/, postgres/) says how
each step is done in its database and how transactions are isolated:

- every step of a transaction acts on one tenant's rows (the tenant it was opened for); the user ids
  it names are that tenant's;
- a read sees one snapshot from its first statement to its end;
- a write starts with `lock_user` or `claim_version`, which hold off every other write of that user (in
  any process) until the transaction ends, so a check-then-write cannot interleave with another one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Protocol, TypeVar

from .records import (
    AppliedMigration,
    Change,
    ProfileVersion,
    RowCheck,
    SchemaStatus,
    StoredImage,
    StoredProfile,
    StoreStats,
)

T = TypeVar("T")


class Transaction(Protocol):
    # --- reads
    def find_profile(self, user_id: str) -> StoredProfile | None: ...

    def find_version(self, user_id: str) -> int | None:
        """The profile's current version; None if the user has no profile."""

    def list_profiles(self, after: str | None, limit: int) -> list[StoredProfile]:
        """Up to limit profiles of the transaction's tenant in byte order of user_id, after the given one."""

    def read_images(self, user_id: str) -> list[StoredImage]:
        """The profile's images with their bytes, by position; [] if there is no profile."""

    def count_profiles(self) -> int:
        """Profiles in every tenant."""

    def list_profile_versions(self, user_id: str, before: int | None, limit: int,
                              version: int | None = None) -> list[ProfileVersion]:
        """Up to limit kept versions of the user, newest first: below `before` if given, only `version` if given."""

    def read_version_images(self, user_id: str, version: int) -> list[StoredImage]:
        """A kept version's images with their bytes, by position."""

    def read_image_data(self, shas: Iterable[str]) -> dict[str, bytes]:
        """The stored bytes of these images (by sha256)."""

    # --- writes
    def lock_user(self, user_id: str) -> None:
        """Holds off every other write of this user until the transaction ends."""

    def claim_version(self, user_id: str) -> int:
        """One above the last version the user was ever given (deletes included), recorded as given.

        Also locks the user, like lock_user.
        """

    def put_profile(
        self,
        user_id: str,
        *,
        liked_features: Sequence[str],
        disliked_features: Sequence[str],
        raw_text: str,
        version: int,
        extractor_model: str,
        created_at: datetime,
        updated_at: datetime,
    ) -> None:
        """Inserts the profile row, or replaces every field of an existing one."""

    def update_profile(
        self,
        user_id: str,
        *,
        version: int,
        updated_at: datetime,
        liked_features: Sequence[str] | None,
        disliked_features: Sequence[str] | None,
    ) -> None:
        """Sets the version and updated_at, and each feature list that is not None."""

    def replace_images(self, user_id: str, images: Sequence[StoredImage]) -> None:
        """Makes `images` the profile's images: stores bytes not stored yet (content-addressed, shared
        between profiles), and deletes the images that no profile uses any more."""

    def delete_profile(self, user_id: str) -> None:
        """Deletes the profile row, every kept version of it, their image references and the images that no
        other profile or version uses."""

    def append_version(self, user_id: str, change: Change) -> None:
        """Copies the current profile (as the last write left it) and its image references into the history."""

    def prune_versions(self, user_id: str, keep: int) -> None:
        """Drops every kept version but the newest `keep`, and the images nothing uses any more."""

    # --- whole-database reads, for the operator's commands (viper-profiles)
    def integrity_problems(self) -> list[str]:
        """What the database's own checks find wrong (damaged pages, broken foreign keys); [] if nothing."""

    def check_rows(self) -> RowCheck: ...

    def stats(self) -> StoreStats: ...


class Backend(Protocol):
    def read(self, operation: Callable[[Transaction], T], tenant: str = ...) -> T:
        """Runs operation in a read-only transaction confined to the tenant."""

    def write(self, operation: Callable[[Transaction], T], tenant: str = ...) -> T:
        """Runs operation in a write transaction confined to the tenant: committed if it returns, rolled back
        if it raises.

        May run it again after a transient conflict, so it must have no effect outside the transaction.
        """

    def ping(self, timeout: float | None) -> None:
        """Raises StoreUnavailable unless the database answers a trivial query (within timeout, if given)."""

    def close(self) -> None:
        """Releases the connections; idempotent. Later calls raise StoreUnavailable."""

    def scrub(self) -> None:
        """After an erasure: makes the deleted bytes unreadable from the database's files where the backend
        can (SQLite: checkpoints and truncates the WAL); a no-op where it cannot."""

    # The migrations opening the database applied (none if it was current, or opened without migrating).
    applied_migrations: tuple[AppliedMigration, ...]

    def schema_status(self) -> SchemaStatus: ...

    def backup(self, target: Path) -> None:
        """Writes an online, consistent copy of the database to target (a new file), or raises
        BackupNotSupported where the database has its own tool for it."""
