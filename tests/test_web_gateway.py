"""The web gateway over HTTP: Connect (JSON and binary, unary and server streaming) and gRPC-Web, against a
real `viper serve` (toy models, auth on) and a real gateway process, both on ephemeral loopback ports.

In-process fake back ends complete the picture where a real server cannot show it: the exact metadata
a back end receives, every gRPC status code's mapping, per-user routing over several back ends.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import re
import struct
import threading
import time
from concurrent import futures
from pathlib import Path
from urllib.parse import unquote, urlsplit

import grpc
import pytest
from google.protobuf import empty_pb2
from PIL import Image

from viper_client import ViperClient
from viper_proto.v1 import generation_pb2, metric_pb2, profile_pb2
from viper_server.testing import ServerProcess
from viper_web.testing import GatewayProcess

from fixture_data import FIXTURES, QUERIES, fixture_images

TOKEN = "web-gateway-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STATIC = Path(__file__).parents[1] / "web" / "viper_web" / "static"
GET_PROFILE = "/viper.v1.ProfileService/GetProfile"
GENERATE = "/viper.v1.GenerationService/Generate"
SCORE = "/viper.v1.MetricService/Score"


# --- HTTP helpers -------------------------------------------------------------------------------------------


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> dict:
        return json.loads(self.body)


def post(base: str, path: str, body: bytes, content_type: str, headers: dict[str, str] | None = None,
         method: str = "POST") -> Reply:
    connection = http.client.HTTPConnection(urlsplit(base).netloc, timeout=120)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": content_type, **(headers or {})})
        response = connection.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


def connect_json(base: str, path: str, request: dict, headers: dict[str, str] | None = None) -> Reply:
    return post(base, path, json.dumps(request).encode(), "application/json", headers)


def envelope(data: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(data)) + data


def frames(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    while data:
        flags, length = struct.unpack_from(">BI", data)
        assert len(data) >= 5 + length, "truncated frame"
        out.append((flags, data[5:5 + length]))
        data = data[5 + length:]
    return out


def connect_stream(base: str, path: str, request: dict | bytes, codec: str = "json",
                   headers: dict[str, str] | None = None) -> tuple[Reply, list, dict]:
    """The messages (dicts for JSON, bytes for proto) and the end-of-stream message of a Connect stream."""
    payload = json.dumps(request).encode() if codec == "json" else request
    reply = post(base, path, envelope(payload), f"application/connect+{codec}", headers)
    assert reply.status == 200, reply.body
    parsed = frames(reply.body)
    assert parsed[-1][0] == 0x02 and all(flags == 0 for flags, _ in parsed[:-1])
    messages = [json.loads(data) if codec == "json" else data for _, data in parsed[:-1]]
    return reply, messages, json.loads(parsed[-1][1])


def grpc_web(base: str, path: str, message: bytes, headers: dict[str, str] | None = None,
             text: bool = False) -> tuple[Reply, list[bytes], dict[str, str]]:
    """The messages and the trailers of a gRPC-Web call."""
    body = envelope(message)
    content_type = "application/grpc-web-text" if text else "application/grpc-web+proto"
    reply = post(base, path, base64.b64encode(body) if text else body, content_type, headers)
    assert reply.status == 200, reply.body
    data = reply.body
    if text:  # each frame is its own padded base64 chunk: decode 4 characters at a time
        data = b"".join(base64.b64decode(data[i:i + 4]) for i in range(0, len(data), 4))
    parsed = frames(data)
    assert parsed[-1][0] == 0x80 and all(flags == 0 for flags, _ in parsed[:-1])
    trailers = dict(line.split(": ", 1) for line in parsed[-1][1].decode().split("\r\n") if line)
    return reply, [data for _, data in parsed[:-1]], trailers


def png_b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


# --- a real server with auth on, and a gateway in front of it --------------------------------------------


@pytest.fixture(scope="module")
def server(toy_models_dir, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("auth") / "tokens.txt"
    tokens.write_text(f"{TOKEN}\n")
    db = tmp_path_factory.mktemp("db") / "profiles.db"
    with ServerProcess(db, toy_models_dir, "--auth-tokens", str(tokens), models="toy") as process:
        with ViperClient(process.target, token=TOKEN) as client:
            client.extract_profile("painter", fixture_images())
        yield process


@pytest.fixture(scope="module")
def gateway(server):
    with GatewayProcess(server.target) as process:
        yield process


def test_the_readme_curl_line_works(gateway):
    # curl -H 'Content-Type: application/json' -d '{"userId":"painter"}' .../GetProfile (plus the token)
    reply = post(gateway.url, GET_PROFILE, b'{"userId":"painter"}', "application/json", AUTH)
    assert reply.status == 200 and reply.headers["content-type"] == "application/json"
    profile = reply.json()
    assert profile["userId"] == "painter" and profile["version"] == "1"
    assert profile["likedImageCount"] == 8 and profile["dislikedImageCount"] == 8
    assert isinstance(profile["likedFeatures"], list) and len(profile["images"]) == 16


def test_connect_json_extract_then_binary_get(gateway):
    images = [
        {"data": png_b64(FIXTURES / "liked" / "0.png"), "comment": "soft pastel light", "rating": "RATING_LIKED"},
        {"data": png_b64(FIXTURES / "disliked" / "0.png"), "comment": "too murky", "rating": "RATING_DISLIKED"},
    ]
    reply = connect_json(gateway.url, "/viper.v1.ProfileService/ExtractProfile",
                         {"userId": "web-extract", "images": images}, AUTH)
    assert reply.status == 200, reply.body
    extracted = reply.json()
    assert extracted["version"] == "1" and extracted["images"][1]["rating"] == "RATING_DISLIKED"
    assert extracted["images"][0]["sha256"] == hashlib.sha256((FIXTURES / "liked" / "0.png").read_bytes()).hexdigest()

    request = profile_pb2.GetProfileRequest(user_id="web-extract").SerializeToString()
    reply = post(gateway.url, GET_PROFILE, request, "application/proto", AUTH)
    assert reply.status == 200 and reply.headers["content-type"] == "application/proto"
    profile = profile_pb2.Profile.FromString(reply.body)
    assert profile.user_id == "web-extract" and list(profile.liked_features) == extracted["likedFeatures"]


def test_update_with_a_stale_version_is_a_conflict(gateway):
    path = "/viper.v1.ProfileService/UpdateProfile"
    update = {"userId": "painter", "likedFeatures": ["gold leaf"], "updateMask": "likedFeatures"}
    fresh = connect_json(gateway.url, path, {**update, "expectedVersion": "1"}, AUTH)
    assert fresh.status == 200 and fresh.json()["version"] == "2"
    assert fresh.json()["likedFeatures"] == ["gold leaf"]
    stale = connect_json(gateway.url, path, {**update, "expectedVersion": "1"}, AUTH)
    assert stale.status == 409
    assert stale.json()["code"] == "aborted" and "version" in stale.json()["message"]


def test_connect_errors_are_json_with_the_right_http_status(gateway):
    missing = connect_json(gateway.url, GET_PROFILE, {"userId": "nobody-here"}, AUTH)
    assert missing.status == 404 and missing.json() == {"code": "not_found",
                                                        "message": "no profile for user 'nobody-here'"}
    invalid = connect_json(gateway.url, GET_PROFILE, {"userId": "bad user"}, AUTH)
    assert invalid.status == 400 and invalid.json()["code"] == "invalid_argument"
    assert "user_id" in invalid.json()["message"]
    # Requests the gateway itself refuses, before any back end sees them.
    not_json = post(gateway.url, GET_PROFILE, b"{not json", "application/json", AUTH)
    assert not_json.status == 400 and not_json.json()["code"] == "invalid_argument"
    assert "viper.v1.GetProfileRequest" in not_json.json()["message"]
    bad_timeout = post(gateway.url, GET_PROFILE, b"{}", "application/json", {**AUTH, "Connect-Timeout-Ms": "soon"})
    assert bad_timeout.status == 400 and "connect-timeout-ms" in bad_timeout.json()["message"]
    bad_version = post(gateway.url, GET_PROFILE, b"{}", "application/json", {**AUTH, "Connect-Protocol-Version": "2"})
    assert bad_version.status == 400 and bad_version.json()["code"] == "invalid_argument"


def test_http_level_refusals(gateway):
    wrong_type = post(gateway.url, GET_PROFILE, b"{}", "text/plain", AUTH)
    assert wrong_type.status == 415 and "application/json" in wrong_type.headers["accept-post"]
    # A streaming method does not take the unary content types, and the other way round.
    assert post(gateway.url, GENERATE, b"{}", "application/json", AUTH).status == 415
    assert post(gateway.url, GET_PROFILE, envelope(b"{}"), "application/connect+json", AUTH).status == 415
    get = post(gateway.url, GET_PROFILE, b"", "application/json", AUTH, method="GET")
    assert get.status == 405 and "POST" in get.headers["allow"]
    assert post(gateway.url, "/viper.v1.ProfileService/Nope", b"{}", "application/json", AUTH).status == 404


def test_token_passes_through_and_its_absence_is_unauthenticated(gateway):
    body = {"userId": "painter"}
    assert connect_json(gateway.url, GET_PROFILE, body, AUTH).status == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        reply = connect_json(gateway.url, GET_PROFILE, body, headers)
        assert reply.status == 401 and reply.json()["code"] == "unauthenticated"
    _, messages, trailers = grpc_web(gateway.url, GET_PROFILE, profile_pb2.GetProfileRequest(user_id="painter")
                                     .SerializeToString())
    assert messages == [] and trailers["grpc-status"] == "16"
    _, messages, end = connect_stream(gateway.url, SCORE, {"userId": "painter", "queries": [png_b64(QUERIES[0])]})
    assert messages == [] and end["error"]["code"] == "unauthenticated"


def test_request_id_reaches_the_server_log_and_comes_back(gateway, server):
    reply = connect_json(gateway.url, GET_PROFILE, {"userId": "painter"}, {**AUTH, "X-Request-Id": "web-test-42"})
    assert reply.status == 200 and reply.headers["x-request-id"] == "web-test-42"
    server.wait_for_log(r"rpc method=/viper.v1.ProfileService/GetProfile .*request_id=web-test-42")
    gateway.wait_for_log(r"rpc method=viper.v1.ProfileService/GetProfile protocol=connect/json user=painter "
                         r".*status=OK .*request_id=web-test-42")
    # Without one, the gateway makes one and the server logs the same.
    made = connect_json(gateway.url, GET_PROFILE, {"userId": "painter"}, AUTH).headers["x-request-id"]
    server.wait_for_log(rf"request_id={made}\b")


def generate_request(**overrides) -> dict:
    return {"userId": "painter", "prompt": "a castle by the sea", "numImages": 2, "width": 64, "height": 64,
            "steps": 4, "seed": "77", "previewEvery": 1, **overrides}


def check_generation_order(events: list[tuple[str, int, object]]) -> None:
    """Per image: progress from step 0, previews while it runs, then the final image last."""
    for index in (0, 1):
        mine = [(kind, value) for kind, i, value in events if i == index]
        kinds = [kind for kind, _ in mine]
        assert kinds[0] == "progress" and kinds[-1] == "image" and kinds.count("image") == 1
        assert "preview" in kinds, "previews stream before the final image"
        steps = [value for kind, value in mine if kind == "progress"]
        assert steps == list(range(len(steps))) and len(steps) > 4


def test_connect_json_generation_streams_progress_previews_then_images(gateway):
    _, messages, end = connect_stream(gateway.url, GENERATE, generate_request(), headers=AUTH)
    assert end == {}
    events = []
    for message in messages:
        (kind, data), = message.items()
        events.append((kind, data["imageIndex"], data.get("step")))
    check_generation_order(events)
    images = [message["image"] for message in messages if "image" in message]
    assert [image["seed"] for image in images] == ["77", "78"]
    for image in images:
        decoded = Image.open(io.BytesIO(base64.b64decode(image["png"])))
        assert decoded.format == "PNG" and decoded.size == (64, 64) and image["profileVersion"] != "0"


def test_connect_proto_score_streams_one_result_per_query(gateway):
    request = metric_pb2.ScoreRequest(user_id="painter", queries=[path.read_bytes() for path in QUERIES])
    _, messages, end = connect_stream(gateway.url, SCORE, request.SerializeToString(), codec="proto", headers=AUTH)
    assert end == {}
    results = [metric_pb2.ScoreResult.FromString(data) for data in messages]
    assert sorted(result.index for result in results) == [0, 1]
    assert all(0.0 <= result.score <= 1.0 for result in results)


def test_connect_stream_errors_come_in_the_end_message(gateway):
    reply, messages, end = connect_stream(gateway.url, GENERATE, generate_request(userId="nobody-here"), headers=AUTH)
    assert reply.status == 200 and messages == []
    assert end["error"] == {"code": "not_found", "message": "no profile for user 'nobody-here'"}
    _, messages, end = connect_stream(gateway.url, GENERATE, generate_request(prompt=""), headers=AUTH)
    assert messages == [] and end["error"]["code"] == "invalid_argument"
    assert "prompt" in end["error"]["message"]


@pytest.mark.parametrize("text", [False, True], ids=["binary", "text"])
def test_grpc_web_unary_and_streaming(gateway, text):
    request = profile_pb2.GetProfileRequest(user_id="painter").SerializeToString()
    reply, messages, trailers = grpc_web(gateway.url, GET_PROFILE, request, AUTH, text=text)
    expected_type = "application/grpc-web-text+proto" if text else "application/grpc-web+proto"
    assert reply.headers["content-type"] == expected_type
    assert trailers["grpc-status"] == "0" and len(messages) == 1
    assert profile_pb2.Profile.FromString(messages[0]).user_id == "painter"

    generate = generation_pb2.GenerateRequest(user_id="painter", prompt="a lighthouse", num_images=2, width=64,
                                              height=64, steps=4, seed=5, preview_every=1)
    _, messages, trailers = grpc_web(gateway.url, GENERATE, generate.SerializeToString(), AUTH, text=text)
    assert trailers["grpc-status"] == "0"
    events = []
    for data in messages:
        event = generation_pb2.GenerateEvent.FromString(data)
        kind = event.WhichOneof("event")
        events.append((kind, getattr(event, kind).image_index, getattr(event, kind).step if kind == "progress" else 0))
    check_generation_order(events)


def test_grpc_web_errors_are_trailers_with_a_percent_encoded_message(gateway):
    request = profile_pb2.GetProfileRequest(user_id="nobody-100%").SerializeToString()
    _, messages, trailers = grpc_web(gateway.url, GET_PROFILE, request, AUTH)
    assert messages == [] and trailers["grpc-status"] == "3"  # INVALID_ARGUMENT: '%' is not allowed in user ids
    assert "nobody-100%25" in trailers["grpc-message"] and "nobody-100%" in unquote(trailers["grpc-message"])
    request = profile_pb2.GetProfileRequest(user_id="nobody-here").SerializeToString()
    _, _, trailers = grpc_web(gateway.url, GET_PROFILE, request, AUTH)
    assert trailers["grpc-status"] == "5" and trailers["grpc-message"] == "no profile for user 'nobody-here'"


@pytest.mark.parametrize("protocol", ["connect", "grpc-web"])
def test_closing_the_http_request_cancels_the_generation_within_a_step(gateway, server, protocol):
    """The browser's cancel is a closed request: the server must stop denoising at once."""
    server.logs.clear()
    # 256 px: steps slow enough that the bound below is not a race with the scheduler on a busy machine.
    request = generate_request(numImages=1, steps=150, width=256, height=256, seed="5", previewEvery=0,
                               prompt=f"a long one {protocol}")
    if protocol == "connect":
        body, content_type = envelope(json.dumps(request).encode()), "application/connect+json"
    else:
        message = generation_pb2.GenerateRequest(user_id="painter", prompt=request["prompt"], num_images=1,
                                                 width=256, height=256, steps=150, seed=5)
        body, content_type = envelope(message.SerializeToString()), "application/grpc-web+proto"
    connection = http.client.HTTPConnection(urlsplit(gateway.url).netloc, timeout=120)
    connection.request("POST", GENERATE, body=body, headers={"Content-Type": content_type, **AUTH})
    response = connection.getresponse()
    assert response.status == 200
    seen = 0
    while seen < 5:
        flags, length = struct.unpack(">BI", response.read(5))
        data = response.read(length)
        assert flags == 0, data
        if protocol == "connect":
            seen = json.loads(data).get("progress", {}).get("step", seen)
        else:
            event = generation_pb2.GenerateEvent.FromString(data)
            seen = event.progress.step if event.HasField("progress") else seen
    connection.sock.close()  # what a browser does when the page aborts the fetch
    connection.close()
    line = server.wait_for_log(r"generation cancelled after \d+ denoising steps", timeout=30)
    steps_done = int(re.search(r"after (\d+) denoising", line).group(1))
    # It stopped right after the cancel reached it, nowhere near the 150+ steps asked for.
    assert seen <= steps_done < seen + 20
    server.wait_for_log(r"rpc method=/viper.v1.GenerationService/Generate .*status=CANCELLED")
    gateway.wait_for_log(rf"rpc method=viper.v1.GenerationService/Generate protocol={protocol}.* status=CANCELLED")


