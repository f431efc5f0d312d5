"""Auth and TLS: the right credentials get in, every wrong one is kept out."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from viper_client import NotFound, Tls, Unauthenticated, Unavailable, ViperClient
from viper_server.rpc.auth import token_digest
from viper_server.testing import ServerProcess

from certs import CertificateAuthority

HASHED_TOKEN = "s3cret-hashed-at-rest"
PLAIN_TOKEN = "s3cret-in-plain-text"


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(f"# accepted tokens\n{token_digest(HASHED_TOKEN)}\n\n{PLAIN_TOKEN}\n")
    return path


@pytest.fixture(scope="module")
def authenticated_server(tiny_models_dir, tmp_path_factory, token_file):
    db = tmp_path_factory.mktemp("db") / "profiles.db"
    with ServerProcess(db, tiny_models_dir, "--auth-tokens", str(token_file)) as server:
        yield server


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue = CertificateAuthority(folder, "viper-ca"), CertificateAuthority(folder, "rogue-ca")
    return {
        "ca": ca.pem.cert,
        "server": ca.issue("server", server=True),
        "client": ca.issue("client", server=False),
        "rogue_client": rogue.issue("rogue-client", server=False),
        "rogue_ca": rogue.pem.cert,
    }


@pytest.fixture(scope="module")
def mtls_server(tiny_models_dir, tmp_path_factory, token_file, pki):
    db = tmp_path_factory.mktemp("db") / "profiles.db"
    args = ("--auth-tokens", str(token_file), "--tls-cert", str(pki["server"].cert),
            "--tls-key", str(pki["server"].key), "--tls-client-ca", str(pki["ca"]))
    probe = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes(),
                                         private_key=pki["client"].key.read_bytes(),
                                         certificate_chain=pki["client"].cert.read_bytes())
    with ServerProcess(db, tiny_models_dir, *args, credentials=probe) as server:
        yield server


@pytest.mark.parametrize("token", [HASHED_TOKEN, PLAIN_TOKEN])
def test_a_known_token_reaches_the_service(authenticated_server, token):
    with ViperClient(authenticated_server.target, token=token) as client:
        with pytest.raises(NotFound):  # past auth: the handler answered
            client.get_profile("nobody")


@pytest.mark.parametrize("token", [None, "", "wrong", HASHED_TOKEN + "x", token_digest(HASHED_TOKEN)])
def test_missing_or_wrong_tokens_are_unauthenticated(authenticated_server, token):
    with ViperClient(authenticated_server.target, token=token) as client:
        with pytest.raises(Unauthenticated, match="bearer token"):
            client.get_profile("nobody")
        with pytest.raises(Unauthenticated):
            list(client.generate("nobody", "a cat"))


def test_health_stays_open_and_reflection_needs_the_token(authenticated_server):
    with grpc.insecure_channel(authenticated_server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as error:
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert error.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_mtls_with_the_right_certificates_and_token_gets_in(mtls_server, pki):
    tls = Tls(ca=pki["ca"], cert=pki["client"].cert, key=pki["client"].key)
    with ViperClient(mtls_server.target, token=PLAIN_TOKEN, tls=tls) as client:
        with pytest.raises(NotFound):
            client.get_profile("nobody")
    with ViperClient(mtls_server.target, tls=tls) as client:
        with pytest.raises(Unauthenticated):
            client.get_profile("nobody")


@pytest.mark.parametrize(
    "credentials",
    ["plaintext", "no client certificate", "client certificate from another CA", "server not trusted"],
)
def test_mtls_keeps_out_wrong_certificates(mtls_server, pki, credentials):
    tls = {
        "plaintext": None,
        "no client certificate": Tls(ca=pki["ca"]),
        "client certificate from another CA": Tls(ca=pki["ca"], cert=pki["rogue_client"].cert,
                                                  key=pki["rogue_client"].key),
        "server not trusted": Tls(ca=pki["rogue_ca"], cert=pki["client"].cert, key=pki["client"].key),
    }[credentials]
    with ViperClient(mtls_server.target, token=PLAIN_TOKEN, tls=tls, timeout=5) as client:
        with pytest.raises(Unavailable):
            client.get_profile("nobody")


def test_serving_a_public_address_without_auth_is_refused(tiny_models_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "viper_server", "serve", "--host", "0.0.0.0", "--port", "0",
         "--db", str(tmp_path / "p.db"), "--models-dir", str(tiny_models_dir)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "refusing to serve 0.0.0.0 without auth" in result.stderr
    assert not (tmp_path / "p.db").exists()
