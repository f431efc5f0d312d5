"""Profile archives: what build_archive writes reads back the same, and every hostile archive is refused."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile

import pytest

from viper_profiles import Change, Rating, SourceImage, open_store
from viper_profiles.archive import FORMAT_VERSION, InvalidArchive, build_archive, import_archive, read_archive

A, B = b"\x89PNG\r\n\x1a\nimage A", b"\xff\xd8\xffimage B"


@pytest.fixture
def store(tmp_path):
    with open_store(tmp_path / "profiles.db") as store:
        yield store


def saved_archive(store) -> bytes:
    store.save_extraction("alice", liked_features=["warm"], disliked_features=["dull"], raw_text="text 1",
                          extractor_model="m", images=[SourceImage(A, "nice", Rating.LIKED)])
    store.save_extraction("alice", liked_features=["warm", "red"], disliked_features=[], raw_text="text 2",
                          extractor_model="m", images=[SourceImage(A, "nice", Rating.LIKED),
                                                       SourceImage(B, "dull", Rating.DISLIKED)],
                          change=Change.ADD)
    return build_archive(store, "alice")


def entries(archive: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(archive)) as opened:
        return {name: opened.read(name) for name in opened.namelist()}


def rezip(files: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def with_document(archive: bytes, change) -> bytes:
    files = entries(archive)
    document = json.loads(files["profile.json"])
    change(document)
    files["profile.json"] = json.dumps(document).encode()
    return rezip(files)


def test_an_archive_holds_every_version_and_reads_back_the_same(store):
    archive = saved_archive(store)
    names = sorted(entries(archive))
    sha_a, sha_b = hashlib.sha256(A).hexdigest(), hashlib.sha256(B).hexdigest()
    assert names == sorted(["profile.json", f"images/{sha_a}.png", f"images/{sha_b}.jpg"])
    document = json.loads(entries(archive)["profile.json"])
    assert (document["format_version"], document["user_id"]) == (FORMAT_VERSION, "alice")
    assert [(v["version"], v["change"], v["raw_text"]) for v in document["versions"]] == [
        (1, "extract", "text 1"), (2, "add", "text 2")]
    assert document["versions"][1]["images"][1] == {
        "sha256": sha_b, "comment": "dull", "rating": "disliked", "position": 1, "file": f"images/{sha_b}.jpg"}

    read = read_archive(archive)
    versions, images = store.export_versions("alice")
    assert read.images == images
    assert [(v.liked_features, v.images, v.created_at, v.updated_at, v.change) for v in read.versions] == [
        (v.liked_features, v.images, v.created_at, v.updated_at, v.change) for v in versions]
    imported = import_archive(store, "bob", read)
    assert (imported.version, imported.raw_text) == (2, "text 2")
    assert build_archive(store, "alice") == archive  # deterministic


def bomb(archive: bytes) -> bytes:
    files = entries(archive)
    files["profile.json"] = files["profile.json"][:-1] + b" " * 50_000_000 + b"}"
    return rezip(files, zipfile.ZIP_DEFLATED)


HOSTILE = {
    "truncated": lambda archive: archive[: len(archive) // 2],
    "not a zip": lambda archive: b"hello",
    "path traversal": lambda archive: rezip({**entries(archive), "../../etc/passwd": b"x"}),
    "image path traversal": lambda archive: rezip({**entries(archive), "images/../profile.json": b"x"}),
    "absolute path": lambda archive: rezip({**entries(archive), "/tmp/x": b"x"}),
    "hash mismatch": lambda archive: rezip({name: (content + b"!" if name.startswith("images/") else content)
                                            for name, content in entries(archive).items()}),
    "unknown format version": lambda archive: with_document(archive, lambda d: d.update(format_version=2)),
    "missing image": lambda archive: rezip({n: c for n, c in entries(archive).items() if not n.endswith(".jpg")}),
    "unused image": lambda archive: rezip({**entries(archive), f"images/{hashlib.sha256(b'z').hexdigest()}.bin": b"z"}),
    "no profile.json": lambda archive: rezip({n: c for n, c in entries(archive).items() if n != "profile.json"}),
    "bad field type": lambda archive: with_document(archive, lambda d: d["versions"][0].update(raw_text=3)),
    "bad rating": lambda archive: with_document(archive, lambda d: d["versions"][0]["images"][0].update(rating="meh")),
    "no versions": lambda archive: with_document(archive, lambda d: d.update(versions=[])),
    "zip bomb": bomb,
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_hostile_archive_is_refused(store, kind: str):
    hostile = HOSTILE[kind](saved_archive(store))
    with pytest.raises(InvalidArchive):
        read_archive(hostile, max_unpacked_bytes=10_000_000)


def test_an_oversized_archive_is_refused_before_it_is_opened(store):
    archive = saved_archive(store)
    with pytest.raises(InvalidArchive, match="at most 100"):
        read_archive(archive, max_archive_bytes=100)
