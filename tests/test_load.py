"""50 concurrent clients mixing reads, scores and small generations against a server with a short queue.

Admission control may refuse model work (RESOURCE_EXHAUSTED) but nothing else may fail, every stream ends
complete or is refused before its first message, memory stays bounded and the server is healthy afterwards.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from viper_client import GeneratedImage, RatedImage, ResourceExhausted, ScoreResult, ViperClient, ViperError
from viper_server.testing import ServerProcess

from imagedata import png_bytes

CLIENTS = 50
MAX_QUEUE = 2
SIZE = 64
USERS = [f"load-{n}" for n in range(4)]
QUERIES = [png_bytes(color=(200, 180, 20)), png_bytes(color=(20, 40, 160))]
# RSS the server may gain under load: generous for allocator caches, far below what a per-call leak adds up to.
MAX_RSS_GROWTH = 512 * 1024 * 1024


def read_profile(client: ViperClient, user_id: str, rng: random.Random) -> Iterator[object]:
    yield client.get_profile(user_id)


def score(client: ViperClient, user_id: str, rng: random.Random) -> Iterator[object]:
    return client.score_stream(user_id, QUERIES)


def generate(client: ViperClient, user_id: str, rng: random.Random) -> Iterator[object]:
    return client.generate(user_id, "a quiet harbour", width=SIZE, height=SIZE, steps=2, seed=rng.randrange(1, 2**31))


def read_is_complete(received: list, user_id: str) -> bool:
    return len(received) == 1 and received[0].user_id == user_id


def scores_are_complete(received: list, user_id: str) -> bool:
    results = [message for message in received if isinstance(message, ScoreResult)]
    return sorted(result.index for result in results) == [0, 1] and all(0 <= r.score <= 1 for r in results)


def image_is_complete(received: list, user_id: str) -> bool:
    final = received[-1] if received else None
    return isinstance(final, GeneratedImage) and (final.image_index, final.width, final.height) == (0, SIZE, SIZE)


@dataclass(frozen=True)
class Operation:
    run: Callable[[ViperClient, str, random.Random], Iterator[object]]
    is_complete: Callable[[list, str], bool]
    weight: int


OPERATIONS = {
    "read": Operation(read_profile, read_is_complete, weight=2),
    "score": Operation(score, scores_are_complete, weight=1),
    "generate": Operation(generate, image_is_complete, weight=1),
}


@dataclass
class Tally:
    succeeded: Counter = field(default_factory=Counter)
    refused: Counter = field(default_factory=Counter)
    # Anything else: an error other than a clean refusal, or a stream that ended incomplete.
    faults: list[str] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        self.succeeded += other.succeeded
        self.refused += other.refused
        self.faults += other.faults


def perform(client: ViperClient, kind: str, user_id: str, rng: random.Random, tally: Tally) -> None:
    operation = OPERATIONS[kind]
    received: list = []
    try:
        for message in operation.run(client, user_id, rng):
            received.append(message)
    except ViperError as exc:
        if isinstance(exc, ResourceExhausted) and not received:
            tally.refused[kind] += 1
            time.sleep(rng.uniform(0.01, 0.05))  # back off, as a well-behaved client does
        else:
            tally.faults.append(f"{kind}: {exc} after {len(received)} messages")
        return
    if operation.is_complete(received, user_id):
        tally.succeeded[kind] += 1
    else:
        tally.faults.append(f"{kind}: stream ended incomplete: {[type(m).__name__ for m in received]}")


def client_loop(target: str, seed: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(seed)
    kinds, weights = list(OPERATIONS), [operation.weight for operation in OPERATIONS.values()]
    with ViperClient(target, timeout=60, long_timeout=60) as client:
        while time.monotonic() < deadline:
            perform(client, rng.choices(kinds, weights)[0], rng.choice(USERS), rng, tally)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def run_once_each(target: str) -> Tally:
    tally = Tally()
    with ViperClient(target) as client:
        for kind in OPERATIONS:
            perform(client, kind, USERS[0], random.Random(0), tally)
    return tally


@pytest.mark.parametrize("seconds", [10, pytest.param(120, marks=pytest.mark.soak)])
def test_concurrent_clients_see_only_clean_refusals(tiny_models_dir, tmp_path, seconds):
    with ServerProcess(tmp_path / "profiles.db", tiny_models_dir, "--max-queue", str(MAX_QUEUE)) as server:
        with ViperClient(server.target) as client:
            for n, user_id in enumerate(USERS):
                client.extract_profile(user_id, [RatedImage(png_bytes(color=(n, 90, 200)), rating="liked"),
                                                 RatedImage(png_bytes(color=(90, n, 20)), rating="disliked")])
        warm_up = run_once_each(server.target)  # first calls allocate what later ones reuse
        assert warm_up.succeeded == Counter(list(OPERATIONS)) and not warm_up.faults
        rss_before = rss_bytes(server.pid)

        deadline = time.monotonic() + seconds
        tallies = [Tally() for _ in range(CLIENTS)]
        threads = [threading.Thread(target=client_loop, args=(server.target, n, deadline, tally))
                   for n, tally in enumerate(tallies)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(seconds + 120)
        assert not any(thread.is_alive() for thread in threads), "a client is stuck"
        total = Tally()
        for tally in tallies:
            total.add(tally)

        server_errors = [line for line in server.logs if re.match(r"\w+(Error|Exception): ", line)]
        assert not total.faults, f"{len(total.faults)} faults, e.g. {total.faults[:5]}; server: {server_errors[:5]}"
        assert all(total.succeeded[kind] > 0 for kind in OPERATIONS), total.succeeded
        assert total.refused, "the queue never filled: admission control was not exercised"
        assert total.refused["read"] == 0, "profile reads run no model and are never refused"
        growth = rss_bytes(server.pid) - rss_before
        assert growth < MAX_RSS_GROWTH, f"RSS grew by {growth / 2**20:.0f} MiB"

        with grpc.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        after = run_once_each(server.target)  # nothing is left queued or stuck
        assert after.succeeded == Counter(list(OPERATIONS)) and not after.faults
