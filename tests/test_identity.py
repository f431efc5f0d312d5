"""Identity and access through gRPC: services with permissions and tenants, end users with JWTs, and the
hostile matrix (every forged, stale or misdirected credential; every reach for another user's or tenant's data)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from jwtkeys import (
    AUDIENCE,
    ISSUER,
    SigningKey,
    bad_tokens,
    claims,
    sha256_hex,
    tampered,
    write_jwks,
)

from viper_client import (
    AsyncViperClient,
    GeneratedImage,
    NotFound,
    PermissionDenied,
    RatedImage,
    Unauthenticated,
    ViperClient,
)
from viper_proto.v1 import generation_pb2, metric_pb2, profile_pb2, profile_pb2_grpc
from viper_server.rpc.interceptor import PERMISSION_OF
from viper_server.testing import ServerProcess

from imagedata import png_bytes

SHORT_ISSUER = "https://short.test/"  # keys cached for a second: removal takes effect at once
SHOP_ADMIN, SHOP_READER, BANK_ADMIN, FILE_TOKEN = "shop-admin-secret", "shop-reader-secret", "bank-secret", "file-tok"
SECRET_COMMENT = "my-private-comment-7731"
SECRET_FEATURE = "secret-feature-5521"


@pytest.fixture(scope="module")
def keys():
    return {"rsa": SigningKey("rsa-1", "RS256"), "ec": SigningKey("ec-1", "ES256"), "ed": SigningKey("ed-1", "EdDSA"),
            "short": SigningKey("short-1", "RS256")}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("identity")


@pytest.fixture(scope="module")
def server(tiny_models_dir, folder, keys):
    write_jwks(folder / "jwks.json", keys["rsa"], keys["ec"], keys["ed"])
    write_jwks(folder / "short-jwks.json", keys["short"])
    (folder / "auth.toml").write_text(f"""
[[services]]
name = "shop-admin"
token_sha256 = "{sha256_hex(SHOP_ADMIN)}"
tenant = "shop"
permissions = ["*"]

[[services]]
name = "shop-reader"
token_sha256 = "{sha256_hex(SHOP_READER)}"
tenant = "shop"
permissions = ["profiles.get"]

[[services]]
name = "bank-admin"
token_sha256 = "{sha256_hex(BANK_ADMIN)}"
tenant = "bank"
permissions = ["*"]

[[issuers]]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
jwks = "jwks.json"
tenant = "shop"

