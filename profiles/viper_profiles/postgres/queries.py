"""The store's steps as PostgreSQL statements, inside a transaction opened by the backend.

Writes run at READ COMMITTED, so each statement sees what was committed before it started, and take row
locks where a check must hold until commit:
- a user's writes serialise on the user's last_versions row (lock_user / claim_version take it first);
- shared images: a write that references an image locks its row (the upsert), and a write that may
  delete an orphan locks the candidates first (sorted, so two writers lock in the same order) and only
  then looks for remaining references, in a new statement that sees every reference committed meanwhile.
  Without the lock, a delete could miss a reference committed after its snapshot and fail on the
  foreign key.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg.rows import dict_row

from ..records import Change, ImageRef, ProfileVersion, Rating, RowCheck, StoredImage, StoredProfile, StoreStats

# The store's tables, for the integrity checks.
_TABLES = ["profiles", "images", "profile_images", "last_versions", "profile_versions", "version_images"]
_PROFILE_COLUMNS = (
    "user_id, liked_features, disliked_features, raw_text, version, extractor_model, created_at, updated_at"
)


class PostgresTransaction:
    def __init__(self, conn: psycopg.Connection, tenant: str) -> None:
        self._conn = conn
        self._tenant = tenant  # every statement is confined to it

    # --- reads

    def find_profile(self, user_id: str) -> StoredProfile | None:
        rows = self._rows(
            f"SELECT {_PROFILE_COLUMNS} FROM profiles WHERE tenant = %s AND user_id = %s", [self._tenant, user_id]
        )
        return _profile(rows[0], self._image_refs([user_id])[user_id]) if rows else None

    def find_version(self, user_id: str) -> int | None:
        row = self._conn.execute(
            "SELECT version FROM profiles WHERE tenant = %s AND user_id = %s", [self._tenant, user_id]
        ).fetchone()
        return None if row is None else row[0]

    def list_profiles(self, after: str | None, limit: int) -> list[StoredProfile]:
        if after is None:
            rows = self._rows(
                f"SELECT {_PROFILE_COLUMNS} FROM profiles WHERE tenant = %s ORDER BY user_id LIMIT %s",
                [self._tenant, limit],
            )
        else:
            rows = self._rows(
                f"SELECT {_PROFILE_COLUMNS} FROM profiles WHERE tenant = %s AND user_id > %s "
                "ORDER BY user_id LIMIT %s",
                [self._tenant, after, limit],
            )
        refs = self._image_refs([row["user_id"] for row in rows])
        return [_profile(row, refs[row["user_id"]]) for row in rows]

    def read_images(self, user_id: str) -> list[StoredImage]:
        # Binary results: the image bytes arrive as they are, not hex-encoded.
        with self._conn.cursor(row_factory=dict_row, binary=True) as cursor:
            cursor.execute(
                """
                SELECT profile_images.sha256, comment, rating, position, data
                FROM profile_images JOIN images USING (sha256)
                WHERE tenant = %s AND user_id = %s
                ORDER BY position
                """,
                [self._tenant, user_id],
            )
            return [
                StoredImage(
                    sha256=row["sha256"],
                    comment=row["comment"],
                    rating=Rating(row["rating"]),
                    position=row["position"],
                    data=bytes(row["data"]),
                )
                for row in cursor
            ]

    def count_profiles(self) -> int:
        return self._conn.execute("SELECT count(*) FROM profiles").fetchone()[0]

    def list_profile_versions(self, user_id: str, before: int | None, limit: int,
                              version: int | None = None) -> list[ProfileVersion]:
        rows = self._rows(
            f"""
            SELECT {_PROFILE_COLUMNS}, made_by FROM profile_versions
            WHERE tenant = %s AND user_id = %s AND (%s::bigint IS NULL OR version < %s::bigint)
              AND (%s::bigint IS NULL OR version = %s::bigint)
            ORDER BY version DESC LIMIT %s
            """,
            [self._tenant, user_id, before, before, version, version, limit],
        )
        refs = self._version_image_refs(user_id, [row["version"] for row in rows])
        return [ProfileVersion(**vars(_profile(row, refs[row["version"]])), change=Change(row["made_by"]))
                for row in rows]

    def read_version_images(self, user_id: str, version: int) -> list[StoredImage]:
        with self._conn.cursor(row_factory=dict_row, binary=True) as cursor:
            cursor.execute(
                """
                SELECT version_images.sha256, comment, rating, position, data
                FROM version_images JOIN images USING (sha256)
                WHERE tenant = %s AND user_id = %s AND version = %s
                ORDER BY position
                """,
                [self._tenant, user_id, version],
            )
            return [StoredImage(sha256=row["sha256"], comment=row["comment"], rating=Rating(row["rating"]),
                                position=row["position"], data=bytes(row["data"])) for row in cursor]

    def read_image_data(self, shas: Iterable[str]) -> dict[str, bytes]:
        with self._conn.cursor(binary=True) as cursor:
            cursor.execute("SELECT sha256, data FROM images WHERE sha256 = ANY(%s)", [sorted(set(shas))])
            return {sha: bytes(data) for sha, data in cursor}

    # --- writes

    def lock_user(self, user_id: str) -> None:
        # No row: the user never had a profile, and the caller's next read says so.
        self._conn.execute(
            "SELECT 1 FROM last_versions WHERE tenant = %s AND user_id = %s FOR UPDATE", [self._tenant, user_id]
        )

    def claim_version(self, user_id: str) -> int:
        return self._conn.execute(
            """
            INSERT INTO last_versions (tenant, user_id, version) VALUES (%s, %s, 1)
            ON CONFLICT (tenant, user_id) DO UPDATE SET version = last_versions.version + 1
            RETURNING version
            """,
            [self._tenant, user_id],
        ).fetchone()[0]

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
        self._conn.execute(
            f"""
            INSERT INTO profiles (tenant, {_PROFILE_COLUMNS})
            VALUES (%s, %s, %s::text[], %s::text[], %s, %s, %s, %s, %s)
            ON CONFLICT (tenant, user_id) DO UPDATE SET
                liked_features = EXCLUDED.liked_features,
                disliked_features = EXCLUDED.disliked_features,
                raw_text = EXCLUDED.raw_text,
                version = EXCLUDED.version,
                extractor_model = EXCLUDED.extractor_model,
                created_at = EXCLUDED.created_at,
                updated_at = EXCLUDED.updated_at
            """,
            [
                self._tenant,
                user_id,
                list(liked_features),
                list(disliked_features),
                raw_text,
                version,
                extractor_model,
                created_at,
                updated_at,
            ],
        )

    def update_profile(
        self,
        user_id: str,
        *,
        version: int,
        updated_at: datetime,
        liked_features: Sequence[str] | None,
        disliked_features: Sequence[str] | None,
    ) -> None:
        # COALESCE keeps a list passed as NULL.
        self._conn.execute(
            """
            UPDATE profiles SET
                version = %s,
                updated_at = %s,
                liked_features = COALESCE(%s::text[], liked_features),
                disliked_features = COALESCE(%s::text[], disliked_features)
            WHERE tenant = %s AND user_id = %s
            """,
            [
                version,
                updated_at,
                None if liked_features is None else list(liked_features),
                None if disliked_features is None else list(disliked_features),
                self._tenant,
                user_id,
            ],
        )

    def replace_images(self, user_id: str, images: Sequence[StoredImage]) -> None:
        dropped = self._drop_image_references(user_id)
        with self._conn.cursor() as cursor:
            # Locks each image row, existing or new, until commit (see the module docstring); sorted and
            # deduplicated, as one command may not update a row twice.
            cursor.executemany(
                """
                INSERT INTO images (sha256, data) VALUES (%s, %b)
                ON CONFLICT (sha256) DO UPDATE SET sha256 = EXCLUDED.sha256
                """,
                sorted({image.sha256: image.data for image in images}.items()),
            )
            cursor.executemany(
                "INSERT INTO profile_images (tenant, user_id, position, sha256, comment, rating) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                [
                    (self._tenant, user_id, image.position, image.sha256, image.comment, image.rating.value)
                    for image in images
                ],
            )
        self._delete_unreferenced_images(set(dropped) - {image.sha256 for image in images})

    def delete_profile(self, user_id: str) -> None:
        dropped = self._drop_image_references(user_id) + self._drop_versions(user_id, None)
        self._conn.execute("DELETE FROM profiles WHERE tenant = %s AND user_id = %s", [self._tenant, user_id])
        self._delete_unreferenced_images(dropped)

    def append_version(self, user_id: str, change: Change) -> None:
        """Copies the current profile and its image references into the history."""
        key = [self._tenant, user_id]
        self._conn.execute(
            f"""
            INSERT INTO profile_versions (tenant, {_PROFILE_COLUMNS}, made_by)
            SELECT tenant, {_PROFILE_COLUMNS}, %s FROM profiles WHERE tenant = %s AND user_id = %s
            """,
            [change.value, *key],
        )
        self._conn.execute(
            """
            INSERT INTO version_images (tenant, user_id, version, position, sha256, comment, rating)
            SELECT tenant, user_id, profiles.version, position, sha256, comment, rating
            FROM profile_images JOIN profiles USING (tenant, user_id) WHERE tenant = %s AND user_id = %s
            """,
            key,
        )

    def prune_versions(self, user_id: str, keep: int) -> None:
        """Drops every version but the newest `keep`, and the images nothing uses any more."""
        row = self._conn.execute(
            "SELECT version FROM profile_versions WHERE tenant = %s AND user_id = %s ORDER BY version DESC "
            "LIMIT 1 OFFSET %s",
            [self._tenant, user_id, keep - 1],
        ).fetchone()
        if row is not None:
            self._delete_unreferenced_images(self._drop_versions(user_id, row[0]))

    # --- helpers

    def _rows(self, query: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        with self._conn.cursor(row_factory=dict_row) as cursor:
            return cursor.execute(query, params).fetchall()

    def _drop_image_references(self, user_id: str) -> list[str]:
        """Deletes the user's image references; returns the sha256s they pointed to."""
        rows = self._conn.execute(
            "DELETE FROM profile_images WHERE tenant = %s AND user_id = %s RETURNING sha256", [self._tenant, user_id]
        )
        return [sha for (sha,) in rows]

    def _drop_versions(self, user_id: str, below: int | None) -> list[str]:
        """Deletes the history rows below a version (None: all); returns the sha256s their images pointed to."""
        where = "tenant = %s AND user_id = %s AND (%s::bigint IS NULL OR version < %s::bigint)"
        args = [self._tenant, user_id, below, below]
        shas = [sha for (sha,) in self._conn.execute(f"DELETE FROM version_images WHERE {where} RETURNING sha256",
                                                     args)]
        self._conn.execute(f"DELETE FROM profile_versions WHERE {where}", args)
        return shas

    def _version_image_refs(self, user_id: str, versions: Sequence[int]) -> defaultdict[int, list[ImageRef]]:
        refs: defaultdict[int, list[ImageRef]] = defaultdict(list)
        rows = self._rows(
            """
            SELECT version, sha256, comment, rating, position FROM version_images
            WHERE tenant = %s AND user_id = %s AND version = ANY(%s)
            ORDER BY version, position
            """,
            [self._tenant, user_id, list(versions)],
        )
        for row in rows:
            refs[row["version"]].append(ImageRef(sha256=row["sha256"], comment=row["comment"],
                                                 rating=Rating(row["rating"]), position=row["position"]))
        return refs

    def _delete_unreferenced_images(self, candidates: Iterable[str]) -> None:
        # Only images this write stopped referencing can have become orphans, so only those are checked.
        candidates = sorted(set(candidates))
        if not candidates:
            return
        self._conn.execute(
            "SELECT 1 FROM images WHERE sha256 = ANY(%s) ORDER BY sha256 FOR UPDATE", [candidates]
        ).fetchall()
        self._conn.execute(
            """
            DELETE FROM images
            WHERE sha256 = ANY(%s)
              AND NOT EXISTS (SELECT 1 FROM profile_images WHERE profile_images.sha256 = images.sha256)
              AND NOT EXISTS (SELECT 1 FROM version_images WHERE version_images.sha256 = images.sha256)
            """,
            [candidates],
        )

    def _image_refs(self, user_ids: Sequence[str]) -> defaultdict[str, list[ImageRef]]:
        refs: defaultdict[str, list[ImageRef]] = defaultdict(list)
        if not user_ids:
            return refs
        rows = self._rows(
            """
            SELECT user_id, sha256, comment, rating, position FROM profile_images
            WHERE tenant = %s AND user_id = ANY(%s)
            ORDER BY user_id, position
            """,
            [self._tenant, list(user_ids)],
        )
        for row in rows:
            refs[row["user_id"]].append(
                ImageRef(
                    sha256=row["sha256"],
                    comment=row["comment"],
                    rating=Rating(row["rating"]),
                    position=row["position"],
                )
            )
        return refs

    # --- whole-database reads, for the operator's commands (viper-profiles)

    def integrity_problems(self) -> list[str]:
        """What can make PostgreSQL's own guarantees not hold: foreign keys not validated or with their
        triggers disabled (rows could break them), and data checksum failures (damaged pages)."""
        problems = [
            f"foreign key {name} of {table} is not validated: rows may break it"
            for table, name in self._conn.execute(
                """
                SELECT conrelid::regclass::text, conname FROM pg_constraint
                WHERE contype = 'f' AND NOT convalidated
                  AND conrelid IN (SELECT to_regclass(name) FROM unnest(%s::text[]) AS name)
                ORDER BY 1, 2
                """,
                [_TABLES],
            )
        ]
        problems += [
            f"{count} foreign key trigger(s) of {table} are disabled: rows may break its foreign keys"
            for table, count in self._conn.execute(
                """
                SELECT tgrelid::regclass::text, count(*) FROM pg_trigger
                WHERE tgisinternal AND tgenabled = 'D'
                  AND tgrelid IN (SELECT to_regclass(name) FROM unnest(%s::text[]) AS name)
                GROUP BY 1 ORDER BY 1
                """,
                [_TABLES],
            )
        ]
        # NULL when the cluster runs without data checksums (initdb --data-checksums).
        (failures,) = self._conn.execute(
            "SELECT checksum_failures FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
        if failures:
            problems.append(f"{failures} data checksum failure(s) in this database: damaged pages")
        return problems

    def check_rows(self) -> RowCheck:
        # octet_length of an out-of-line bytea reads its TOAST pointer, not the bytes.
        return RowCheck(**self._rows(
            """
            SELECT
                (SELECT count(*) FROM images WHERE NOT EXISTS (
                    SELECT 1 FROM profile_images WHERE profile_images.sha256 = images.sha256) AND NOT EXISTS (
                    SELECT 1 FROM version_images WHERE version_images.sha256 = images.sha256)) AS orphaned_images,
                (SELECT coalesce(sum(octet_length(data)), 0) FROM images WHERE NOT EXISTS (
                    SELECT 1 FROM profile_images WHERE profile_images.sha256 = images.sha256) AND NOT EXISTS (
                    SELECT 1 FROM version_images WHERE version_images.sha256 = images.sha256))
                    AS orphaned_image_bytes,
                (SELECT count(*) FROM profile_images WHERE NOT EXISTS (
                    SELECT 1 FROM profiles WHERE profiles.tenant = profile_images.tenant
                    AND profiles.user_id = profile_images.user_id)) AS stray_references,
                (SELECT count(*) FROM (SELECT DISTINCT tenant, user_id FROM profile_images WHERE NOT EXISTS (
                    SELECT 1 FROM profiles WHERE profiles.tenant = profile_images.tenant
                    AND profiles.user_id = profile_images.user_id)) AS stray) AS stray_users,
                (SELECT count(*) FROM profile_images WHERE NOT EXISTS (
                    SELECT 1 FROM images WHERE images.sha256 = profile_images.sha256)) AS missing_images,
                (SELECT count(*) FROM profiles WHERE NOT EXISTS (
                    SELECT 1 FROM last_versions
                    WHERE last_versions.tenant = profiles.tenant AND last_versions.user_id = profiles.user_id
                    AND last_versions.version >= profiles.version
                )) AS unversioned_profiles
            """,
            [],
        )[0])

    def stats(self) -> StoreStats:
        return StoreStats(**self._rows(
            """
            SELECT
                (SELECT count(*) FROM profiles) AS users,
                (SELECT count(*) FROM last_versions WHERE NOT EXISTS (
                    SELECT 1 FROM profiles WHERE profiles.tenant = last_versions.tenant
                    AND profiles.user_id = last_versions.user_id)) AS deleted_users,
                (SELECT coalesce(sum(version), 0) FROM last_versions)::bigint AS versions,
                (SELECT count(*) FROM images) AS images,
                (SELECT coalesce(sum(octet_length(data)), 0) FROM images)::bigint AS image_bytes,
                (SELECT count(*) FROM profile_images) AS image_references,
                (SELECT count(*) FROM (
                    SELECT sha256 FROM (SELECT DISTINCT sha256, tenant, user_id FROM profile_images) AS uses
                    GROUP BY sha256 HAVING count(*) > 1
                ) AS shared) AS shared_images,
                pg_database_size(current_database()) AS database_bytes
            """,
            [],
        )[0])


def _profile(row: dict[str, Any], images: Sequence[ImageRef]) -> StoredProfile:
    return StoredProfile(
        user_id=row["user_id"],
        liked_features=tuple(row["liked_features"]),
        disliked_features=tuple(row["disliked_features"]),
        raw_text=row["raw_text"],
        version=row["version"],
        extractor_model=row["extractor_model"],
        # In the session's time zone as read; the store speaks UTC.
        created_at=row["created_at"].astimezone(timezone.utc),
        updated_at=row["updated_at"].astimezone(timezone.utc),
        images=tuple(images),
    )
