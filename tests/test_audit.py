"""The audit log's writer: off the request path, never failing a call, and rotatable."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from viper_server.audit import AuditEvent, JsonLinesAudit


def event(request_id: str) -> AuditEvent:
    return AuditEvent(time="2026-01-01T00:00:00.000+00:00", request_id=request_id, principal="svc", kind="service",
                      tenant="default", method="/viper.v1.ProfileService/GetProfile", user_id="alice",
                      permission="profiles.get", granted=True, code="OK", items=0)


def lines_in(path: Path, count: int, timeout: float = 10) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return [json.loads(line) for line in lines]
        time.sleep(0.02)


def test_records_are_json_lines_and_close_writes_what_is_queued(tmp_path):
    audit = JsonLinesAudit(str(tmp_path / "audit.jsonl"))
    for number in range(100):
        audit.record(event(f"r{number}"))
    audit.close()
    assert [record["request_id"] for record in lines_in(tmp_path / "audit.jsonl", 100)] == [
        f"r{number}" for number in range(100)]


def test_a_moved_file_is_followed_by_a_new_one(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = JsonLinesAudit(str(path))
    audit.record(event("before"))
    assert [r["request_id"] for r in lines_in(path, 1)] == ["before"]
    os.rename(path, tmp_path / "audit.jsonl.1")  # logrotate's move-and-create, without telling the server
    audit.record(event("after"))
    audit.close()
    assert [r["request_id"] for r in lines_in(path, 1)] == ["after"]
    assert [r["request_id"] for r in lines_in(tmp_path / "audit.jsonl.1", 1)] == ["before"]


def test_reopen_takes_a_file_replaced_in_place(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = JsonLinesAudit(str(path))
    audit.record(event("one"))
    lines_in(path, 1)
    audit.reopen()  # what SIGHUP does
    audit.record(event("two"))
    audit.close()
    assert [r["request_id"] for r in lines_in(path, 2)] == ["one", "two"]


def test_a_write_failure_loses_the_record_not_the_caller(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = JsonLinesAudit(str(path))
    audit._file.close()  # a broken file under the writer: every write fails
    os.rename(path, tmp_path / "gone")
    os.mkdir(path)  # and the path cannot be reopened either
    started = time.monotonic()
    for number in range(1000):
        audit.record(event(f"r{number}"))  # never raises, never blocks
    assert time.monotonic() - started < 1
    audit.close()
    assert audit.dropped > 0
