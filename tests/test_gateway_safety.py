"""The gateway under hostile input: it never stalls, refuses cheaply, and cuts off slow clients.

A real `viper serve` (toy models, auth on) and real gateway processes on ephemeral loopback ports, as in
test_web_gateway.py. Beyond status codes these measure what an attacker would aim at: how long the page's
own HTML takes while JSON bombs arrive (the event loop's latency), and the gateway's resident memory.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest
from test_web_gateway import AUTH, GET_PROFILE, SCORE, TOKEN, connect_json, connect_stream, grpc_web, post

from viper_server.testing import ServerProcess
from viper_web.testing import GatewayProcess

from certs import CertificateAuthority

EXTRACT = "/viper.v1.ProfileService/ExtractProfile"
LIST_PROFILES = "/viper.v1.ProfileService/ListProfiles"
MiB = 1024 * 1024
# The issue's bomb: 2 million empty objects, 5.7 MiB, sent without a token.
BOMB = b'{"userId":"mallory","images":[' + b"{}," * (2_000_000 - 1) + b"{}]}"


@pytest.fixture(scope="module")
def server(toy_models_dir, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("auth") / "tokens.txt"
    tokens.write_text(f"{TOKEN}\n")
    db = tmp_path_factory.mktemp("db") / "profiles.db"
    with ServerProcess(db, toy_models_dir, "--auth-tokens", str(tokens), models="toy") as process:
        yield process


@pytest.fixture(scope="module")
def gateway(server):
    with GatewayProcess(server.target) as process:
        yield process


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def page_load_seconds(base: str) -> float:
    started = time.monotonic()
    connection = http.client.HTTPConnection(urlsplit(base).netloc, timeout=60)
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        assert response.status == 200 and b"<html" in response.read().lower()
    finally:
        connection.close()
    return time.monotonic() - started


def raw_connection(base: str) -> socket.socket:
    return socket.create_connection(urlsplit(base).netloc.split(":"), timeout=30)


def read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_the_page_loads_within_a_second_while_json_bombs_arrive(gateway):
    before = rss_bytes(gateway.pid)
    statuses: list[int] = []
    stop = threading.Event()

    def bomb() -> None:
        while not stop.is_set():
            try:
                statuses.append(post(gateway.url, EXTRACT, BOMB, "application/json").status)
            except ConnectionError:  # refused before its body was read: the gateway closed the connection
                statuses.append(-1)

    def sample_rss() -> None:
        while not stop.is_set():
            peaks.append(rss_bytes(gateway.pid))
            time.sleep(0.02)

    peaks: list[int] = []
    threads = [threading.Thread(target=bomb) for _ in range(3)] + [threading.Thread(target=sample_rss)]
    for thread in threads:
        thread.start()
    try:
        while len(statuses) < 2:  # bombs are arriving
            time.sleep(0.05)
        loads = []
        for _ in range(10):
            loads.append(page_load_seconds(gateway.url))
            time.sleep(0.1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)
    print(f"page loads during bombs: max {max(loads) * 1e3:.0f} ms; {len(statuses)} bombs; "
          f"RSS {before / MiB:.0f} -> peak {max(peaks) / MiB:.0f} MiB")
    assert max(loads) < 1.0, f"the page took {max(loads):.2f} s during a JSON bomb"
    assert set(statuses) <= {429, 401, -1} and 429 in statuses
    # Each bomb's body (6 MB) is held while it is checked, nothing more: far below a parse's ~270 MB.
    assert max(peaks) - before < 80 * MiB, f"RSS grew by {(max(peaks) - before) / MiB:.0f} MiB"


def test_a_bomb_is_refused_naming_the_cap(gateway):
    reply = post(gateway.url, EXTRACT, BOMB, "application/json", AUTH)
    assert reply.status == 429 and reply.json()["code"] == "resource_exhausted"
    assert "array of more than 4096 elements" in reply.json()["message"]


@pytest.mark.parametrize("body, cap", [
    (b"[" * 100_000 + b"]" * 100_000, "nested deeper than 32"),
    (b'{"userId":"a","x":[' + b"[]," * 200_000 + b"[]]}", "array of more than 4096"),
    (b'{"userId":"a",' + b",".join(b'"k%d":0' % i for i in range(100_001)) + b"}", "more than 100000 values"),
    (b'{"userId":"' + b"a" * 70_000 + b'"}', "user_id: a string of more than 65536 characters"),
    (b'{"userId":"a","' + b"k" * 70_000 + b'":1}', "object key of more than 65536"),
])
def test_json_counts_are_capped(gateway, body, cap):
    reply = post(gateway.url, GET_PROFILE if len(body) < MiB else EXTRACT, body, "application/json", AUTH)
    assert reply.status == 429 and reply.json()["code"] == "resource_exhausted", reply.body[:200]
    assert cap in reply.json()["message"]


@pytest.mark.parametrize("body", [
    b'{"userId":"alice","user_id":"bob"}',
    b'{"user_id":"bob","userId":"alice"}',
    b'{"userId":"alice","userId":"bob"}',
    b'{"userId":"alice","images":[{"data":"","comment":"a","comment":"b"}]}',
])
def test_ambiguous_json_is_invalid_argument(gateway, body):
    reply = post(gateway.url, EXTRACT, body, "application/json", AUTH)
    assert reply.status == 400 and reply.json()["code"] == "invalid_argument", reply.body
    assert "twice" in reply.json()["message"]


@pytest.mark.parametrize("path, request_json, field", [
    (GET_PROFILE, {"userId": "alice", "version": "my secret words"}, "version"),
    (LIST_PROFILES, {"pageSize": "my secret words"}, "pageSize"),
    (EXTRACT, {"userId": "alice", "images": [{"comment": {"my secret words": 1}}]}, "images.comment"),
])
def test_a_value_of_the_wrong_type_is_named_by_its_field_never_quoted(gateway, path, request_json, field):
    """json_format's own messages quote the value they could not parse, and it may be a comment or a prompt."""
    reply = post(gateway.url, path, json.dumps(request_json).encode(), "application/json", AUTH)
    assert reply.status == 400 and reply.json()["code"] == "invalid_argument", reply.body
    assert f"field {field}: wrong type or value" in reply.json()["message"]
    assert b"secret" not in reply.body


