"""Runs a real viper-server process on an ephemeral loopback port, for tests and benchmarks."""

from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# The one line read for a fact: the port the OS picked for --port 0.
_LISTENING = re.compile(r"listening on [\w.:\[\]-]+:(\d+)")


class ServerProcess:
    """`python -m viper_server serve --port 0`; ready once grpc.health.v1.Health answers SERVING.

    A context manager: leaving the block kills the process. It is also killed when the interpreter
    exits, so a test or bench that fails half-way never leaves a server behind.
    """

    def __init__(self, db: Path | str, models_dir: Path, *extra_args: str, env: dict[str, str] | None = None,
                 models: str = "tiny", credentials: grpc.ChannelCredentials | None = None) -> None:
        self.args = [
            sys.executable, "-m", "viper_server", "serve",
            "--port", "0", "--db", str(db), "--models", models, "--models-dir", str(models_dir),
            *extra_args,
        ]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        # For the readiness probe of a TLS server (its client certificate too, for mTLS).
        self._credentials = credentials
        self.logs: list[str] = []
        self.port: int | None = None
        self._port_known = threading.Event()
        self._process: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def started(self) -> bool:
        return self._process is not None

    def start(self, timeout: float = 180) -> ServerProcess:
        """Starts the process and returns once its health check says SERVING."""
        if self.started:
            raise RuntimeError("this ServerProcess was started already")
        self._process = subprocess.Popen(self.args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         text=True, env=self.env)
        atexit.register(self.kill)
        threading.Thread(target=self._read_logs, daemon=True).start()
        deadline = time.monotonic() + timeout
        if not self._port_known.wait(timeout) or self.port is None or not self._wait_serving(deadline):
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

    def wait(self, timeout: float = 60) -> int:
        """Waits for the process to exit on its own (e.g. after a drain); returns its exit code."""
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

    def _wait_serving(self, deadline: float) -> bool:
        target = self.target
        channel = (grpc.secure_channel(target, self._credentials) if self._credentials
                   else grpc.insecure_channel(target))
        with channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline and self._process.poll() is None:
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return True
                except grpc.RpcError:
                    pass  # not listening yet, or refusing our credentials while starting
                time.sleep(0.1)
        return False

    def _read_logs(self) -> None:
        for line in self._process.stderr:
            self.logs.append(line.rstrip("\n"))
            if self.port is None and (match := _LISTENING.search(line)):
                self.port = int(match.group(1))
                self._port_known.set()
        self._port_known.set()  # exited: start() reports the failure

    def __enter__(self) -> ServerProcess:
        return self if self.started else self.start()

    def __exit__(self, *exc_info) -> None:
        self.kill()
