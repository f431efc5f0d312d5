"""The PostgreSQL backend: psycopg 3 connections from a psycopg_pool pool, shared by every thread.

Connections are in autocommit mode and each operation opens one explicit transaction: writes at READ
COMMITTED with row locks (see queries.py), reads at REPEATABLE READ READ ONLY, so that a read of
several statements sees one snapshot.

Unreachable database -> StoreUnavailable, after at most `timeout` seconds (waiting for a pooled
connection, or for a row lock). The pool checks a connection before handing it out and replaces broken
ones in the background, so it recovers by itself once the server is back.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolClosed

from ..errors import BackupNotSupported, StoreUnavailable
from ..records import SchemaStatus
from ..tenants import DEFAULT_TENANT
from .queries import PostgresTransaction
from .schema import migrate, schema_status

T = TypeVar("T")

# A write that loses a deadlock or a serialization check to another one is run again, from the start.
WRITE_ATTEMPTS = 5
# (Not psycopg.errors.TransactionRollback: in psycopg 3 these two are not its subclasses.)
_LOST_TO_ANOTHER_WRITE = (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)
# How long the pool retries (with backoff) to replace a lost connection before giving up; the next
# call then starts a fresh attempt. Short, so that recovery does not wait out a long backoff delay.
RECONNECT_TIMEOUT = 5.0


class PostgresBackend:
    def __init__(self, url: str, *, timeout: float, pool_size: int, migrate_schema: bool = True) -> None:
        if pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, got {pool_size}")
        self._timeout = timeout
        self.applied_migrations = ()
        try:
            settings = conninfo_to_dict(url)  # also rejects a malformed URL, before any connection
        except psycopg.ProgrammingError as error:
            raise ValueError(f"invalid PostgreSQL URL: {error}") from error
        kwargs: dict[str, object] = {"autocommit": True}
        if "connect_timeout" not in settings:
            kwargs["connect_timeout"] = max(2, math.ceil(timeout))  # libpq's minimum is 2 s
        if "application_name" not in settings:
            kwargs["application_name"] = "viper-serve"
        self._pool = ConnectionPool(
            url,
            kwargs=kwargs,
            min_size=1,
            max_size=pool_size,
            open=False,
            configure=self._configure,
            check=ConnectionPool.check_connection,
            timeout=timeout,
            reconnect_timeout=RECONNECT_TIMEOUT,
            name="viper_profiles",
        )
        with _unavailable_on_connection_errors():
            # One connection of our own first: a failure says why (wrong password, no such database), where
            # the pool would only time out. No lock_timeout on it: a replica migrating first is waited for.
            with psycopg.connect(url, **kwargs) as conn:
                if migrate_schema:
                    self.applied_migrations = tuple(migrate(conn))
            try:
                self._pool.open(wait=True, timeout=timeout)
            except BaseException:
                self._pool.close()
                raise

    def read(self, operation: Callable[[PostgresTransaction], T], tenant: str = DEFAULT_TENANT) -> T:
        with _unavailable_on_connection_errors(), self._pool.connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            return operation(PostgresTransaction(conn, tenant))

    def write(self, operation: Callable[[PostgresTransaction], T], tenant: str = DEFAULT_TENANT) -> T:
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                with _unavailable_on_connection_errors(), self._pool.connection() as conn, conn.transaction():
                    return operation(PostgresTransaction(conn, tenant))
            except _LOST_TO_ANOTHER_WRITE:
                if attempt == WRITE_ATTEMPTS:
                    raise
                # Row-lock waiters are not queued fairly: retrying at once can take the lock back before the
                # winner, which was waiting for it, wakes up, and deadlock again.
                time.sleep(random.uniform(0.005, 0.02) * attempt)
        raise AssertionError("unreachable")

    def ping(self, timeout: float | None = None) -> None:
        with _unavailable_on_connection_errors(), self._pool.connection(timeout=timeout) as conn:
            conn.execute("SELECT 1").fetchone()

    def schema_status(self) -> SchemaStatus:
        with _unavailable_on_connection_errors(), self._pool.connection() as conn:
            return schema_status(conn)

    def backup(self, target: Path) -> None:
        raise BackupNotSupported(
            "a PostgreSQL database is backed up with its own tool: "
            "pg_dump --format=custom --file=FILE URL (restore with pg_restore)"
        )

    def scrub(self) -> None:
        """Nothing the store can do: deleted rows stay in the table's pages (and WAL) until VACUUM reuses them
        (README "Erasure")."""

    def close(self) -> None:
        self._pool.close()  # a no-op once closed

    def _configure(self, conn: psycopg.Connection) -> None:
        # A row lock held elsewhere (another replica's write of the same user) is waited for no longer
        # than a connection is: past that, the database counts as unavailable.
        conn.execute("SELECT set_config('lock_timeout', %s, false)", [f"{math.ceil(self._timeout * 1000)}ms"])


@contextlib.contextmanager
def _unavailable_on_connection_errors() -> Iterator[None]:
    try:
        yield
    except _LOST_TO_ANOTHER_WRITE:
        raise  # not an outage: write() runs the operation again
    except PoolClosed as error:
        raise StoreUnavailable("the profile store is closed") from error
    except psycopg.OperationalError as error:
        # Connection refused or lost, server shutting down, pool timeout, lock timeout.
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise StoreUnavailable(f"the profile database is unavailable: {reason}") from error
