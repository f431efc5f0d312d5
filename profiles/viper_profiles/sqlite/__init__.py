"""The SQLite backend: one file, one connection, WAL."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from ..errors import StoreNotFound, StoreUnavailable
from ..records import SchemaStatus
from ..tenants import DEFAULT_TENANT
from .connection import is_busy, open_database, transaction
from .queries import SqliteTransaction
from .schema import migrate, schema_status

T = TypeVar("T")


class SqliteBackend:
    """A single connection guarded by a lock.

    SQLite admits one writer at a time anyway and the reads are a few small rows, so
    per-thread connections would mostly add connections to track for asyncio.to_thread's
    changing pool threads, plus SQLITE_BUSY waits between our own threads.
    """

    def __init__(self, path: Path, *, timeout: float, migrate_schema: bool = True) -> None:
        if migrate_schema:
            path.parent.mkdir(parents=True, exist_ok=True)
        elif not path.is_file():  # opened as it is: never create an empty file for a mistyped path
            raise StoreNotFound(f"no SQLite database at {path}")
        self._lock = threading.Lock()
        self._closed = False
        self.applied_migrations = ()
        with _unavailable_when_busy():
            self._db = open_database(path, timeout=timeout)
            try:
                if migrate_schema:
                    self.applied_migrations = tuple(migrate(self._db))
            except BaseException:
                self._db.close()
                raise

    def read(self, operation: Callable[[SqliteTransaction], T], tenant: str = DEFAULT_TENANT) -> T:
        with self._transaction(write=False) as db:
            return operation(SqliteTransaction(db, tenant))

    def write(self, operation: Callable[[SqliteTransaction], T], tenant: str = DEFAULT_TENANT) -> T:
        with self._transaction(write=True) as db:
            return operation(SqliteTransaction(db, tenant))

    def ping(self, timeout: float | None = None) -> None:
        # No timeout to apply: a read in WAL mode waits for nobody.
        with self._transaction(write=False) as db:
            db.execute("SELECT 1").fetchone()

    def schema_status(self) -> SchemaStatus:
        with self._transaction(write=False) as db:
            return schema_status(db)

    def backup(self, target: Path) -> None:
        # The backup API copies every page in one step under a read transaction: a consistent snapshot,
        # while other processes keep reading and writing (WAL). Written aside, then renamed: a failed
        # backup leaves no partial file under the target's name.
        partial = target.with_name(target.name + ".partial")
        partial.unlink(missing_ok=True)
        with _unavailable_when_busy(), self._lock:
            if self._closed:
                raise StoreUnavailable("the profile store is closed")
            with contextlib.closing(sqlite3.connect(partial)) as copy:
                self._db.conn.backup(copy)
        partial.replace(target)

    def scrub(self) -> None:
        # secure_delete zeroed the freed pages in the database, but the WAL still holds the frames written
        # before (the images as inserted): copy the WAL back and truncate it to nothing. Another process
        # reading at that moment keeps its frames; they are overwritten by a later checkpoint.
        with _unavailable_when_busy(), self._lock:
            if self._closed:
                raise StoreUnavailable("the profile store is closed")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._db.close()  # closing a closed sqlite3 connection is a no-op

    @contextlib.contextmanager
    def _transaction(self, *, write: bool) -> Iterator:
        with _unavailable_when_busy(), self._lock:
            if self._closed:
                raise StoreUnavailable("the profile store is closed")
            with transaction(self._db, write=write) as db:
                yield db


@contextlib.contextmanager
def _unavailable_when_busy() -> Iterator[None]:
    """SQLITE_BUSY after the timeout: another process holds the write lock; worth retrying later."""
    try:
        yield
    except sqlite3.OperationalError as error:
        if is_busy(error):
            raise StoreUnavailable(f"the profile database is busy: {error}") from error
        raise
