"""SHA256SUMS manifests of checkpoint folders (the `sha256sum` format, so `sha256sum -c` checks them too)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

MANIFEST = "SHA256SUMS"


class ManifestError(OSError):
    """A checkpoint folder does not match its manifest (an OSError: `viper-server` reports unusable files
    in one line, without a traceback)."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> str:
    """Writes folder/SHA256SUMS listing every other file under folder; returns the manifest's text."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    text = "".join(f"{file_sha256(p)}  {p.relative_to(folder).as_posix()}\n" for p in files)
    (folder / MANIFEST).write_text(text)
    return text


def read_manifest(folder: Path) -> dict[str, str]:
    """relative path -> sha256, from folder/SHA256SUMS; ManifestError when it is missing or malformed."""
    path = folder / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path} is missing")
    entries = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        digest, separator, name = line.partition("  ")
        if not separator or len(digest) != 64 or not name or name.startswith("/") or ".." in Path(name).parts:
            raise ManifestError(f"{path}:{number} is not a '<sha256>  <relative path>' line")
        entries[name] = digest
    if not entries:
        raise ManifestError(f"{path} lists no files")
    return entries


def verify(folder: Path, *, ignore: Iterable[str] = ()) -> dict[str, str]:
    """Checks every file the manifest lists (and that it lists every file but those named in ignore);
    returns the manifest.

    Raises ManifestError naming the first file that is missing, unlisted or changed (e.g. a Git LFS
    pointer checked out in place of the weights).
    """
    entries = read_manifest(folder)
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    present -= set(ignore)
    if unlisted := sorted(present - entries.keys()):
        raise ManifestError(f"{folder / unlisted[0]} is not in {MANIFEST}")
    for name, digest in entries.items():
        path = folder / name
        if not path.is_file():
            raise ManifestError(f"{path} is missing")
        if file_sha256(path) != digest:
            raise ManifestError(f"{path} does not match its sha256 in {MANIFEST}")
    return entries
