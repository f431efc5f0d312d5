"""A profile's life end to end (issue 20): ratings added over sessions and removed, the history and restoring
it, export and import, erasure; a real server process on the toy models, driven through the SDK."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest

from viper_client import (
    AsyncViperClient,
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RatedImage,
    ViperClient,
    cli,
)
from viper_server.testing import ServerProcess

from fixture_data import FIXTURES, fixture_images
from imagedata import noise_png

MAX_PROFILE_IMAGES = 14


@pytest.fixture(scope="module")
def server(toy_models_dir, tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "profiles.db"
    with ServerProcess(db, toy_models_dir, "--max-profile-images", str(MAX_PROFILE_IMAGES), models="toy") as process:
        process.db = db
        yield process


@pytest.fixture
def client(server):
    with ViperClient(server.target) as client:
        yield client


def sha(image: RatedImage) -> str:
    return hashlib.sha256(Path(image.image).read_bytes()).hexdigest()


def features(profile) -> tuple:
    return profile.liked_features, profile.disliked_features, profile.raw_text


# Two sessions of ratings: liked and disliked images mixed, so each half alone says something else.
IMAGES = fixture_images()
FIRST = [IMAGES[0], IMAGES[8], IMAGES[1], IMAGES[9]]
SECOND = [IMAGES[2], IMAGES[10], IMAGES[3], IMAGES[11], IMAGES[4]]


def test_ratings_added_over_two_sessions_equal_one_extraction_of_them_all(client):
    first = client.add_ratings("life-add", FIRST)  # creates the profile
    assert (first.version, [image.sha256 for image in first.images]) == (1, [sha(image) for image in FIRST])
    second = client.add_ratings("life-add", SECOND, expected_version=1)
    assert second.version == 2
    assert [(image.sha256, image.position) for image in second.images] == [
        (sha(image), position) for position, image in enumerate(FIRST + SECOND)]

    at_once = client.extract_profile("life-once", FIRST + SECOND)
    assert features(second) == features(at_once)
    # The compared thing moves the output: the first session alone extracts something else.
    assert features(first) != features(at_once)


def test_an_image_added_again_keeps_its_place_and_takes_the_new_comment(client):
    client.add_ratings("life-again", FIRST)
    again = RatedImage(FIRST[1].image, comment="on reflection I like it", rating="liked")
    profile = client.add_ratings("life-again", [again, SECOND[0]])
    assert [image.sha256 for image in profile.images] == [sha(image) for image in FIRST + SECOND[:1]]
    assert (profile.images[1].comment, profile.images[1].rating.value) == ("on reflection I like it", "liked")


def test_add_ratings_refuses_a_stale_version_and_too_many_images(client):
    client.add_ratings("life-stale", FIRST)
    with pytest.raises(Conflict, match="version"):
        client.add_ratings("life-stale", SECOND, expected_version=7)
    with pytest.raises(Conflict):
        client.add_ratings("life-new", SECOND, expected_version=1)  # no profile: version 0
    with pytest.raises(InvalidArgument, match=f"at most {MAX_PROFILE_IMAGES}"):
        client.add_ratings("life-stale", IMAGES)
    assert client.get_profile("life-stale").version == 1


def test_remove_ratings_re_extracts_over_the_rest(client):
    client.add_ratings("life-remove", FIRST + SECOND)
    removed = client.remove_ratings("life-remove", [sha(image) for image in SECOND], expected_version=1)
    assert [image.sha256 for image in removed.images] == [sha(image) for image in FIRST]
    assert features(removed) == features(client.extract_profile("life-remove-ref", FIRST))
    with pytest.raises(NotFound, match="not one of the profile's images"):
        client.remove_ratings("life-remove", [sha(SECOND[0])])
    with pytest.raises(FailedPrecondition, match="DeleteProfile"):
        client.remove_ratings("life-remove", [sha(image) for image in FIRST])
    with pytest.raises(Conflict):
        client.remove_ratings("life-remove", [sha(FIRST[0])], expected_version=1)
    with pytest.raises(InvalidArgument, match="sha256"):
        client.remove_ratings("life-remove", ["not-a-hash"])


def test_history_lists_every_version_and_restores_one(client):
    client.add_ratings("life-history", FIRST)
    client.add_ratings("life-history", SECOND)
    client.update_profile("life-history", liked_features=["mine"])
    versions = list(client.list_profile_versions("life-history", page_size=2))  # two pages
    assert [(v.version, v.change) for v in versions] == [(3, "update"), (2, "add"), (1, "add")]
    assert client.get_profile("life-history", version=1) == versions[2]

    restored = client.restore_profile_version("life-history", 1, expected_version=3)
    assert (restored.version, features(restored)) == (4, features(versions[2]))
    assert [image.sha256 for image in restored.images] == [sha(image) for image in FIRST]
    assert next(client.list_profile_versions("life-history")).change == "restore"
    with pytest.raises(Conflict):
        client.restore_profile_version("life-history", 2, expected_version=3)
    with pytest.raises(NotFound, match="no version 9"):
        client.restore_profile_version("life-history", 9)
    with pytest.raises(NotFound):
        client.get_profile("life-history", version=9)


def test_export_then_import_moves_every_version(client):
    client.add_ratings("life-export", FIRST)
    client.add_ratings("life-export", SECOND)
    archive = client.export_profile("life-export")
    with zipfile.ZipFile(io.BytesIO(archive)) as opened:
        assert len(opened.namelist()) == 1 + len(FIRST + SECOND)

    imported = client.import_profile("life-imported", archive)
    assert features(imported) == features(client.get_profile("life-export"))
    assert [v.change for v in client.list_profile_versions("life-imported")] == ["import", "add"]
    with pytest.raises(Conflict, match="replace"):
        client.import_profile("life-imported", archive)
    assert client.import_profile("life-imported", archive, replace=True).version == 4


def hostile_archives(archive: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(archive)) as opened:
        files = {name: opened.read(name) for name in opened.namelist()}

    def rezip(entries: dict[str, bytes]) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as out:
            for name, content in entries.items():
                out.writestr(name, content)
        return buffer.getvalue()

    image = next(name for name in files if name.startswith("images/"))
    return {
        "truncated": archive[:-100],
        "traversal": rezip({**files, "../evil": b"x"}),
        "hash mismatch": rezip({**files, image: files[image] + b"x"}),
        "format version": rezip({**files, "profile.json": files["profile.json"].replace(
            b'"format_version": 1', b'"format_version": 99')}),
        "zip bomb": rezip({**files, "profile.json": files["profile.json"][:-1] + b" " * 300_000_000 + b"}"}),
        "not an image": rezip({**{n: c for n, c in files.items() if n != image},
                               f"images/{hashlib.sha256(b'junk').hexdigest()}.png": b"junk",
                               "profile.json": files["profile.json"].replace(
                                   image[7:71].encode(), hashlib.sha256(b"junk").hexdigest().encode())}),
    }


def test_a_bad_archive_is_invalid_argument_and_leaves_nothing(client, server):
    client.add_ratings("life-source", FIRST)
    archives = hostile_archives(client.export_profile("life-source"))
    for hostile in archives.values():
        with pytest.raises(InvalidArgument, match="archive"):
            client.import_profile("life-hostile", hostile)
        with pytest.raises(NotFound):
            client.get_profile("life-hostile")
    assert "life-hostile" not in {profile.user_id for profile in client.list_profiles()}


def test_delete_erases_every_version_and_every_byte_of_the_images(client, server, tmp_path):
    secret = tmp_path / "secret.png"
    # A PNG only this user uploaded: its bytes must not survive anywhere in the database files.
    secret.write_bytes(noise_png(40))
    data = secret.read_bytes()
    client.add_ratings("life-erase", [RatedImage(secret, comment="my secret", rating="liked"), FIRST[1]])
    client.add_ratings("life-erase", SECOND[:1])
    client.delete_profile("life-erase")
    with pytest.raises(NotFound):
        list(client.list_profile_versions("life-erase"))
    files = b"".join(Path(str(server.db) + suffix).read_bytes()
                     for suffix in ("", "-wal", "-shm") if Path(str(server.db) + suffix).exists())
    assert all(data[start:start + 32] not in files for start in range(8, len(data) - 32, 256))


def test_the_async_client_adds_lists_restores_exports_and_imports(server):
    async def scenario():
        async with AsyncViperClient(server.target) as client:
            await client.add_ratings("life-async", FIRST)
            await client.add_ratings("life-async", SECOND[:1], expected_version=1)
            versions = [v async for v in client.list_profile_versions("life-async")]
            assert [v.version for v in versions] == [2, 1]
            assert (await client.get_profile("life-async", version=1)).version == 1
            assert (await client.restore_profile_version("life-async", 1)).version == 3
            removed = await client.remove_ratings("life-async", [sha(FIRST[0])])
            archive = await client.export_profile("life-async")
            imported = await client.import_profile("life-async-copy", archive)
            assert features(imported) == features(removed)

    asyncio.run(scenario())


# --- who may do what: every new operation is authorized before it reads anything -----------------------


NEW_OPERATIONS = {
    "profiles.add_ratings": lambda service, caller: service.add_ratings(caller, "bob", [], expected_version=None),
    "profiles.remove_ratings": lambda service, caller: service.remove_ratings(caller, "bob", ["a"],
                                                                              expected_version=None),
    "profiles.history": lambda service, caller: service.list_versions(caller, "bob", 10, None),
    "profiles.restore": lambda service, caller: service.restore_version(caller, "bob", 1, expected_version=None),
    "profiles.export": lambda service, caller: service.export_profile(caller, "bob"),
    "profiles.import": lambda service, caller: service.import_profile(caller, "bob", None, replace=False),
    "profiles.get": lambda service, caller: service.get_profile(caller, "bob", 1),
}


@pytest.mark.parametrize("permission", sorted(NEW_OPERATIONS))
def test_each_operation_needs_its_permission_and_an_end_user_acts_only_on_themselves(permission):
    from viper_server.access import PERMISSIONS, SERVICE, USER, Caller, PermissionDenied
    from viper_server.application import ViperService

    assert permission in PERMISSIONS
    service = ViperService(store=None, engine=None)  # refused before either is touched
    others = PERMISSIONS - {permission}
    callers = [Caller("svc", SERVICE, "default", frozenset(others)),
               Caller("issuer alice", USER, "default", frozenset(PERMISSIONS), user_id="alice")]
    for caller in callers:
        with pytest.raises(PermissionDenied):
            asyncio.run(NEW_OPERATIONS[permission](service, caller))


# --- the `viper` CLI ----------------------------------------------------------------------------------


def session(folder: Path, liked: list[int], disliked: list[int]) -> list[str]:
    """A folder of newly rated images (copies of the fixtures) with its comments file; the CLI's arguments."""
    comments, all_comments = {}, json.loads((FIXTURES / "comments.json").read_text())
    for rating, indexes in (("liked", liked), ("disliked", disliked)):
        (folder / rating).mkdir(parents=True)
        for index in indexes:
            shutil.copy(FIXTURES / rating / f"{index}.png", folder / rating / f"{index}.png")
            comments[f"{rating}/{index}.png"] = all_comments[f"{rating}/{index}.png"]
    (folder / "comments.json").write_text(json.dumps(comments))
    return ["--liked", str(folder / "liked"), "--disliked", str(folder / "disliked"),
            "--comments", str(folder / "comments.json")]


