"""The SQLite backend: one file, one connection, WAL."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from ..errors import StoreUnavailable
from .connection import is_busy, open_database, transaction
from .queries import SqliteTransaction
from .schema import migrate

T = TypeVar("T")


class SqliteBackend:
    """A single connection guarded by a lock.

    SQLite admits one writer at a time anyway and the reads are a few small rows, so
    per-thread connections would mostly add connections to track for asyncio.to_thread's
    changing pool threads, plus SQLITE_BUSY waits between our own threads.
    """

    def __init__(self, path: Path, *, timeout: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._closed = False
        with _unavailable_when_busy():
            self._db = open_database(path, timeout=timeout)
            try:
                migrate(self._db)
            except BaseException:
                self._db.close()
                raise

    def read(self, operation: Callable[[SqliteTransaction], T]) -> T:
        with self._transaction(write=False) as db:
            return operation(SqliteTransaction(db))

    def write(self, operation: Callable[[SqliteTransaction], T]) -> T:
        with self._transaction(write=True) as db:
            return operation(SqliteTransaction(db))

    def ping(self, timeout: float | None = None) -> None:
        # No timeout to apply: a read in WAL mode waits for nobody.
        with self._transaction(write=False) as db:
            db.execute("SELECT 1").fetchone()

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
