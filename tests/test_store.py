"""Behaviour of viper_profiles.ProfileStore against real SQLite files."""

from __future__ import annotations

import contextlib
import hashlib
import re
import sqlite3
import threading
from datetime import timezone
from pathlib import Path

import pytest
from sqlite_utils import Database

from viper_profiles import (
    USER_ID_PATTERN,
    InvalidUserId,
    ProfileNotFound,
    ProfileStore,
    Rating,
    SourceImage,
    StoreError,
    VersionConflict,
    validate_user_id,
)
from viper_profiles.schema import MIGRATIONS, migrate, schema_version

EXAMPLES = Path(__file__).parent / "fixtures" / "viper_examples"
LIKED_PNG = (EXAMPLES / "liked" / "0.png").read_bytes()
DISLIKED_PNG = (EXAMPLES / "disliked" / "0.png").read_bytes()
SHARED = b"bytes two users both uploaded"


def save(store: ProfileStore, user_id: str, images: list[SourceImage] | None = None, **fields):
    arguments = {
        "liked_features": ["warm colors", "impasto"],
        "disliked_features": ["flat lighting"],
        "raw_text": "Liked Art Features: warm colors, impasto\nDisliked Art Features: flat lighting",
        "extractor_model": "EPFL-VILAB/VPE-ViPer",
        "images": images if images is not None else [liked(LIKED_PNG), disliked(DISLIKED_PNG)],
    }
    return store.save_extraction(user_id, **{**arguments, **fields})


def liked(data: bytes, comment: str = "love the brushwork") -> SourceImage:
    return SourceImage(data=data, comment=comment, rating=Rating.LIKED)


def disliked(data: bytes, comment: str = "too dull") -> SourceImage:
    return SourceImage(data=data, comment=comment, rating=Rating.DISLIKED)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "profiles.db"


@pytest.fixture
def store(path: Path):
    with ProfileStore(path) as store:
        yield store


@contextlib.contextmanager
def raw(path: Path):
    """A second, independent connection, to look at what is really in the file."""
    with contextlib.closing(sqlite3.connect(path)) as connection:
        yield connection


def stored_shas(path: Path) -> set[str]:
    with raw(path) as connection:
        return {sha for (sha,) in connection.execute("SELECT sha256 FROM images")}


def dump(path: Path) -> dict[str, list[tuple]]:
    with raw(path) as connection:
        return {
            table: sorted(connection.execute(f"SELECT * FROM {table}"))
            for table in ("profiles", "images", "profile_images")
        }


# --- create / get / list ----------------------------------------------------------


def test_first_save_creates_version_1_with_ordered_images(store: ProfileStore):
    profile = save(
        store,
        "alice",
        images=[liked(LIKED_PNG, "glowing"), disliked(DISLIKED_PNG, "muddy"), liked(b"third")],
    )

    assert profile.user_id == "alice"
    assert profile.version == 1
    assert profile.liked_features == ("warm colors", "impasto")
    assert profile.disliked_features == ("flat lighting",)
    assert profile.raw_text.startswith("Liked Art Features:")
    assert profile.extractor_model == "EPFL-VILAB/VPE-ViPer"
    assert profile.created_at == profile.updated_at
    assert [(ref.position, ref.sha256, ref.comment, ref.rating) for ref in profile.images] == [
        (0, sha256(LIKED_PNG), "glowing", Rating.LIKED),
        (1, sha256(DISLIKED_PNG), "muddy", Rating.DISLIKED),
        (2, sha256(b"third"), "love the brushwork", Rating.LIKED),
    ]
    assert (profile.liked_image_count, profile.disliked_image_count) == (2, 1)
    assert store.get("alice") == profile
    assert store.count() == 1


def test_get_unknown_user_raises_profile_not_found(store: ProfileStore):
    with pytest.raises(ProfileNotFound) as raised:
        store.get("nobody")
    assert raised.value.user_id == "nobody"
    assert isinstance(raised.value, StoreError)


