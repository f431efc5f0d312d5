"""`pip install .` in a fresh venv gives the client SDK and CLI without torch, and they talk to a server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from viper_server.testing import ServerProcess

from fixture_data import FIXTURES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("client-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([venv / "bin" / "pip", "install", "--quiet", "--disable-pip-version-check", str(ROOT)],
                   check=True, timeout=900)
    return venv


def run(venv: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], capture_output=True, text=True, timeout=300)


def test_the_client_install_has_no_torch(client_venv):
    installed = run(client_venv, "python", "-m", "pip", "list", "--format=freeze").stdout.lower()
    names = {line.split("==")[0] for line in installed.splitlines()}
    assert {"grpcio", "protobuf", "pillow", "viper-serve"} <= names
    assert not names & {"torch", "transformers", "diffusers", "peft", "sqlite-utils"}
    probe = run(client_venv, "python", "-c", "import viper_client, sys; print('torch' in sys.modules)")
    assert probe.stdout.strip() == "False"


@pytest.mark.parametrize("package", ["viper_server", "viper_profiles", "torch"])
def test_the_client_install_has_no_server_code(client_venv, package):
    probe = run(client_venv, "python", "-c", f"import {package}")
    assert probe.returncode == 1 and f"No module named '{package}'" in probe.stderr


def test_the_stubs_are_a_public_package_of_the_client(client_venv):
    code = "from viper_proto.v1 import profile_pb2; print(profile_pb2.DESCRIPTOR.package)"
    probe = run(client_venv, "python", "-c", code)
    assert probe.stdout.strip() == "viper.v1", probe.stderr


def test_the_client_cli_talks_to_a_server(client_venv, tiny_models_dir, tmp_path):
    with ServerProcess(tmp_path / "profiles.db", tiny_models_dir) as server:
        target = ("--target", server.target)
        extracted = run(client_venv, "viper", *target, "profile", "extract", "--user", "cli-user",
                        "--liked", str(FIXTURES / "liked"), "--disliked", str(FIXTURES / "disliked"),
                        "--comments", str(FIXTURES / "comments.json"))
        assert extracted.returncode == 0, extracted.stderr
        listed = run(client_venv, "viper", *target, "profile", "list")
        assert listed.returncode == 0 and "cli-user" in listed.stdout
        missing = run(client_venv, "viper", *target, "profile", "get", "--user", "nobody")
        assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
        scored = run(client_venv, "viper", *target, "score", "--user", "cli-user", str(FIXTURES / "query1.png"))
        assert scored.returncode == 0, scored.stderr
        assert "query1.png" in scored.stdout


def test_serve_without_the_server_extra_says_what_to_install(client_venv):
    result = run(client_venv, "viper", "serve")
    assert result.returncode == 2
    assert "pip install . ./profiles ./server" in result.stderr
