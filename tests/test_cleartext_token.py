"""The SDK never sends a bearer token in plaintext off this machine unless told to (issue 25)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from viper_client import AsyncViperClient, CleartextTokenError, Tls, ViperClient, ViperError, cli

REMOTE = ["10.1.2.3:50051", "viper.example.com:443", "127.0.0.1:50051,10.1.2.3:50051", "dns:///viper.example:1",
          "[2001:db8::1]:50051"]
LOCAL = ["127.0.0.1:50051", "localhost:50051", "[::1]:50051", "127.0.0.2:1", "unix:/tmp/viper.sock"]


@pytest.mark.parametrize("target", REMOTE)
def test_a_token_in_cleartext_to_another_host_is_refused_when_the_client_is_made(target):
    with pytest.raises(CleartextTokenError, match="cleartext.*insecure=True"):
        ViperClient(target, token="secret")
    with pytest.raises(ValueError, match="cleartext"):
        asyncio.run(_async_client(target, token="secret"))


async def _async_client(target: str, **kwargs) -> None:
    client = AsyncViperClient(target, **kwargs)
    await client.close()


@pytest.mark.parametrize("target", REMOTE[:2])
@pytest.mark.parametrize("kwargs", [{"insecure": True}, {"tls": Tls()}, {}], ids=["insecure", "tls", "no-token"])
def test_tls_insecure_or_no_token_are_allowed(target, kwargs):
    token = {} if not kwargs else {"token": "secret"}
    ViperClient(target, **token, **kwargs).close()
    asyncio.run(_async_client(target, **token, **kwargs))


@pytest.mark.parametrize("target", REMOTE[:2])
def test_a_token_callable_to_another_host_needs_tls_even_with_insecure(target):
    with pytest.raises(CleartextTokenError, match="callable.*even with insecure=True"):
        ViperClient(target, token=lambda: "secret", insecure=True)
    ViperClient(target, token=lambda: "secret", tls=Tls()).close()


@pytest.mark.parametrize("target", LOCAL)
def test_loopback_targets_take_a_token_in_plaintext(target):
    ViperClient(target, token="secret").close()


def test_the_cli_refuses_too_unless_insecure(capsys, monkeypatch):
    args = ["--target", "10.1.2.3:50051", "--token", "secret", "--timeout", "0.2", "profile", "get", "--user", "alice"]
    assert cli.main(args) == 2
    error = capsys.readouterr().err
    assert "cleartext" in error and "--insecure" in error and "secret" not in error
    # Past the check, the client would dial that address: no test sends traffic off this machine.
    def not_dialled(*args, **kwargs):
        raise ViperError(grpc.StatusCode.UNAVAILABLE, "not dialled in this test")

    monkeypatch.setattr(cli, "ViperClient", not_dialled)
    assert cli.main(["--insecure", *args]) == 1  # past the check
    monkeypatch.setenv("VIPER_INSECURE", "1")
    assert cli.main(args) == 1


def test_viper_health_refuses_a_cleartext_token_too(capsys, monkeypatch):
    args = ["--target", "10.1.2.3:50051", "--token", "secret", "health"]
    assert cli.main(args) == 2
    error = capsys.readouterr().err
    assert "cleartext" in error and "secret" not in error
    monkeypatch.setattr(cli, "check_health", lambda args, tls: 0)  # past the check, never dialled
    assert cli.main(["--insecure", *args]) == 0
