"""`pip install ./profiles` alone in a fresh venv gives the profile store and viper-profiles, without torch, the
server or the client, and the CLI works there on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def profiles_venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("profiles-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([venv / "bin" / "pip", "install", "--quiet", "--disable-pip-version-check", str(ROOT / "profiles")],
                   check=True, timeout=900)
    return venv


def run(venv: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], capture_output=True, text=True, timeout=300)


def test_the_profiles_install_has_the_store_and_nothing_else_of_ours(profiles_venv):
    installed = run(profiles_venv, "python", "-m", "pip", "list", "--format=freeze").stdout.lower()
    names = {line.split("==")[0] for line in installed.splitlines()}
    assert {"viper-serve-profiles", "sqlite-utils", "psycopg", "psycopg-pool"} <= names
    assert not names & {"torch", "transformers", "diffusers", "grpcio", "viper-serve", "viper-serve-server"}
    probe = run(profiles_venv, "python", "-c", "import viper_profiles.cli; print(viper_profiles.open_store.__name__)")
    assert probe.stdout.strip() == "open_store", probe.stderr


@pytest.mark.parametrize("package", ["viper_server", "viper_client", "torch"])
def test_the_profiles_install_has_no_server_or_client_code(profiles_venv, package):
    probe = run(profiles_venv, "python", "-c", f"import {package}")
    assert probe.returncode == 1 and f"No module named '{package}'" in probe.stderr


def test_viper_profiles_help(profiles_venv):
    result = run(profiles_venv, "viper-profiles", "--help")
    assert result.returncode == 0, result.stderr
    for command in ("migrate", "check", "stats", "backup"):
        assert command in result.stdout


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_viper_profiles_migrates_and_checks_from_its_own_install(profiles_venv, backend, tmp_path, request):
    db = str(tmp_path / "profiles.db") if backend == "sqlite" else request.getfixturevalue("postgres_url")
    migrated = run(profiles_venv, "viper-profiles", "migrate", "--db", db)
    assert migrated.returncode == 0 and migrated.stdout.startswith("applied migration 1: "), migrated.stderr
    checked = run(profiles_venv, "viper-profiles", "check", "--db", db)
    assert checked.returncode == 0 and "rows: ok" in checked.stdout, checked.stderr
