"""The hostile identity matrix again, through the web gateway (Connect JSON and gRPC-Web) in front of a real
server: the gateway verifies nothing and passes `authorization` through, so every answer is the server's."""

from __future__ import annotations

import base64
import json
import time

import pytest
from jwtkeys import AUDIENCE, ISSUER, SigningKey, bad_tokens, claims, sha256_hex, write_jwks
from test_web_gateway import connect_json, connect_stream, grpc_web

from viper_client import ViperClient
from viper_proto.v1 import profile_pb2
from viper_server.testing import ServerProcess
from viper_web.testing import GatewayProcess

from imagedata import png_bytes

ADMIN, READER, BANK = "gw-shop-admin", "gw-shop-reader", "gw-bank-admin"
SECRET_COMMENT = "gateway-private-comment-4410"
PROFILES = "/viper.v1.ProfileService/"
GENERATE = "/viper.v1.GenerationService/Generate"
SCORE = "/viper.v1.MetricService/Score"
PNG = base64.b64encode(png_bytes()).decode()


@pytest.fixture(scope="module")
def key():
    return SigningKey("gw-rsa-1", "RS256")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("identity-gateway")


@pytest.fixture(scope="module")
def server(tiny_models_dir, folder, key):
    write_jwks(folder / "jwks.json", key)
    services = "".join(
        f'[[services]]\nname = "{name}"\ntoken_sha256 = "{sha256_hex(token)}"\ntenant = "{tenant}"\n'
        f"permissions = {json.dumps(permissions)}\n\n"
        for name, token, tenant, permissions in (("admin", ADMIN, "shop", ["*"]), ("reader", READER, "shop",
                                                 ["profiles.get"]), ("bank", BANK, "bank", ["*"]))
    )
    (folder / "auth.toml").write_text(
        services + f'[[issuers]]\nissuer = "{ISSUER}"\naudience = "{AUDIENCE}"\njwks = "jwks.json"\ntenant = "shop"\n'
    )
    args = ("--auth-config", str(folder / "auth.toml"), "--audit-log", str(folder / "audit.jsonl"))
    with ServerProcess(folder / "profiles.db", tiny_models_dir, *args) as process:
        from viper_client import RatedImage

        images = [RatedImage(png_bytes(color=(1, 2, 3)), comment=SECRET_COMMENT, rating="liked"),
                  RatedImage(png_bytes(color=(3, 2, 1)), comment=SECRET_COMMENT, rating="disliked")]
        with ViperClient(process.target, token=ADMIN) as shop, ViperClient(process.target, token=BANK) as bank:
            shop.extract_profile("alice", images)
            shop.extract_profile("bob", images)
            bank.extract_profile("alice", images)
            bank.update_profile("alice", liked_features=["bank"])
        yield process


@pytest.fixture(scope="module")
def gateway(server):
    with GatewayProcess(server.target) as process:
        yield process


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


UNARY = {
    "get": ("GetProfile", lambda user: {"userId": user}),
    "update": ("UpdateProfile", lambda user: {"userId": user, "likedFeatures": ["mine"]}),
    "delete": ("DeleteProfile", lambda user: {"userId": user}),
    "extract": ("ExtractProfile", lambda user: {"userId": user, "images": [
        {"data": PNG, "comment": "x", "rating": "RATING_LIKED"}]}),
}
STREAMS = {
    "generate": (GENERATE, lambda user: {"userId": user, "prompt": "a cat", "numImages": 1, "width": 64,
                                         "height": 64, "steps": 2}),
    "score stored": (SCORE, lambda user: {"userId": user, "queries": [PNG]}),
    "score inline": (SCORE, lambda user: {"userId": user, "queries": [PNG], "liked": [PNG], "disliked": [PNG]}),
}


def test_a_user_token_reaches_its_own_profile_and_lists_only_it(gateway, key):
    headers = bearer(key.sign(claims("alice")))
    own = connect_json(gateway.url, PROFILES + "GetProfile", {"userId": "alice"}, headers)
    assert own.status == 200 and own.json()["userId"] == "alice"
    listing = connect_json(gateway.url, PROFILES + "ListProfiles", {}, headers)
    assert listing.status == 200 and [p["userId"] for p in listing.json()["profiles"]] == ["alice"]


