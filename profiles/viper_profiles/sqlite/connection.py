"""Opening the SQLite file and running transactions on it."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from sqlite_utils import Database


def open_database(path: Path, *, timeout: float) -> Database:
    """timeout: how long a write waits for another connection's write lock before SQLITE_BUSY."""
    # check_same_thread=False: the backend hands this one connection between
    # asyncio.to_thread workers, serialised by its own lock. timeout= sets the busy
    # timeout as the file opens, before any statement.
    _create_owner_only(path)
    connection = sqlite3.connect(path, timeout=timeout, check_same_thread=False)
    db = Database(connection)
    _enable_wal(db, timeout=timeout)
    # Off by default in SQLite, and per connection.
    db.execute("PRAGMA foreign_keys = ON")
    # Erasure: deleted rows (images) are overwritten with zeros in the file, not just marked free.
    db.execute("PRAGMA secure_delete = ON")
    return db


def _create_owner_only(path: Path) -> None:
    """Creates a missing database file 0600 (people's photos and comments): SQLite gives its WAL and SHM files
    the database file's permissions. An existing file keeps its own."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


# SQLITE_BUSY and SQLITE_LOCKED (primary codes; the extended ones carry them in the low byte).
_BUSY_CODES = {5, 6}


def is_busy(error: sqlite3.OperationalError) -> bool:
    code = getattr(error, "sqlite_errorcode", None)  # Python 3.11+
    return (code & 0xFF) in _BUSY_CODES if code is not None else "database is locked" in str(error)


def _enable_wal(db: Database, *, timeout: float) -> None:
    """Switches the file to WAL mode (a no-op once it is).

    The switch reads the header, then upgrades to a write lock. SQLite never waits (no busy handler) on
    that upgrade, as two connections each holding a read lock and waiting for the other would deadlock:
    when another process switches or migrates a new file at the same moment, the PRAGMA fails at once with
    SQLITE_BUSY, whatever the busy timeout. That failure released our read lock, so we try again within
    the timeout, as the busy handler would.
    """
    deadline = time.monotonic() + timeout
    pause = 0.001
    while True:
        try:
            db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as error:
            if not is_busy(error) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(2 * pause, 0.05)


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