def test_list_pages_in_user_id_order(store: ProfileStore):
    for user_id in ["delta", "alpha", "echo", "charlie", "bravo"]:
        save(store, user_id)

    pages, after = [], None
    while page := store.list(page_size=2, after=after):
        pages.append([profile.user_id for profile in page])
        after = page[-1].user_id

    assert pages == [["alpha", "bravo"], ["charlie", "delta"], ["echo"]]
    assert store.list(page_size=10, after="bz") == store.list(page_size=3, after="bravo")
    listed = store.list(page_size=1)[0]
    assert listed == store.get("alpha")  # with its image references


@pytest.mark.parametrize("page_size", [0, -1])
def test_list_rejects_non_positive_page_size(store: ProfileStore, page_size: int):
    with pytest.raises(ValueError):
        store.list(page_size=page_size)


def test_images_returns_the_uploaded_bytes_unchanged_in_position_order(store: ProfileStore):
    not_an_image = bytes(range(256)) + b"\x00" * 10  # stored as-is, never decoded
    save(store, "alice", images=[disliked(DISLIKED_PNG), liked(not_an_image), liked(LIKED_PNG)])

    images = store.images("alice")

    assert [image.data for image in images] == [DISLIKED_PNG, not_an_image, LIKED_PNG]
    assert [image.position for image in images] == [0, 1, 2]
    assert [image.sha256 for image in images] == [sha256(image.data) for image in images]
    assert [image.rating for image in images] == [Rating.DISLIKED, Rating.LIKED, Rating.LIKED]
    with pytest.raises(ProfileNotFound):
        store.images("bob")


def test_get_with_images_reads_one_version(store: ProfileStore):
    save(store, "alice", images=[liked(LIKED_PNG)])
    save(store, "alice", images=[disliked(DISLIKED_PNG), liked(LIKED_PNG)])

    profile, images = store.get_with_images("alice")

    assert profile == store.get("alice") and profile.version == 2
    assert images == store.images("alice")
    assert [image.data for image in images] == [DISLIKED_PNG, LIKED_PNG]
    with pytest.raises(ProfileNotFound):
        store.get_with_images("bob")


def test_timestamps_are_utc_and_stored_as_iso_with_microseconds(store: ProfileStore, path: Path):
    profile = save(store, "alice")

    assert profile.created_at.tzinfo == timezone.utc
    with raw(path) as connection:
        created_at, updated_at = connection.execute(
            "SELECT created_at, updated_at FROM profiles"
        ).fetchone()
    iso_utc_micro = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00"
    assert re.fullmatch(iso_utc_micro, created_at)
    assert re.fullmatch(iso_utc_micro, updated_at)


# --- versioning: re-extraction, update, delete -------------------------------------


def test_re_extraction_replaces_everything_and_keeps_created_at(store: ProfileStore, path: Path):
    first = save(store, "alice", images=[liked(b"old only"), disliked(DISLIKED_PNG)])

    second = save(
        store,
        "alice",
        liked_features=["cool palette"],
        disliked_features=[],
        raw_text="new output",
        extractor_model="other-model",
        images=[liked(LIKED_PNG, "new comment")],
    )

    assert second.version == 2
    assert second.created_at == first.created_at
    assert second.updated_at > first.updated_at
    assert (second.liked_features, second.disliked_features) == (("cool palette",), ())
    assert (second.raw_text, second.extractor_model) == ("new output", "other-model")
    assert [(ref.sha256, ref.comment) for ref in second.images] == [(sha256(LIKED_PNG), "new comment")]
    assert store.get("alice") == second
    assert stored_shas(path) == {sha256(LIKED_PNG)}  # the replaced images went with them
    assert save(store, "alice").version == 3


def test_update_features_replaces_only_the_given_lists(store: ProfileStore):
    saved = save(store, "alice")

    updated = store.update_features("alice", liked_features=["chiaroscuro"])

    assert updated.version == 2
    assert updated.liked_features == ("chiaroscuro",)
    assert updated.disliked_features == saved.disliked_features
    assert (updated.raw_text, updated.images) == (saved.raw_text, saved.images)
    assert updated.created_at == saved.created_at
    assert updated.updated_at > saved.updated_at
    assert store.get("alice") == updated

    again = store.update_features("alice", disliked_features=["neon"], expected_version=2)
    assert (again.version, again.liked_features, again.disliked_features) == (
        3,
        ("chiaroscuro",),
        ("neon",),
    )