def test_the_page_and_its_examples_are_served(gateway):
    connection = http.client.HTTPConnection(urlsplit(gateway.url).netloc, timeout=30)

    def get(path: str) -> http.client.HTTPResponse:
        connection.request("GET", path)
        response = connection.getresponse()
        response.body = response.read()
        return response

    page = get("/")
    assert page.status == 200 and page.getheader("content-type").startswith("text/html")
    assert b'src="main.js"' in page.body and "script-src 'self'" in page.getheader("content-security-policy")
    for name in ("main.js", "rpc.js", "style.css"):
        assert get(f"/{name}").status == 200
    manifest = json.loads(get("/examples/examples.json").body)
    fixture_hashes = {hashlib.sha256(path.read_bytes()).digest() for path in FIXTURES.glob("*/*.png")}
    served = [get(f"/examples/{name}") for name in manifest["images"]]
    assert len(served) == 16 and all(response.status == 200 for response in served)
    assert {hashlib.sha256(response.body).digest() for response in served} == fixture_hashes
    assert b"Apache License" in get("/examples/LICENSE").body
    assert get("/nothing-here.js").status == 404
    assert get("/../pyproject.toml").status == 404
    assert get("/%2e%2e/registry.py").status == 404
    connection.close()


# --- fake back ends: exact metadata, every status code, routing over several back ends ------------------