def test_unambiguous_json_in_either_spelling_still_works(gateway):
    for body in (b'{"userId":"nobody-here"}', b'{"user_id":"nobody-here"}'):
        reply = post(gateway.url, GET_PROFILE, body, "application/json", AUTH)
        assert reply.status == 404 and "nobody-here" in reply.json()["message"]


def test_body_limits_are_per_method(server):
    args = ("--max-small-body-bytes", "4096", "--max-body-bytes", "65536")
    with GatewayProcess(server.target, extra_args=args) as gateway:
        padded = b'{"userId":"nobody-here"' + b" " * 5000 + b"}"
        small = post(gateway.url, GET_PROFILE, padded, "application/json", AUTH)
        assert small.status == 429 and "4096" in small.json()["message"]
        # ExtractProfile carries images: the same body reaches the back end, which answers for itself.
        padded_extract = b'{"userId":"x","images":[{"data":"AAAA","rating":"RATING_LIKED"}]' + b" " * 5000 + b"}"
        large = post(gateway.url, EXTRACT, padded_extract, "application/json", AUTH)
        assert large.status == 400 and "image" in large.json()["message"]
        too_large = post(gateway.url, EXTRACT, padded_extract + b" " * 65536, "application/json", AUTH)
        assert too_large.status == 429 and "65536" in too_large.json()["message"]
        # gRPC-Web too (the framing differs, the limit is the method's).
        _, _, trailers = grpc_web(gateway.url, GET_PROFILE, b"\x0a\x01a" + b"\x12\x00" * 3000, AUTH)
        assert trailers["grpc-status"] == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])


