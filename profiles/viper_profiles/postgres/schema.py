"""The PostgreSQL tables and the ordered migrations that build them.

The same list as sqlite/schema.py, numbered alike. Each applied migration is recorded in
schema_migrations (version, name, applied_at). Append new migrations at the end; never
edit or reorder released ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import psycopg

from ..errors import StoreError
from ..records import AppliedMigration, SchemaStatus

Migration = Callable[[psycopg.Connection], None]

# The advisory lock every migrate() on a database takes: replicas starting together migrate one at a time.
MIGRATION_LOCK_ID = 0x5649504552  # "VIPER"


def _create_profile_tables(conn: psycopg.Connection) -> None:
    # COLLATE "C": user ids sort and page in byte order, as in SQLite, whatever the database's locale.
    conn.execute(
        """
        CREATE TABLE profiles (
            user_id text COLLATE "C" PRIMARY KEY,
            liked_features text[] NOT NULL,
            disliked_features text[] NOT NULL,
            raw_text text NOT NULL,
            version bigint NOT NULL,
            extractor_model text NOT NULL,
            created_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL
        )
        """
    )
    # Content-addressed: one row per distinct upload, shared by every profile using it.
    conn.execute('CREATE TABLE images (sha256 text COLLATE "C" PRIMARY KEY, data bytea NOT NULL)')
    # Uploads are PNG / JPEG, compressed already: keep them out of line without trying to compress them.
    conn.execute("ALTER TABLE images ALTER COLUMN data SET STORAGE EXTERNAL")
    conn.execute(
        """
        CREATE TABLE profile_images (
            user_id text COLLATE "C" NOT NULL REFERENCES profiles (user_id),
            position integer NOT NULL,
            sha256 text COLLATE "C" NOT NULL REFERENCES images (sha256),
            comment text NOT NULL,
            rating text NOT NULL CHECK (rating IN ('liked', 'disliked')),
            PRIMARY KEY (user_id, position)
        )
        """
    )
    # Every write that drops references looks up the remaining users of an image by sha256.
    conn.execute("CREATE INDEX profile_images_sha256 ON profile_images (sha256)")


def _create_last_versions(conn: psycopg.Connection) -> None:
    # The last version each user was given, kept when the profile is deleted: versions never repeat.
    conn.execute('CREATE TABLE last_versions (user_id text COLLATE "C" PRIMARY KEY, version bigint NOT NULL)')
    conn.execute("INSERT INTO last_versions (user_id, version) SELECT user_id, version FROM profiles")


def _add_tenants(conn: psycopg.Connection) -> None:
    # Every row stored so far moves into the tenant "default"; the keys become (tenant, user_id).
    conn.execute("ALTER TABLE profile_images DROP CONSTRAINT profile_images_user_id_fkey")
    for table in ("profiles", "profile_images", "last_versions"):
        conn.execute(f"ALTER TABLE {table} ADD COLUMN tenant text COLLATE \"C\" NOT NULL DEFAULT 'default'")
        conn.execute(f"ALTER TABLE {table} ALTER COLUMN tenant DROP DEFAULT")
        conn.execute(f"ALTER TABLE {table} DROP CONSTRAINT {table}_pkey")
    conn.execute("ALTER TABLE profiles ADD PRIMARY KEY (tenant, user_id)")
    conn.execute("ALTER TABLE last_versions ADD PRIMARY KEY (tenant, user_id)")
    conn.execute("ALTER TABLE profile_images ADD PRIMARY KEY (tenant, user_id, position)")
    conn.execute(
        "ALTER TABLE profile_images ADD FOREIGN KEY (tenant, user_id) REFERENCES profiles (tenant, user_id)"
    )


def _add_profile_versions(conn: psycopg.Connection) -> None:
    # Every kept version of a profile, with its images (by reference: the bytes stay in `images`, once).
    conn.execute(
        """
        CREATE TABLE profile_versions (
            tenant text COLLATE "C" NOT NULL,
            user_id text COLLATE "C" NOT NULL,
            version bigint NOT NULL,
            liked_features text[] NOT NULL,
            disliked_features text[] NOT NULL,
            raw_text text NOT NULL,
            extractor_model text NOT NULL,
            created_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL,
            made_by text NOT NULL,
            PRIMARY KEY (tenant, user_id, version)
        )
        """
    )
    conn.execute(
        """
        CREATE TABLE version_images (
            tenant text COLLATE "C" NOT NULL,
            user_id text COLLATE "C" NOT NULL,
            version bigint NOT NULL,
            position integer NOT NULL,
            sha256 text COLLATE "C" NOT NULL REFERENCES images (sha256),
            comment text NOT NULL,
            rating text NOT NULL CHECK (rating IN ('liked', 'disliked')),
            PRIMARY KEY (tenant, user_id, version, position),
            FOREIGN KEY (tenant, user_id, version) REFERENCES profile_versions (tenant, user_id, version)
        )
        """
    )
    conn.execute("CREATE INDEX version_images_sha256 ON version_images (sha256)")
    # Each existing profile's current version becomes its first history row; what made it is not known.
    conn.execute(
        """
        INSERT INTO profile_versions SELECT tenant, user_id, version, liked_features, disliked_features, raw_text,
            extractor_model, created_at, updated_at, 'unknown' FROM profiles
        """
    )
    conn.execute(
        """
        INSERT INTO version_images SELECT tenant, user_id, profiles.version, position, sha256, comment, rating
        FROM profile_images JOIN profiles USING (tenant, user_id)
        """
    )


MIGRATIONS: tuple[Migration, ...] = (
    _create_profile_tables, _create_last_versions, _add_tenants, _add_profile_versions,
)


def migration_name(migration: Migration) -> str:
    return migration.__name__.lstrip("_")


def schema_version(conn: psycopg.Connection) -> int:
    """How many migrations the database has had (0 for an empty one)."""
    if conn.execute("SELECT to_regclass('schema_migrations')").fetchone()[0] is None:
        return 0
    return conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0]


def schema_status(conn: psycopg.Connection, migrations: Sequence[Migration] = MIGRATIONS) -> SchemaStatus:
    applied: tuple[str, ...] = ()
    if conn.execute("SELECT to_regclass('schema_migrations')").fetchone()[0] is not None:
        applied = tuple(name for (name,) in conn.execute("SELECT name FROM schema_migrations ORDER BY version"))
    return SchemaStatus(applied=applied, known=tuple(migration_name(migration) for migration in migrations))


def migrate(conn: psycopg.Connection, migrations: Sequence[Migration] = MIGRATIONS) -> list[AppliedMigration]:
    """Applies the migrations the database has not had yet, in order, each recorded in schema_migrations.

    One transaction (PostgreSQL's DDL is transactional): a failed upgrade leaves the database as it was.
    The advisory lock, held to the end of it, makes processes starting together take turns: the first
    migrates, the others then find every migration recorded and do nothing.
    Returns the migrations it applied (none if the database was current).
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [MIGRATION_LOCK_ID])
        conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version integer PRIMARY KEY,
                name text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        applied = [name for (name,) in conn.execute("SELECT name FROM schema_migrations ORDER BY version")]
        known = tuple(migration_name(migration) for migration in migrations)
        if refusal := SchemaStatus(applied=tuple(applied), known=known).refusal():
            raise StoreError(refusal)
        done = []
        for version, migration in enumerate(migrations[len(applied) :], start=len(applied) + 1):
            migration(conn)
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", [version, migration_name(migration)]
            )
            done.append(AppliedMigration(version, migration_name(migration)))
    return done
