"""Runs a real viper-serve process on an ephemeral loopback port, for tests and benchmarks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

_LISTENING = re.compile(r"listening on [\w.:\[\]-]+:(\d+)")


class ServerProcess:
    """`python -m viper_server serve` with --port 0; the port is read from its log."""

    def __init__(self, db_path: Path, models_dir: Path, *extra_args: str, env: dict[str, str] | None = None) -> None:
        self.args = [
            sys.executable, "-m", "viper_server", "serve",
            "--port", "0", "--db", str(db_path), "--models", "tiny", "--models-dir", str(models_dir),
            *extra_args,
        ]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.logs: list[str] = []
        self.port: int | None = None
        self._ready = threading.Event()
        self._process: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self._process.pid

    def start(self, timeout: float = 180) -> ServerProcess:
        """Starts the process and returns once its models are loaded."""
        self._process = subprocess.Popen(self.args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         text=True, env=self.env)
        threading.Thread(target=self._read_logs, daemon=True).start()
        if not self._ready.wait(timeout) or self._process.poll() is not None:
            self.kill()
            raise RuntimeError("server did not become ready:\n" + "\n".join(self.logs[-40:]))
        return self

    def send_signal(self, sig: int) -> None:
        self._process.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Sends sig and waits for the process to exit; returns its exit code."""
        if self._process.poll() is None:
            self._process.send_signal(sig)
        return self._process.wait(timeout)

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(30)

    def wait_for_log(self, pattern: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.logs):
                if re.search(pattern, line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no log line matching {pattern!r} in:\n" + "\n".join(self.logs[-20:]))

    def _read_logs(self) -> None:
        for line in self._process.stderr:
            self.logs.append(line.rstrip("\n"))
            if self.port is None and (match := _LISTENING.search(line)):
                self.port = int(match.group(1))
            if "viper-serve ready" in line:
                self._ready.set()
        self._ready.set()  # exited: start() reports the failure

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.kill()
