import contextlib
import fcntl
import hashlib
import os
from importlib import metadata
from pathlib import Path

import pytest

# One torch (OpenMP) thread in this process and in every process a test starts (servers, CLIs, benches), set
# before anything imports torch: the suite runs several workers on few cores, where each extra OpenMP thread
# only spins waiting for a core (a tiny-model extraction took 9x the CPU seconds with torch's default threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
# Built and installed models, kept across sessions under var/ (git-ignored), each in a folder named by a hash
# of everything that shapes its files: a change to a builder or a library version makes a new folder.
MODEL_CACHE = ROOT / "var" / "test-models"
# The libraries whose versions shape the files written (formats, configs, default values).
MODEL_LIBRARIES = ("torch", "transformers", "diffusers", "peft", "tokenizers", "safetensors")


def content_key(*sources: Path) -> str:
    """A short hash of the source files (every file under a folder) and the model libraries' versions."""
    digest = hashlib.sha256()
    for library in MODEL_LIBRARIES:
        digest.update(f"{library}={metadata.version(library)}\n".encode())
    for source in sources:
        files = sorted(path for path in source.rglob("*") if path.is_file() and "__pycache__" not in path.parts) \
            if source.is_dir() else [source]
        for path in files:
            digest.update(f"{path.relative_to(ROOT)}\n".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def cache_lock(name: str):
    """Held while one process (a session, or an xdist worker) fills a cache folder; the others wait, then find
    it filled. The folders are also written atomically (renamed into place), so a reader never sees half."""
    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    with open(MODEL_CACHE / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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
def tiny_models_dir() -> Path:
    """Tiny random-weight checkpoints (layout: engine.presets.BUILT_LAYOUT), built through the same builder
    `make serve` uses, once for all sessions and workers while the builders and libraries stay the same
    (var/test-models/tiny-<hash>). Read only: a test that changes models works on a copy."""
    from viper_server.models.tiny import ensure_tiny_models

    with cache_lock("tiny"):
        return ensure_tiny_models(MODEL_CACHE / f"tiny-{content_key(ROOT / 'server/viper_server/models')}")


@pytest.fixture(scope="session")
def toy_models_dir() -> Path:
    """The trained toy-world checkpoints (viper_server.toy; same layout), installed through the same code
    `--models toy` uses (the manifest checked), once while the weights and installer stay the same
    (var/test-models/toy-<hash>). Read only."""
    from viper_server.toy import ensure_toy_models

    toy = ROOT / "server/viper_server/toy"
    key = content_key(toy / "weights", toy / "checkpoints.py", toy / "manifest.py")
    with cache_lock("toy"):
        return ensure_toy_models(MODEL_CACHE / f"toy-{key}")


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server (viper_server.testing.postgres) for the whole session, stopped at its end.

    Missing PostgreSQL is installed when we are root on Debian; elsewhere the tests that need it skip,
    except in CI (CI=true), where they fail instead.
    """
    import os

    from viper_server.testing.postgres import PostgresNotFound, PostgresServer, find_postgres_bin

    try:
        with cache_lock("system-packages"):  # one apt-get at a time across xdist workers
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
        with cache_lock("system-packages"):
            return find_nginx(install=True)
    except NginxNotFound as missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the nginx tests: {missing}")
        pytest.skip(str(missing))


# The slowest modules first, by the CPU seconds and waits of each run alone (the suite is CPU-bound on 2 cores):
# under `make test`'s --dist loadfile each module is one unit of work, handed out in collection order
# (--no-loadscope-reorder: xdist would order them by their number of tests), and a slow module started last keeps
# one worker busy after the others have finished. Any module not named keeps its place after these.
SLOW_MODULES_FIRST = (
    "test_benches.py",
    "test_benches_load.py",
    "test_toy_service.py",
    "test_replicas.py",
    "test_lifecycle.py",
    "test_metric_model.py",
    "test_web_browser.py",
    "test_client_install.py",
    "test_crash_recovery.py",
    "test_load.py",
    "test_profile_life.py",
    "test_toy_models.py",
    "test_identity_gateway.py",
    "test_web_gateway.py",
    "test_web_best_of_n.py",
    "test_best_of_n.py",
    "test_gateway_safety.py",
    "test_generation_service.py",
    "test_tracing_processes.py",
    "test_identity.py",
    "test_profiles_install.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(SLOW_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort: the rest keep their order
