"""`viper-profiles`: an operator's commands on a profile database, without the server (no torch, no models).

    viper-profiles migrate --db URL      apply pending migrations, print what ran (deploys: before the servers)
    viper-profiles check --db URL        integrity, schema version, orphaned images, stray rows; 1 on a problem
    viper-profiles stats --db URL        users, versions, images, bytes, shared images (--json)
    viper-profiles backup --db URL FILE  an online, consistent copy (SQLite; PostgreSQL: pg_dump)
    viper-profiles export --db URL --user U -o FILE   one profile, every kept version, as an archive
    viper-profiles import --db URL --user U FILE      a profile from an archive (--replace to overwrite)

Exit status, as the `viper` CLI's: 0 done; 1 the database is there but something is wrong with it (a check
found a problem, the schema is not this code's, a damaged file); 2 the command could not run (usage, a bad
--db, no database at that path, the database unreachable). Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .archive import build_archive, import_archive, read_archive
from .errors import BackupNotSupported, StoreError, StoreNotFound, StoreUnavailable
from .store import DB_ENV, DEFAULT_DB, DEFAULT_TIMEOUT, ProfileStore, open_store
from .tenants import DEFAULT_TENANT

EXIT_PROBLEM = 1
EXIT_USAGE = 2
# Exit status of a command stopped with Ctrl-C, as shells report SIGINT.
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # usage errors: argparse exits 2
    try:
        return args.run(args)
    except (StoreNotFound, StoreUnavailable, BackupNotSupported) as error:
        return _fail(error, EXIT_USAGE)
    except StoreError as error:  # the schema is newer than this code, or not this code's
        return _fail(error, EXIT_PROBLEM)
    except _database_errors() as error:  # not a database, a damaged one, no privilege on a table
        return _fail(f"database error: {_first_line(error)}", EXIT_PROBLEM)
    except (ValueError, OSError) as error:  # a bad URL or a file that cannot be written
        return _fail(error, EXIT_USAGE)
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return EXIT_INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="viper-profiles",
        description="Operator's commands on a viper-serve profile database (SQLite or PostgreSQL).",
        epilog="Deploys run `viper-profiles migrate` first, then start (or roll) the servers. Exit status: 0 done, "
               "1 a problem with the database, 2 the command could not run.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--db", default=os.environ.get(DB_ENV, DEFAULT_DB),
        help=f"the profile database, as the server's --db: a SQLite file path, sqlite:///path or "
             f"postgresql://user:password@host:port/database (env {DB_ENV}; default {DEFAULT_DB})",
    )
    common.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help=f"seconds to wait for the database (default {DEFAULT_TIMEOUT:g})")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    migrate = commands.add_parser(
        "migrate", parents=[common], help="apply the pending migrations and print what ran",
        description="Applies the migrations the database has not had yet, in one transaction, and prints them "
                    "(a SQLite file that does not exist is created). Run it before starting or rolling the "
                    "servers; servers starting on an older schema migrate it themselves too.")
    migrate.set_defaults(run=run_migrate)
    check = commands.add_parser(
        "check", parents=[common], help="integrity, schema version, orphaned images, stray rows; exit 1 on a problem",
        description="Reads the database without changing it and exits 1 if anything is wrong, saying what.")
    check.set_defaults(run=run_check)
    stats = commands.add_parser("stats", parents=[common],
                                help="users, versions, images, bytes and shared images")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.set_defaults(run=run_stats)
    backup = commands.add_parser(
        "backup", parents=[common], help="an online, consistent copy of a SQLite database (PostgreSQL: pg_dump)",
        description="Copies a SQLite database while servers keep using it (SQLite's backup API): a consistent "
                    "snapshot, written aside and renamed, so FILE is complete or absent. A PostgreSQL "
                    "database is backed up with pg_dump --format=custom --file=FILE URL.")
    backup.add_argument("file", type=Path, metavar="FILE", help="the copy to write; must not exist")
    backup.set_defaults(run=run_backup)
    _add_archive_commands(commands, common)
    return parser


def _add_archive_commands(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    owner = argparse.ArgumentParser(add_help=False)
    owner.add_argument("--user", required=True, help="the user id")
    owner.add_argument("--tenant", default=DEFAULT_TENANT, help=f"the user's tenant (default {DEFAULT_TENANT})")
    export = commands.add_parser(
        "export", parents=[common, owner], help="write one profile, every kept version, as an archive",
        description="Writes the user's profile with every kept version and its images as a zip archive "
                    "(docs/profile-archive.md), the same as the ExportProfile RPC's.")
    export.add_argument("-o", "--output", type=Path, required=True, metavar="FILE", help="the archive to write; "
                        "must not exist")
    export.set_defaults(run=run_export)
    imported = commands.add_parser(
        "import", parents=[common, owner], help="create a profile from an archive",
        description="Creates the user's profile from an archive made by export (or ExportProfile), every version "
                    "kept, after checking the archive whole (sizes, names, format version, hashes). The server's "
                    "ImportProfile also decodes every image and applies its request limits.")
    imported.add_argument("file", type=Path, metavar="FILE", help="the archive")
    imported.add_argument("--replace", action="store_true", help="erase and replace an existing profile")
    imported.set_defaults(run=run_import)


def run_export(args: argparse.Namespace) -> int:
    if args.output.exists():
        raise ValueError(f"{args.output} exists: remove it or name another file")
    with _open_current(args) as store:
        archive = build_archive(store, args.user, tenant=args.tenant)
    partial = args.output.with_name(args.output.name + ".partial")
    partial.write_bytes(archive)
    partial.replace(args.output)  # complete or absent
    print(f"exported {args.user} to {args.output} ({_size(len(archive))})")
    return 0


def run_import(args: argparse.Namespace) -> int:
    archive = read_archive(args.file.read_bytes())  # InvalidArchive is a ValueError: nothing stored
    with _open_current(args) as store:
        profile = import_archive(store, args.user, archive, replace=args.replace, tenant=args.tenant)
    print(f"imported {len(archive.versions)} version(s) as {args.user}: now at version {profile.version}")
    return 0


def _open_current(args: argparse.Namespace) -> ProfileStore:
    store = _open_as_it_is(args)
    if (problem := store.schema_status().problem()) is not None:
        store.close()
        raise StoreError(problem)
    return store


def run_migrate(args: argparse.Namespace) -> int:
    with open_store(args.db, timeout=args.timeout, pool_size=1) as store:
        applied, status = store.applied_migrations, store.schema_status()
    for migration in applied:
        print(f"applied migration {migration.version}: {migration.name}")
    if applied:
        print(f"schema at version {status.version}")
    else:
        print(f"nothing to migrate: schema at version {status.version}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    with _open_as_it_is(args) as store:
        status = store.schema_status()
        integrity = _checked(store.integrity_problems)
        # The row checks read the current schema's tables, and need a file that can be read.
        checkable = status.current and not any(problem.startswith(_UNCHECKABLE) for problem in integrity)
        rows = _checked(lambda: store.check_rows().problems()) if checkable else None
    problems = [status.problem()] if status.problem() else []
    print(f"schema: {status.problem() or f'version {status.version} of {status.latest}, current'}")
    print(f"integrity: {'; '.join(integrity) or 'ok'}")
    if rows is None:
        print("rows: not checked" + (": the database could not be read" if status.current else
                                     " until the schema is current"))
    else:
        print(f"rows: {'; '.join(rows) or 'ok'}")
    problems += integrity + (rows or [])
    if problems:
        print(f"error: {len(problems)} problem(s) found", file=sys.stderr)
        return EXIT_PROBLEM
    return 0


_UNCHECKABLE = "the database could not be read"


def _checked(check: Callable[[], list[str]]) -> list[str]:
    """A check's problems; a database too damaged to be checked is a problem too, not a crash."""
    try:
        return check()
    except _database_errors() as error:
        return [f"{_UNCHECKABLE}: {_first_line(error)}"]


