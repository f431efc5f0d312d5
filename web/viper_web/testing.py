"""Runs a real gateway process on an ephemeral loopback port, for tests and benchmarks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

_LISTENING = re.compile(r"viper-web listening on http://[\w.:\[\]-]+:(\d+)")


class GatewayProcess:
    """`python -m viper_web --port 0 --backend ...`; the port is read from its log."""

    def __init__(self, *backends: str, extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.args = [sys.executable, "-m", "viper_web", "--port", "0", "--backend", ",".join(backends), *extra_args]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.logs: list[str] = []
        self.port: int | None = None
        self._ready = threading.Event()
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self._process.pid

    def start(self, timeout: float = 60) -> GatewayProcess:
        self._process = subprocess.Popen(self.args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         text=True, env=self.env)
        threading.Thread(target=self._read_logs, daemon=True).start()
        if not self._ready.wait(timeout) or self._process.poll() is not None or self.port is None:
            self.kill()
            raise RuntimeError("gateway did not start:\n" + "\n".join(self.logs[-40:]))
        return self

    def stop(self, timeout: float = 30) -> int:
        if self._process.poll() is None:
            self._process.terminate()
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
        raise AssertionError(f"no gateway log line matching {pattern!r} in:\n" + "\n".join(self.logs[-20:]))

    def _read_logs(self) -> None:
        for line in self._process.stderr:
            self.logs.append(line.rstrip("\n"))
            if self.port is None and (match := _LISTENING.search(line)):
                self.port = int(match.group(1))
            if "viper-web ready" in line:
                self._ready.set()
        self._ready.set()  # exited: start() reports the failure

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        try:
            self.stop(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()
