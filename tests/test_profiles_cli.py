"""viper-profiles, the operator's CLI on the profile store: migrate, check, stats and backup, on SQLite and on
PostgreSQL, run in process through its main()."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest

from viper_client import ViperClient
from viper_profiles import DB_ENV, Rating, SourceImage, open_store
from viper_profiles.cli import main
from viper_profiles.sqlite.schema import MIGRATIONS, migration_name
from viper_server.testing import ServerProcess

from imagedata import noise_png, png_bytes

MIGRATION_NAMES = [migration_name(migration) for migration in MIGRATIONS]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "profiles.db")
    return request.getfixturevalue("postgres_url")


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def save(store, user: str, *images: bytes) -> None:
    store.save_extraction(
        user, liked_features=["soft light"], disliked_features=["gloom"], raw_text="Liked Art Features: soft light",
        extractor_model="test",
        images=[SourceImage(data, f"comment {n}", Rating.LIKED) for n, data in enumerate(images)],
    )


def raw_execute(url: str, *statements: str) -> None:
    """Writes behind the store's back, foreign keys not enforced (as a careless script or a bug could)."""
    if url.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute("SET session_replication_role = replica")  # skips the foreign key triggers
            for statement in statements:
                connection.execute(statement)
    else:
        with sqlite3.connect(url, isolation_level=None) as connection:  # foreign_keys is off by default
            for statement in statements:
                connection.execute(statement)
        connection.close()


# --- migrate


def test_migrate_prints_what_ran_then_that_nothing_was_pending(capsys, db_url):
    status, out, err = run(capsys, "migrate", "--db", db_url)
    assert status == 0, err
    assert out.splitlines() == [
        *(f"applied migration {number}: {name}" for number, name in enumerate(MIGRATION_NAMES, start=1)),
        f"schema at version {len(MIGRATION_NAMES)}",
    ]
    status, out, err = run(capsys, "migrate", "--db", db_url)
    assert (status, out, err) == (0, f"nothing to migrate: schema at version {len(MIGRATION_NAMES)}\n", "")


def test_migrate_takes_the_database_from_the_servers_env_var(capsys, monkeypatch, tmp_path):
    assert DB_ENV == "VIPER_DB"
    monkeypatch.setenv(DB_ENV, f"sqlite:///{tmp_path}/from-env.db")
    status, out, _ = run(capsys, "migrate")
    assert status == 0 and "applied migration 1" in out
    assert (tmp_path / "from-env.db").is_file()


