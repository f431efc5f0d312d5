"""The store's steps as SQLite statements, inside a transaction opened by the backend.

Writes run under BEGIN IMMEDIATE, which already excludes every other writer of the file: lock_user
has nothing left to do. Lists travel as JSON arrays read back with json_each.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlite_utils import Database
from sqlite_utils.db import NotFoundError

from ..records import Change, ImageRef, ProfileVersion, Rating, RowCheck, StoredImage, StoredProfile, StoreStats


class SqliteTransaction:
    def __init__(self, db: Database, tenant: str) -> None:
        self._db = db
        self._tenant = tenant  # every statement is confined to it

    # --- reads

    def find_profile(self, user_id: str) -> StoredProfile | None:
        row = self._profile_row(user_id)
        return None if row is None else _profile(row, self._image_refs([user_id])[user_id])

    def find_version(self, user_id: str) -> int | None:
        row = self._db.execute(
            "SELECT version FROM profiles WHERE tenant = ? AND user_id = ?", [self._tenant, user_id]
        ).fetchone()
        return None if row is None else row[0]

    def list_profiles(self, after: str | None, limit: int) -> list[StoredProfile]:
        # SQLite compares TEXT with memcmp: byte order, like PostgreSQL's COLLATE "C".
        where, where_args = "tenant = ?", [self._tenant]
        if after is not None:
            where, where_args = where + " AND user_id > ?", [*where_args, after]
        rows = list(self._db["profiles"].rows_where(where, where_args, order_by="user_id", limit=limit))
        refs = self._image_refs([row["user_id"] for row in rows])
        return [_profile(row, refs[row["user_id"]]) for row in rows]

    def read_images(self, user_id: str) -> list[StoredImage]:
        rows = self._db.query(
            """
            SELECT profile_images.sha256, comment, rating, position, data
            FROM profile_images JOIN images USING (sha256)
            WHERE tenant = ? AND user_id = ?
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
                data=row["data"],
            )
            for row in rows
        ]

    def count_profiles(self) -> int:
        return self._db["profiles"].count

    def list_profile_versions(self, user_id: str, before: int | None, limit: int,
                              version: int | None = None) -> list[ProfileVersion]:
        where, args = "tenant = ? AND user_id = ?", [self._tenant, user_id]
        if before is not None:
            where, args = where + " AND version < ?", [*args, before]
        if version is not None:
            where, args = where + " AND version = ?", [*args, version]
        rows = list(self._db["profile_versions"].rows_where(where, args, order_by="version DESC", limit=limit))
        refs = self._version_image_refs(user_id, [row["version"] for row in rows])
        return [ProfileVersion(**vars(_profile(row, refs[row["version"]])), change=Change(row["made_by"]))
                for row in rows]

    def read_version_images(self, user_id: str, version: int) -> list[StoredImage]:
        rows = self._db.query(
            """
            SELECT version_images.sha256, comment, rating, position, data
            FROM version_images JOIN images USING (sha256)
            WHERE tenant = ? AND user_id = ? AND version = ?
            ORDER BY position
            """,
            [self._tenant, user_id, version],
        )
        return [StoredImage(sha256=row["sha256"], comment=row["comment"], rating=Rating(row["rating"]),
                            position=row["position"], data=row["data"]) for row in rows]

    def read_image_data(self, shas: Iterable[str]) -> dict[str, bytes]:
        rows = self._db.query(
            "SELECT sha256, data FROM images WHERE sha256 IN (SELECT value FROM json_each(?))",
            [json.dumps(sorted(set(shas)))],
        )
        return {row["sha256"]: row["data"] for row in rows}

    # --- writes

    def lock_user(self, user_id: str) -> None:
        """Nothing to do: BEGIN IMMEDIATE holds the file's write lock already."""

    def claim_version(self, user_id: str) -> int:
        return self._db.execute(
            """
            INSERT INTO last_versions (tenant, user_id, version) VALUES (?, ?, 1)
            ON CONFLICT (tenant, user_id) DO UPDATE SET version = version + 1
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
        self._db["profiles"].upsert(
            {
                "tenant": self._tenant,
                "user_id": user_id,
                "liked_features": json.dumps(list(liked_features)),
                "disliked_features": json.dumps(list(disliked_features)),
                "raw_text": raw_text,
                "version": version,
                "extractor_model": extractor_model,
                "created_at": _timestamp(created_at),
                "updated_at": _timestamp(updated_at),
            },
            pk=("tenant", "user_id"),
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
        updates: dict[str, Any] = {"version": version, "updated_at": _timestamp(updated_at)}
        if liked_features is not None:
            updates["liked_features"] = json.dumps(list(liked_features))
        if disliked_features is not None:
            updates["disliked_features"] = json.dumps(list(disliked_features))
        self._db["profiles"].update((self._tenant, user_id), updates)

    def replace_images(self, user_id: str, images: Sequence[StoredImage]) -> None:
        dropped = self._drop_image_references(user_id)
        # Identical bytes are already stored, whoever uploaded them.
        self._db["images"].insert_all(({"sha256": image.sha256, "data": image.data} for image in images), ignore=True)
        self._db["profile_images"].insert_all(
            {
                "tenant": self._tenant,
                "user_id": user_id,
                "position": image.position,
                "sha256": image.sha256,
                "comment": image.comment,
                "rating": image.rating.value,
            }
            for image in images
        )
        self._delete_unreferenced_images(dropped)

    def delete_profile(self, user_id: str) -> None:
        dropped = self._drop_image_references(user_id) + self._drop_versions(user_id, None)
        self._db["profiles"].delete((self._tenant, user_id))
        self._delete_unreferenced_images(dropped)

    def append_version(self, user_id: str, change: Change) -> None:
        """Copies the current profile and its image references into the history."""
        key = [self._tenant, user_id]
        self._db.execute(
            """
            INSERT INTO profile_versions SELECT tenant, user_id, version, liked_features, disliked_features,
                raw_text, extractor_model, created_at, updated_at, ? FROM profiles WHERE tenant = ? AND user_id = ?
            """,
            [change.value, *key],
        )
        self._db.execute(
            """
            INSERT INTO version_images SELECT tenant, user_id, profiles.version, position, sha256, comment, rating
            FROM profile_images JOIN profiles USING (tenant, user_id) WHERE tenant = ? AND user_id = ?
            """,
            key,
        )

    def prune_versions(self, user_id: str, keep: int) -> None:
        """Drops every version but the newest `keep`, and the images nothing uses any more."""
        row = self._db.execute(
            "SELECT version FROM profile_versions WHERE tenant = ? AND user_id = ? ORDER BY version DESC "
            "LIMIT 1 OFFSET ?",
            [self._tenant, user_id, keep - 1],
        ).fetchone()
        if row is not None:
            self._delete_unreferenced_images(self._drop_versions(user_id, row[0]))

    # --- helpers

    def _profile_row(self, user_id: str) -> dict[str, Any] | None:
        try:
            return self._db["profiles"].get((self._tenant, user_id))
        except NotFoundError:
            return None

    def _drop_image_references(self, user_id: str) -> list[str]:
        """Deletes the user's image references; returns the sha256s they pointed to."""
        rows = self._db.query(
            "DELETE FROM profile_images WHERE tenant = ? AND user_id = ? RETURNING sha256", [self._tenant, user_id]
        )
        return [row["sha256"] for row in rows]

    def _drop_versions(self, user_id: str, below: int | None) -> list[str]:
        """Deletes the history rows below a version (None: all); returns the sha256s their images pointed to."""
        where, args = "tenant = ? AND user_id = ?", [self._tenant, user_id]
        if below is not None:
            where, args = where + " AND version < ?", [*args, below]
        rows = self._db.query(f"DELETE FROM version_images WHERE {where} RETURNING sha256", args)
        shas = [row["sha256"] for row in rows]
        self._db.execute(f"DELETE FROM profile_versions WHERE {where}", args)
        return shas

    def _version_image_refs(self, user_id: str, versions: Sequence[int]) -> defaultdict[int, list[ImageRef]]:
        rows = self._db.query(
            """
            SELECT version, sha256, comment, rating, position FROM version_images
            WHERE tenant = ? AND user_id = ? AND version IN (SELECT value FROM json_each(?))
            ORDER BY version, position
            """,
            [self._tenant, user_id, json.dumps(list(versions))],
        )
        refs: defaultdict[int, list[ImageRef]] = defaultdict(list)
        for row in rows:
            refs[row["version"]].append(ImageRef(sha256=row["sha256"], comment=row["comment"],
                                                 rating=Rating(row["rating"]), position=row["position"]))
        return refs

    def _delete_unreferenced_images(self, candidates: Iterable[str]) -> None:
        # Only images this write stopped referencing can have become orphans, so only
        # those are checked: a write costs its own images, not the whole table.
        self._db.execute(
            """
            DELETE FROM images
            WHERE sha256 IN (SELECT value FROM json_each(?))
              AND NOT EXISTS (
                SELECT 1 FROM profile_images WHERE profile_images.sha256 = images.sha256
              )
              AND NOT EXISTS (
                SELECT 1 FROM version_images WHERE version_images.sha256 = images.sha256
              )
            """,
            [json.dumps(sorted(set(candidates)))],
        )

    def _image_refs(self, user_ids: Sequence[str]) -> defaultdict[str, list[ImageRef]]:
        rows = self._db.query(
            """
            SELECT user_id, sha256, comment, rating, position FROM profile_images
            WHERE tenant = ? AND user_id IN (SELECT value FROM json_each(?))
            ORDER BY user_id, position
            """,
            [self._tenant, json.dumps(list(user_ids))],
        )
        refs: defaultdict[str, list[ImageRef]] = defaultdict(list)
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
        """What SQLite's own checks find: damaged pages or indexes, rows breaking a foreign key."""
        # A file too damaged to be checked at all raises sqlite3.DatabaseError ("malformed").
        problems = [row[0] for row in self._db.execute("PRAGMA integrity_check") if row[0] != "ok"]
        violations = self._db.execute(
            "SELECT \"table\", parent, count(*) FROM pragma_foreign_key_check GROUP BY 1, 2 ORDER BY 1, 2"
        ).fetchall()
        return problems + [
            f"{count} row(s) of {table} refer to a missing {parent} row (foreign key)"
            for table, parent, count in violations
        ]

    def check_rows(self) -> RowCheck:
        # length() of a BLOB is its size in bytes, read from the row header without loading it.
        return RowCheck(**next(self._db.query(
            """
            SELECT
                (SELECT count(*) FROM images WHERE NOT EXISTS (
                    SELECT 1 FROM profile_images WHERE profile_images.sha256 = images.sha256) AND NOT EXISTS (
                    SELECT 1 FROM version_images WHERE version_images.sha256 = images.sha256)) AS orphaned_images,
                (SELECT coalesce(sum(length(data)), 0) FROM images WHERE NOT EXISTS (
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
            """
        )))

    def stats(self) -> StoreStats:
        return StoreStats(**next(self._db.query(
            """
            SELECT
                (SELECT count(*) FROM profiles) AS users,
                (SELECT count(*) FROM last_versions WHERE NOT EXISTS (
                    SELECT 1 FROM profiles WHERE profiles.tenant = last_versions.tenant
                    AND profiles.user_id = last_versions.user_id)) AS deleted_users,
                (SELECT coalesce(sum(version), 0) FROM last_versions) AS versions,
                (SELECT count(*) FROM images) AS images,
                (SELECT coalesce(sum(length(data)), 0) FROM images) AS image_bytes,
                (SELECT count(*) FROM profile_images) AS image_references,
                (SELECT count(*) FROM (
                    SELECT sha256 FROM (SELECT DISTINCT sha256, tenant, user_id FROM profile_images) AS uses
                    GROUP BY sha256 HAVING count(*) > 1
                )) AS shared_images,
                (SELECT page_count * page_size FROM pragma_page_count, pragma_page_size) AS database_bytes
            """
        )))


def _timestamp(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")


def _profile(row: dict[str, Any], images: Sequence[ImageRef]) -> StoredProfile:
    return StoredProfile(
        user_id=row["user_id"],
        liked_features=tuple(json.loads(row["liked_features"])),
        disliked_features=tuple(json.loads(row["disliked_features"])),
        raw_text=row["raw_text"],
        version=row["version"],
        extractor_model=row["extractor_model"],
        created_at=datetime.fromisoformat(row["created_at"]),
        updated_at=datetime.fromisoformat(row["updated_at"]),
        images=tuple(images),
    )