def test_update_features_with_a_stale_version_changes_nothing(store: ProfileStore):
    save(store, "alice")
    store.update_features("alice", liked_features=["first"])
    before = store.get("alice")

    with pytest.raises(VersionConflict) as raised:
        store.update_features("alice", liked_features=["second"], expected_version=1)

    assert (raised.value.user_id, raised.value.expected, raised.value.actual) == ("alice", 1, 2)
    assert store.get("alice") == before


def test_update_features_of_unknown_user_raises_profile_not_found(store: ProfileStore):
    with pytest.raises(ProfileNotFound):
        store.update_features("bob", liked_features=["x"])


def test_update_features_rejects_a_bare_string(store: ProfileStore):
    save(store, "alice")
    with pytest.raises(TypeError):
        store.update_features("alice", liked_features="warm colors")
    assert store.get("alice").version == 1


def test_delete_removes_the_profile(store: ProfileStore):
    save(store, "alice")
    save(store, "bob", images=[liked(b"bob's own")])

    store.delete("alice")

    with pytest.raises(ProfileNotFound):
        store.get("alice")
    assert store.count() == 1
    assert [profile.user_id for profile in store.list(page_size=10)] == ["bob"]
    with pytest.raises(ProfileNotFound):
        store.delete("alice")


def test_delete_checks_expected_version(store: ProfileStore):
    save(store, "alice")
    save(store, "alice")

    with pytest.raises(VersionConflict) as raised:
        store.delete("alice", expected_version=1)
    assert (raised.value.expected, raised.value.actual) == (1, 2)
    assert store.get("alice").version == 2

    store.delete("alice", expected_version=2)
    assert store.count() == 0


# --- content-addressed images ------------------------------------------------------


def test_same_bytes_are_stored_once_and_kept_while_any_profile_uses_them(
    store: ProfileStore, path: Path
):
    save(store, "alice", images=[liked(SHARED, "alice likes it"), liked(b"alice only")])
    save(store, "bob", images=[disliked(SHARED, "bob does not"), liked(SHARED, "twice")])
    assert stored_shas(path) == {sha256(SHARED), sha256(b"alice only")}

    store.delete("alice")
    assert stored_shas(path) == {sha256(SHARED)}
    assert [image.data for image in store.images("bob")] == [SHARED, SHARED]

    store.delete("bob")
    assert stored_shas(path) == set()


# --- the file: persistence, WAL, migrations ----------------------------------------


def test_profiles_persist_across_reopen(path: Path):
    with ProfileStore(path) as store:
        saved = save(store, "alice")
    with ProfileStore(path) as store:
        assert store.get("alice") == saved
        assert [image.data for image in store.images("alice")] == [LIKED_PNG, DISLIKED_PNG]


def test_creates_missing_parent_directories(tmp_path: Path):
    with ProfileStore(tmp_path / "nested" / "dir" / "profiles.db") as store:
        save(store, "alice")
    assert (tmp_path / "nested" / "dir" / "profiles.db").is_file()


def test_database_is_in_wal_mode(store: ProfileStore, path: Path):
    with raw(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_close_is_idempotent(path: Path):
    store = ProfileStore(path)
    store.close()
    store.close()
    with ProfileStore(path) as store:
        pass
    store.close()


def test_opening_a_current_database_changes_nothing(path: Path):
    with ProfileStore(path) as store:
        save(store, "alice")
    with raw(path) as connection:
        schema = sorted(connection.execute("SELECT type, name, sql FROM sqlite_master"))
        data_version = connection.execute("PRAGMA data_version").fetchone()

        ProfileStore(path).close()

        # data_version changes when another connection commits to the file.
        assert connection.execute("PRAGMA data_version").fetchone() == data_version
        assert sorted(connection.execute("SELECT type, name, sql FROM sqlite_master")) == schema
        assert connection.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)


def test_an_unversioned_database_is_migrated_and_keeps_its_other_tables(path: Path):
    with raw(path) as connection:
        connection.execute("CREATE TABLE notes (text TEXT)")
        connection.execute("INSERT INTO notes VALUES ('kept')")
        connection.commit()

    with ProfileStore(path) as store:
        save(store, "alice")

    with raw(path) as connection:
        assert connection.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
        assert connection.execute("SELECT text FROM notes").fetchall() == [("kept",)]


