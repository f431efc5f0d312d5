"""A profile's history in the store, export/import through the facade, and erasure: on SQLite and PostgreSQL."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import test_store
from test_store import PostgresDb, SqliteDb, disliked, liked, save, sha256, stored_shas

from viper_profiles import (
    Change,
    ProfileExists,
    ProfileNotFound,
    ProfileStore,
    VersionConflict,
    VersionNotFound,
)

# The store tests' fixtures: each test runs on SQLite and on PostgreSQL.
db, store, sqlite_db, postgres_db = test_store.db, test_store.store, test_store.sqlite_db, test_store.postgres_db

A, B, C = b"image A bytes", b"image B bytes", b"image C bytes"


def history(store: ProfileStore, user_id: str = "alice", **options) -> list[tuple[int, str, tuple[str, ...]]]:
    return [(v.version, v.change.value, v.liked_features)
            for v in store.list_versions(user_id, page_size=100, **options)]


def test_every_write_appends_a_version_newest_first(store: ProfileStore):
    save(store, "alice", liked_features=["one"], images=[liked(A), disliked(B)])
    store.update_features("alice", liked_features=["two"])
    save(store, "alice", liked_features=["three"], images=[liked(C)], change=Change.ADD)
    assert history(store) == [(3, "add", ("three",)), (2, "update", ("two",)), (1, "extract", ("one",))]
    # Each version keeps its own image set, in order.
    versions = store.list_versions("alice", page_size=100)
    assert [[(i.sha256, i.rating.value, i.position) for i in v.images] for v in versions] == [
        [(sha256(C), "liked", 0)],
        [(sha256(A), "liked", 0), (sha256(B), "disliked", 1)],
        [(sha256(A), "liked", 0), (sha256(B), "disliked", 1)],
    ]
    assert store.get_version("alice", 1).liked_features == ("one",)
    # Paging: below a version.
    assert [v.version for v in store.list_versions("alice", page_size=1, before=3)] == [2]


def test_history_of_an_unknown_user_or_version(store: ProfileStore):
    with pytest.raises(ProfileNotFound):
        store.list_versions("nobody", page_size=10)
    save(store, "alice")
    with pytest.raises(VersionNotFound):
        store.get_version("alice", 7)
    with pytest.raises(ProfileNotFound):
        store.get_version("alice", 1, tenant="other")


def test_images_are_stored_once_and_kept_while_a_version_uses_them(store: ProfileStore, db):
    save(store, "alice", images=[liked(A), disliked(B)])
    save(store, "alice", images=[liked(B), disliked(C)])
    save(store, "alice", images=[liked(B), disliked(C)])
    assert db.query("SELECT count(*) FROM images") == [(3,)]  # A is kept for version 1
    assert stored_shas(db) == {sha256(A), sha256(B), sha256(C)}
    assert store.check_rows().problems() == []
    store.delete("alice")
    assert stored_shas(db) == set()
    assert db.query("SELECT count(*) FROM profile_versions") == [(0,)]
    assert db.query("SELECT count(*) FROM version_images") == [(0,)]


def test_keep_versions_drops_the_oldest_and_their_images(db):
    with db.open(keep_versions=2) as store:
        save(store, "alice", images=[liked(A)])
        save(store, "alice", images=[liked(B)])
        save(store, "bob", images=[liked(B)])
        save(store, "alice", images=[liked(C)])
        assert [v for v, _, _ in history(store)] == [3, 2]
        assert stored_shas(db) == {sha256(B), sha256(C)}  # A was only version 1's
        with pytest.raises(VersionNotFound):
            store.restore_version("alice", 1)
        assert store.check_rows().problems() == []
    with pytest.raises(ValueError):
        db.open(keep_versions=0)


def test_restore_makes_a_new_version_from_an_old_one(store: ProfileStore):
    save(store, "alice", liked_features=["old"], images=[liked(A, "nice"), disliked(B)])
    save(store, "alice", liked_features=["new"], images=[liked(C)])
    restored = store.restore_version("alice", 1, expected_version=2)
    assert (restored.version, restored.liked_features) == (3, ("old",))
    assert [(i.sha256, i.comment) for i in restored.images] == [(sha256(A), "nice"), (sha256(B), "too dull")]
    assert [image.data for image in store.get_with_images("alice")[1]] == [A, B]
    assert restored.created_at == store.get_version("alice", 1).created_at
    assert history(store)[0] == (3, "restore", ("old",))
    with pytest.raises(VersionConflict):
        store.restore_version("alice", 2, expected_version=2)
    assert store.get("alice").version == 3


def test_save_with_an_expected_version(store: ProfileStore):
    assert save(store, "alice", expected_version=0).version == 1  # 0: no profile yet
    with pytest.raises(VersionConflict):
        save(store, "alice", expected_version=0)
    with pytest.raises(VersionConflict):
        save(store, "bob", expected_version=1)
    assert save(store, "alice", expected_version=1).version == 2
    assert history(store)[0][0] == 2 and len(history(store)) == 2


def test_export_and_import_keep_every_version(store: ProfileStore):
    save(store, "alice", liked_features=["one"], images=[liked(A), disliked(B)])
    save(store, "alice", liked_features=["two"], images=[liked(A), disliked(B), liked(C)], change=Change.ADD)
    versions, images = store.export_versions("alice")
    assert [v.version for v in versions] == [1, 2] and set(images) == {sha256(A), sha256(B), sha256(C)}

    imported = store.import_versions("bob", versions, images, tenant="other")
    assert (imported.version, imported.liked_features) == (2, ("two",))
    assert history(store, "bob", tenant="other") == [(2, "import", ("two",)), (1, "extract", ("one",))]
    assert [i.data for i in store.get_with_images("bob", tenant="other")[1]] == [A, B, C]
    with pytest.raises(ProfileExists):
        store.import_versions("bob", versions[:1], images, tenant="other")
    replaced = store.import_versions("bob", versions[:1], images, tenant="other", replace=True)
    assert (replaced.version, replaced.liked_features) == (3, ("one",))  # versions never repeat
    assert history(store, "bob", tenant="other") == [(3, "import", ("one",))]


def test_an_import_with_a_wrong_image_stores_nothing(store: ProfileStore, db):
    save(store, "alice", images=[liked(A)])
    versions, _ = store.export_versions("alice")
    before = stored_shas(db)
    with pytest.raises(ValueError, match="sha256"):
        store.import_versions("bob", versions, {sha256(A): b"not A"})
    with pytest.raises(ProfileNotFound):
        store.get("bob")
    assert stored_shas(db) == before


def test_profiles_stored_before_history_become_their_first_version(db):
    with db.migration_connection() as connection:
        db.schema.migrate(connection, db.schema.MIGRATIONS[:3])
    at = "'2024-01-01T00:00:00+00:00'"
    features = "'[\"warm\"]'" if db.name == "sqlite" else "'{warm}'"
    db.execute(
        "INSERT INTO images (sha256, data) VALUES ('s1', " + ("x'01'" if db.name == "sqlite" else "'\\x01'") + ")",
        "INSERT INTO profiles (tenant, user_id, liked_features, disliked_features, raw_text, version, "
        f"extractor_model, created_at, updated_at) VALUES ('default', 'alice', {features}, {features}, 't', 3, 'm', "
        f"{at}, {at})",
        "INSERT INTO profile_images (tenant, user_id, position, sha256, comment, rating) "
        "VALUES ('default', 'alice', 0, 's1', 'nice', 'liked')",
        "INSERT INTO last_versions (tenant, user_id, version) VALUES ('default', 'alice', 3)",
    )
    with db.open() as store:
        (first,) = store.list_versions("alice", page_size=10)
        assert (first.version, first.change, first.liked_features) == (3, Change.UNKNOWN, ("warm",))
        assert [(i.sha256, i.comment) for i in first.images] == [("s1", "nice")]
        store.update_features("alice", liked_features=["cool"])
        restored = store.restore_version("alice", 3)
        assert (restored.version, restored.liked_features) == (5, ("warm",))


# --- erasure: no byte of a deleted image is left in the database -----------------------------------


def sqlite_file_bytes(path: Path) -> bytes:
    """The database file with its WAL and shared-memory index, as a reader of the disk would see them."""
    return b"".join(Path(str(path) + suffix).read_bytes()
                    for suffix in ("", "-wal", "-shm") if os.path.exists(str(path) + suffix))


def test_delete_leaves_no_byte_of_the_images_in_the_sqlite_files(sqlite_db: SqliteDb):
    secret = os.urandom(48_000)  # spans overflow pages
    with sqlite_db.open() as store:
        save(store, "alice", images=[liked(secret), disliked(A)])
        save(store, "alice", images=[liked(secret), liked(B)])
        save(store, "bob", images=[liked(A)])
        assert secret[1000:1064] in sqlite_file_bytes(sqlite_db.path)
        store.delete("alice")
        files = sqlite_file_bytes(sqlite_db.path)
        for start in range(0, len(secret), 4000):
            assert secret[start:start + 32] not in files
        assert B not in files and A in files  # bob's image stays
        assert b"too dull" not in files  # nor the comments of the erased versions


def test_delete_leaves_no_row_of_the_images_in_postgresql(postgres_db: PostgresDb):
    secret = os.urandom(48_000)
    with postgres_db.open() as store:
        save(store, "alice", images=[liked(secret), disliked(A)])
        save(store, "alice", images=[liked(secret), liked(B)])
        save(store, "bob", images=[liked(A)])
        store.delete("alice")
    tables = ("profiles", "images", "profile_images", "last_versions", "profile_versions", "version_images")
    contents = b"".join(
        bytes(value) if isinstance(value, (bytes, memoryview)) else str(value).encode()
        for table in tables for row in postgres_db.query(f"SELECT * FROM {table}") for value in row
    )
    assert secret[:32] not in contents and B not in contents and sha256(secret).encode() not in contents
    assert A in contents
