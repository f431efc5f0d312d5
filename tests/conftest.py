from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules running models in process (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`):
    the machine's cores are shared, and one thread keeps small models fast and timings steady."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random-weight checkpoints (layout: engine.presets.BUILT_LAYOUT), built once per test session
    through the same builder `make serve` uses."""
    from viper_server.models.tiny import ensure_tiny_models

    return ensure_tiny_models(tmp_path_factory.mktemp("models") / "tiny-models")


@pytest.fixture(scope="session")
def toy_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained toy-world checkpoints (viper_server.toy; same layout), installed once per test session
    through the same code `--models toy` uses."""
    from viper_server.toy import ensure_toy_models

    return ensure_toy_models(tmp_path_factory.mktemp("models") / "toy-models")


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server (viper_server.testing.postgres) for the whole session, stopped at its end.

    Missing PostgreSQL is installed when we are root on Debian; elsewhere the tests that need it skip,
    except in CI (CI=true), where they fail instead.
    """
    import os

    from viper_server.testing.postgres import PostgresNotFound, PostgresServer, find_postgres_bin

    try:
        bin_dir = find_postgres_bin(install=True)
    except PostgresNotFound as missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the PostgreSQL tests: {missing}")
        pytest.skip(str(missing))
    with PostgresServer(bin_dir) as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A URL to a fresh, empty database on the session's PostgreSQL server, dropped after the test."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url.rsplit("/", 1)[1])


@pytest.fixture(scope="session")
def nginx_bin():
    """Debian's nginx binary (viper_server.testing.nginx), for the proxy in front of several replicas.

    Installed when missing and we are root on Debian; elsewhere the tests that need it skip, except in CI
    (CI=true), where they fail instead.
    """
    import os

    from viper_server.testing.nginx import NginxNotFound, find_nginx

    try:
        return find_nginx(install=True)
    except NginxNotFound as missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the nginx tests: {missing}")
        pytest.skip(str(missing))