def test_bodies_held_at_once_are_bounded_and_released(server):
    with GatewayProcess(server.target, extra_args=("--max-buffered-bytes", str(MiB))) as gateway:
        padding = b" " * (600 * 1024)
        over = post(gateway.url, EXTRACT, b'{"userId":"x"' + padding * 2 + b"}", "application/json", AUTH)
        assert over.status == 429 and "--max-buffered-bytes" in over.json()["message"]
        for _ in range(2):  # 600 KiB each, one after the other: each call's share is given back
            reply = post(gateway.url, EXTRACT, b'{"userId":"x"' + padding + b"}", "application/json", AUTH)
            assert reply.status == 400 and "image" in reply.json()["message"], reply.body


def test_the_default_limit_of_profile_calls_is_small(gateway):
    padded = b'{"userId":"nobody-here"' + b" " * (2 * MiB) + b"}"
    reply = post(gateway.url, GET_PROFILE, padded, "application/json", AUTH)
    assert reply.status == 429 and str(MiB) in reply.json()["message"]


def send_headers_only(base: str, path: str, content_type: str, length: int) -> tuple[bytes, bytes]:
    """A request announcing `length` body bytes that never come: the head and the body of the reply."""
    with raw_connection(base) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {length}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536) or pytest.fail(f"closed without an answer: {data!r}")
        head, _, body = data.partition(b"\r\n\r\n")
        size = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))
        while len(body) < size:
            body += sock.recv(65536) or pytest.fail("closed within the answer")
        return head, body


def test_without_a_token_the_body_is_never_read_once_the_back_end_asked_for_one(server):
    with GatewayProcess(server.target, extra_args=("--body-timeout", "20")) as gateway:
        # Learned from the back end's first answer, per method.
        first = connect_json(gateway.url, EXTRACT, {"userId": "alice"})
        assert first.status == 401
        gateway.wait_for_log("ExtractProfile needs a token")
        started = time.monotonic()
        head, body = send_headers_only(gateway.url, EXTRACT, "application/json", 50 * MiB)
        assert time.monotonic() - started < 10, "answered before the body deadline: the body was not awaited"
        assert head.startswith(b"HTTP/1.1 401") and json.loads(body)["code"] == "unauthenticated"
        # A token is still let through, and its body read.
        assert connect_json(gateway.url, EXTRACT, {"userId": "alice"}, AUTH).status == 400


def test_require_auth_refuses_from_the_first_call_in_each_protocol(server):
    with GatewayProcess(server.target, extra_args=("--require-auth",)) as gateway:
        head, _ = send_headers_only(gateway.url, GET_PROFILE, "application/json", 50 * MiB)
        assert head.startswith(b"HTTP/1.1 401")
        _, messages, trailers = grpc_web(gateway.url, GET_PROFILE, b"\x0a\x01a")
        assert messages == [] and trailers["grpc-status"] == "16" and "bearer token" in trailers["grpc-message"]
        _, messages, end = connect_stream(gateway.url, SCORE, {"userId": "a", "queries": ["AAAA"]})
        assert messages == [] and end["error"]["code"] == "unauthenticated"
        assert connect_json(gateway.url, GET_PROFILE, {"userId": "nobody-here"}, AUTH).status == 404
        assert not any("GetProfile" in line and "status=UNAUTHENTICATED" in line and "backend=127" in line
                       for line in gateway.logs), "no call without a token reached the back end"


def trickle(sock: socket.socket, data: bytes, every: float, give_up: float) -> tuple[float | None, bytes]:
    """Sends data a byte every `every` s until the gateway answers or closes: (seconds until then, what it sent).
    (None, b"") if it did neither within give_up seconds."""
    started = time.monotonic()
    sock.settimeout(every)
    for byte in data:
        if time.monotonic() - started > give_up:
            break
        try:
            sock.sendall(bytes([byte]))
            received = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:  # reset
            return time.monotonic() - started, b""
        return time.monotonic() - started, received
    return None, b""


