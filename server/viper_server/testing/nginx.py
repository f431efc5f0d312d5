"""A throwaway nginx (Debian's package) in front of viper-server replicas, for tests and benchmarks.

`NginxProxy` runs deploy/nginx.conf itself, rewritten only where a test must: the upstream's `server` lines
(the replicas' ports), the `listen` address (a free loopback port) and the log folder; optionally without
its `hash` line (round robin, for comparison). It runs as a child process (`nginx -p DIR -c FILE -g 'daemon
off;'`) in a temp dir of its own, which `close()` deletes after stopping it.

`find_nginx()` locates the binary and, when asked to and allowed to (root on Debian), installs Debian's
`nginx` package first.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# deploy/nginx.conf of the repository this package is installed from (editable, as tests and benches run).
DEPLOY_CONFIG = Path(__file__).resolve().parents[3] / "deploy" / "nginx.conf"

_UPSTREAM = re.compile(r"(upstream viper_replicas \{\n)(.*?)(\n\})", re.S)
_SERVER_LINE = re.compile(r"^(\s*)server\s+\S+(\s[^;]*)?;\n?", re.M)
_HASH_LINE = re.compile(r"^\s*hash \$viper_route consistent;\n", re.M)
_LISTEN_LINE = re.compile(r"^(\s*)listen\s+\S+\s+http2;", re.M)
_LOG_DIR = "/var/log/nginx/"
# One line of the viper_grpc access log format.
# (upstream: "a:1, b:2" when nginx tried a first and moved on to b.)
_ACCESS = re.compile(r'"(?P<path>[^"]*)" user="(?P<user>[^"]*)" upstream=(?P<upstream>.+?) http=(?P<http>\d+) '
                     r"grpc_status=(?P<grpc_status>\S*)")


class NginxNotFound(RuntimeError):
    """nginx is not installed (and could not be)."""


def can_install_nginx() -> bool:
    """True where `apt-get install nginx` can work: root on Debian (or a derivative)."""
    return os.geteuid() == 0 and Path("/etc/debian_version").exists() and shutil.which("apt-get") is not None


def find_nginx(*, install: bool = False) -> Path:
    """The nginx binary ($VIPER_NGINX, else nginx on PATH or in /usr/sbin); with install=True, installs
    Debian's package if missing. Raises NginxNotFound saying why when there is none."""
    configured = os.environ.get("VIPER_NGINX")
    if configured and not Path(configured).is_file():
        raise NginxNotFound(f"VIPER_NGINX={configured} is not a file")
    found = _locate()
    if found is None and install and can_install_nginx():
        try:
            _apt_install("nginx")
        except (OSError, subprocess.CalledProcessError) as error:
            raise NginxNotFound(f"nginx is not installed and `apt-get install nginx` failed: {error}") from error
        found = _locate()
    if found is None:
        how = ("`apt-get install nginx` did not provide it" if install and can_install_nginx()
               else "install it (Debian: `apt-get install nginx`, as root) or set VIPER_NGINX to its path")
        raise NginxNotFound(f"nginx not found: {how}")
    return found


def _locate() -> Path | None:
    if configured := os.environ.get("VIPER_NGINX"):
        return Path(configured) if Path(configured).is_file() else None
    on_path = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    return Path(on_path) if on_path else None


