"""Opening the SQLite file and running transactions on it."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from sqlite_utils import Database


def open_database(path: Path, *, timeout: float) -> Database:
    """timeout: how long a write waits for another connection's write lock before SQLITE_BUSY."""
    # check_same_thread=False: the backend hands this one connection between
    # asyncio.to_thread workers, serialised by its own lock.
    connection = sqlite3.connect(path, timeout=timeout, check_same_thread=False)
    db = Database(connection)
    db.enable_wal()
    # Off by default in SQLite, and per connection.
    db.execute("PRAGMA foreign_keys = ON")
    # Erasure: deleted rows (images) are overwritten with zeros in the file, not just marked free.
    db.execute("PRAGMA secure_delete = ON")
    return db


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
