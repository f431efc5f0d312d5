"""A throwaway PostgreSQL server for tests and benchmarks.

`PostgresServer` runs initdb in a fresh temp dir and pg_ctl on a free loopback port (TCP only, no Unix
socket), with a random superuser password; `close()` stops it and deletes the dir. PostgreSQL refuses to
run as root, so as root every server command runs as the `postgres` user (`runuser -u postgres --`) in a
dir that user owns. Durability is traded for speed (fsync off): data survives the server being killed,
not the machine crashing. The default collation is ICU's en-US where available, not C.

`find_postgres_bin()` locates the binaries (Debian: /usr/lib/postgresql/<version>/bin) and, when asked
to and allowed to (root on Debian), installs Debian's `postgresql` package first.
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

# Settings for a disposable test server: fast, loopback only, no Unix socket.
TEST_SETTINGS: Mapping[str, str] = {
    "listen_addresses": "'127.0.0.1'",
    "unix_socket_directories": "''",
    "fsync": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
    "log_connections": "off",
    "deadlock_timeout": "200ms",
}

_DEBIAN_BIN_DIRS = Path("/usr/lib/postgresql")
_SERVER_USER = "postgres"


class PostgresNotFound(RuntimeError):
    """The PostgreSQL server binaries are not installed (and could not be)."""


def can_install_postgres() -> bool:
    """True where `apt-get install postgresql` can work: root on Debian (or a derivative)."""
    return os.geteuid() == 0 and Path("/etc/debian_version").exists() and shutil.which("apt-get") is not None


def find_postgres_bin(*, install: bool = False) -> Path:
    """The directory holding initdb and pg_ctl; with install=True, installs Debian's package if missing.

    Looks at $VIPER_POSTGRES_BIN, then the newest /usr/lib/postgresql/<version>/bin, then pg_ctl on PATH.
    Raises PostgresNotFound saying why when there is none.
    """
    found = _locate_bin()
    if found is None and install and can_install_postgres():
        try:
            install_postgres()
        except (OSError, subprocess.CalledProcessError) as error:
            failed = f"PostgreSQL is not installed and `apt-get install postgresql` failed: {error}"
            raise PostgresNotFound(failed) from error
        found = _locate_bin()
    if found is None:
        how = (
            "`apt-get install postgresql` did not provide it"
            if install and can_install_postgres()
            else "install PostgreSQL (Debian: `apt-get install postgresql`, as root) or set VIPER_POSTGRES_BIN"
        )
        raise PostgresNotFound(f"PostgreSQL server binaries (initdb, pg_ctl) not found: {how}")
    return found


def install_postgres() -> None:
    """apt-get install postgresql (Debian, as root); `apt-get update` first if the lists are missing or stale.

    Debian's package also creates its own `main` cluster (on port 5432, started where systemd runs); the
    servers here never use it.
    """
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"]
    if subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL, check=True)
        subprocess.run(command, env=env, stdout=subprocess.DEVNULL, check=True)


def _locate_bin() -> Path | None:
    if configured := os.environ.get("VIPER_POSTGRES_BIN"):
        return Path(configured) if (Path(configured) / "pg_ctl").is_file() else None
    versions = sorted(
        (int(path.name), path / "bin")
        for path in (_DEBIAN_BIN_DIRS.iterdir() if _DEBIAN_BIN_DIRS.is_dir() else [])
        if path.name.isdigit() and (path / "bin" / "pg_ctl").is_file()
    )
    if versions:
        return versions[-1][1]
    on_path = shutil.which("pg_ctl")
    return Path(on_path).resolve().parent if on_path else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    """One PostgreSQL server in a temp dir, for as long as the object lives (a context manager).

    `url(dbname)` gives a libpq URL for a database; `create_database()` makes a fresh, empty one.
    `stop()` / `start()` simulate an outage or a restart (the port and data are kept).
    """

    def __init__(self, bin_dir: Path | None = None, *, settings: Mapping[str, str] | None = None) -> None:
        self.bin_dir = bin_dir or find_postgres_bin()
        self.settings = {**TEST_SETTINGS, **(settings or {})}
        self.password = secrets.token_urlsafe(16)
        self.port: int | None = None
        self.dir: Path | None = None
        self._database_count = 0
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    @property
    def log_path(self) -> Path:
        return self.dir / "server.log"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres:{quote(self.password)}@127.0.0.1:{self.port}/{quote(dbname)}"

    def start(self, timeout: float = 60) -> PostgresServer:
        """Initialises the cluster on the first call, then starts the server and waits until it accepts."""
        if self._running:
            return self
        if self.dir is None:
            self._init()
        # The port is chosen once and kept across restarts: clients hold URLs with it. Another process may
        # take a free port between the probe and the bind, so a first start retries on a new one.
        for attempt in range(5):
            self.port = self.port or _free_port()
            result = self._run(
                "pg_ctl", "start", "--wait", f"--timeout={int(timeout)}", "--silent",
                "-D", str(self.dir / "data"), "-l", str(self.log_path), "-o", f"-p {self.port}",
            )
            if result.returncode == 0:
                self._running = True
                atexit.register(self.close)  # a safety net: close() is what should run
                return self
            if attempt == 4 or not re.search(r"could not bind|already in use", self._log_tail()):
                raise RuntimeError(f"PostgreSQL did not start (pg_ctl exit {result.returncode}):\n{self._log_tail()}")
            self.port = None
        raise AssertionError("unreachable")

    def stop(self, mode: str = "fast") -> None:
        """Stops the server: 'fast' (clean, disconnects clients) or 'immediate' (like a crash)."""
        if not self._running:
            return
        result = self._run("pg_ctl", "stop", "--wait", "--silent", "-m", mode, "-D", str(self.dir / "data"))
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl stop failed (exit {result.returncode}):\n{self._log_tail()}")
        self._running = False

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def create_database(self, name: str | None = None) -> str:
        """Creates an empty database (a fresh name unless given) and returns its URL."""
        import psycopg
        from psycopg import sql

        if name is None:
            self._database_count += 1
            name = f"db{self._database_count}_{secrets.token_hex(3)}"
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drops the database, disconnecting whoever is still connected to it."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def close(self) -> None:
        """Stops the server (if running) and deletes its directory. Safe to call more than once."""
        try:
            if self._running:
                self.stop("immediate")  # the data is thrown away: no need for a clean shutdown
        finally:
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None
            atexit.unregister(self.close)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _init(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="viper-postgres-"))
        try:
            password_file = self.dir / "password"
            password_file.write_text(self.password + "\n")
            if os.geteuid() == 0:
                account = pwd.getpwnam(_SERVER_USER)
                for path in (self.dir, password_file):
                    os.chown(path, account.pw_uid, account.pw_gid)
            initdb = (
                "initdb", "--no-sync", "--auth=scram-sha-256", "--username=postgres", "--encoding=UTF8",
                "--locale=C", f"--pwfile={password_file}", "-D", str(self.dir / "data"),
            )
            # A linguistic default collation, as production databases usually have (en_US): code that
            # needs byte order must ask for it. Without ICU support, the C locale.
            result = self._run(*initdb, "--locale-provider=icu", "--icu-locale=en-US")
            if result.returncode != 0:
                shutil.rmtree(self.dir / "data", ignore_errors=True)
                result = self._run(*initdb)
            password_file.unlink()
            if result.returncode != 0:
                raise RuntimeError(f"initdb failed (exit {result.returncode}):\n{result.stdout}")
            with open(self.dir / "data" / "postgresql.conf", "a") as conf:
                conf.writelines(f"{key} = {value}\n" for key, value in self.settings.items())
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
            raise

    def _run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", _SERVER_USER, "--", *command]
        # cwd: runuser keeps ours, which the postgres user may not be allowed to read.
        return subprocess.run(
            command, cwd=self.dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True,
        )

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"