@pytest.mark.parametrize("operation", UNARY)
def test_another_users_profile_is_denied_alike_through_connect(gateway, key, operation):
    method, body = UNARY[operation]
    replies = [connect_json(gateway.url, PROFILES + method, body(user), bearer(key.sign(claims("alice"))))
               for user in ("bob", "nobody-at-all")]
    assert [reply.status for reply in replies] == [403, 403]
    assert replies[0].json() == replies[1].json()
    assert replies[0].json()["code"] == "permission_denied"


@pytest.mark.parametrize("operation", STREAMS)
def test_another_users_generation_and_scores_are_denied_through_connect(gateway, key, operation):
    path, body = STREAMS[operation]
    ends = []
    for user in ("bob", "nobody-at-all"):
        _, messages, end = connect_stream(gateway.url, path, body(user), headers=bearer(key.sign(claims("alice"))))
        assert messages == []
        ends.append(end)
    assert ends[0] == ends[1] and ends[0]["error"]["code"] == "permission_denied"


def test_cross_user_through_grpc_web(gateway, key):
    for user in ("bob", "nobody-at-all"):
        _, messages, trailers = grpc_web(gateway.url, PROFILES + "GetProfile",
                                         profile_pb2.GetProfileRequest(user_id=user).SerializeToString(),
                                         bearer(key.sign(claims("alice"))))
        assert messages == [] and trailers["grpc-status"] == "7"  # PERMISSION_DENIED


def test_tenants_stay_apart_through_the_gateway(gateway):
    bank = connect_json(gateway.url, PROFILES + "GetProfile", {"userId": "alice"}, bearer(BANK))
    assert bank.status == 200 and bank.json()["likedFeatures"] == ["bank"]
    assert connect_json(gateway.url, PROFILES + "GetProfile", {"userId": "bob"}, bearer(BANK)).status == 404
    listing = connect_json(gateway.url, PROFILES + "ListProfiles", {}, bearer(BANK)).json()
    assert [p["userId"] for p in listing["profiles"]] == ["alice"]


def test_a_service_outside_its_permissions_is_denied(gateway):
    assert connect_json(gateway.url, PROFILES + "GetProfile", {"userId": "bob"}, bearer(READER)).status == 200
    for method, body in (("DeleteProfile", {"userId": "bob"}), ("ListProfiles", {})):
        reply = connect_json(gateway.url, PROFILES + method, body, bearer(READER))
        assert reply.status == 403 and reply.json()["code"] == "permission_denied"


@pytest.mark.parametrize("case", list(bad_tokens(SigningKey("x", "RS256"), ADMIN)))
def test_every_bad_credential_is_unauthenticated_through_the_gateway(gateway, key, case):
    token = bad_tokens(key, ADMIN)[case]
    reply = connect_json(gateway.url, PROFILES + "GetProfile", {"userId": "alice"}, bearer(token))
    assert reply.status == 401 and reply.json()["code"] == "unauthenticated"
    _, messages, end = connect_stream(gateway.url, SCORE, STREAMS["score stored"][1]("alice"), headers=bearer(token))
    assert messages == [] and end["error"]["code"] == "unauthenticated"


def test_a_key_added_at_rotation_works_through_the_gateway(gateway, folder, key):
    new = SigningKey("gw-rsa-2", "RS256")
    write_jwks(folder / "jwks.json", key, new)
    token, started = new.sign(claims("alice")), time.monotonic()
    while connect_json(gateway.url, PROFILES + "GetProfile", {"userId": "alice"}, bearer(token)).status != 200:
        assert time.monotonic() - started < 15, "the new key was never taken"
        time.sleep(0.5)


def test_gateway_denials_are_audited_without_secrets(gateway, folder, key):
    token = key.sign(claims("alice"))
    headers = {**bearer(token), "X-Request-Id": "gw-deny-1"}
    assert connect_json(gateway.url, PROFILES + "GetProfile", {"userId": "bob"}, headers).status == 403
    deadline = time.monotonic() + 10
    while True:
        records = [json.loads(line) for line in (folder / "audit.jsonl").read_text().splitlines()]
        mine = [record for record in records if record["request_id"] == "gw-deny-1"]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert mine and mine[0]["granted"] is False and mine[0]["code"] == "PERMISSION_DENIED"
    assert any(not record["granted"] and record["code"] == "UNAUTHENTICATED" for record in records)
    log = (folder / "audit.jsonl").read_text()
    for secret in (token, ADMIN, READER, BANK, SECRET_COMMENT):
        assert secret not in log