def test_slow_and_idle_clients_are_cut_off(server):
    args = ("--header-timeout", "1", "--body-timeout", "1")
    with GatewayProcess(server.target, extra_args=args) as gateway:
        with raw_connection(gateway.url) as idle:
            started = time.monotonic()
            assert read_until_closed(idle) == b"" and time.monotonic() - started < 10
        with raw_connection(gateway.url) as slow_headers:
            headers = f"POST {GET_PROFILE} HTTP/1.1\r\nHost: x\r\nX-Padding: {'a' * 200}\r\n".encode()
            seconds, received = trickle(slow_headers, headers, every=0.1, give_up=20)
            assert seconds is not None and seconds < 10 and received == b"", "headers trickled for too long"
        with raw_connection(gateway.url) as slow_body:
            slow_body.sendall(f"POST {GET_PROFILE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              f"Authorization: Bearer {TOKEN}\r\nContent-Length: 300\r\n\r\n".encode())
            seconds, received = trickle(slow_body, b'{"userId":"' + b"a" * 280 + b'"}', every=0.1, give_up=20)
            assert seconds is not None and seconds < 10, "a body trickled for too long"
            reply = received + read_until_closed(slow_body)
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 504") and json.loads(body)["code"] == "deadline_exceeded"
        assert page_load_seconds(gateway.url) < 10  # and the gateway serves on


def test_connections_past_the_limit_get_503(server):
    with GatewayProcess(server.target, extra_args=("--limit-concurrency", "3")) as gateway:
        # Accepted in order: the held connections count before the request's own (which counts too).
        held = [raw_connection(gateway.url)]
        try:
            below = post(gateway.url, GET_PROFILE, b'{"userId":"nobody-here"}', "application/json", AUTH)
            assert below.status == 404
            held.append(raw_connection(gateway.url))
            assert post(gateway.url, GET_PROFILE, b"{}", "application/json", AUTH).status == 503
        finally:
            for sock in held:
                sock.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue = CertificateAuthority(folder, "viper-ca"), CertificateAuthority(folder, "rogue-ca")
    return {"ca": ca.pem.cert, "server": ca.issue("server", server=True),
            "gateway": ca.issue("gateway", server=False), "rogue_ca": rogue.pem.cert}


def test_the_gateway_reaches_a_back_end_over_mutual_tls(toy_models_dir, tmp_path, pki):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"{TOKEN}\n")
    server_args = ("--auth-tokens", str(tokens), "--tls-cert", str(pki["server"].cert),
                   "--tls-key", str(pki["server"].key), "--tls-client-ca", str(pki["ca"]))
    probe = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes(),
                                         private_key=pki["gateway"].key.read_bytes(),
                                         certificate_chain=pki["gateway"].cert.read_bytes())
    client = ("--backend-cert", str(pki["gateway"].cert), "--backend-key", str(pki["gateway"].key))
    with ServerProcess(tmp_path / "db", toy_models_dir, *server_args, models="toy", credentials=probe) as server:
        with GatewayProcess(server.target, extra_args=("--backend-ca", str(pki["ca"]), *client)) as gateway:
            reply = connect_json(gateway.url, GET_PROFILE, {"userId": "nobody-here"}, AUTH)
            assert reply.status == 404 and reply.json()["code"] == "not_found"
        for args in [(), ("--backend-tls",), ("--backend-ca", str(pki["ca"])),
                     ("--backend-ca", str(pki["rogue_ca"]), *client)]:
            with GatewayProcess(server.target, extra_args=args) as gateway:
                reply = connect_json(gateway.url, GET_PROFILE, {"userId": "nobody-here"}, AUTH)
                assert reply.status == 503 and reply.json()["code"] == "unavailable", args
