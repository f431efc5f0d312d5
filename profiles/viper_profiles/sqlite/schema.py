"""The SQLite tables and the ordered migrations that build them.

PRAGMA user_version holds how many of MIGRATIONS a database has had. Append new
migrations at the end; never edit or reorder released ones. postgres/schema.py
keeps the same list, numbered alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sqlite_utils import Database

from ..errors import StoreError
from ..records import AppliedMigration, SchemaStatus
from .connection import transaction

Migration = Callable[[Database], None]


def _create_profile_tables(db: Database) -> None:
    db["profiles"].create(
        {
            "user_id": str,
            "liked_features": str,  # JSON list of strings
            "disliked_features": str,  # JSON list of strings
            "raw_text": str,
            "version": int,
            "extractor_model": str,
            "created_at": str,  # ISO 8601 UTC with microseconds
            "updated_at": str,
        },
        pk="user_id",
        not_null=[
            "liked_features",
            "disliked_features",
            "raw_text",
            "version",
            "extractor_model",
            "created_at",
            "updated_at",
        ],
        strict=True,
    )
    # Content-addressed: one row per distinct upload, shared by every profile using it.
    db["images"].create(
        {"sha256": str, "data": bytes}, pk="sha256", not_null=["data"], strict=True
    )
    db["profile_images"].create(
        {"user_id": str, "position": int, "sha256": str, "comment": str, "rating": str},
        pk=("user_id", "position"),
        foreign_keys=[("user_id", "profiles", "user_id"), ("sha256", "images", "sha256")],
        not_null=["sha256", "comment", "rating"],
        strict=True,
    )
    # Every write that drops references looks up the remaining users of an image by sha256.
    db["profile_images"].create_index(["sha256"])


def _create_last_versions(db: Database) -> None:
    # The last version each user was given, kept when the profile is deleted: versions never repeat.
    db["last_versions"].create({"user_id": str, "version": int}, pk="user_id", not_null=["version"], strict=True)
    # Deletes made before this migration left no trace: those users start again above nothing.
    db.execute("INSERT INTO last_versions (user_id, version) SELECT user_id, version FROM profiles")


def _add_tenants(db: Database) -> None:
    # A primary key cannot be altered in SQLite: each table is rebuilt with tenant in its key, and every row
    # stored so far moves into the tenant "default". Dropping the referencing table first keeps the foreign
    # keys satisfied throughout; RENAME rewrites the references to the new tables' final names.
    db.execute(
        """
        CREATE TABLE profiles_new (
            tenant TEXT NOT NULL, user_id TEXT NOT NULL, liked_features TEXT NOT NULL,
            disliked_features TEXT NOT NULL, raw_text TEXT NOT NULL, version INTEGER NOT NULL,
            extractor_model TEXT NOT NULL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
            PRIMARY KEY (tenant, user_id)
        ) STRICT
        """
    )
    db.execute(
        """
        CREATE TABLE profile_images_new (
            tenant TEXT NOT NULL, user_id TEXT NOT NULL, position INTEGER NOT NULL,
            sha256 TEXT NOT NULL REFERENCES images (sha256), comment TEXT NOT NULL, rating TEXT NOT NULL,
            PRIMARY KEY (tenant, user_id, position),
            FOREIGN KEY (tenant, user_id) REFERENCES profiles_new (tenant, user_id)
        ) STRICT
        """
    )
    db.execute(
        """
        CREATE TABLE last_versions_new (
            tenant TEXT NOT NULL, user_id TEXT NOT NULL, version INTEGER NOT NULL, PRIMARY KEY (tenant, user_id)
        ) STRICT
        """
    )
    for table in ("profiles", "profile_images", "last_versions"):
        db.execute(f"INSERT INTO {table}_new SELECT 'default', * FROM {table}")
    for table in ("profile_images", "profiles", "last_versions"):
        db.execute(f"DROP TABLE {table}")
        db.execute(f"ALTER TABLE {table}_new RENAME TO {table}")
    db.execute("CREATE INDEX idx_profile_images_sha256 ON profile_images (sha256)")


def _add_profile_versions(db: Database) -> None:
    # Every kept version of a profile, with its images (by reference: the bytes stay in `images`, once).
    db.execute(
        """
        CREATE TABLE profile_versions (
            tenant TEXT NOT NULL, user_id TEXT NOT NULL, version INTEGER NOT NULL, liked_features TEXT NOT NULL,
            disliked_features TEXT NOT NULL, raw_text TEXT NOT NULL, extractor_model TEXT NOT NULL,
            created_at TEXT NOT NULL, updated_at TEXT NOT NULL, made_by TEXT NOT NULL,
            PRIMARY KEY (tenant, user_id, version)
        ) STRICT
        """
    )
    db.execute(
        """
        CREATE TABLE version_images (
            tenant TEXT NOT NULL, user_id TEXT NOT NULL, version INTEGER NOT NULL, position INTEGER NOT NULL,
            sha256 TEXT NOT NULL REFERENCES images (sha256), comment TEXT NOT NULL, rating TEXT NOT NULL,
            PRIMARY KEY (tenant, user_id, version, position),
            FOREIGN KEY (tenant, user_id, version) REFERENCES profile_versions (tenant, user_id, version)
        ) STRICT
        """
    )
    db.execute("CREATE INDEX idx_version_images_sha256 ON version_images (sha256)")
    # Each existing profile's current version becomes its first history row; what made it is not known.
    db.execute(
        """
        INSERT INTO profile_versions SELECT tenant, user_id, version, liked_features, disliked_features, raw_text,
            extractor_model, created_at, updated_at, 'unknown' FROM profiles
        """
    )
    db.execute(
        """
        INSERT INTO version_images SELECT tenant, user_id, profiles.version, position, sha256, comment, rating
        FROM profile_images JOIN profiles USING (tenant, user_id)
        """
    )


MIGRATIONS: tuple[Migration, ...] = (
    _create_profile_tables, _create_last_versions, _add_tenants, _add_profile_versions,
)


def schema_version(db: Database) -> int:
    return db.execute("PRAGMA user_version").fetchone()[0]


def migration_name(migration: Migration) -> str:
    return migration.__name__.lstrip("_")


def schema_status(db: Database, migrations: Sequence[Migration] = MIGRATIONS) -> SchemaStatus:
    """user_version counts migrations without naming them: the first ones are this code's."""
    known = tuple(migration_name(migration) for migration in migrations)
    version = schema_version(db)
    applied = known[:version] + tuple(f"#{number}" for number in range(len(known) + 1, version + 1))
    return SchemaStatus(applied=applied, known=known)


def migrate(db: Database, migrations: Sequence[Migration] = MIGRATIONS) -> list[AppliedMigration]:
    """Applies the migrations the database has not had yet, in order.

    All of them and the version bump are one transaction (user_version is part of
    the database header, so it rolls back too): a failed upgrade leaves the file as
    it was, and two processes opening the file at once cannot both migrate it.
    Returns the migrations it applied (none if the database was current).
    """
    with transaction(db, write=True):
        status = schema_status(db, migrations)
        if refusal := status.refusal():
            raise StoreError(refusal)
        version = status.version
        if version == len(migrations):
            return []
        for migration in migrations[version:]:
            migration(db)
        # PRAGMA takes no bound parameters; len() is an int.
        db.execute(f"PRAGMA user_version = {len(migrations)}")
    return [AppliedMigration(number, migration_name(migration))
            for number, migration in enumerate(migrations[version:], start=version + 1)]