[[issuers]]
issuer = "{SHORT_ISSUER}"
audience = "{AUDIENCE}"
jwks = "short-jwks.json"
tenant = "shop"
jwks_cache_seconds = 1
""")
    (folder / "tokens").write_text(FILE_TOKEN + "\n")
    args = ("--auth-config", str(folder / "auth.toml"), "--auth-tokens", str(folder / "tokens"),
            "--audit-log", str(folder / "audit.jsonl"))
    with ServerProcess(folder / "profiles.db", tiny_models_dir, *args) as process:
        seed(process.target)
        yield process


def rated(seed: int) -> list[RatedImage]:
    return [RatedImage(png_bytes(color=(seed, 10, 10)), comment=SECRET_COMMENT, rating="liked"),
            RatedImage(png_bytes(color=(10, seed, 10)), comment=SECRET_COMMENT, rating="disliked")]


def seed(target: str) -> None:
    with ViperClient(target, token=SHOP_ADMIN) as shop, ViperClient(target, token=BANK_ADMIN) as bank:
        for user in ("alice", "bob"):
            shop.extract_profile(user, rated(50))
        shop.update_profile("alice", liked_features=[SECRET_FEATURE, "shop"])
        bank.extract_profile("alice", rated(90))
        bank.update_profile("alice", liked_features=["bank"])


def user_client(server, token: str) -> ViperClient:
    return ViperClient(server.target, token=token)


@pytest.fixture
def alice(server, keys):
    with user_client(server, keys["rsa"].sign(claims("alice"))) as client:
        yield client


# --- what a user may do -------------------------------------------------------------------------


def test_a_user_reaches_their_own_profile_in_their_tenant(alice):
    profile = alice.get_profile("alice")
    assert profile.liked_features == [SECRET_FEATURE, "shop"]  # the shop's alice, not the bank's
    assert [p.user_id for p in alice.list_profiles()] == ["alice"]
    assert alice.update_profile("alice", liked_features=[SECRET_FEATURE, "shop"]).version == profile.version + 1


@pytest.mark.parametrize("key", ["rsa", "ec", "ed"])
def test_each_pinned_algorithm_is_accepted(server, keys, key):
    with user_client(server, keys[key].sign(claims("alice"))) as client:
        assert client.get_profile("alice").user_id == "alice"


def test_a_user_generates_for_themselves(alice):
    events = list(alice.generate("alice", "a cat", num_images=1, width=64, height=64, steps=2))
    assert sum(isinstance(event, GeneratedImage) for event in events) == 1


CROSS_USER = {
    "get": lambda c, user: c.get_profile(user),
    "update": lambda c, user: c.update_profile(user, liked_features=["mine now"]),
    "delete": lambda c, user: c.delete_profile(user),
    "extract": lambda c, user: c.extract_profile(user, rated(7)),
    "generate": lambda c, user: list(c.generate(user, "a cat", num_images=1, width=64, height=64, steps=2)),
    "score stored": lambda c, user: c.score(user, [png_bytes()]),
    "score inline": lambda c, user: c.score(user, [png_bytes()], liked=[png_bytes()], disliked=[png_bytes()]),
}


@pytest.mark.parametrize("operation", CROSS_USER)
def test_another_users_profile_is_denied_alike_whether_or_not_it_exists(alice, operation):
    messages = []
    for target in ("bob", "nobody-at-all"):  # bob has a profile, nobody-at-all has none
        with pytest.raises(PermissionDenied) as denied:
            CROSS_USER[operation](alice, target)
        messages.append(denied.value.message)
    assert messages[0] == messages[1]
    assert "bob" not in messages[0]


def test_denied_writes_change_nothing(server):
    with ViperClient(server.target, token=SHOP_ADMIN) as admin:
        bob = admin.get_profile("bob")
        assert bob.version >= 1  # still there, untouched by the denied update and delete


def test_listing_shows_a_user_nothing_but_their_own_profile(server, keys):
    with user_client(server, keys["rsa"].sign(claims("carol"))) as carol:  # no profile
        assert list(carol.list_profiles()) == []
    with ViperClient(server.target, token=SHOP_ADMIN) as admin:
        assert {p.user_id for p in admin.list_profiles()} >= {"alice", "bob"}


# --- the SDK and the CLI ------------------------------------------------------------------------


def test_the_sdk_asks_a_token_callable_before_every_call(server, keys):
    issued = []

    def fresh_token() -> str:
        issued.append(keys["ec"].sign(claims("alice", lifetime=60)))
        return issued[-1]

    with ViperClient(server.target, token=fresh_token) as client:
        assert client.get_profile("alice").user_id == "alice"
        with pytest.raises(PermissionDenied):
            client.get_profile("bob")
    assert len(issued) == 2

    async def asynchronously():
        async with AsyncViperClient(server.target, token=fresh_token) as client:
            return (await client.get_profile("alice")).user_id

    assert asyncio.run(asynchronously()) == "alice"
    assert len(issued) == 3


def test_a_token_callable_is_never_sent_in_plaintext_to_another_host():
    with pytest.raises(ValueError, match="TLS"):
        ViperClient("192.0.2.1:50051", token=lambda: "t")


def test_the_cli_reads_viper_token(server, keys):
    env = {**os.environ, "VIPER_TARGET": server.target, "VIPER_TOKEN": keys["rsa"].sign(claims("alice"))}
    viper = [sys.executable, "-c", "import sys; from viper_client.cli import main; sys.exit(main())"]
    own = subprocess.run([*viper, "profile", "get", "--user", "alice", "--json"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert own.returncode == 0, own.stderr
    assert json.loads(own.stdout)["user_id"] == "alice"
    other = subprocess.run([*viper, "profile", "get", "--user", "bob"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert other.returncode != 0 and "PERMISSION_DENIED" in other.stderr


# --- tenants ------------------------------------------------------------------------------------


def test_nothing_crosses_tenants(server):
    with ViperClient(server.target, token=BANK_ADMIN) as bank, ViperClient(server.target, token=SHOP_ADMIN) as shop:
        assert bank.get_profile("alice").liked_features == ["bank"]
        assert shop.get_profile("alice").liked_features[-1] == "shop"
        assert [p.user_id for p in bank.list_profiles()] == ["alice"]
        with pytest.raises(NotFound):
            bank.get_profile("bob")  # the shop's bob is not the bank's
        with pytest.raises(NotFound):
            bank.update_profile("bob", liked_features=["x"])
    with ViperClient(server.target, token=FILE_TOKEN) as default:  # --auth-tokens: "*" in "default"
        assert list(default.list_profiles()) == []
        with pytest.raises(NotFound):
            default.get_profile("alice")


def test_the_metric_prefix_cache_keeps_tenants_apart(server):
    with ViperClient(server.target, token=BANK_ADMIN) as bank, ViperClient(server.target, token=SHOP_ADMIN) as shop:
        bank.score("alice", [png_bytes()])
        shop.score("alice", [png_bytes()])
    server.wait_for_log("metric context computed for bank/alice version")
    server.wait_for_log("metric context computed for shop/alice version")


# --- services -----------------------------------------------------------------------------------


def test_a_service_is_held_to_its_permissions(server):
    with ViperClient(server.target, token=SHOP_READER) as reader:
        assert reader.get_profile("bob").user_id == "bob"
        for refused in (lambda: reader.delete_profile("bob"), lambda: list(reader.list_profiles()),
                        lambda: reader.update_profile("bob", liked_features=["x"]),
                        lambda: list(reader.generate("bob", "a cat")), lambda: reader.score("bob", [png_bytes()]),
                        lambda: reader.extract_profile("bob", rated(3))):
            with pytest.raises(PermissionDenied, match="does not grant"):
                refused()


def test_every_rpc_of_the_protos_has_a_permission():
    methods = {
        f"/{service.full_name}/{method.name}"
        for module in (profile_pb2, generation_pb2, metric_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert methods == set(PERMISSION_OF)


# --- the credential matrix ----------------------------------------------------------------------


BAD_TOKEN_NAMES = list(bad_tokens(SigningKey("x", "RS256"), SHOP_ADMIN))


@pytest.mark.parametrize("case", BAD_TOKEN_NAMES)
def test_every_bad_credential_is_unauthenticated(server, keys, case):
    with user_client(server, bad_tokens(keys["rsa"], SHOP_ADMIN)[case]) as client:
        with pytest.raises(Unauthenticated):
            client.get_profile("alice")
        with pytest.raises(Unauthenticated):
            list(client.generate("alice", "a cat"))


def test_health_is_open_and_reflection_takes_any_valid_credential(server, keys):
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as error:
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert error.value.code() is grpc.StatusCode.UNAUTHENTICATED
    token = grpc.access_token_call_credentials(keys["ed"].sign(claims("alice")))
    local = grpc.composite_channel_credentials(grpc.local_channel_credentials(), token)
    with grpc.secure_channel(server.target, local) as channel:
        assert "viper.v1.ProfileService" in ProtoReflectionDescriptorDatabase(channel).get_services()


# --- keys change without a restart --------------------------------------------------------------


def accepted(server, token: str) -> bool:
    with user_client(server, token) as client:
        try:
            client.get_profile("alice")
        except Unauthenticated:
            return False
    return True


def test_a_key_added_at_rotation_works_without_a_restart(server, folder, keys):
    new = SigningKey("rsa-2", "RS256")
    token = new.sign(claims("alice"))
    write_jwks(folder / "jwks.json", keys["rsa"], keys["ec"], keys["ed"], new)
    started = time.monotonic()
    # An unknown kid re-reads the JWKS at most once per 10 s: within that, the new key must be taken.
    while not accepted(server, token):
        assert time.monotonic() - started < 15, "the new key was never taken"
        time.sleep(0.5)
    assert accepted(server, keys["rsa"].sign(claims("alice")))  # the old key still works


def test_a_removed_key_stops_working_within_the_cache_time(server, folder, keys):
    token = keys["short"].sign(claims("alice", iss=SHORT_ISSUER))
    assert accepted(server, token)
    write_jwks(folder / "short-jwks.json", SigningKey("short-2", "RS256"))
    started = time.monotonic()
    while accepted(server, token):
        assert time.monotonic() - started < 5, "a removed key kept working past jwks_cache_seconds"
        time.sleep(0.2)


# --- refused before the request is read -----------------------------------------------------------


def test_an_unauthenticated_16_mb_request_is_refused_before_it_is_parsed(server):
    # 8 million empty RatedImage entries: 16 MB on the wire, gigabytes once parsed into messages.
    payload = profile_pb2.ExtractProfileRequest(user_id="alice").SerializeToString() + b"\x12\x00" * 8_000_000
    process = psutil.Process(server.pid)
    before, peak, done = process.memory_info().rss, [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", -1)]) as channel:
            extract = channel.unary_unary("/viper.v1.ProfileService/ExtractProfile")  # bytes in, bytes out
            with pytest.raises(grpc.RpcError) as error:
                extract(payload, timeout=60)
    finally:
        done.set()
        sampler.join()
    assert error.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert max(peak[0], process.memory_info().rss) - before <= 64 * 1024 * 1024


# --- the audit log ------------------------------------------------------------------------------


def audit_records(server, folder, request_ids: set[str], timeout: float = 10) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        lines = (folder / "audit.jsonl").read_text().splitlines()
        records = {record["request_id"]: record for record in map(json.loads, lines)}
        if request_ids <= set(records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def test_every_denial_is_audited_and_the_log_holds_no_secret(server, folder, keys):
    alice_token = keys["rsa"].sign(claims("alice"))
    calls = {  # request id -> (token, user id, expected code)
        "deny-cross-user": (alice_token, "bob", "PERMISSION_DENIED"),
        "deny-no-token": (None, "bob", "UNAUTHENTICATED"),
        "deny-forged": (tampered(alice_token, sub="bob"), "bob", "UNAUTHENTICATED"),
        "deny-permission": (SHOP_READER, "bob", "PERMISSION_DENIED"),
        "allow-own": (alice_token, "alice", "OK"),
    }
    with grpc.insecure_channel(server.target) as channel:
        profiles = profile_pb2_grpc.ProfileServiceStub(channel)
        for request_id, (token, user, _) in calls.items():
            metadata = [("x-request-id", request_id)] + ([("authorization", f"Bearer {token}")] if token else [])
            call = (profiles.DeleteProfile if request_id == "deny-permission" else profiles.GetProfile)
            request_type = (profile_pb2.DeleteProfileRequest if request_id == "deny-permission"
                            else profile_pb2.GetProfileRequest)
            try:
                call(request_type(user_id=user), metadata=metadata)
            except grpc.RpcError:
                pass
    records = audit_records(server, folder, set(calls))
    for request_id, (_, _, code) in calls.items():
        record = records[request_id]
        assert record["code"] == code
        assert record["granted"] is (code == "OK" or code == "NOT_FOUND")
    assert records["deny-cross-user"] | {"time": None} == {
        "time": None, "request_id": "deny-cross-user", "principal": f"{ISSUER} alice", "kind": "user",
        "tenant": "shop", "method": "/viper.v1.ProfileService/GetProfile", "user_id": "bob",
        "permission": "profiles.get", "granted": False, "code": "PERMISSION_DENIED", "items": 0,
    }
    assert records["deny-permission"]["principal"] == "shop-reader"
    assert records["deny-no-token"]["principal"] is None
    generated = [r for r in records.values() if r["method"].endswith("/Generate") and r["code"] == "OK"]
    assert generated and all(record["items"] == 1 for record in generated)

    log = (folder / "audit.jsonl").read_text()
    for secret in (SHOP_ADMIN, SHOP_READER, BANK_ADMIN, FILE_TOKEN, alice_token, alice_token.split(".")[2],
                   SECRET_COMMENT, SECRET_FEATURE):
        assert secret not in log


# --- configuration ------------------------------------------------------------------------------


def test_the_kubernetes_example_uses_a_valid_auth_config(tmp_path):
    import yaml

    from viper_server.rpc.auth_config import load_auth_config

    kubernetes = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
    secrets = {doc["metadata"]["name"]: doc for doc in yaml.safe_load_all((kubernetes / "secret.yaml").read_text())}
    (tmp_path / "auth.toml").write_text(secrets["viper-auth"]["stringData"]["auth.toml"])
    config = load_auth_config(tmp_path / "auth.toml")
    assert config.services and config.issuers[0].jwks.startswith("https://")
    replicas = next(doc for doc in yaml.safe_load_all((kubernetes / "replicas.yaml").read_text())
                    if doc["kind"] == "StatefulSet")
    assert "--auth-config=/etc/viper/auth.toml" in replicas["spec"]["template"]["spec"]["containers"][0]["args"]


@pytest.mark.parametrize("text, complaint", [
    ('[[services]]\nname = "a"\ntoken_sha256 = "abc"\npermissions = ["*"]\n', "64 hex"),
    ('[[services]]\nname = "a"\ntoken_sha256 = "' + "a" * 64 + '"\npermissions = ["profiles.read"]\n',
     "unknown permission"),
    ('[[issuers]]\nissuer = "i"\naudience = "a"\njwks = "http://x/jwks.json"\n', "https://"),
    ('[[issuers]]\nissuer = "i"\naudience = "a"\njwks = "j.json"\nleeway = 300\n', "leeway"),
    ('[[issuers]]\nissuer = "i"\naudience = "a"\njwks = "j.json"\ntenant = "No/Good"\n', "tenant"),
    ('[[issuers]]\nissuer = "i"\njwks = "j.json"\n', "missing"),
    ("[[issuers]]\nissuer = 'i'\nfoo = 1\n", "unknown key"),
    ("", "every call would be refused"),
])
def test_a_bad_auth_config_stops_the_server_with_one_line(tmp_path, text, complaint):
    (tmp_path / "auth.toml").write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "viper_server", "serve", "--port", "0", "--db", str(tmp_path / "p.db"),
         "--auth-config", str(tmp_path / "auth.toml"), "--models-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert complaint in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_serving_beyond_loopback_without_auth_exits_2_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "viper_server", "serve", "--host", "0.0.0.0", "--port", "0", "--db",
         str(tmp_path / "p.db")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "--auth-config" in result.stderr and not (tmp_path / "p.db").exists()


def test_an_unreachable_jwks_is_asked_once_per_interval_and_refuses_tokens(keys, monkeypatch):
    from viper_server.rpc import jwt_issuers
    from viper_server.rpc.auth_config import IssuerEntry

    attempts = []

    def unreachable(self):
        attempts.append(time.monotonic())
        raise OSError("connection refused")

    monkeypatch.setattr(jwt_issuers.IssuerKeys, "_read_jwks", unreachable)
    issuer = jwt_issuers.IssuerKeys(IssuerEntry(issuer=ISSUER, audience=AUDIENCE, jwks="https://127.0.0.1:9/jwks"))
    for _ in range(5):
        with pytest.raises(jwt_issuers.TokenRefused, match="kid"):
            asyncio.run(issuer.verify(keys["rsa"].sign(claims("alice"))))
    assert len(attempts) == 1
