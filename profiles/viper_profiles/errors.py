"""Exceptions raised by the profile store; the server maps each to a gRPC status."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error the profile store raises on purpose."""


class StoreUnavailable(StoreError):
    """The database cannot be reached right now (down, refusing connections, no pooled connection free, or
    locked past the timeout). Nothing was changed, or the outcome is unknown if it broke during a commit;
    the call may be retried. The server answers UNAVAILABLE."""


class InvalidText(StoreError, ValueError):
    """A text field holds a character the store cannot keep on every backend (NUL: PostgreSQL refuses it)."""

    def __init__(self, field: str) -> None:
        super().__init__(f"{field} contains a NUL character, which cannot be stored")
        self.field = field


class ProfileNotFound(StoreError):
    def __init__(self, user_id: str) -> None:
        super().__init__(f"no profile for user {user_id!r}")
        self.user_id = user_id


class VersionNotFound(StoreError):
    """The profile exists, but not that version of it (never made, or dropped by --keep-versions)."""

    def __init__(self, user_id: str, version: int) -> None:
        super().__init__(f"profile of user {quote_user_id(user_id)} has no version {version}")
        self.user_id = user_id
        self.version = version


class ProfileExists(StoreError):
    """An import would overwrite an existing profile, and replacing it was not asked for."""

    def __init__(self, user_id: str, version: int) -> None:
        super().__init__(f"user {quote_user_id(user_id)} has a profile already (version {version}); "
                         "set replace to overwrite it")
        self.user_id = user_id
        self.version = version


class VersionConflict(StoreError):
    """The caller's expected_version is stale: someone else changed the profile first."""

    def __init__(self, user_id: str, *, expected: int, actual: int) -> None:
        super().__init__(
            f"profile of user {user_id!r} is at version {actual}, expected {expected}"
        )
        self.user_id = user_id
        self.expected = expected
        self.actual = actual


def quote_user_id(user_id: object) -> str:
    """A possibly hostile id for messages and log lines: quoted, escaped, and only its start."""
    if isinstance(user_id, str) and len(user_id) > 40:
        return repr(user_id[:40]) + "..."
    return repr(user_id)


class InvalidUserId(StoreError, ValueError):
    def __init__(self, user_id: object, reason: str) -> None:
        # The message travels in gRPC trailers and log lines: never the whole id.
        super().__init__(f"invalid user_id {quote_user_id(user_id)}: {reason}")
        self.user_id = user_id


class StoreNotFound(StoreError):
    """There is no database to open as it is (open_store(..., migrate=False)): for SQLite, no such file.
    Only opening with migration creates one."""


class BackupNotSupported(StoreError):
    """ProfileStore.backup on a backend whose database has its own backup tool (PostgreSQL: pg_dump)."""
