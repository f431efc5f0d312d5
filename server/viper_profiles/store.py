"""ProfileStore: users' preference profiles and their source images in one SQLite file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlite_utils import Database
from sqlite_utils.db import NotFoundError

from .database import open_database, transaction
from .errors import ProfileNotFound, VersionConflict
from .records import ImageRef, Rating, SourceImage, StoredImage, StoredProfile
from .schema import migrate
from .user_ids import validate_user_id


class ProfileStore:
    """Stores one profile per user, with the images it was extracted from.

    Every method is one transaction. Thread safety: a single connection guarded by a
    lock. SQLite admits one writer at a time anyway and the reads are a few small
    rows, so per-thread connections would mostly add connections to track for
    asyncio.to_thread's changing pool threads, plus SQLITE_BUSY waits between our
    own threads.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = open_database(path)
        try:
            migrate(self._db)
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()  # closing a closed sqlite3 connection is a no-op

    def __enter__(self) -> ProfileStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def save_extraction(
        self,
        user_id: str,
        *,
        liked_features: Sequence[str],
        disliked_features: Sequence[str],
        raw_text: str,
        extractor_model: str,
        images: Sequence[SourceImage],
    ) -> StoredProfile:
        """Creates the user's profile, or replaces all of it (features, text, images).

        The version goes up by one; created_at is kept from the first save.
        """
        validate_user_id(user_id)
        liked, disliked = _json_list(liked_features), _json_list(disliked_features)
        # Hash outside the lock: it is the only per-byte work of a save.
        image_rows = [
            {"sha256": hashlib.sha256(image.data).hexdigest(), "data": bytes(image.data)}
            for image in images
        ]
        reference_rows = [
            {
                "user_id": user_id,
                "position": position,
                "sha256": image_row["sha256"],
                "comment": image.comment,
                "rating": Rating(image.rating).value,
            }
            for position, (image, image_row) in enumerate(zip(images, image_rows))
        ]
        now = _timestamp(_utc_now())
        with self._transaction(write=True) as db:
            previous = _find_profile_row(db, user_id)
            dropped = _drop_image_references(db, user_id)
            db["profiles"].upsert(
                {
                    "user_id": user_id,
                    "liked_features": liked,
                    "disliked_features": disliked,
                    "raw_text": raw_text,
                    "version": previous["version"] + 1 if previous else 1,
                    "extractor_model": extractor_model,
                    "created_at": previous["created_at"] if previous else now,
                    "updated_at": now,
                },
                pk="user_id",
            )
            # Identical bytes are already stored, whoever uploaded them.
            db["images"].insert_all(image_rows, ignore=True)
            db["profile_images"].insert_all(reference_rows)
            _delete_unreferenced_images(db, dropped)
            return _read_profile(db, user_id)

    def get(self, user_id: str) -> StoredProfile:
        validate_user_id(user_id)
        with self._transaction(write=False) as db:
            return _read_profile(db, user_id)

    def list(self, *, page_size: int, after: str | None = None) -> list[StoredProfile]:
        """Up to page_size profiles ordered by user_id, starting after the given user_id."""
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        # `after` is only a bound to compare with, so it needs no user_id validation.
        where, where_args = ("user_id > ?", [after]) if after is not None else (None, [])
        with self._transaction(write=False) as db:
            rows = list(
                db["profiles"].rows_where(
                    where, where_args, order_by="user_id", limit=page_size
                )
            )
            refs = _image_refs(db, [row["user_id"] for row in rows])
        return [_profile(row, refs[row["user_id"]]) for row in rows]

    def update_features(
        self,
        user_id: str,
        *,
        liked_features: Sequence[str] | None = None,
        disliked_features: Sequence[str] | None = None,
        expected_version: int | None = None,
    ) -> StoredProfile:
        """Replaces the given feature lists (None keeps one); the version goes up by one."""
        validate_user_id(user_id)
        updates = {"updated_at": _timestamp(_utc_now())}
        if liked_features is not None:
            updates["liked_features"] = _json_list(liked_features)
        if disliked_features is not None:
            updates["disliked_features"] = _json_list(disliked_features)
        with self._transaction(write=True) as db:
            version = _checked_version(db, user_id, expected_version)
            db["profiles"].update(user_id, {**updates, "version": version + 1})
            return _read_profile(db, user_id)

    def delete(self, user_id: str, *, expected_version: int | None = None) -> int:
        """Deletes the profile, and every image of it that no other profile uses; returns the deleted version."""
        validate_user_id(user_id)
        with self._transaction(write=True) as db:
            version = _checked_version(db, user_id, expected_version)
            dropped = _drop_image_references(db, user_id)
            db["profiles"].delete(user_id)
            _delete_unreferenced_images(db, dropped)
            return version

    def images(self, user_id: str) -> list[StoredImage]:
        """The profile's source images with their bytes, ordered by position."""
        validate_user_id(user_id)
        with self._transaction(write=False) as db:
            _require_profile_row(db, user_id)
            return _read_images(db, user_id)

    def get_with_images(self, user_id: str) -> tuple[StoredProfile, list[StoredImage]]:
        """The profile and its images from one snapshot: the images are exactly those of that version."""
        validate_user_id(user_id)
        with self._transaction(write=False) as db:
            return _read_profile(db, user_id), _read_images(db, user_id)

    def count(self) -> int:
        with self._transaction(write=False) as db:
            return db["profiles"].count

    @contextlib.contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Database]:
        with self._lock, transaction(self._db, write=write) as db:
            yield db


