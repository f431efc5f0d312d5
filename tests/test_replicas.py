"""Three real `viper-server serve` replicas (tiny models) on one PostgreSQL, behind nginx running
deploy/nginx.conf (Debian's nginx) and behind the SDK's own ring_hash over the three addresses.

Shown here: each user's calls stick to one replica (its metric cache-hit counter); a write on one replica is
read on the others at once and never leaves a stale metric context or profile behind; ListProfiles pages
continue across replicas; a client's cancel or deadline through nginx stops the replica's denoising within
a step; PostgreSQL restarted -> UNAVAILABLE and NOT_SERVING while it is down, back by itself, no
acknowledged write lost; a replica killed with SIGKILL -> its users' next calls succeed on another. The
replica-killing test runs last (module order): it leaves two replicas.

Before them, without servers: the deploy files (nginx config rendering, the Kubernetes manifests parse and
carry deploy/nginx.conf unchanged) and the SDK's multi-target channel on in-process gRPC servers (grpcio
routes by the user header only with its switch on, which is why the SDK sets it).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from viper_client import AsyncViperClient, DeadlineExceeded, NotFound, ResourceExhausted, Unavailable, ViperClient, cli
from viper_client.channel import RING_HASH_SWITCH
from viper_client.types import GeneratedImage, Progress, RatedImage
from viper_profiles import SourceImage, open_store
from viper_proto.v1 import profile_pb2, profile_pb2_grpc
from viper_server.testing import ServerProcess
from viper_server.testing.nginx import DEPLOY_CONFIG, NginxProxy, render_config

from fixture_data import QUERIES, fixture_images

KUBERNETES = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
SIZE = 64
# Generations that get cancelled: 256 px makes a step slow enough that "within a step" is not a race.
LONG_SIZE = 256
SCORES_PER_USER = 20
CANCELLED = r"generation cancelled after (\d+) denoising steps"


def connect(target, **options) -> ViperClient:
    """An SDK client whose model calls give up after 2 minutes (the SDK's default is 10), so a hang shows."""
    return ViperClient(target, **{"long_timeout": 120, **options})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- the deploy files (no servers) ----------------------------------------------------------------------------


def test_the_nginx_config_renders_for_any_replicas_and_refuses_a_config_it_cannot_rewrite(tmp_path):
    template = DEPLOY_CONFIG.read_text()
    rendered = render_config(template, ["127.0.0.1:1", "127.0.0.1:2"], listen="127.0.0.1:9", log_dir=tmp_path)
    assert re.findall(r"server (\S+) max_fails=1 fail_timeout=10s;", rendered) == ["127.0.0.1:1", "127.0.0.1:2"]
    assert "listen 127.0.0.1:9 http2;" in rendered and f"access_log {tmp_path}/viper-access.log" in rendered
    assert "hash $viper_route consistent;" in rendered and "10.0.0.11" not in rendered
    round_robin = render_config(template, ["127.0.0.1:1"], listen="127.0.0.1:9", log_dir=tmp_path,
                                consistent_hash=False)
    assert "hash $viper_route" not in round_robin
    with pytest.raises(ValueError, match="upstream viper_replicas"):
        render_config(template.replace("listen 50050 http2;", ""), ["127.0.0.1:1"], listen="x:1", log_dir=tmp_path)


def test_the_kubernetes_manifests_parse_and_route_like_deploy_nginx_conf():
    import yaml  # PyYAML comes with the server's dependencies (transformers)

    documents = [document for path in sorted(KUBERNETES.glob("*.yaml")) for document in
                 yaml.safe_load_all(path.read_text())]
    by_kind = {(document["kind"], document["metadata"]["name"]): document for document in documents}
    assert set(by_kind) == {("Secret", "viper-database"), ("Secret", "viper-auth"), ("StatefulSet", "viper-replicas"),
                            ("Service", "viper-replicas"), ("ConfigMap", "viper-nginx"),
                            ("Deployment", "viper-nginx"), ("Service", "viper-nginx"),
                            ("NetworkPolicy", "viper-default-deny"), ("NetworkPolicy", "viper-replicas"),
                            ("NetworkPolicy", "viper-nginx")}
    replica = by_kind["StatefulSet", "viper-replicas"]["spec"]["template"]["spec"]["containers"][0]
    assert replica["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert replica["startupProbe"]["grpc"] == replica["readinessProbe"]["grpc"] == {"port": 50051}
    assert {"name": "VIPER_DB", "value": "postgresql://?service=viper"} in replica["env"]
    # The ConfigMap is deploy/nginx.conf with the pods' names, re-resolved (nginx 1.27.3+), and logs on stdout.
    shipped = by_kind["ConfigMap", "viper-nginx"]["data"]["viper.conf"]
    names = re.findall(r"server (\S+) max_fails=1 fail_timeout=10s resolve;", shipped)
    assert names == [f"viper-replicas-{index}.viper-replicas.viper.svc.cluster.local:50051" for index in range(3)]
    back = re.sub(r"    # nginx 1\.27\.3\+.*?\n    resolver [^\n]*\n", "", shipped, flags=re.S)
    back = back.replace(" resolve;", ";").replace("/dev/stdout", "/var/log/nginx/viper-access.log")
    assert back == render_config(DEPLOY_CONFIG.read_text(), names, listen="50050", log_dir=Path("/var/log/nginx"))


def test_the_kubernetes_pods_run_locked_down():
    import yaml

    documents = [document for path in sorted(KUBERNETES.glob("*.yaml")) for document in
                 yaml.safe_load_all(path.read_text())]
    by_kind = {(document["kind"], document["metadata"]["name"]): document for document in documents}
    for kind, name in [("StatefulSet", "viper-replicas"), ("Deployment", "viper-nginx")]:
        pod = by_kind[kind, name]["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                                    "capabilities": {"drop": ["ALL"]}}
            image, _, tag = container["image"].rpartition(":")
            assert "@sha256:" in container["image"] or re.fullmatch(r"\d+\.\d+\.\d+(-\w+)?", tag), container["image"]
            # Whatever must be written goes to an emptyDir.
            writable = [mount for mount in container["volumeMounts"] if not mount.get("readOnly")]
            empty_dirs = {volume["name"] for volume in pod["volumes"] if "emptyDir" in volume}
            assert writable and {mount["name"] for mount in writable} <= empty_dirs
    # The database settings come from a secret file (a libpq service file), never from an env var's value.
    replica = by_kind["StatefulSet", "viper-replicas"]["spec"]["template"]["spec"]
    env = {item["name"]: item for item in replica["containers"][0]["env"]}
    service_file = env["PGSERVICEFILE"]["value"]
    mount = next(mount for mount in replica["containers"][0]["volumeMounts"]
                 if service_file.startswith(mount["mountPath"] + "/"))
    volume = next(volume for volume in replica["volumes"] if volume["name"] == mount["name"])
    secret = by_kind["Secret", volume["secret"]["secretName"]]["stringData"]
    settings = dict(line.split("=", 1) for line in secret[Path(service_file).name].splitlines() if "=" in line)
    assert settings["sslmode"] == "verify-full" and Path(settings["sslrootcert"]).name in secret
    assert not any("password" in str(item).lower() for item in env.values())
    # Only nginx reaches the gRPC port, only the monitoring namespace the metrics port; the rest is denied.
    assert by_kind["NetworkPolicy", "viper-default-deny"]["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    rules = by_kind["NetworkPolicy", "viper-replicas"]["spec"]["ingress"]
    assert [(rule["from"], [port["port"] for port in rule["ports"]]) for rule in rules] == [
        ([{"podSelector": {"matchLabels": {"app": "viper-nginx"}}}], [50051]),
        ([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}], [9090]),
    ]
    # nginx limits each client and answers in gRPC's shape when it refuses.
    conf = DEPLOY_CONFIG.read_text()
    for directive in ("limit_conn viper_calls", "limit_req zone=viper_rate", "client_header_timeout",
                      "client_body_timeout", "send_timeout", "add_header grpc-status 8"):
        assert directive in conf


# --- the SDK's multi-target channel, on in-process servers ---------------------------------------------------


# Three in-process gRPC servers answering the health check; each records the x-viper-user of its calls.
_RING_PROBE = """
import json, sys
from concurrent import futures
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from viper_client.channel import USER_HEADER, service_config

seen = {}
class Recorder(health_pb2_grpc.HealthServicer):
    def __init__(self, name):
        self.name = name
    def Check(self, request, context):
        seen.setdefault(dict(context.invocation_metadata()).get(USER_HEADER), set()).add(self.name)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
servers, ports = [], []
for name in range(3):
    server = grpc.server(futures.ThreadPoolExecutor(2))
    ports.append(server.add_insecure_port("127.0.0.1:0"))
    health_pb2_grpc.add_HealthServicer_to_server(Recorder(name), server)
    server.start()
    servers.append(server)
config = json.dumps(service_config(ring_hash=True, retries=True))
target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)
with grpc.insecure_channel(target, options=[("grpc.service_config", config)]) as channel:
    check = health_pb2_grpc.HealthStub(channel).Check
    try:
        for user in range(30):
            for _ in range(3):
                check(health_pb2.HealthCheckRequest(), metadata=((USER_HEADER, f"user-{user}"),), timeout=10)
    except grpc.RpcError as error:
        print(json.dumps({"error": [error.code().name, error.details()]}))
        sys.exit()
print(json.dumps({"homes": {user: sorted(names) for user, names in seen.items()}}))
"""


def ring_probe(switch: str | None) -> dict:
    """Runs _RING_PROBE in a fresh interpreter, with the ring-hash switch set to `switch` (None: unset)."""
    env = {key: value for key, value in os.environ.items() if key != RING_HASH_SWITCH}
    if switch is not None:
        env[RING_HASH_SWITCH] = switch
    result = subprocess.run([sys.executable, "-c", _RING_PROBE], env=env, capture_output=True, text=True,
                            timeout=120, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def test_grpcio_routes_by_the_user_header_only_with_its_switch_on():
    routed = ring_probe("true")["homes"]
    assert all(len(homes) == 1 for homes in routed.values()), "each user's calls on one server"
    assert {home for homes in routed.values() for home in homes} == {0, 1, 2}, "users spread over all three"
    # Unset, grpcio ignores requestHashHeader and fails every call. If this starts passing, grpcio no longer
    # needs the switch: drop enable_ring_hash() from viper_client/channel.py and its README paragraph.
    assert ring_probe(None) == {"error": ["INTERNAL", "hash attribute not present"]}


def test_a_client_over_several_targets_checks_its_targets_and_the_switch(monkeypatch):
    monkeypatch.setenv(RING_HASH_SWITCH, "false")
    with pytest.raises(ValueError, match=f"{RING_HASH_SWITCH}=true"):
        ViperClient(["127.0.0.1:1", "127.0.0.1:2"])
    monkeypatch.delenv(RING_HASH_SWITCH)
    for bad in (["127.0.0.1:1", "no-port"], "127.0.0.1:1,,127.0.0.1:2", ["127.0.0.1:1", "::1:2"],
                ["127.0.0.1:1", "dns:///x:2"]):
        with pytest.raises(ValueError, match="host:port|empty"):
            ViperClient(bad)
    with pytest.raises(ValueError, match="one family"):  # ring_hash's target is ipv4: or ipv6:, not both
        ViperClient(["127.0.0.1:1", "[::1]:2"])
    with ViperClient(["127.0.0.1:1", "localhost:3"]):
        pass  # a host name is resolved (to its IPv4 address, as 127.0.0.1 has no IPv6 one)
    assert os.environ[RING_HASH_SWITCH] == "true", "set for the process when it was unset"


# --- three replicas on one database, nginx in front ------------------------------------------------------


@pytest.fixture(scope="module")
def database(postgres_server):
    url = postgres_server.create_database()
    yield url
    if not postgres_server.running:  # a failed restart test must not break the session's other tests
        postgres_server.start()
    postgres_server.drop_database(url.rsplit("/", 1)[1])


@pytest.fixture(scope="module")
def store(database):
    """The shared store, opened by the test itself to seed profiles without running the extractor."""
    opened = open_store(database)
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def replicas(database, tiny_models_dir):
    processes = []
    for _ in range(3):
        metrics_port = free_port()
        process = ServerProcess(database, tiny_models_dir, "--metrics-port", str(metrics_port))
        process.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        processes.append(process)
    try:
        with futures.ThreadPoolExecutor(3) as pool:  # the three start (and migrate the schema) at once
            list(pool.map(lambda process: process.start(), processes))
        yield processes
    finally:
        for process in processes:
            process.kill()


@pytest.fixture(scope="module")
def proxy(replicas, nginx_bin):
    with NginxProxy([replica.target for replica in replicas], nginx=nginx_bin) as proxy:
        yield proxy


def seed(store, user_id: str, liked: Sequence[RatedImage], disliked: Sequence[RatedImage]) -> None:
    """Stores a profile with these context images straight into the shared database."""
    images = [SourceImage(image.image.read_bytes(), image.comment, image.rating) for image in (*liked, *disliked)]
    store.save_extraction(user_id, liked_features=["calm"], disliked_features=["noise"], raw_text="seeded",
                          extractor_model="test-seed", images=images)


LIKED, DISLIKED = fixture_images()[:8], fixture_images()[8:]


@dataclass(frozen=True)
class CacheCounts:
    hits: float
    misses: float


def cache_counts(replica: ServerProcess) -> CacheCounts:
    text = urllib.request.urlopen(replica.metrics_url, timeout=10).read().decode()
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return CacheCounts(float(samples["viper_metric_cache_hits_total"]),
                       float(samples["viper_metric_cache_misses_total"]))


def scores_per_replica(replicas, score_once, times: int) -> list[CacheCounts]:
    """Each replica's (hits, misses) added while score_once() ran `times` times."""
    before = [cache_counts(replica) for replica in replicas]
    for _ in range(times):
        score_once()
    after = [cache_counts(replica) for replica in replicas]
    return [CacheCounts(a.hits - b.hits, a.misses - b.misses) for a, b in zip(after, before)]


def assert_sticks_to_one_replica(deltas: list[CacheCounts], times: int) -> int:
    """Asserts that >= 95% of the scores hit one replica's cache; returns that replica's index."""
    served = [delta.hits + delta.misses for delta in deltas]
    assert sum(served) == times, deltas  # each score looked its context up once, on one replica
    home = max(range(len(deltas)), key=lambda index: served[index])
    assert deltas[home].hits >= 0.95 * times, deltas
    return home


def health(replica: ServerProcess) -> int:
    with grpc.insecure_channel(replica.target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def wait_health(replicas, status: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(health(replica) == status for replica in replicas):
            return
        time.sleep(0.2)
    raise AssertionError(f"not every replica reached {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")


def wait_any_log(replicas, pattern: str, timeout: float = 30) -> tuple[ServerProcess, re.Match]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for replica in replicas:
            for line in list(replica.logs):
                if match := re.search(pattern, line):
                    return replica, match
        time.sleep(0.05)
    raise AssertionError(f"no replica logged {pattern!r}")


# --- affinity ------------------------------------------------------------------------------------------------


def test_through_nginx_each_user_sticks_to_one_replica_and_its_cache(replicas, proxy, store):
    scored, spread = [f"affinity-{index}" for index in range(3)], [f"spread-{index}" for index in range(30)]
    for user in scored + spread:
        seed(store, user, LIKED[:1], DISLIKED[:1])
    cache_homes = {}
    with connect(proxy.target) as client:
        for user in scored:
            deltas = scores_per_replica(replicas, lambda user=user: client.score(user, QUERIES[:1]), SCORES_PER_USER)
            cache_homes[user] = replicas[assert_sticks_to_one_replica(deltas, SCORES_PER_USER)].target
        for user in spread:  # cheap calls, many users: how the users spread
            for _ in range(3):
                client.get_profile(user)
    # nginx's log: each user's calls all went to one upstream, for the scored users the one whose cache counted.
    records = proxy.access_records()
    homes = {}
    for user in scored + spread:
        upstreams = {record.upstream for record in records if record.user == user}
        assert len(upstreams) == 1, (user, upstreams)
        homes[user] = upstreams.pop()
    assert {user: homes[user] for user in scored} == cache_homes
    assert set(homes.values()) == {replica.target for replica in replicas}, "every replica has users"


def served_by(replicas, method: str, user: str, calls: int, timeout: float = 15) -> list[int]:
    """The index of the replica that served each of the user's `calls` calls of method, from their rpc logs."""
    needle = f"rpc method=/viper.v1.{method} user={user} "
    deadline = time.monotonic() + timeout
    while True:  # a replica's log line may come just after the client heard back
        served = [index for index, replica in enumerate(replicas) for line in list(replica.logs) if needle in line]
        if len(served) >= calls or time.monotonic() > deadline:
            return served
        time.sleep(0.05)


def test_the_sdk_over_three_targets_keeps_each_user_on_one_replica(replicas, store):
    scored, spread = [f"ring-{index}" for index in range(3)], [f"ring-spread-{index}" for index in range(30)]
    for user in scored + spread:
        seed(store, user, LIKED[:1], DISLIKED[:1])
    cache_homes = {}
    with connect([replica.target for replica in replicas]) as client:
        for user in scored:
            deltas = scores_per_replica(replicas, lambda user=user: client.score(user, QUERIES[:1]), SCORES_PER_USER)
            cache_homes[user] = assert_sticks_to_one_replica(deltas, SCORES_PER_USER)
        for user in spread:
            for _ in range(3):
                client.get_profile(user)
        # Calls without a user (ListProfiles) go to any replica.
        assert set(scored + spread) <= {profile.user_id for profile in client.list_profiles()}
    homes = dict(cache_homes)
    for user in spread:
        served = served_by(replicas, "ProfileService/GetProfile", user, 3)
        assert len(served) == 3 and len(set(served)) == 1, (user, served)
        homes[user] = served[0]
    assert set(homes.values()) == {0, 1, 2}, "every replica has users"
    # The same client as "host:port,host:port,host:port" routes the same way; so does the CLI's --target.
    joined = ",".join(replica.target for replica in replicas)
    with connect(joined) as client:
        user = scored[0]
        deltas = scores_per_replica(replicas, lambda: client.score(user, QUERIES[:1]), 5)
        assert [delta.hits for delta in deltas].index(5) == cache_homes[user], deltas
    assert cli.main(["--target", joined, "profile", "get", "--user", spread[0]]) == 0
    assert served_by(replicas, "ProfileService/GetProfile", spread[0], 4) == [homes[spread[0]]] * 4

    async def read_async() -> None:
        async with AsyncViperClient([replica.target for replica in replicas]) as client:
            await client.get_profile(spread[1])

    asyncio.run(read_async())
    assert served_by(replicas, "ProfileService/GetProfile", spread[1], 4) == [homes[spread[1]]] * 4


# --- one database behind every replica ----------------------------------------------------------------------


def test_a_write_on_one_replica_is_read_on_every_other(replicas):
    a, b, c = (connect(replica.target) for replica in replicas)
    with a, b, c:
        created = a.extract_profile("shared", [*LIKED[:1], *DISLIKED[:1]])
        for other in (b, c):
            read = other.get_profile("shared")
            assert (read.version, read.liked_features, read.images) == (created.version, created.liked_features,
                                                                        created.images)
        updated = b.update_profile("shared", liked_features=["from b"], expected_version=created.version)
        assert updated.version == created.version + 1
        for other in (a, c):
            assert other.get_profile("shared").liked_features == ["from b"]
        c.delete_profile("shared", expected_version=updated.version)
        for other in (a, b):
            with pytest.raises(NotFound):
                other.get_profile("shared")


def test_no_stale_context_or_profile_after_a_write_through_another_replica(replicas):
    a, b = connect(replicas[0].target), connect(replicas[1].target)
    with a, b:
        a.extract_profile("moving", [*LIKED[:2], *DISLIKED[:2]])
        old = b.score("moving", QUERIES)  # B caches the context of the first extraction
        assert b.score("moving", QUERIES) == old
        # Re-extracted on A from other images: B's very next score uses them, not its cached prefix.
        changed = a.extract_profile("moving", [*LIKED[2:4], *DISLIKED[2:4]])
        new = b.score("moving", QUERIES)
        inline = b.score("moving", QUERIES, liked=[image.image for image in LIKED[2:4]],
                         disliked=[image.image for image in DISLIKED[2:4]])
        assert new == pytest.approx(inline, abs=1e-6)
        assert new != pytest.approx(old, abs=1e-6), "the two contexts must score differently for this to show"
        # Features updated on A: B's next generation follows the new version.
        updated = a.update_profile("moving", liked_features=["ochre"], expected_version=changed.version)
        images = [event for event in b.generate("moving", "a field", width=SIZE, height=SIZE, steps=2, seed=3)
                  if isinstance(event, GeneratedImage)]
        assert [image.profile_version for image in images] == [updated.version]


def test_list_profiles_pages_continue_across_replicas(replicas, store):
    for index in range(7):
        seed(store, f"page-{index}", LIKED[:1], DISLIKED[:1])
    channels = [grpc.insecure_channel(replica.target) for replica in replicas]
    try:
        stubs = [profile_pb2_grpc.ProfileServiceStub(channel) for channel in channels]
        everything = [profile.user_id for profile in
                      stubs[0].ListProfiles(profile_pb2.ListProfilesRequest(page_size=1000), timeout=10).profiles]
        paged, token, turn = [], "", 0
        while True:  # page 1 from replica 0, page 2 from replica 1, ...: the token is valid on every one
            page = stubs[turn % 3].ListProfiles(profile_pb2.ListProfilesRequest(page_size=3, page_token=token),
                                                timeout=10)
            paged += [profile.user_id for profile in page.profiles]
            turn += 1
            if not (token := page.next_page_token):
                break
        assert paged == everything and len(set(paged)) == len(paged) and turn >= 3
        assert {f"page-{index}" for index in range(7)} <= set(paged)
    finally:
        for channel in channels:
            channel.close()


# --- cancellation through nginx ------------------------------------------------------------------------------


@pytest.fixture
def painter(replicas, store):
    seed(store, "painter", LIKED[:1], DISLIKED[:1])
    for replica in replicas:
        replica.logs.clear()
    return "painter"


def test_a_cancel_through_nginx_stops_the_replicas_denoising_within_a_step(replicas, proxy, painter):
    with connect(proxy.target) as client:
        stream = client.generate(painter, "a long one", width=LONG_SIZE, height=LONG_SIZE, steps=150, seed=5,
                                 preview_every=0)
        seen = 0
        for event in stream:
            if isinstance(event, Progress):
                seen = event.step
                if seen >= 5:
                    break
        stream.close()  # the SDK cancels the call: an HTTP/2 RST_STREAM to nginx
    replica, match = wait_any_log(replicas, CANCELLED)
    # It stopped right after the cancel reached it through nginx, nowhere near the 150+ steps asked for.
    assert seen <= int(match.group(1)) < seen + 20
    replica.wait_for_log(r"rpc method=/viper.v1.GenerationService/Generate .*status=CANCELLED")


def test_a_deadline_through_nginx_stops_the_replicas_denoising_within_a_step(replicas, proxy, painter):
    seen = 0
    with connect(proxy.target) as client, pytest.raises(DeadlineExceeded):
        for event in client.generate(painter, "a long one", width=LONG_SIZE, height=LONG_SIZE, steps=150, seed=6,
                                     preview_every=0, timeout=2):
            if isinstance(event, Progress):
                seen = event.step
    assert 0 < seen < 150, "the deadline fell mid-generation"
    _, match = wait_any_log(replicas, CANCELLED)
    assert seen <= int(match.group(1)) < seen + 20


# --- faults ------------------------------------------------------------------------------------------------


class Writer(threading.Thread):
    """Updates one user's features through nginx in a loop, recording what was acknowledged and tried."""

    def __init__(self, target: str, user_id: str) -> None:
        super().__init__(daemon=True)
        self.target, self.user_id = target, user_id
        self.acknowledged: list[tuple[int, int]] = []  # (step, version)
        self.tried: list[int] = []
        self.failures: list[Exception] = []
        self.crash: BaseException | None = None  # anything else ends the loop, and the test fails on it
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            self._write()
        except BaseException as error:
            self.crash = error

    def _write(self) -> None:
        with connect(self.target, timeout=15) as client:
            step = 0
            while not self.stop.is_set():
                step += 1
                self.tried.append(step)
                try:
                    profile = client.update_profile(self.user_id, liked_features=[f"step {step}"])
                    self.acknowledged.append((step, profile.version))
                    # Well under nginx's 100 calls/s per client: the test's own reads after the writes must
                    # find the limiter's bucket full, not emptied by this loop (they failed with 429 once).
                    self.stop.wait(0.02)
                except Unavailable as error:
                    self.failures.append(error)
                    time.sleep(0.2)
                except ResourceExhausted:  # nginx's 100 calls/s per client (deploy/nginx.conf): back off
                    time.sleep(0.2)


def test_postgres_restart_is_unavailable_then_recovers_with_nothing_acknowledged_lost(
        replicas, proxy, store, postgres_server):
    seed(store, "durable", LIKED[:1], DISLIKED[:1])
    with connect(proxy.target) as client:
        users_before = {profile.user_id for profile in client.list_profiles()}
    writer = Writer(proxy.target, "durable")
    writer.start()
    try:
        while len(writer.acknowledged) < 5:
            time.sleep(0.05)
        postgres_server.stop("immediate")  # like a crash of the database server
        try:
            wait_health(replicas, health_pb2.HealthCheckResponse.NOT_SERVING)
            with connect(proxy.target, retries=False) as client:
                with pytest.raises(Unavailable, match="profile store"):
                    client.get_profile("durable")
                with pytest.raises(Unavailable, match="profile store"):
                    client.update_profile("durable", liked_features=["lost"])
            acknowledged_while_down = len(writer.acknowledged)
        finally:
            postgres_server.start()
        wait_health(replicas, health_pb2.HealthCheckResponse.SERVING)
        deadline = time.monotonic() + 30
        while len(writer.acknowledged) < acknowledged_while_down + 5 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        writer.stop.set()
        writer.join(30)
    assert writer.crash is None, writer.crash
    assert writer.failures, "the writer saw the outage"
    assert len(writer.acknowledged) >= acknowledged_while_down + 5, "writes succeed again without a restart"
    last_step, last_version = writer.acknowledged[-1]
    with connect(proxy.target) as client:
        final = client.get_profile("durable")
        # The last acknowledged write, or one tried after it whose answer was lost (UNAVAILABLE).
        final_step = int(final.liked_features[0].removeprefix("step "))
        assert final_step in writer.tried and final_step >= last_step and final.version >= last_version
        assert users_before <= {profile.user_id for profile in client.list_profiles()}
    versions = [version for _, version in writer.acknowledged]
    assert versions == sorted(set(versions)), "every acknowledged write has its own version"


def test_a_replica_killed_moves_its_users_to_another_replica(replicas, proxy, store):
    """Runs last: it leaves the module with two replicas."""
    users = [f"survivor-{index}" for index in range(6)]
    for user in users:
        seed(store, user, LIKED[:1], DISLIKED[:1])
    nginx_client, ring_client = connect(proxy.target), connect([replica.target for replica in replicas])
    with nginx_client, ring_client:
        homes: dict[tuple[int, str], int] = {}  # (client, user) -> the replica serving that user through it
        for number, client in enumerate((nginx_client, ring_client)):
            for user in users:
                deltas = scores_per_replica(replicas, lambda client=client, user=user: client.score(user, QUERIES[:1]),
                                            1)
                homes[number, user] = max(range(3), key=lambda index: deltas[index].hits + deltas[index].misses)
        # A replica that is home to some user through nginx and to some user through the SDK's ring.
        victim = next(index for index in range(3) if index in {homes[0, user] for user in users}
                      and index in {homes[1, user] for user in users})
        moved = {number: next(user for user in users if homes[number, user] == victim) for number in (0, 1)}
        replicas[victim].stop(signal.SIGKILL)
        # Through nginx and through the SDK's ring: reads, a stream and a write all succeed on another replica.
        for number, client in enumerate((nginx_client, ring_client)):
            user = moved[number]
            assert client.get_profile(user).user_id == user
            assert len(client.score(user, QUERIES[:1])) == 1
            client.update_profile(user, liked_features=["still here"])
            events = list(client.generate(user, "a dune", width=SIZE, height=SIZE, steps=2))
            assert any(isinstance(event, GeneratedImage) for event in events)
    after_kill = [record for record in proxy.access_records() if record.user == moved[0]][-4:]
    assert [record.path.rsplit("/", 1)[1] for record in after_kill] == ["GetProfile", "Score", "UpdateProfile",
                                                                       "Generate"]
    assert all(record.grpc_status == "0" for record in after_kill), after_kill
    # The first call found the dead replica refusing and went on to the next one on the ring ("dead, live");
    # nginx then skipped the dead one.
    assert after_kill[0].upstream.split(", ")[0] == replicas[victim].target, after_kill
    assert all(record.upstream.split(", ")[-1] != replicas[victim].target for record in after_kill), after_kill
