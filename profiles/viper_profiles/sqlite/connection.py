"""Opening the SQLite file and running transactions on it."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from sqlite_utils import Database


def open_database(path: Path, *, timeout: float) -> Database:
    """timeout: how long a write waits for another connection's write lock before SQLITE_BUSY."""
    # check_same_thread=False: the backend hands this one connection between
    # asyncio.to_thread workers, serialised by its own lock.
    _create_owner_only(path)
    connection = sqlite3.connect(path, timeout=timeout, check_same_thread=False)
    db = Database(connection)
    db.enable_wal()
    # Off by default in SQLite, and per connection.
    db.execute("PRAGMA foreign_keys = ON")
    return db


def _create_owner_only(path: Path) -> None:
    """Creates a missing database file 0600 (people's photos and comments): SQLite gives its WAL and SHM files
    the database file's permissions. An existing file keeps its own."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


@contextlib.contextmanager
def transaction(db: Database, *, write: bool) -> Iterator[Database]:
    """Runs the block as one transaction: committed if it returns, rolled back if it raises.

    Writes use BEGIN IMMEDIATE, which takes the write lock before the first read, so a
    check-then-write (version checks) cannot interleave with another process's write.
    Reads use a deferred BEGIN so that multi-query reads see one snapshot.
    """
    db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        yield db
        db.commit()
    except BaseException:
        # Also covers a failed COMMIT, which leaves the transaction open.
        db.rollback()
        raise
