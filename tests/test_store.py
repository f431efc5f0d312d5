"""Behaviour of the viper_profiles store, on SQLite and on PostgreSQL alike.

The `db` fixture runs each test on both backends: a SQLite file in a temp dir, and a fresh database on
the session's throwaway PostgreSQL server. Tests look at what is really stored through a separate raw
connection (`db.query`). A few tests are about one backend's own machinery (SQLite's WAL and file
upgrade, PostgreSQL's pool), and say so in their names.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import re
import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timezone
from pathlib import Path
from types import ModuleType

import pytest
from sqlite_utils import Database

from viper_profiles import (
    USER_ID_PATTERN,
    InvalidText,
    InvalidUserId,
    ProfileNotFound,
    ProfileStore,
    Rating,
    SourceImage,
    StoreError,
    StoreUnavailable,
    VersionConflict,
    open_store,
    validate_user_id,
)
from viper_profiles.sqlite import schema as sqlite_schema

EXAMPLES = Path(__file__).parent / "fixtures" / "viper_examples"
# A database written by the store before versions were kept across deletes (schema version 1).
VERSION_1_DATABASE = Path(__file__).parent / "fixtures" / "store" / "profiles-v1.sqlite"
LIKED_PNG = (EXAMPLES / "liked" / "0.png").read_bytes()
DISLIKED_PNG = (EXAMPLES / "disliked" / "0.png").read_bytes()
SHARED = b"bytes two users both uploaded"
TABLES = ("profiles", "images", "profile_images", "last_versions")


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


def images_of(store: ProfileStore, user_id: str) -> list[bytes]:
    return [image.data for image in store.get_with_images(user_id)[1]]


def wait_until(attempt: Callable[[], object], timeout: float = 30.0):
    """attempt()'s result once it stops raising StoreUnavailable."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return attempt()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# --- the two backends, seen from outside the store ---------------------------------