def _read_images(db: Database, user_id: str) -> list[StoredImage]:
    rows = db.query(
        """
        SELECT profile_images.sha256, comment, rating, position, data
        FROM profile_images JOIN images USING (sha256)
        WHERE user_id = ?
        ORDER BY position
        """,
        [user_id],
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


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _timestamp(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")


def _json_list(features: Sequence[str]) -> str:
    # A bare string is a Sequence[str] too; storing its characters would be a silent bug.
    if isinstance(features, str):
        raise TypeError("feature lists must be sequences of strings, not a string")
    return json.dumps(list(features))


def _find_profile_row(db: Database, user_id: str) -> dict[str, Any] | None:
    try:
        return db["profiles"].get(user_id)
    except NotFoundError:
        return None


def _require_profile_row(db: Database, user_id: str) -> dict[str, Any]:
    row = _find_profile_row(db, user_id)
    if row is None:
        raise ProfileNotFound(user_id)
    return row


def _checked_version(db: Database, user_id: str, expected_version: int | None) -> int:
    """The stored version, after checking it against expected_version (None: no check)."""
    version = _require_profile_row(db, user_id)["version"]
    if expected_version is not None and expected_version != version:
        raise VersionConflict(user_id, expected=expected_version, actual=version)
    return version


def _drop_image_references(db: Database, user_id: str) -> list[str]:
    """Deletes the user's image references; returns the sha256s they pointed to."""
    rows = db.query(
        "DELETE FROM profile_images WHERE user_id = ? RETURNING sha256", [user_id]
    )
    return [row["sha256"] for row in rows]


def _delete_unreferenced_images(db: Database, candidates: Iterable[str]) -> None:
    # Only images this write stopped referencing can have become orphans, so only
    # those are checked: a write costs its own images, not the whole table.
    db.execute(
        """
        DELETE FROM images
        WHERE sha256 IN (SELECT value FROM json_each(?))
          AND NOT EXISTS (
            SELECT 1 FROM profile_images WHERE profile_images.sha256 = images.sha256
          )
        """,
        [json.dumps(sorted(set(candidates)))],
    )


def _image_refs(db: Database, user_ids: Sequence[str]) -> defaultdict[str, list[ImageRef]]:
    rows = db.query(
        """
        SELECT user_id, sha256, comment, rating, position FROM profile_images
        WHERE user_id IN (SELECT value FROM json_each(?))
        ORDER BY user_id, position
        """,
        [json.dumps(list(user_ids))],
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


def _read_profile(db: Database, user_id: str) -> StoredProfile:
    row = _require_profile_row(db, user_id)
    return _profile(row, _image_refs(db, [user_id])[user_id])


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