def run_stats(args: argparse.Namespace) -> int:
    with _open_as_it_is(args) as store:
        status = store.schema_status()
        if not status.current:
            raise StoreError(status.problem())
        stats = store.stats()
    values = {"schema_version": status.version, **dataclasses.asdict(stats)}
    if args.json:
        print(json.dumps(values))
        return 0
    width = max(len(name) for name in values)
    for name, value in values.items():
        shown = f"{value} ({_size(value)})" if name.endswith("_bytes") else str(value)
        print(f"{name.replace('_', ' '):<{width}}  {shown}")
    return 0


def run_backup(args: argparse.Namespace) -> int:
    # Never over an existing file: it may be the last good backup, or the database itself.
    if args.file.exists():
        raise ValueError(f"{args.file} exists: remove it or name another file")
    if not args.file.parent.is_dir():
        raise ValueError(f"no directory {args.file.parent} to write {args.file.name} in")
    with _open_as_it_is(args) as store:
        store.backup(args.file)
    print(f"backed up to {args.file} ({_size(args.file.stat().st_size)})")
    return 0


def _open_as_it_is(args: argparse.Namespace) -> ProfileStore:
    return open_store(args.db, timeout=args.timeout, pool_size=1, migrate=False)


def _fail(error: object, status: int) -> int:
    print(f"error: {_first_line(error)}", file=sys.stderr)
    return status


def _first_line(error: object) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _database_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [sqlite3.DatabaseError]
    psycopg = sys.modules.get("psycopg")  # imported only once a PostgreSQL URL was opened
    if psycopg is not None:
        errors.append(psycopg.Error)
    return tuple(errors)


def _size(count: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


if __name__ == "__main__":
    sys.exit(main())