def test_migrate_only_applies_what_a_database_lacks(capsys, tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as connection:  # a database a release with only the first migration made
        from sqlite_utils import Database

        MIGRATIONS[0](Database(connection))
        connection.execute("PRAGMA user_version = 1")
    connection.close()
    status, out, _ = run(capsys, "migrate", "--db", str(path))
    assert status == 0
    assert out.splitlines()[0] == f"applied migration 2: {MIGRATION_NAMES[1]}"
    assert "migration 1:" not in out


# --- check


def test_check_passes_on_a_healthy_database(capsys, db_url):
    with open_store(db_url) as store:
        save(store, "alice", png_bytes(), png_bytes(color=(1, 2, 3)))
        save(store, "bob", png_bytes())
        save(store, "carol", png_bytes(color=(9, 9, 9)))
        store.delete("carol")  # its last version is kept on purpose: not a stray row
    status, out, err = run(capsys, "check", "--db", db_url)
    assert (status, err) == (0, "")
    assert out.splitlines() == [
        f"schema: version {len(MIGRATION_NAMES)} of {len(MIGRATION_NAMES)}, current", "integrity: ok", "rows: ok",
    ]


def test_check_finds_an_orphaned_image_and_a_deleted_users_stray_rows(capsys, db_url):
    with open_store(db_url) as store:
        save(store, "alice", png_bytes())
    shared = hashlib.sha256(png_bytes()).hexdigest()
    orphan = noise_png(8)
    blob = f"X'{orphan.hex()}'" if not db_url.startswith("postgresql") else f"'\\x{orphan.hex()}'::bytea"
    raw_execute(
        db_url,
        f"INSERT INTO images (sha256, data) VALUES ('{hashlib.sha256(orphan).hexdigest()}', {blob})",
        "INSERT INTO profile_images (tenant, user_id, position, sha256, comment, rating) "
        f"VALUES ('default', 'deleted-user', 0, '{shared}', 'left behind', 'liked')",
    )
    status, out, err = run(capsys, "check", "--db", db_url)
    assert status == 1
    assert f"1 orphaned image(s), {len(orphan)} bytes" in out
    assert "1 stray image reference(s) of 1 user(s) without a profile" in out
    assert err.startswith("error: ") and "problem(s) found" in err
    if not db_url.startswith("postgresql"):  # SQLite's own foreign key check sees the stray row too
        assert "row(s) of profile_images refer to a missing profiles row" in out


def test_check_finds_postgresql_foreign_keys_that_are_not_enforced(capsys, postgres_url):
    open_store(postgres_url).close()
    raw_execute(postgres_url, "ALTER TABLE profile_images DISABLE TRIGGER ALL")
    status, out, _ = run(capsys, "check", "--db", postgres_url)
    assert status == 1
    assert "integrity: 4 foreign key trigger(s) of profile_images are disabled" in out


def test_check_reports_a_database_that_is_not_migrated(capsys, db_url):
    if not db_url.startswith("postgresql"):
        Path(db_url).touch()  # an empty file is an empty SQLite database
    status, out, _ = run(capsys, "check", "--db", db_url)
    assert status == 1
    assert f"schema version 0 of {len(MIGRATION_NAMES)}" in out and "run `viper-profiles migrate`" in out
    assert "rows: not checked until the schema is current" in out


def test_check_reports_a_schema_newer_than_the_code(capsys, tmp_path):
    path = tmp_path / "newer.db"
    open_store(path).close()
    raw_execute(str(path), f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    status, out, _ = run(capsys, "check", "--db", str(path))
    assert status == 1 and "newer than this code's" in out


def test_check_never_creates_a_database(capsys, tmp_path):
    missing = tmp_path / "typo.db"
    status, out, err = run(capsys, "check", "--db", str(missing))
    assert (status, out) == (2, "")
    assert err == f"error: no SQLite database at {missing}\n"
    assert not missing.exists()


def test_check_finds_a_damaged_sqlite_file(capsys, tmp_path):
    path = tmp_path / "damaged.db"
    with open_store(path) as store:
        for n in range(20):
            save(store, f"user-{n}", noise_png(64, seed=n))
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = b"\xff" * 4096  # a page of garbage in the middle
    path.write_bytes(bytes(data))
    status, out, err = run(capsys, "check", "--db", str(path))
    assert status == 1, (out, err)
    # SQLite either lists what is wrong or finds the file too damaged to go on: a problem, not a crash.
    assert out.splitlines()[1].startswith("integrity: ") and out.splitlines()[1] != "integrity: ok"


# --- stats


def test_stats_counts_users_versions_images_bytes_and_shared_images(capsys, db_url):
    common, own, gone = png_bytes(), noise_png(8, seed=1), noise_png(8, seed=2)
    with open_store(db_url) as store:
        save(store, "alice", common, own)
        store.update_features("alice", liked_features=["pastel"])  # version 2
        save(store, "bob", common)
        save(store, "carol", gone)
        store.delete("carol")
    status, out, err = run(capsys, "stats", "--db", db_url, "--json")
    assert (status, err) == (0, "")
    stats = json.loads(out)
    assert stats.pop("database_bytes") > 0
    assert stats == {
        "schema_version": len(MIGRATION_NAMES), "users": 2, "deleted_users": 1, "versions": 2 + 1 + 1,
        "images": 2, "image_bytes": len(common) + len(own), "image_references": 3, "shared_images": 1,
    }
    status, out, _ = run(capsys, "stats", "--db", db_url)
    assert status == 0
    assert "shared images     1" in out and f"image bytes       {len(common) + len(own)} (" in out


def test_stats_refuses_a_database_that_is_not_migrated(capsys, tmp_path):
    path = tmp_path / "empty.db"
    path.touch()
    status, out, err = run(capsys, "stats", "--db", str(path))
    assert (status, out) == (1, "")
    assert "run `viper-profiles migrate`" in err and len(err.splitlines()) == 1


# --- backup


def test_backup_is_a_database_the_server_starts_on_with_the_same_profiles(capsys, tmp_path, tiny_models_dir):
    source, copy = tmp_path / "profiles.db", tmp_path / "backup" / "copy.db"
    copy.parent.mkdir()
    with open_store(source) as store:
        save(store, "alice", png_bytes(), noise_png(16))
        save(store, "bob", png_bytes())
        alice = store.get("alice")
        # Online: another connection is in the middle of a write while the copy is made.
        with sqlite3.connect(source, isolation_level=None) as writer:
            writer.execute("BEGIN IMMEDIATE")
            writer.execute("UPDATE profiles SET raw_text = 'uncommitted' WHERE user_id = 'bob'")
            status, out, err = run(capsys, "backup", "--db", str(source), str(copy))
            writer.execute("COMMIT")
        writer.close()
    assert (status, err) == (0, "")
    assert out.startswith(f"backed up to {copy} (")
    assert sorted(path.name for path in copy.parent.iterdir()) == ["copy.db"]  # no partial file left

    assert run(capsys, "check", "--db", str(copy))[0] == 0
    with ServerProcess(copy, tiny_models_dir) as server, ViperClient(server.target) as client:
        restored = client.get_profile("alice")
        assert [profile.user_id for profile in client.list_profiles()] == ["alice", "bob"]
        assert client.get_profile("bob").raw_text == "Liked Art Features: soft light"  # the committed text
    assert (restored.version, restored.liked_features, restored.raw_text) == (
        alice.version, list(alice.liked_features), alice.raw_text)
    assert [image.sha256 for image in restored.images] == [image.sha256 for image in alice.images]


def test_backup_never_overwrites_a_file(capsys, tmp_path):
    source, existing = tmp_path / "profiles.db", tmp_path / "last-good-backup.db"
    open_store(source).close()
    existing.write_bytes(b"precious")
    status, out, err = run(capsys, "backup", "--db", str(source), str(existing))
    assert (status, out) == (2, "")
    assert "exists" in err and existing.read_bytes() == b"precious"


def test_backup_into_a_missing_directory_is_a_usage_error(capsys, tmp_path):
    source = tmp_path / "profiles.db"
    open_store(source).close()
    status, out, err = run(capsys, "backup", "--db", str(source), str(tmp_path / "nowhere" / "copy.db"))
    assert (status, out) == (2, "")
    assert err == f"error: no directory {tmp_path / 'nowhere'} to write copy.db in\n"


def test_backup_of_postgresql_says_to_use_pg_dump(capsys, postgres_url, tmp_path):
    open_store(postgres_url).close()
    status, out, err = run(capsys, "backup", "--db", postgres_url, str(tmp_path / "dump"))
    assert (status, out) == (2, "")
    assert err.startswith("error: ") and "pg_dump" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "dump").exists()


# --- errors: one line, the right status, no traceback


@pytest.mark.parametrize("db, expected", [
    ("mysql://host/db", "unsupported database URL scheme 'mysql'"),
    ("postgresql://user:secret@127.0.0.1:1/db", "the profile database is unavailable"),
    ("postgresql://user:secret@127.0.0.1:5432/db?sslmode=nonsense", "sslmode"),
])
def test_bad_or_unreachable_databases_are_usage_errors(capsys, db, expected):
    for command in ("migrate", "check", "stats"):
        status, out, err = run(capsys, command, "--db", db, "--timeout", "2")
        assert (status, out) == (2, "")
        assert err.startswith("error: ") and expected in err and len(err.splitlines()) == 1, err
        assert "secret" not in err


def test_a_file_that_is_not_a_database_is_a_problem(capsys, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a database, but long enough to have a header " * 4)
    status, out, err = run(capsys, "check", "--db", str(path))
    assert (status, out) == (1, "")
    assert err == "error: database error: file is not a database\n"


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["vacuum"])
    assert exited.value.code == 2
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2


# --- the Kubernetes example migrates first


def test_the_kubernetes_replicas_migrate_with_viper_profiles_before_serving():
    import yaml  # PyYAML comes with the server's dependencies (transformers)

    root = Path(__file__).resolve().parents[1]
    assert 'viper-profiles = "viper_profiles.cli:main"' in (root / "profiles" / "pyproject.toml").read_text()
    documents = yaml.safe_load_all((root / "deploy" / "kubernetes" / "replicas.yaml").read_text())
    pod = next(document for document in documents if document["kind"] == "StatefulSet")["spec"]["template"]["spec"]
    [migrate] = pod["initContainers"]
    [server] = pod["containers"]
    assert migrate["command"] == ["viper-profiles", "migrate"]
    assert migrate["image"] == server["image"]
    database = [variable for variable in server["env"] if variable["name"] == DB_ENV]
    assert [variable for variable in migrate["env"] if variable["name"] == DB_ENV] == database
    assert all(variable in server["env"] for variable in migrate["env"])  # the same database, the same way


# --- export and import


def test_export_then_import_moves_a_profile_between_databases(capsys, db_url, tmp_path):
    with open_store(db_url) as store:
        save(store, "alice", b"one", b"two")
        save(store, "alice", b"two", b"three")
    archive = tmp_path / "alice.zip"
    status, out, err = run(capsys, "export", "--db", db_url, "--user", "alice", "-o", str(archive))
    assert (status, err) == (0, "") and out.startswith(f"exported alice to {archive}")
    assert run(capsys, "export", "--db", db_url, "--user", "alice", "-o", str(archive))[0] == 2  # never overwrites

    other = str(tmp_path / "other.db")
    status, out, err = run(capsys, "import", "--db", other, "--user", "bob", "--tenant", "shop", str(archive))
    assert (status, out) == (2, "")  # like every operator command, never creates a database
    assert run(capsys, "migrate", "--db", other)[0] == 0
    status, out, err = run(capsys, "import", "--db", other, "--user", "bob", "--tenant", "shop", str(archive))
    assert (status, out, err) == (0, "imported 2 version(s) as bob: now at version 2\n", "")
    with open_store(other) as store:
        assert [v.change.value for v in store.list_versions("bob", page_size=10, tenant="shop")] == ["import",
                                                                                                   "extract"]
        assert [image.data for image in store.get_with_images("bob", tenant="shop")[1]] == [b"two", b"three"]
    status, _, err = run(capsys, "import", "--db", other, "--user", "bob", "--tenant", "shop", str(archive))
    assert status == 1 and "replace" in err
    assert run(capsys, "import", "--db", other, "--user", "bob", "--tenant", "shop", "--replace", str(archive))[0] == 0


def test_import_of_a_bad_archive_stores_nothing(capsys, tmp_path):
    db = str(tmp_path / "profiles.db")
    open_store(db).close()
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 truncated")
    status, out, err = run(capsys, "import", "--db", db, "--user", "bob", str(bad))
    assert (status, out) == (2, "") and err.startswith("error: archive: not a readable zip")
    assert run(capsys, "export", "--db", db, "--user", "bob", "-o", str(tmp_path / "x.zip"))[0] == 1