class SqliteDb:
    name = "sqlite"
    schema: ModuleType = sqlite_schema
    injected_error: type[Exception] = sqlite3.IntegrityError

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = str(path)

    def open(self, **options) -> ProfileStore:
        return open_store(self.url, **options)

    @contextlib.contextmanager
    def raw(self) -> Iterator[sqlite3.Connection]:
        """A second, independent connection (autocommit), to look at what is really in the file."""
        with contextlib.closing(sqlite3.connect(self.path, isolation_level=None)) as connection:
            yield connection

    @contextlib.contextmanager
    def migration_connection(self) -> Iterator[Database]:
        with contextlib.closing(Database(self.path)) as connection:
            yield connection

    def query(self, sql: str) -> list[tuple]:
        with self.raw() as connection:
            return [tuple(row) for row in connection.execute(sql)]

    def execute(self, *statements: str) -> None:
        with self.raw() as connection:
            for statement in statements:
                connection.execute(statement)

    def table_names(self) -> set[str]:
        return {name for (name,) in self.query("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def fail_on(self, table: str, event: str, condition: str = "1") -> list[str]:
        """Statements installing a trigger that makes a write fail part-way through."""
        return [
            f"""CREATE TRIGGER inject_failure BEFORE {event} ON {table} WHEN {condition}
                BEGIN SELECT RAISE(ABORT, 'injected failure'); END"""
        ]

    def remove_failure(self) -> list[str]:
        return ["DROP TRIGGER inject_failure"]

    def mark_schema_newer(self) -> None:
        self.execute(f"PRAGMA user_version = {len(self.schema.MIGRATIONS) + 1}")


class PostgresDb:
    name = "postgresql"

    def __init__(self, url: str) -> None:
        import psycopg

        from viper_profiles.postgres import schema

        self.url = url
        self.schema = schema
        self.injected_error = psycopg.errors.RaiseException
        self._connect = psycopg.connect

    def open(self, **options) -> ProfileStore:
        return open_store(self.url, **options)

    @contextlib.contextmanager
    def raw(self):
        with self._connect(self.url, autocommit=True) as connection:
            yield connection

    migration_connection = raw

    def query(self, sql: str) -> list[tuple]:
        with self.raw() as connection:
            return [tuple(row) for row in connection.execute(sql)]

    def execute(self, *statements: str) -> None:
        with self.raw() as connection:
            for statement in statements:
                connection.execute(statement)

    def table_names(self) -> set[str]:
        return {
            name
            for (name,) in self.query("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
        }

    def fail_on(self, table: str, event: str, condition: str = "true") -> list[str]:
        return [
            """CREATE FUNCTION inject_failure() RETURNS trigger LANGUAGE plpgsql
               AS $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$""",
            f"""CREATE TRIGGER inject_failure BEFORE {event} ON {table} FOR EACH ROW WHEN ({condition})
                EXECUTE FUNCTION inject_failure()""",
        ]

    def remove_failure(self) -> list[str]:
        return ["DROP FUNCTION inject_failure() CASCADE"]

    def mark_schema_newer(self) -> None:
        self.execute(
            "INSERT INTO schema_migrations (version, name) SELECT max(version) + 1, 'x' FROM schema_migrations"
        )


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        return SqliteDb(tmp_path / "profiles.db")
    return PostgresDb(request.getfixturevalue("postgres_url"))


@pytest.fixture
def store(db):
    with db.open() as store:
        yield store


@pytest.fixture
def sqlite_db(tmp_path: Path) -> SqliteDb:
    return SqliteDb(tmp_path / "profiles.db")


@pytest.fixture
def postgres_db(postgres_url: str) -> PostgresDb:
    return PostgresDb(postgres_url)


def stored_shas(db) -> set[str]:
    return {sha for (sha,) in db.query("SELECT sha256 FROM images")}


def dump(db) -> dict[str, list[tuple]]:
    return {table: sorted(db.query(f"SELECT * FROM {table}")) for table in TABLES}


@contextlib.contextmanager
def failing(db, table: str, event: str, condition: str | None = None):
    """Installs a trigger, from another connection, that makes a write fail part-way through."""
    db.execute(*(db.fail_on(table, event, condition) if condition else db.fail_on(table, event)))
    try:
        yield
    finally:
        db.execute(*db.remove_failure())


# --- opening a store --------------------------------------------------------------


def test_open_store_picks_the_backend_from_the_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    for url, path in [
        ("plain.db", tmp_path / "plain.db"),
        (tmp_path / "a path.db", tmp_path / "a path.db"),
        ("sqlite:///relative/profiles.db", tmp_path / "relative" / "profiles.db"),
        (f"sqlite:///{tmp_path}/absolute.db", tmp_path / "absolute.db"),
        ("sqlite:///with%20space.db", tmp_path / "with space.db"),
    ]:
        with open_store(url) as store:
            save(store, "alice")
        assert path.is_file(), url
        with open_store(path) as store:
            assert store.get("alice").version == 1


@pytest.mark.parametrize("url", ["mysql://localhost/db", "sqlite://host/db", "sqlite:///"])
def test_open_store_refuses_other_urls(url: str):
    with pytest.raises(ValueError):
        open_store(url)


def test_open_store_on_an_unreachable_postgresql_raises_store_unavailable():
    with socket_closed_port() as port:
        with pytest.raises(StoreUnavailable, match="unavailable"):
            open_store(f"postgresql://nobody@127.0.0.1:{port}/none", timeout=0.3)


def test_open_store_says_why_postgresql_refused_the_connection(postgres_server, postgres_url: str):
    wrong_password = postgres_url.replace(postgres_server.password, "wrong")
    with pytest.raises(StoreUnavailable, match="password authentication failed"):
        open_store(wrong_password, timeout=0.3)
    with pytest.raises(StoreUnavailable, match='database "missing" does not exist'):
        open_store(postgres_url.rsplit("/", 1)[0] + "/missing", timeout=0.3)


@contextlib.contextmanager
def socket_closed_port() -> Iterator[int]:
    """A loopback port with nothing listening on it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        yield probe.getsockname()[1]  # bound but not listening: connections are refused


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


def test_list_orders_user_ids_by_bytes_on_every_backend(store: ProfileStore):
    # A locale-aware order would put "a" next to "A" and skip punctuation; pages must not depend on it.
    user_ids = ["b", "B", "a", "A", "_x", "-x", ".x", "a.b", "a-b", "a_b", "9", "@z", ":y"]
    for user_id in user_ids:
        save(store, user_id, images=[])

    assert [profile.user_id for profile in store.list(page_size=100)] == sorted(user_ids)
    assert [profile.user_id for profile in store.list(page_size=100, after="Z")] == sorted(
        user_id for user_id in user_ids if user_id > "Z"
    )


@pytest.mark.parametrize("page_size", [0, -1])
def test_list_rejects_non_positive_page_size(store: ProfileStore, page_size: int):
    with pytest.raises(ValueError):
        store.list(page_size=page_size)


def test_images_come_back_as_uploaded_in_position_order(store: ProfileStore):
    not_an_image = bytes(range(256)) + b"\x00" * 10  # stored as-is, never decoded
    save(store, "alice", images=[disliked(DISLIKED_PNG), liked(not_an_image), liked(LIKED_PNG)])

    _, images = store.get_with_images("alice")

    assert [image.data for image in images] == [DISLIKED_PNG, not_an_image, LIKED_PNG]
    assert [image.position for image in images] == [0, 1, 2]
    assert [image.sha256 for image in images] == [sha256(image.data) for image in images]
    assert [image.rating for image in images] == [Rating.DISLIKED, Rating.LIKED, Rating.LIKED]


def test_get_with_images_reads_one_version(store: ProfileStore):
    save(store, "alice", images=[liked(LIKED_PNG)])
    save(store, "alice", images=[disliked(DISLIKED_PNG), liked(LIKED_PNG)])

    profile, images = store.get_with_images("alice")

    assert profile == store.get("alice") and profile.version == 2
    assert [(image.sha256, image.comment, image.rating, image.position) for image in images] == [
        (ref.sha256, ref.comment, ref.rating, ref.position) for ref in profile.images
    ]
    assert [image.data for image in images] == [DISLIKED_PNG, LIKED_PNG]
    with pytest.raises(ProfileNotFound):
        store.get_with_images("bob")


def test_image_data_reads_the_current_profile_s_images_by_sha256_and_leaves_out_the_others(store: ProfileStore):
    save(store, "alice", images=[liked(LIKED_PNG), disliked(DISLIKED_PNG)])
    save(store, "bob", images=[liked(b"bob's own bytes")])
    shas = [sha256(LIKED_PNG), sha256(DISLIKED_PNG), sha256(b"bob's own bytes"), "0" * 64]

    assert store.image_data("alice", shas) == {sha256(LIKED_PNG): LIKED_PNG, sha256(DISLIKED_PNG): DISLIKED_PNG}
    save(store, "alice", images=[liked(LIKED_PNG)])  # the profile changed since its row was read
    assert store.image_data("alice", shas) == {sha256(LIKED_PNG): LIKED_PNG}
    with pytest.raises(ProfileNotFound):
        store.image_data("alice", shas, tenant="shop")  # another tenant's alice has no profile
    with pytest.raises(ProfileNotFound):
        store.image_data("carol", shas)


def test_get_with_images_never_mixes_two_versions(db, store: ProfileStore):
    # Each version's images all carry its number: a read that mixed snapshots would show two numbers.
    def images(version: int) -> list[SourceImage]:
        return [liked(f"v{version} image {index}".encode(), f"v{version}") for index in range(4)]

    save(store, "alice", images=images(1))
    stop = threading.Event()

    def rewrite() -> None:
        with db.open() as writer:
            version = 1
            while not stop.is_set():
                version += 1
                save(writer, "alice", images=images(version))

    thread = threading.Thread(target=rewrite)
    thread.start()
    try:
        for _ in range(150):
            profile, read = store.get_with_images("alice")
            assert {image.comment for image in read} == {f"v{profile.version}"}
            assert [image.sha256 for image in read] == [ref.sha256 for ref in profile.images]
    finally:
        stop.set()
        thread.join()


def test_timestamps_are_utc_with_microseconds(store: ProfileStore):
    profile = save(store, "alice")

    assert profile.created_at.tzinfo == timezone.utc
    assert store.get("alice").created_at == profile.created_at  # microseconds survive the round trip
    assert store.get("alice").updated_at.tzinfo == timezone.utc


def test_sqlite_stores_timestamps_as_iso_with_microseconds(sqlite_db: SqliteDb):
    with sqlite_db.open() as store:
        save(store, "alice")
    [(created_at, updated_at)] = sqlite_db.query("SELECT created_at, updated_at FROM profiles")
    iso_utc_micro = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00"
    assert re.fullmatch(iso_utc_micro, created_at)
    assert re.fullmatch(iso_utc_micro, updated_at)


def test_postgresql_column_types(postgres_db: PostgresDb):
    postgres_db.open().close()
    columns = dict(
        ((table, column), data_type)
        for table, column, data_type in postgres_db.query(
            "SELECT table_name, column_name, data_type FROM information_schema.columns WHERE table_schema = 'public'"
        )
    )
    assert columns[("images", "data")] == "bytea"
    assert columns[("profiles", "created_at")] == "timestamp with time zone"
    assert columns[("profiles", "liked_features")] == "ARRAY"
    assert columns[("last_versions", "version")] == "bigint"


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"raw_text": "a\x00b"}, "raw_text"),
        ({"liked_features": ["ok", "n\x00l"]}, "liked_features[1]"),
        ({"images": [liked(b"x"), disliked(b"y", "bad\x00")]}, "images[1].comment"),
    ],
)
def test_text_with_a_nul_character_is_refused_on_every_backend(store: ProfileStore, fields, field):
    with pytest.raises(InvalidText) as raised:
        save(store, "alice", **fields)
    assert raised.value.field == field and isinstance(raised.value, ValueError)
    save(store, "alice")
    with pytest.raises(InvalidText):
        store.update_features("alice", disliked_features=["\x00"])
    assert store.get("alice").version == 1


# --- versioning: re-extraction, update, delete -------------------------------------


def test_re_extraction_replaces_everything_and_keeps_created_at(store: ProfileStore, db):
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
    # The replaced images stay while version 1 is kept in the history (test_store_history.py).
    assert stored_shas(db) == {sha256(LIKED_PNG), sha256(b"old only"), sha256(DISLIKED_PNG)}
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
    assert store.update_features("alice", liked_features=[]).liked_features == ()


def test_update_features_with_a_stale_version_changes_nothing(store: ProfileStore, db):
    save(store, "alice")
    store.update_features("alice", liked_features=["first"])
    before, stored = store.get("alice"), dump(db)

    with pytest.raises(VersionConflict) as raised:
        store.update_features("alice", liked_features=["second"], expected_version=1)

    assert (raised.value.user_id, raised.value.expected, raised.value.actual) == ("alice", 1, 2)
    assert store.get("alice") == before
    assert dump(db) == stored


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

    assert store.delete("alice", expected_version=2) == 2  # the version deleted
    assert store.count() == 0


# --- versions are never reused (issue 10, item 1) -------------------------------------


def test_versions_continue_above_a_deleted_profile(store: ProfileStore):
    save(store, "alice")
    store.update_features("alice", liked_features=["second"])
    store.delete("alice")

    again = save(store, "alice", images=[liked(b"other images")])

    assert again.version == 3
    # An expected_version held from the deleted profile names other content: refused.
    for stale in (1, 2):
        with pytest.raises(VersionConflict) as raised:
            store.update_features("alice", liked_features=["lost update"], expected_version=stale)
        assert raised.value.actual == 3
        with pytest.raises(VersionConflict):
            store.delete("alice", expected_version=stale)
    assert store.update_features("alice", liked_features=["ok"], expected_version=3).version == 4
    assert save(store, "bob").version == 1  # per user


def test_versions_never_repeat_across_stores_sharing_a_database(db):
    # Like several server processes on one database: none of them remembers versions in memory.
    with db.open() as first, db.open() as second:
        assert save(first, "alice").version == 1
        assert second.delete("alice") == 1
        assert save(second, "alice").version == 2
        first.delete("alice", expected_version=2)
        assert save(first, "alice").version == 3
        second.delete("alice")
    with db.open() as reopened:
        assert save(reopened, "alice").version == 4


def test_racing_saves_and_deletes_of_one_user_never_hand_out_a_version_twice(db):
    with db.open() as first, db.open() as second:
        stores = [first, second, first, second]

        def churn(i: int) -> list[int]:
            versions = []
            for _ in range(6):
                versions.append(save(stores[i], "alice", images=[liked(SHARED), liked(b"own %d" % i)]).version)
                with contextlib.suppress(ProfileNotFound):
                    stores[i].delete("alice")
            return versions

        outcomes = run_in_threads(4, churn)

    versions = [version for outcome in outcomes for version in outcome]
    assert len(versions) == 24 and len(set(versions)) == 24
    assert all(outcome == sorted(outcome) for outcome in outcomes)


def test_a_version_1_sqlite_database_upgrades_in_place(tmp_path: Path):
    path = tmp_path / "profiles.db"
    shutil.copy(VERSION_1_DATABASE, path)
    old = SqliteDb(path)
    assert old.query("PRAGMA user_version") == [(1,)]
    before = {table: sorted(old.query(f"SELECT * FROM {table}")) for table in TABLES[:3]}

    with open_store(path) as store:
        # Every row moved into the tenant "default", unchanged otherwise.
        in_default = {table: sorted(("default", *row) if table != "images" else row for row in rows)
                      for table, rows in before.items()}
        assert {table: sorted(old.query(f"SELECT * FROM {table}")) for table in TABLES[:3]} == in_default
        assert old.query("PRAGMA user_version") == [(len(sqlite_schema.MIGRATIONS),)]
        assert sorted(old.query("SELECT * FROM last_versions")) == [("default", "alice", 3), ("default", "bob", 1)]
        alice, images = store.get_with_images("alice")
        assert (alice.version, alice.liked_features, alice.disliked_features) == (
            3,
            ("warm colors", "impasto"),
            ("neon",),
        )
        assert [(image.data, image.comment) for image in images] == [(b"shared image", "nice"), (b"alice only", "dull")]
        assert images_of(store, "bob") == [b"shared image"]

        store.delete("alice")
        assert save(store, "alice").version == 4
        assert store.update_features("bob", liked_features=["x"], expected_version=1).version == 2


# --- content-addressed images ------------------------------------------------------


def test_same_bytes_are_stored_once_and_kept_while_any_profile_uses_them(store: ProfileStore, db):
    save(store, "alice", images=[liked(SHARED, "alice likes it"), liked(b"alice only")])
    save(store, "bob", images=[disliked(SHARED, "bob does not"), liked(SHARED, "twice")])
    assert stored_shas(db) == {sha256(SHARED), sha256(b"alice only")}

    store.delete("alice")
    assert stored_shas(db) == {sha256(SHARED)}
    assert images_of(store, "bob") == [SHARED, SHARED]

    store.delete("bob")
    assert stored_shas(db) == set()


# --- persistence, closing, migrations -----------------------------------------------


def test_profiles_persist_across_reopen(db):
    with db.open() as store:
        saved = save(store, "alice")
    with db.open() as store:
        assert store.get("alice") == saved
        assert images_of(store, "alice") == [LIKED_PNG, DISLIKED_PNG]


def test_sqlite_creates_missing_parent_directories(tmp_path: Path):
    with open_store(tmp_path / "nested" / "dir" / "profiles.db") as store:
        save(store, "alice")
    assert (tmp_path / "nested" / "dir" / "profiles.db").is_file()


def test_sqlite_database_is_in_wal_mode(sqlite_db: SqliteDb):
    sqlite_db.open().close()
    assert sqlite_db.query("PRAGMA journal_mode") == [("wal",)]


def test_close_is_idempotent_and_a_closed_store_is_unavailable(db):
    store = db.open()
    save(store, "alice")
    store.close()
    store.close()
    for call in (store.ping, lambda: store.get("alice"), lambda: save(store, "bob")):
        with pytest.raises(StoreUnavailable, match="closed"):
            call()
    with db.open() as store:
        store.ping()
    store.close()


def test_ping_answers_when_the_database_does(store: ProfileStore):
    assert store.ping() is None


def test_opening_a_current_database_changes_nothing(db):
    with db.open() as store:
        save(store, "alice")
    schema_query = (
        "SELECT type, name, sql FROM sqlite_master"
        if db.name == "sqlite"
        else "SELECT table_name, column_name, data_type FROM information_schema.columns WHERE table_schema = 'public'"
    )
    schema, data = sorted(db.query(schema_query)), dump(db)
    recorded = db.query("PRAGMA user_version" if db.name == "sqlite" else "SELECT * FROM schema_migrations")

    db.open().close()

    assert sorted(db.query(schema_query)) == schema
    assert dump(db) == data
    assert db.query("PRAGMA user_version" if db.name == "sqlite" else "SELECT * FROM schema_migrations") == recorded


def test_postgresql_records_each_migration_once(postgres_db: PostgresDb):
    for _ in range(2):
        postgres_db.open().close()
    names = [postgres_db.schema.migration_name(migration) for migration in postgres_db.schema.MIGRATIONS]
    assert postgres_db.query("SELECT version, name FROM schema_migrations ORDER BY version") == [
        (number, name) for number, name in enumerate(names, start=1)
    ]


def test_a_database_with_other_tables_is_migrated_and_keeps_them(db):
    db.execute("CREATE TABLE notes (text TEXT)", "INSERT INTO notes VALUES ('kept')")

    with db.open() as store:
        save(store, "alice")

    with db.migration_connection() as connection:
        assert db.schema.schema_version(connection) == len(db.schema.MIGRATIONS)
    assert db.query("SELECT text FROM notes") == [("kept",)]


def counting_migration(name: str, applied: list[str]):
    def apply(connection) -> None:
        applied.append(name)
        connection.execute(f"CREATE TABLE {name} (id integer PRIMARY KEY)")

    apply.__name__ = name
    return apply


def test_migrate_applies_only_pending_migrations_in_order(db):
    applied: list[str] = []
    first, second, third = (counting_migration(name, applied) for name in ("first", "second", "third"))
    with db.migration_connection() as connection:
        db.schema.migrate(connection, [first, second])
        assert (applied, db.schema.schema_version(connection)) == (["first", "second"], 2)

        db.schema.migrate(connection, [first, second, third])  # an older database meets newer code
        assert (applied, db.schema.schema_version(connection)) == (["first", "second", "third"], 3)

        db.schema.migrate(connection, [first, second, third])
        assert applied == ["first", "second", "third"]
    assert db.table_names() - {"schema_migrations"} == {"first", "second", "third"}


def test_a_failing_migration_leaves_the_database_untouched(db):
    def create_table(connection) -> None:
        connection.execute("CREATE TABLE half_done (id integer PRIMARY KEY)")

    def fail(connection) -> None:
        raise RuntimeError("migration bug")

    with db.migration_connection() as connection:
        with pytest.raises(RuntimeError):
            db.schema.migrate(connection, [create_table, fail])
        assert db.schema.schema_version(connection) == 0
    assert db.table_names() == set()


def test_refuses_a_database_from_newer_code(db):
    db.open().close()
    db.mark_schema_newer()
    with pytest.raises(StoreError, match="newer"):
        db.open()


def test_processes_starting_together_migrate_once(db):
    # Each thread has its own connection, as separate processes would.
    applied: list[str] = []
    migrations = [counting_migration(name, applied) for name in ("one", "two", "three")]

    def migrate(_: int) -> None:
        with db.migration_connection() as connection:
            db.schema.migrate(connection, migrations)

    assert run_in_threads(6, migrate) == [None] * 6
    assert applied == ["one", "two", "three"]


def test_stores_opened_together_on_a_new_database_all_work(db):
    stores = run_in_threads(5, lambda i: db.open())
    try:
        assert all(isinstance(store, ProfileStore) for store in stores), stores
        for index, store in enumerate(stores):
            save(store, f"user{index}")
        assert all(store.count() == 5 for store in stores)
    finally:
        for store in stores:
            if isinstance(store, ProfileStore):
                store.close()


# Enough rounds that the old code (PRAGMA journal_mode=WAL failing at once with "database is locked" when
# another process switched the new file first) failed every run: about 1 round in 30 lost a store. Files
# already in WAL mode only migrate, under BEGIN IMMEDIATE, which waits for the lock: fewer rounds.
PROCESSES, ROUNDS = 6, {"new": 120, "version-1": 30}


def open_each_store_together(paths: list[str], barrier, outcomes) -> None:
    """In a child process: opens and closes a store on each file, released together with the other children."""
    for path in paths:
        barrier.wait(timeout=120)
        try:
            open_store(path).close()
            outcomes.put(None)
        except Exception as error:  # reported to the test, which names the file
            outcomes.put(f"{Path(path).name}: {error!r}")


@pytest.mark.parametrize("existing", [False, True], ids=["new", "version-1"])
def test_processes_opening_a_database_together_all_succeed(tmp_path: Path, existing: bool):
    """Separate processes (not threads sharing one SQLite library) opening one file at the same moment:
    every store opens, the file ends migrated once, in WAL mode."""
    rounds = ROUNDS["version-1" if existing else "new"]
    paths = [str(tmp_path / f"{round}.db") for round in range(rounds)]
    if existing:
        for path in paths:
            shutil.copy(VERSION_1_DATABASE, path)
    context = multiprocessing.get_context("spawn")
    barrier, outcomes = context.Barrier(PROCESSES), context.Queue()
    children = [context.Process(target=open_each_store_together, args=(paths, barrier, outcomes))
                for _ in range(PROCESSES)]
    for child in children:
        child.start()
    try:
        results = [outcomes.get(timeout=300) for _ in range(PROCESSES * rounds)]
    finally:
        for child in children:
            child.join(timeout=60)
            child.kill()
    assert [result for result in results if result is not None] == []
    assert [child.exitcode for child in children] == [0] * PROCESSES
    for path in paths:
        with contextlib.closing(sqlite3.connect(path)) as connection:
            assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            assert connection.execute("PRAGMA user_version").fetchone() == (len(sqlite_schema.MIGRATIONS),)


# --- every write is one transaction ----------------------------------------------


def test_a_failed_re_extraction_changes_nothing(store: ProfileStore, db):
    save(store, "alice", images=[liked(b"old")])
    save(store, "bob", images=[liked(SHARED)])
    before, profile = dump(db), store.get("alice")

    # Fires on the second reference row: after the version was claimed, the profile row written, the old
    # references deleted and the new images inserted.
    with failing(db, "profile_images", "INSERT", "NEW.position = 1"):
        with pytest.raises(db.injected_error, match="injected failure"):
            save(store, "alice", liked_features=["new"], images=[liked(b"brand new"), liked(SHARED)])

    assert dump(db) == before
    assert store.get("alice") == profile
    assert save(store, "alice").version == 2  # the store is still usable, and no version was used up


def test_a_failed_first_save_leaves_no_trace(store: ProfileStore, db):
    before = dump(db)

    with failing(db, "profile_images", "INSERT", "NEW.position = 1"):
        with pytest.raises(db.injected_error):
            save(store, "alice", images=[liked(b"one"), liked(b"two")])

    assert dump(db) == before
    with pytest.raises(ProfileNotFound):
        store.get("alice")


def test_a_failed_delete_changes_nothing(store: ProfileStore, db):
    save(store, "alice", images=[liked(b"alice only"), liked(SHARED)])
    save(store, "bob", images=[liked(SHARED)])
    before = dump(db)

    # Fires at the last step, after the references and the profile row are gone.
    with failing(db, "images", "DELETE"):
        with pytest.raises(db.injected_error):
            store.delete("alice")

    assert dump(db) == before
    store.delete("alice")
    assert stored_shas(db) == {sha256(SHARED)}


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
        lambda store, user_id: store.get_with_images(user_id),
        lambda store, user_id: store.image_data(user_id, []),
    ],
    ids=["save_extraction", "get", "update_features", "delete", "get_with_images", "image_data"],
)
def test_every_method_validates_user_id(store: ProfileStore, db, call):
    with pytest.raises(InvalidUserId):
        call(store, "bad id")
    assert dump(db) == {table: [] for table in TABLES}


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
    assert len(winners) == 1 and len(conflicts) == 7, outcomes
    assert all((conflict.expected, conflict.actual) == (1, 2) for conflict in conflicts)
    assert store.get("alice") == winners[0]
    assert winners[0].version == 2


def test_racing_updates_through_separate_connections_have_one_winner(db):
    # Like several server processes on one database: no in-process lock can help, the database's must.
    stores = [db.open() for _ in range(6)]
    try:
        save(stores[0], "alice")
        outcomes = run_in_threads(
            6,
            lambda i: stores[i].update_features("alice", liked_features=[f"t{i}"], expected_version=1),
        )
    finally:
        for store in stores:
            store.close()

    outcome_types = sorted(type(outcome).__name__ for outcome in outcomes)
    assert outcome_types == ["StoredProfile"] + ["VersionConflict"] * 5, outcomes


def test_concurrent_unconditional_updates_are_all_counted(store: ProfileStore):
    save(store, "alice")

    def update_five_times(i: int) -> None:
        for round_ in range(5):
            store.update_features("alice", liked_features=[f"{i}-{round_}"])

    outcomes = run_in_threads(6, update_five_times)

    assert outcomes == [None] * 6
    assert store.get("alice").version == 1 + 6 * 5


def test_concurrent_saves_and_deletes_keep_shared_images_consistent(store: ProfileStore, db):
    def save_user(i: int):
        return save(store, f"user{i}", images=[liked(SHARED), liked(f"own {i}".encode())])

    assert all(not isinstance(outcome, Exception) for outcome in run_in_threads(6, save_user))
    assert store.count() == 6
    assert len(stored_shas(db)) == 1 + 6

    assert run_in_threads(3, lambda i: store.delete(f"user{i}")) == [1] * 3  # the deleted versions
    assert stored_shas(db) == {sha256(SHARED)} | {sha256(f"own {i}".encode()) for i in range(3, 6)}

    assert run_in_threads(3, lambda i: store.delete(f"user{i + 3}")) == [1] * 3
    assert stored_shas(db) == set()


def test_users_sharing_images_while_others_drop_them_never_fail(db):
    # One user's delete may find an image unused just as another user's save starts using it again:
    # the image must stay (or come back) and neither call may fail.
    with db.open() as first, db.open() as second:
        stores = [first, second, first, second]

        def churn(i: int) -> None:
            for round_ in range(8):
                images = [liked(SHARED), liked(b"common %d" % (round_ % 2)), liked(b"own %d" % i)]
                save(stores[i], f"user{i}", images=images[::-1] if i % 2 else images)
                stores[i].delete(f"user{i}")
            save(stores[i], f"user{i}", images=[liked(SHARED)])

        assert run_in_threads(4, churn) == [None] * 4
        assert stored_shas(db) == {sha256(SHARED)}
        assert all(images_of(first, f"user{i}") == [SHARED] for i in range(4))


def test_postgresql_write_that_loses_a_deadlock_is_run_again(postgres_db: PostgresDb):
    # Two writes lock two users in opposite orders: PostgreSQL aborts one, which the backend runs again.
    # (The store's own writes lock one user each; this forces what a future write might do.)
    with postgres_db.open() as store:
        save(store, "a")
        save(store, "b")
        both_hold_one = threading.Barrier(2)
        attempts = {"ab": 0, "ba": 0}

        def lock_in_order(order: str):
            def operation(tx) -> str:
                attempts[order] += 1
                tx.lock_user(order[0])
                if attempts[order] == 1:
                    both_hold_one.wait()
                tx.lock_user(order[1])
                return order

            return operation

        outcomes = run_in_threads(2, lambda i: store._backend.write(lock_in_order(["ab", "ba"][i])))

    assert outcomes == ["ab", "ba"]
    fewer, more = sorted(attempts.values())
    assert fewer == 1 and more >= 2  # the deadlock's loser was run again, and went through


# --- an unreachable database -------------------------------------------------------


def test_sqlite_write_lock_held_past_the_timeout_is_store_unavailable(sqlite_db: SqliteDb):
    with sqlite_db.open(timeout=0.1) as store:
        save(store, "alice")
        with sqlite_db.raw() as other:
            other.execute("BEGIN IMMEDIATE")  # another process writing, for too long
            with pytest.raises(StoreUnavailable, match="busy"):
                save(store, "bob")
            assert store.get("alice").version == 1  # reads go on (WAL)
            other.execute("ROLLBACK")
        assert save(store, "bob").version == 1


def test_postgresql_down_is_store_unavailable_until_it_is_back(postgres_server, postgres_db: PostgresDb):
    with postgres_db.open(timeout=0.3) as store:
        alice = save(store, "alice")
        postgres_server.stop()
        try:
            for call in (
                store.ping,
                lambda: store.ping(timeout=0.1),
                lambda: store.get("alice"),
                lambda: save(store, "bob"),
                lambda: store.delete("alice"),
                store.count,
            ):
                with pytest.raises(StoreUnavailable):
                    call()
        finally:
            postgres_server.start()

        # The pool reconnects by itself: no call needed beyond the ones that now succeed.
        wait_until(store.ping)
        assert store.get("alice") == alice
        assert save(store, "bob").version == 1
        assert store.count() == 2


def test_postgresql_crash_loses_no_acknowledged_write(postgres_server, postgres_db: PostgresDb):
    acknowledged: list = []
    unavailable: list[StoreUnavailable] = []
    stop = threading.Event()

    with postgres_db.open(timeout=0.3) as store:

        def write(i: int) -> None:
            for n in range(10_000):
                if stop.is_set():
                    return
                try:
                    acknowledged.append(save(store, f"w{i}-{n}", images=[liked(SHARED), liked(b"%d-%d" % (i, n))]))
                except StoreUnavailable as error:
                    unavailable.append(error)
                    time.sleep(0.01)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: len(acknowledged) >= 15)
            postgres_server.stop("immediate")  # like a crash: connections cut in mid-transaction
            wait_for(lambda: len(unavailable) >= 3)
            postgres_server.start()
            recovered_from = len(acknowledged)
            wait_for(lambda: len(acknowledged) >= recovered_from + 15)  # writers go on after recovery
        finally:
            stop.set()
            for thread in threads:
                thread.join()
            postgres_server.start()

        for profile in acknowledged:
            assert store.get(profile.user_id) == profile
        assert {sha256(SHARED)} <= stored_shas(postgres_db)


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_postgresql_pool_exhausted_past_the_timeout_is_store_unavailable(postgres_db: PostgresDb):
    # A gate holds an update, and with it the pool's only connection, until the test opens it.
    postgres_db.execute(
        "CREATE TABLE gate (opened boolean)",
        """CREATE FUNCTION wait_for_gate() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
             WHILE NOT EXISTS (SELECT 1 FROM gate) LOOP PERFORM pg_sleep(0.01); END LOOP;
             RETURN NEW;
           END $$""",
    )
    with postgres_db.open(pool_size=1, timeout=0.3) as store:
        save(store, "alice")
        save(store, "bob")
        postgres_db.execute(
            "CREATE TRIGGER hold BEFORE UPDATE ON profiles FOR EACH ROW EXECUTE FUNCTION wait_for_gate()"
        )
        held: dict = {}
        holder = threading.Thread(
            target=lambda: held.update(profile=store.update_features("alice", liked_features=["held"]))
        )
        holder.start()
        wait_for(lambda: postgres_db.query("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%UPDATE profiles%'"
                                           " AND state = 'active' AND pid <> pg_backend_pid()") == [(1,)])

        with pytest.raises(StoreUnavailable, match="couldn't get a connection"):
            store.get("bob")

        postgres_db.execute("INSERT INTO gate VALUES (true)")
        holder.join()
        assert held["profile"].version == 2
        assert store.get("bob").version == 1



# --- tenants -----------------------------------------------------------------------


def test_the_same_user_id_in_two_tenants_is_two_profiles(store: ProfileStore):
    save(store, "alice", tenant="shop", liked_features=["shop"], images=[liked(b"shop image")])
    save(store, "alice", tenant="bank", liked_features=["bank"], images=[liked(b"bank image")])
    save(store, "alice", tenant="bank", liked_features=["bank again"], images=[liked(b"bank image")])
    assert store.get("alice", tenant="shop").liked_features == ("shop",)
    assert store.get("alice", tenant="shop").version == 1  # versions are per tenant too
    assert store.get("alice", tenant="bank").version == 2
    with pytest.raises(ProfileNotFound):
        store.get("alice")  # the default tenant has no alice
    assert [image.data for image in store.get_with_images("alice", tenant="shop")[1]] == [b"shop image"]

    store.delete("alice", tenant="shop")
    assert store.get("alice", tenant="bank").liked_features == ("bank again",)
    with pytest.raises(ProfileNotFound):
        store.update_features("alice", tenant="shop", liked_features=["x"])
    with pytest.raises(ProfileNotFound):
        store.delete("alice", tenant="shop")


def test_listing_stays_in_its_tenant(store: ProfileStore):
    for user in ("a", "b", "c"):
        save(store, user, tenant="shop")
    save(store, "bb", tenant="bank")
    assert [p.user_id for p in store.list(page_size=10, tenant="shop")] == ["a", "b", "c"]
    assert [p.user_id for p in store.list(page_size=10, after="a", tenant="shop")] == ["b", "c"]
    assert [p.user_id for p in store.list(page_size=10, tenant="bank")] == ["bb"]
    assert store.list(page_size=10) == []
    assert store.count() == 4


@pytest.mark.parametrize("tenant", ["", "Shop", "a/b", "x" * 64, "-x"])
def test_a_malformed_tenant_is_refused(store: ProfileStore, tenant: str):
    from viper_profiles import InvalidTenant

    with pytest.raises(InvalidTenant):
        store.get("alice", tenant=tenant)


def test_rows_stored_before_tenants_move_into_the_default_tenant(db):
    # A database at the schema before tenants, with data in it, as a released version left it.
    with db.migration_connection() as connection:
        db.schema.migrate(connection, db.schema.MIGRATIONS[:2])
    at = "'2024-01-01T00:00:00+00:00'"
    features = "'[]'" if db.name == "sqlite" else "'{}'"
    db.execute(
        "INSERT INTO images (sha256, data) VALUES ('s1', " + ("x'01'" if db.name == "sqlite" else "'\\x01'") + ")",
        f"INSERT INTO profiles VALUES ('alice', {features}, {features}, 'text', 3, 'm', {at}, {at})",
        "INSERT INTO profile_images VALUES ('alice', 0, 's1', 'nice', 'liked')",
        "INSERT INTO last_versions VALUES ('alice', 3)",
    )
    with db.open() as store:
        alice, images = store.get_with_images("alice")
        assert (alice.version, [image.comment for image in images]) == (3, ["nice"])
        with pytest.raises(ProfileNotFound):
            store.get("alice", tenant="shop")
        assert save(store, "alice").version == 4  # the last version given moved too
        assert save(store, "alice", tenant="shop").version == 1