def _apt_install(package: str) -> None:
    """apt-get install (Debian, as root); `apt-get update` first if the lists are missing or stale.

    On a machine where services start on install (systemd), Debian's package also starts its own nginx on
    port 80; the proxies here never use it."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
    if subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL, check=True)
        subprocess.run(command, env=env, stdout=subprocess.DEVNULL, check=True)


def render_config(template: str, replicas: Sequence[str], *, listen: str, log_dir: Path,
                  consistent_hash: bool = True) -> str:
    """deploy/nginx.conf with the replicas ("host:port") as its upstream servers (each keeping the
    parameters of the template's first server line), listening on `listen` ("host:port"), logging into
    log_dir; without the hash line (nginx's default, round robin) when consistent_hash is False.

    Raises ValueError when the template no longer has the lines this rewrites."""
    if not replicas:
        raise ValueError("no replicas")
    upstream = _UPSTREAM.search(template)
    servers = list(_SERVER_LINE.finditer(upstream.group(2))) if upstream else []
    if not servers or len(_LISTEN_LINE.findall(template)) != 1 or len(_HASH_LINE.findall(template)) != 1:
        raise ValueError("the nginx config has no `upstream viper_replicas` block with server lines, or not "
                         "exactly one `listen ... http2;` and one `hash $viper_route consistent;` line")
    indent, parameters = servers[0].group(1), servers[0].group(2) or ""
    body = _SERVER_LINE.sub("", upstream.group(2))
    lines = "".join(f"{indent}server {replica}{parameters};\n" for replica in replicas)
    first = servers[0].start()
    body = body[:first] + lines + body[first:]
    if not consistent_hash:
        body = _HASH_LINE.sub("", body)
    rendered = template[:upstream.start(2)] + body.rstrip("\n") + template[upstream.end(2):]
    rendered = _LISTEN_LINE.sub(lambda match: f"{match.group(1)}listen {listen} http2;", rendered)
    return rendered.replace(_LOG_DIR, f"{log_dir}/")


@dataclass(frozen=True)
class AccessRecord:
    """One call as nginx logged it (deploy/nginx.conf's viper_grpc format)."""

    path: str
    user: str
    upstream: str  # the replica's address; "a:1, b:2" when nginx tried a first and moved on to b
    http_status: int
    grpc_status: str  # "-" when no replica sent one (nginx answered itself, e.g. 502, or the call was cancelled)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class NginxProxy:
    """nginx in front of `replicas`, on a free loopback port; a context manager (stopped and deleted on exit).

    It is also stopped when the interpreter exits, so a test that fails half-way leaves no nginx behind.
    """

    def __init__(self, replicas: Sequence[str], *, consistent_hash: bool = True, config: Path = DEPLOY_CONFIG,
                 nginx: Path | None = None) -> None:
        if not config.is_file():
            raise FileNotFoundError(f"no nginx config at {config}")
        self.replicas = list(replicas)
        self.consistent_hash = consistent_hash
        self.config = config
        self.nginx = nginx or find_nginx()
        self.dir: Path | None = None
        self.port: int | None = None
        self._process: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def error_log(self) -> Path:
        return self.dir / "error.log"

    def start(self, timeout: float = 20) -> NginxProxy:
        if self._process is not None:
            raise RuntimeError("this NginxProxy was started already")
        self.dir = Path(tempfile.mkdtemp(prefix="viper-nginx-"))
        atexit.register(self.close)
        try:
            (self.dir / "temp").mkdir()
            for attempt in range(5):  # another process may take the free port before nginx binds it
                self.port = _free_port()
                self._write_configs()
                self._process = subprocess.Popen(
                    [str(self.nginx), "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"),
                     "-e", str(self.error_log), "-g", "daemon off;"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    start_new_session=True,  # its workers share its process group: close() can end them all
                )
                if self._wait_listening(time.monotonic() + timeout):
                    return self
                self._stop_process()
                if attempt == 4 or "Address already in use" not in self._error_log_tail():
                    raise RuntimeError(f"nginx did not start:\n{self._error_log_tail()}")
            raise AssertionError("unreachable")
        except BaseException:
            self.close()
            raise

    def access_records(self) -> list[AccessRecord]:
        """The calls logged so far (nginx writes each line when its call ends)."""
        path = self.dir / "viper-access.log"
        records = []
        for line in path.read_text().splitlines() if path.exists() else []:
            if match := _ACCESS.search(line):
                records.append(AccessRecord(match["path"], match["user"], match["upstream"], int(match["http"]),
                                            match["grpc_status"]))
        return records

    def close(self) -> None:
        """Stops nginx (if running) and deletes its dir. Safe to call more than once."""
        try:
            self._stop_process()
        finally:
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None
            atexit.unregister(self.close)

    def __enter__(self) -> NginxProxy:
        return self if self._process is not None else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _write_configs(self) -> None:
        site = render_config(self.config.read_text(), self.replicas, listen=self.target, log_dir=self.dir,
                             consistent_hash=self.consistent_hash)
        (self.dir / "viper.conf").write_text(site)
        temp = self.dir / "temp"
        # Debian's nginx was built with temp paths under /var/lib/nginx: each one moves into our dir. As root,
        # nginx's workers would run as nobody, who cannot enter a temp dir only root may read: test-only root.
        (self.dir / "nginx.conf").write_text(
            ("user root;\n" if os.geteuid() == 0 else "")
            + f"worker_processes 1;\npid {self.dir}/nginx.pid;\nerror_log {self.error_log} notice;\n"
            "events { worker_connections 1024; }\n"
            "http {\n"
            + "".join(f"    {kind}_temp_path {temp}/{kind};\n"
                      for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
            + "    access_log off;\n"
            f"    include {self.dir}/viper.conf;\n"
            "}\n"
        )

    def _wait_listening(self, deadline: float) -> bool:
        while time.monotonic() < deadline and self._process.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def _stop_process(self) -> None:
        if self._process is None:
            return
        process, self._process = self._process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # fast shutdown: the master stops its workers, then exits
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # its own process group: the master and its workers
                process.wait(15)

    def _error_log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.error_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no error log)"
