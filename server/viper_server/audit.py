"""The audit log: one JSON object a line for every call, refusals included (`--audit-log FILE`, or `-`).

Modelled on Cloud Audit Logs: who (principal, kind, tenant), did what (method, permission, the user id
acted on, items), when, and whether it was granted and how it ended. Never a token, a comment, a
feature or image bytes: an AuditEvent has no field that could hold one.

Records are written off the request path, by one thread from a bounded queue: a slow or failing disk
never slows or fails a call (a full queue drops records and counts them). The file may be rotated: the
writer reopens it on SIGHUP (`reopen()`), or by itself when the path names another file (logrotate's
default move-and-create) or none at all.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
from dataclasses import asdict, dataclass
from typing import IO, Protocol

log = logging.getLogger(__name__)

QUEUE_SIZE = 10_000


@dataclass(frozen=True)
class AuditEvent:
    time: str  # RFC 3339, UTC
    request_id: str
    principal: str | None  # service name, or "issuer subject"; None when no credential was accepted
    kind: str | None  # "service" or "user"
    tenant: str | None
    method: str
    user_id: str | None  # the user acted on
    permission: str | None
    granted: bool
    code: str  # the gRPC status code's name
    items: int  # images generated, queries scored


class AuditSink(Protocol):
    """Where the RPC layer sends each call's record; must not block."""

    def record(self, event: AuditEvent) -> None: ...


class JsonLinesAudit:
    """Writes AuditEvents as JSON lines to a file (appending) or to stderr ("-")."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._queue: queue.Queue[AuditEvent | None] = queue.Queue(QUEUE_SIZE)
        self._reopen = threading.Event()
        self.dropped = 0
        self._failing = False  # logs the first failure of a run of them, not each
        self._file: IO[str] | None = None
        self._open()  # a path that cannot be opened stops the server at start, not silently later
        self._thread = threading.Thread(target=self._write_all, name="audit-log", daemon=True)
        self._thread.start()

    def record(self, event: AuditEvent) -> None:
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1

    def reopen(self) -> None:
        """Reopens the file before the next record (SIGHUP, after a rotation)."""
        self._reopen.set()

    def close(self, timeout: float = 5.0) -> None:
        """Writes what is queued, then stops."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _open(self) -> None:
        if self._path == "-":
            self._file = sys.stderr
            return
        if self._file is not None:
            self._file.close()
        self._file = open(self._path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the writer)

    def _rotated(self) -> bool:
        if self._path == "-" or self._file is None:
            return False
        try:
            return os.stat(self._path).st_ino != os.fstat(self._file.fileno()).st_ino
        except OSError:  # moved away and not recreated yet
            return True

    def _write_all(self) -> None:
        while (event := self._queue.get()) is not None:
            try:
                if self._reopen.is_set() or self._rotated():
                    self._reopen.clear()
                    self._open()
                self._file.write(json.dumps(asdict(event), separators=(",", ":")) + "\n")
                if self._queue.empty():
                    self._file.flush()
                self._failing = False
            except (OSError, ValueError) as error:  # a full disk, a closed file: the record is lost, not the call
                self.dropped += 1
                if not self._failing:
                    log.warning("audit log %s: cannot write (%s); records are dropped until it can",
                                self._path, error)
                self._failing = True
        if self._file is not None and self._file is not sys.stderr:
            self._file.close()