class FakeBackend:
    """A ProfileService/MetricService that records what reaches it. user_id "status-NAME" fails with that code."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[tuple[str, str, dict[str, str]]] = []  # (method, user, metadata)
        self.cancelled = threading.Event()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        profile_handlers = {
            "GetProfile": grpc.unary_unary_rpc_method_handler(
                self._get, profile_pb2.GetProfileRequest.FromString, profile_pb2.Profile.SerializeToString),
            "ListProfiles": grpc.unary_unary_rpc_method_handler(
                self._list, profile_pb2.ListProfilesRequest.FromString,
                profile_pb2.ListProfilesResponse.SerializeToString),
            "DeleteProfile": grpc.unary_unary_rpc_method_handler(
                self._delete, profile_pb2.DeleteProfileRequest.FromString, empty_pb2.Empty.SerializeToString),
            "ExtractProfile": grpc.unary_unary_rpc_method_handler(
                self._hang, profile_pb2.ExtractProfileRequest.FromString, profile_pb2.Profile.SerializeToString),
        }
        metric_handlers = {
            "Score": grpc.unary_stream_rpc_method_handler(
                self._score, metric_pb2.ScoreRequest.FromString, metric_pb2.ScoreResult.SerializeToString),
        }
        self.server.add_generic_rpc_handlers([
            grpc.method_handlers_generic_handler("viper.v1.ProfileService", profile_handlers),
            grpc.method_handlers_generic_handler("viper.v1.MetricService", metric_handlers),
        ])
        self.server.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _record(self, method: str, request, context) -> None:
        self.calls.append((method, getattr(request, "user_id", ""), dict(context.invocation_metadata())))
        if getattr(request, "user_id", "").startswith("status-"):
            code = grpc.StatusCode[request.user_id.removeprefix("status-")]
            context.set_trailing_metadata((("x-detail", "from-the-back-end"),))
            context.abort(code, f"failed with {code.name} ünïcode")

    def _get(self, request, context):
        self._record("GetProfile", request, context)
        return profile_pb2.Profile(user_id=request.user_id, extractor_model=self.name, version=1)

    def _list(self, request, context):
        self._record("ListProfiles", request, context)
        return profile_pb2.ListProfilesResponse(next_page_token=self.name)

    def _delete(self, request, context):
        self._record("DeleteProfile", request, context)
        return empty_pb2.Empty()

    def _hang(self, request, context):
        self._record("ExtractProfile", request, context)
        context.add_callback(self.cancelled.set)
        deadline = time.monotonic() + 60
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.01)
        return profile_pb2.Profile()

    def _score(self, request, context):
        yield metric_pb2.ScoreResult(index=0, score=0.5)
        self._record("Score", request, context)
        yield metric_pb2.ScoreResult(index=1, score=0.25)

    def stop(self) -> None:
        self.server.stop(None).wait()


@pytest.fixture(scope="module")
def fakes():
    backends = [FakeBackend("a"), FakeBackend("b")]
    yield backends
    for backend in backends:
        backend.stop()


@pytest.fixture(scope="module")
def fake_gateway(fakes):
    with GatewayProcess(fakes[0].target) as process:
        yield process


def test_the_back_end_gets_token_request_id_and_user_header_and_nothing_else(fakes, fake_gateway):
    fakes[0].calls.clear()
    headers = {"Authorization": "Bearer abc", "X-Request-Id": "rid-1", "Cookie": "session=secret",
               "X-Viper-User": "mallory"}
    reply = connect_json(fake_gateway.url, GET_PROFILE, {"userId": "alice"}, headers)
    assert reply.status == 200 and reply.json()["extractorModel"] == "a"
    (method, user, metadata), = fakes[0].calls
    assert (method, user) == ("GetProfile", "alice")
    assert metadata["authorization"] == "Bearer abc" and metadata["x-request-id"] == "rid-1"
    assert metadata["x-viper-user"] == "alice", "the routing header comes from the request, not the caller"
    assert "cookie" not in metadata
    fakes[0].calls.clear()
    connect_json(fake_gateway.url, "/viper.v1.ProfileService/ListProfiles", {})
    (_, _, metadata), = fakes[0].calls
    assert "x-viper-user" not in metadata and "authorization" not in metadata


CODES = [code for code in grpc.StatusCode if code is not grpc.StatusCode.OK]
CONNECT = {  # connectrpc.com/docs/protocol#error-codes
    "CANCELLED": ("canceled", 499), "UNKNOWN": ("unknown", 500), "INVALID_ARGUMENT": ("invalid_argument", 400),
    "DEADLINE_EXCEEDED": ("deadline_exceeded", 504), "NOT_FOUND": ("not_found", 404),
    "ALREADY_EXISTS": ("already_exists", 409), "PERMISSION_DENIED": ("permission_denied", 403),
    "RESOURCE_EXHAUSTED": ("resource_exhausted", 429), "FAILED_PRECONDITION": ("failed_precondition", 400),
    "ABORTED": ("aborted", 409), "OUT_OF_RANGE": ("out_of_range", 400), "UNIMPLEMENTED": ("unimplemented", 501),
    "INTERNAL": ("internal", 500), "UNAVAILABLE": ("unavailable", 503), "DATA_LOSS": ("data_loss", 500),
    "UNAUTHENTICATED": ("unauthenticated", 401),
}


@pytest.mark.parametrize("code", CODES, ids=[code.name for code in CODES])
def test_every_status_code_maps_faithfully(fake_gateway, code):
    user = f"status-{code.name}"
    message = f"failed with {code.name} ünïcode"
    # With a token: without one, a gateway that saw UNAUTHENTICATED refuses such calls itself (auth-before-body).
    token = {"Authorization": "Bearer any"}
    reply = connect_json(fake_gateway.url, GET_PROFILE, {"userId": user}, token)
    name, http_status = CONNECT[code.name]
    assert (reply.status, reply.json()) == (http_status, {"code": name, "message": message})
    assert reply.headers["trailer-x-detail"] == "from-the-back-end"

    _, messages, end = connect_stream(fake_gateway.url, SCORE, {"userId": user}, headers=token)
    assert len(messages) == 1, "what came before the error is delivered"
    assert end["error"] == {"code": name, "message": message}
    assert end["metadata"]["x-detail"] == ["from-the-back-end"]

    request = profile_pb2.GetProfileRequest(user_id=user).SerializeToString()
    _, messages, trailers = grpc_web(fake_gateway.url, GET_PROFILE, request, token)
    assert messages == [] and trailers["grpc-status"] == str(code.value[0])
    assert trailers["grpc-message"] == f"failed with {code.name} %C3%BCn%C3%AFcode"
    assert trailers["x-detail"] == "from-the-back-end"


def test_a_closed_request_cancels_a_unary_call_and_a_deadline_is_passed_on(fakes, fake_gateway):
    fakes[0].cancelled.clear()
    connection = http.client.HTTPConnection(urlsplit(fake_gateway.url).netloc, timeout=30)
    connection.request("POST", "/viper.v1.ProfileService/ExtractProfile", body=b'{"userId":"slow"}',
                       headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + 30
    while not any(call[0] == "ExtractProfile" for call in fakes[0].calls) and time.monotonic() < deadline:
        time.sleep(0.02)
    connection.sock.close()
    connection.close()
    assert fakes[0].cancelled.wait(30), "the back-end call was not cancelled"

    fakes[0].cancelled.clear()
    timed = post(fake_gateway.url, "/viper.v1.ProfileService/ExtractProfile", b'{"userId":"slow"}',
                 "application/json", {"Connect-Timeout-Ms": "300"})
    assert timed.status == 504 and timed.json()["code"] == "deadline_exceeded"
    request = profile_pb2.ExtractProfileRequest(user_id="slow").SerializeToString()
    _, _, trailers = grpc_web(fake_gateway.url, "/viper.v1.ProfileService/ExtractProfile", request,
                              {"grpc-timeout": "300m"})
    assert trailers["grpc-status"] == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])


def test_users_stick_to_one_of_several_back_ends_and_reads_fail_over(fakes):
    first, second = fakes
    with GatewayProcess(first.target, second.target) as gateway:
        users = [f"user-{i}" for i in range(24)]
        home = {}
        for user in users:
            for _ in range(3):
                home.setdefault(user, set()).add(connect_json(gateway.url, GET_PROFILE, {"userId": user})
                                                 .json()["extractorModel"])
        assert all(len(backends) == 1 for backends in home.values()), "a user's calls all reach one back end"
        on_b = [user for user in users if home[user] == {"b"}]
        assert 0 < len(on_b) < len(users), "users spread over both back ends"
        pages = {connect_json(gateway.url, "/viper.v1.ProfileService/ListProfiles", {}).json()["nextPageToken"]
                 for _ in range(4)}
        assert pages == {"a", "b"}, "calls without a user take turns"

        second.stop()
        moved = connect_json(gateway.url, GET_PROFILE, {"userId": on_b[0]})
        assert moved.status == 200 and moved.json()["extractorModel"] == "a", "a read fails over"
        delete = connect_json(gateway.url, "/viper.v1.ProfileService/DeleteProfile", {"userId": on_b[0]})
        assert delete.status == 503 and delete.json()["code"] == "unavailable", "a write is never re-sent"


def test_cross_origin_calls_need_an_allowed_origin(fakes):
    with GatewayProcess(fakes[0].target, extra_args=("--allow-origin", "https://app.example")) as gateway:
        preflight = post(gateway.url, GET_PROFILE, b"", "application/json",
                         {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
                         method="OPTIONS")
        assert preflight.status == 204
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in preflight.headers["access-control-allow-headers"]
        allowed = connect_json(gateway.url, GET_PROFILE, {"userId": "alice"}, {"Origin": "https://app.example"})
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in allowed.headers["access-control-expose-headers"]
        other = connect_json(gateway.url, GET_PROFILE, {"userId": "alice"}, {"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        refused = post(gateway.url, GET_PROFILE, b"", "application/json", {"Origin": "https://evil.example"},
                       method="OPTIONS")
        assert refused.status == 403


def test_messages_over_the_limit_are_refused(fakes):
    with GatewayProcess(fakes[0].target, extra_args=("--max-message-bytes", "4096")) as gateway:
        image = base64.b64encode(b"x" * 5000).decode()
        big = connect_json(gateway.url, "/viper.v1.ProfileService/ExtractProfile",
                           {"userId": "alice", "images": [{"data": image}]})
        assert big.status == 429 and big.json()["code"] == "resource_exhausted"
        assert "4096" in big.json()["message"]