def test_the_cli_adds_over_two_sessions_shows_history_restores_exports_and_imports(server, tmp_path, capsys):
    def viper(*argv: object) -> tuple[int, str]:
        code = cli.main(["--target", server.target, *map(str, argv)])
        return code, capsys.readouterr().out

    assert viper("profile", "add", "--user", "life-cli", *session(tmp_path / "monday", [0, 1], [0]))[0] == 0
    code, out = viper("profile", "add", "--user", "life-cli", "--expected-version", 1,
                      *session(tmp_path / "friday", [2], [1, 2]))
    assert code == 0 and "3 liked, 3 disliked" in out
    code, out = viper("profile", "history", "--user", "life-cli")
    assert code == 0 and [line.split()[:2] for line in out.splitlines()[1:]] == [["2", "add"], ["1", "add"]]
    assert viper("profile", "restore", "--user", "life-cli", "--version", 1)[0] == 0
    code, out = viper("profile", "get", "--user", "life-cli", "--version", 3, "--json")
    assert json.loads(out)["change"] == "restore"
    first_image = json.loads(out)["images"][0]["sha256"]
    code, out = viper("profile", "remove", "--user", "life-cli", "--image", first_image)
    assert code == 0 and "1 liked, 1 disliked" in out
    archive = tmp_path / "life-cli.zip"
    assert viper("profile", "export", "--user", "life-cli", "-o", archive)[0] == 0
    assert viper("profile", "import", "--user", "life-cli-copy", archive)[0] == 0
    assert viper("profile", "import", "--user", "life-cli-copy", archive)[0] == 1  # exists: Conflict
    code, out = viper("profile", "history", "--user", "life-cli-copy", "--json")
    assert [v["change"] for v in json.loads(out)] == ["import", "restore", "add", "add"]