def test_migrate_applies_only_pending_migrations_in_order(path: Path):
    applied: list[str] = []

    def migration(name: str):
        def apply(db: Database) -> None:
            applied.append(name)
            db[name].create({"id": int}, pk="id")

        return apply

    first, second, third = migration("first"), migration("second"), migration("third")
    with contextlib.closing(Database(path)) as db:
        migrate(db, [first, second])
        assert (applied, schema_version(db)) == (["first", "second"], 2)

        migrate(db, [first, second, third])  # an older database meets newer code
        assert (applied, schema_version(db)) == (["first", "second", "third"], 3)

        migrate(db, [first, second, third])
        assert applied == ["first", "second", "third"]
        assert set(db.table_names()) == {"first", "second", "third"}


def test_a_failing_migration_leaves_the_database_untouched(path: Path):
    def create_table(db: Database) -> None:
        db["half_done"].create({"id": int}, pk="id")

    def fail(db: Database) -> None:
        raise RuntimeError("migration bug")

    with contextlib.closing(Database(path)) as db:
        with pytest.raises(RuntimeError):
            migrate(db, [create_table, fail])
        assert schema_version(db) == 0
        assert db.table_names() == []


def test_refuses_a_database_from_newer_code(path: Path):
    with raw(path) as connection:
        connection.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(StoreError, match="newer"):
        ProfileStore(path)


# --- every write is one transaction ----------------------------------------------


@contextlib.contextmanager
def failing_trigger(path: Path, sql: str):
    """Installs a trigger that makes a write fail part-way through, from another connection."""
    with raw(path) as connection:
        connection.execute(sql)
        connection.commit()
    yield
    with raw(path) as connection:
        connection.execute("DROP TRIGGER inject_failure")
        connection.commit()


# Fires on the second reference row: after the profile row was written, the old
# references were deleted and the new images were inserted.
FAIL_ON_SECOND_REFERENCE = """
    CREATE TRIGGER inject_failure BEFORE INSERT ON profile_images WHEN NEW.position = 1
    BEGIN SELECT RAISE(ABORT, 'injected failure'); END
"""


def test_a_failed_re_extraction_changes_nothing(store: ProfileStore, path: Path):
    save(store, "alice", images=[liked(b"old")])
    save(store, "bob", images=[liked(SHARED)])
    before, profile = dump(path), store.get("alice")

    with failing_trigger(path, FAIL_ON_SECOND_REFERENCE):
        with pytest.raises(sqlite3.IntegrityError, match="injected failure"):
            save(
                store,
                "alice",
                liked_features=["new"],
                images=[liked(b"brand new"), liked(SHARED)],
            )

    assert dump(path) == before
    assert store.get("alice") == profile
    assert save(store, "alice").version == 2  # the store is still usable


def test_a_failed_first_save_leaves_no_trace(store: ProfileStore, path: Path):
    before = dump(path)

    with failing_trigger(path, FAIL_ON_SECOND_REFERENCE):
        with pytest.raises(sqlite3.IntegrityError):
            save(store, "alice", images=[liked(b"one"), liked(b"two")])

    assert dump(path) == before
    with pytest.raises(ProfileNotFound):
        store.get("alice")


def test_a_failed_delete_changes_nothing(store: ProfileStore, path: Path):
    save(store, "alice", images=[liked(b"alice only"), liked(SHARED)])
    save(store, "bob", images=[liked(SHARED)])
    before = dump(path)

    # Fires at the last step, after the references and the profile row are gone.
    with failing_trigger(
        path,
        """CREATE TRIGGER inject_failure BEFORE DELETE ON images
           BEGIN SELECT RAISE(ABORT, 'injected failure'); END""",
    ):
        with pytest.raises(sqlite3.IntegrityError):
            store.delete("alice")

    assert dump(path) == before
    store.delete("alice")
    assert stored_shas(path) == {sha256(SHARED)}


# --- user ids -------------------------------------------------------------------


INVALID_USER_IDS = ["", "a" * 129, "with space", "slash/", "ünïcode", "trailing\n", "tab\t"]


@pytest.mark.parametrize("user_id", INVALID_USER_IDS)
def test_validate_user_id_rejects(user_id: str):
    with pytest.raises(InvalidUserId) as raised:
        validate_user_id(user_id)
    assert isinstance(raised.value, ValueError)
    assert raised.value.user_id == user_id
    assert "A-Z a-z 0-9" in str(raised.value)


def test_validate_user_id_rejects_non_strings():
    with pytest.raises(InvalidUserId, match="must be a string"):
        validate_user_id(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("user_id", ["a", "a" * 128, "Alice.B_c:d@example.org-1"])
def test_validate_user_id_accepts(user_id: str):
    validate_user_id(user_id)
    assert USER_ID_PATTERN.fullmatch(user_id)


@pytest.mark.parametrize(
    "call",
    [
        lambda store, user_id: save(store, user_id),
        lambda store, user_id: store.get(user_id),
        lambda store, user_id: store.update_features(user_id, liked_features=["x"]),
        lambda store, user_id: store.delete(user_id),
        lambda store, user_id: store.images(user_id),
    ],
    ids=["save_extraction", "get", "update_features", "delete", "images"],
)
def test_every_method_validates_user_id(store: ProfileStore, path: Path, call):
    with pytest.raises(InvalidUserId):
        call(store, "bad id")
    assert dump(path) == {"profiles": [], "images": [], "profile_images": []}


# --- concurrency ----------------------------------------------------------------


def run_in_threads(count: int, work) -> list:
    """Runs work(i) on `count` threads released together; returns results or exceptions."""
    barrier = threading.Barrier(count)
    outcomes: list = [None] * count

    def run(index: int) -> None:
        barrier.wait()
        try:
            outcomes[index] = work(index)
        except Exception as error:  # collected for the test to inspect
            outcomes[index] = error

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def test_racing_updates_with_the_same_expected_version_have_one_winner(store: ProfileStore):
    save(store, "alice")

    outcomes = run_in_threads(
        8, lambda i: store.update_features("alice", liked_features=[f"t{i}"], expected_version=1)
    )

    winners = [outcome for outcome in outcomes if not isinstance(outcome, Exception)]
    conflicts = [outcome for outcome in outcomes if isinstance(outcome, VersionConflict)]
    assert len(winners) == 1 and len(conflicts) == 7
    assert all((conflict.expected, conflict.actual) == (1, 2) for conflict in conflicts)
    assert store.get("alice") == winners[0]
    assert winners[0].version == 2


def test_racing_updates_through_separate_connections_have_one_winner(path: Path):
    # Like several server processes on one file: the lock cannot help, SQLite's must.
    stores = [ProfileStore(path) for _ in range(6)]
    try:
        save(stores[0], "alice")
        outcomes = run_in_threads(
            6,
            lambda i: stores[i].update_features(
                "alice", liked_features=[f"t{i}"], expected_version=1
            ),
        )
    finally:
        for store in stores:
            store.close()

    outcome_types = sorted(type(outcome).__name__ for outcome in outcomes)
    assert outcome_types == ["StoredProfile"] + ["VersionConflict"] * 5


def test_concurrent_unconditional_updates_are_all_counted(store: ProfileStore):
    save(store, "alice")

    def update_five_times(i: int) -> None:
        for round_ in range(5):
            store.update_features("alice", liked_features=[f"{i}-{round_}"])

    outcomes = run_in_threads(6, update_five_times)

    assert outcomes == [None] * 6
    assert store.get("alice").version == 1 + 6 * 5


def test_concurrent_saves_and_deletes_keep_shared_images_consistent(
    store: ProfileStore, path: Path
):
    def save_user(i: int):
        return save(store, f"user{i}", images=[liked(SHARED), liked(f"own {i}".encode())])

    assert all(not isinstance(outcome, Exception) for outcome in run_in_threads(6, save_user))
    assert store.count() == 6
    assert len(stored_shas(path)) == 1 + 6

    assert run_in_threads(3, lambda i: store.delete(f"user{i}")) == [None] * 3
    assert stored_shas(path) == {sha256(SHARED)} | {sha256(f"own {i}".encode()) for i in range(3, 6)}

    assert run_in_threads(3, lambda i: store.delete(f"user{i + 3}")) == [None] * 3
    assert stored_shas(path) == set()