def test_the_whole_life_on_postgresql(toy_models_dir, postgres_url):
    with ServerProcess(postgres_url, toy_models_dir, "--keep-versions", "3", models="toy") as server, \
            ViperClient(server.target) as client:
        client.add_ratings("pg-life", FIRST)
        client.add_ratings("pg-life", SECOND, expected_version=1)
        removed = client.remove_ratings("pg-life", [sha(SECOND[0]), sha(SECOND[1])], expected_version=2)
        restored = client.restore_profile_version("pg-life", 2)
        assert [v.version for v in client.list_profile_versions("pg-life")] == [4, 3, 2]  # --keep-versions 3
        assert [image.sha256 for image in restored.images] == [sha(image) for image in FIRST + SECOND]
        with pytest.raises(NotFound):
            client.get_profile("pg-life", version=1)
        archive = client.export_profile("pg-life")
        copy = client.import_profile("pg-life-copy", archive)
        assert features(copy) == features(restored) and features(removed) != features(restored)
        client.delete_profile("pg-life")
        client.delete_profile("pg-life-copy")
    import psycopg

    with psycopg.connect(postgres_url) as connection:
        for table in ("profiles", "profile_versions", "version_images", "images"):
            assert connection.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,), table


def test_the_history_and_profile_size_flags():
    import argparse

    from viper_server.config import add_serve_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    defaults = config_from_args(parser.parse_args([]), environ={})
    assert (defaults.keep_versions, defaults.limits.max_profile_images) == (None, 100)
    given = config_from_args(parser.parse_args([]), environ={"VIPER_KEEP_VERSIONS": "5",
                                                               "VIPER_MAX_PROFILE_IMAGES": "40"})
    assert (given.keep_versions, given.limits.max_profile_images) == (5, 40)
    with pytest.raises(ValueError, match="keep_versions"):
        config_from_args(parser.parse_args(["--keep-versions", "0"]), environ={})
    assert "unlimited" in parser.format_help()
