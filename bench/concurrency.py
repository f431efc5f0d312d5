"""Concurrency benchmark: the step schedulers, continuous batching and the input caches, end to end through gRPC.

One server process on the tiny models and on the server's DEFAULT settings (its own torch threads, batch sizes,
workers and caches: only the flags given with --server-arg, --threads or --device change them); each comparison
side by side in one run, the two ways interleaved:
  (a) Score latency (one user, prefix cached), 1-query and 4-query calls taking turns: p50 / p95 / worst alone,
      then with three clients extracting in a loop all along (16 commented images, `--new-tokens`, new bytes
      every time, so no cache spares them any work);
  (b) four Generate calls (one image each) at once vs the same four one after another (throughput);
  (c) four extractions (new bytes each call) at once vs one after another;
  (d) eight users' Score calls (the same 4 queries) at once vs one after another;
  (e) warm extraction: the 16 example images with new bytes extracted for the first time, then the same bytes by
      another user with other comments (warm: whatever the server cached of the images helps), then the first
      request again, whose text must be identical to the first time's.
(a)-(d) report the largest difference between the outputs of the concurrent and the serial run (which must be
equal: batching changes no result). The bench prints the peak resident memory of the server process and its
child processes, and the server's cache hits and misses where its Prometheus metrics have any. The last line is
`concurrency: score-under-load N.Nx, generate N.NNx, extract N.NNx, score N.NNx, warm-extract N.NNx`: the
1-query Score's p95 under load over its p95 alone (lower is better), the throughput of each concurrent run over
the serial one, and the cold over the warm extraction's time.

    .venv/bin/python bench/concurrency.py [--repeats 3] [--scores 30] [--new-tokens 400] [--warm-new-tokens N]
        [--warm-repeats 7]

At real scale on a GPU host (random weights, nothing downloaded; `make bench-gpu` runs it with bench/gpu.py):

    python bench/concurrency.py --models full-random --device cuda --size 1024 --steps 10 --new-tokens 128 \
        --warm-new-tokens 128 --repeats 2 --scores 20 --warm-repeats 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import socket
import statistics
import struct
import tempfile
import threading
import time
import urllib.request
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sampling import Sampler

from viper_client import GeneratedImage, RatedImage, ViperClient
from viper_server.models.tiny import ensure_tiny_models
from viper_server.testing import ServerProcess

EXAMPLES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "viper_examples"
COMMENTS = json.loads((EXAMPLES / "comments.json").read_text())
# The 16 commented fixture images: 8 liked, then 8 disliked.
NAMES = [name for rating in ("liked", "disliked") for name in sorted(c for c in COMMENTS if c.startswith(rating))]
PNGS = {name: (EXAMPLES / name).read_bytes() for name in NAMES}
MiB = 1024 * 1024


def with_nonce(png: bytes, nonce: str) -> bytes:
    """The same PNG (same pixels) with a text chunk before IEND: new bytes, so a cache keyed by content misses."""
    data = b"nonce\0" + nonce.encode()
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))
    return png[:-12] + chunk + png[-12:]  # the last 12 bytes are the IEND chunk


def repainted(png: bytes, seed: int) -> bytes:
    """The same picture with one pixel of another colour: new pixels too, not only new bytes."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.putpixel((0, 0), tuple(random.Random(seed).randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def rated_images(rotation: int = 0, *, pngs: dict[str, bytes] | None = None, comment_shift: int = 0,
                 nonce: str | None = None) -> list[RatedImage]:
    """The 16 commented images (8 liked, 8 disliked), each user's in its own order (rotation: their prompts, contexts
    and so their outputs differ); comment_shift gives each image the comment of another of its rating; a nonce
    makes every image's bytes new."""
    pngs = pngs or PNGS
    images = []
    for rating in ("liked", "disliked"):
        names = [name for name in NAMES if name.startswith(rating)]
        for index, name in enumerate(names):
            data = with_nonce(pngs[name], f"{nonce}-{name}") if nonce else pngs[name]
            comment = COMMENTS[names[(index + comment_shift) % len(names)]]
            images.append(RatedImage(data, comment=comment, rating=rating))
    liked, disliked = images[:8], images[8:]
    return liked[rotation:] + liked[:rotation] + disliked[rotation:] + disliked[:rotation]


def queries() -> list[bytes]:
    query1, query2 = (Image.open(EXAMPLES / name).convert("RGB") for name in ("query1.png", "query2.png"))
    crops = [query1, query2, query1.crop((0, 0, 448, 200)), query2.crop((100, 0, 250, 448))]
    encoded = []
    for image in crops:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded


def together(calls: list[Callable[[], object]]) -> tuple[float, list[object]]:
    """Runs the calls at once, one thread each; returns the wall time and their results in order."""
    results: list[object] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            results[index] = calls[index]()
        except BaseException as error:  # re-raised below, in the caller's thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(calls))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started, results


def one_by_one(calls: list[Callable[[], object]]) -> tuple[float, list[object]]:
    started = time.perf_counter()
    results = [call() for call in calls]
    return time.perf_counter() - started, results


@dataclass(frozen=True)
class Throughput:
    name: str
    serial_seconds: float
    concurrent_seconds: float
    difference: str

    @property
    def speedup(self) -> float:
        return self.serial_seconds / self.concurrent_seconds

    def row(self) -> str:
        return (f"| {self.name} | {self.serial_seconds:.2f} | {self.concurrent_seconds:.2f} | {self.speedup:.2f}x "
                f"| {self.difference} |")


def compare(name: str, calls: list[Callable[[], object]], repeats: int,
            difference: Callable[[list[object], list[object]], str]) -> Throughput:
    serial_times, concurrent_times, differences = [], [], []
    for _ in range(repeats):
        serial_time, serial = one_by_one(calls)
        concurrent_time, concurrent = together(calls)
        serial_times.append(serial_time)
        concurrent_times.append(concurrent_time)
        differences.append(difference(serial, concurrent))
    return Throughput(name, statistics.median(serial_times), statistics.median(concurrent_times),
                      max(differences, key=lambda text: (text != "none", text)))


def pixel_difference(serial: list[object], concurrent: list[object]) -> str:
    worst = 0
    for ours, theirs in zip(serial, concurrent):
        for a, b in zip(ours, theirs):
            a, b = (np.asarray(Image.open(io.BytesIO(png))).astype(np.int16) for png in (a, b))
            worst = max(worst, int(np.abs(a - b).max()))
    return "none" if worst == 0 else f"{worst}/255 pixel"


def text_difference(serial: list[object], concurrent: list[object]) -> str:
    differing = sum(a != b for a, b in zip(serial, concurrent))
    return "none" if differing == 0 else f"{differing} texts differ"


def score_difference(serial: list[object], concurrent: list[object]) -> str:
    worst = max(abs(a - b) for ours, theirs in zip(serial, concurrent) for a, b in zip(ours, theirs))
    return "none" if worst == 0 else f"{worst:.1e} in score"


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


class MemoryWatch(Sampler):
    """The resident memory of a process and its descendants (preprocessing workers, say): each one's peak
    (VmHWM, read at the end) and the peak of their sum, sampled every half second while the watch runs."""

    every = 0.5

    def __init__(self, pid: int) -> None:
        super().__init__()
        self.pid = pid
        self.sampled_peak = 0

    def sample(self) -> None:
        total = sum(_status_kib(pid, "VmRSS") for pid in [self.pid, *_descendants(self.pid)])
        self.sampled_peak = max(self.sampled_peak, total * 1024)

    def figures(self) -> dict[str, float]:
        """Read while the server runs: its own peak, its children's peaks together, the sampled peak of the sum."""
        children = _descendants(self.pid)
        return {
            "server_peak_mib": _status_kib(self.pid, "VmHWM") / 1024,
            "children": len(children),
            "children_peak_mib": sum(_status_kib(pid, "VmHWM") for pid in children) / 1024,
            "sampled_total_peak_mib": self.sampled_peak / MiB,
        }


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:  # gone
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state, past the command name
            parents.setdefault(parent, []).append(int(entry.name))
    found, frontier = [], [pid]
    while frontier:
        children = parents.get(frontier.pop(), [])
        found += children
        frontier += children
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scrape(url: str) -> dict[str, float]:
    """The server's Prometheus samples; empty where it has none to give."""
    try:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
    except OSError:
        return {}
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def cache_counts(before: dict[str, float], after: dict[str, float]) -> dict[str, tuple[int, int]]:
    """(hits, misses) between two scrapes of every cache the server counts (`*_hits_total` / `*_misses_total`)."""
    counts = {}
    for name, value in after.items():
        if name.endswith("_hits_total"):
            stem = name[: -len("_hits_total")]
            misses = stem + "_misses_total"
            if misses in after:
                counts[stem.removeprefix("viper_")] = (
                    round(value - before.get(name, 0)), round(after[misses] - before.get(misses, 0)))
    return counts


def describe_caches(counts: dict[str, tuple[int, int]]) -> str:
    if not counts:
        return "none counted in the server's metrics"
    return "; ".join(f"{name} {hits} hits / {misses} misses" for name, (hits, misses) in sorted(counts.items()))


@dataclass(frozen=True)
class Latency:
    alone: list[float]
    loaded: list[float]

    def figures(self) -> dict[str, float]:
        ms = {f"{phase}_{name}_ms": value * 1e3 for phase, values in (("alone", self.alone), ("loaded", self.loaded))
              for name, value in (("p50", percentile(values, 0.5)), ("p95", percentile(values, 0.95)),
                                  ("worst", max(values)))}
        return {**ms, "p95_ratio": ms["loaded_p95_ms"] / ms["alone_p95_ms"]}


class ExtractionLoad:
    """Three clients extracting in a loop (16 images, new bytes every time) while the block runs."""

    def __init__(self, target: str, clients: int = 3) -> None:
        self.target = target
        self._done: list[int] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(number,)) for number in range(clients)]

    def _loop(self, number: int) -> None:
        with ViperClient(self.target, long_timeout=600) as client:
            while not self._stop.is_set():
                client.extract_profile(f"load-{number}", rated_images(number, nonce=uuid.uuid4().hex))
                self._done.append(1)

    @property
    def count(self) -> int:
        return len(self._done)

    def __enter__(self) -> ExtractionLoad:
        for thread in self._threads:
            thread.start()
        time.sleep(1.0)  # all of them are in their input work, prefill or decode
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def score_under_load(target: str, kinds: dict[str, list[bytes]], scores: int,
                     repeats: int) -> tuple[str, dict[str, dict[str, float]]]:
    """(a): blocks of `scores` Score calls of each kind (taking turns) alone, then under ExtractionLoad."""
    times = {kind: Latency([], []) for kind in kinds}
    first: dict[str, list[float]] = {}
    worst_difference = 0.0
    extractions = 0

    def block(phase: str) -> None:
        nonlocal worst_difference
        with ViperClient(target) as client:
            for _ in range(scores):
                for kind, query_bytes in kinds.items():
                    started = time.perf_counter()
                    result = client.score(USERS[0], query_bytes)
                    getattr(times[kind], phase).append(time.perf_counter() - started)
                    expected = first.setdefault(kind, result)
                    worst_difference = max([worst_difference, *(abs(a - b) for a, b in zip(result, expected))])

    for _ in range(repeats):
        block("alone")
        with ExtractionLoad(target) as load:
            block("loaded")
        extractions += load.count
    figures = {kind: latency.figures() for kind, latency in times.items()}
    rows = [f"| {kind} | {f['alone_p50_ms']:.0f} / {f['alone_p95_ms']:.0f} / {f['alone_worst_ms']:.0f} | "
            f"{f['loaded_p50_ms']:.0f} / {f['loaded_p95_ms']:.0f} / {f['loaded_worst_ms']:.0f} | "
            f"{f['p95_ratio']:.1f}x | {len(times[kind].alone)} + {len(times[kind].loaded)} |"
            for kind, f in figures.items()]
    table = "\n".join([
        "| Score, prefix cached | alone: p50 / p95 / worst, ms | with three extractions running, ms | p95 ratio "
        "| calls |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"{extractions} extractions ran meanwhile; largest score difference between any two calls of a kind: "
        f"{'none' if worst_difference == 0 else f'{worst_difference:.1e}'}",
    ])
    return table, figures


def warm_extraction(target: str, repeats: int, metrics_url: str) -> tuple[str, dict[str, object]]:
    """(e): per repeat, the 16 images repainted (new pixels and bytes) extracted by a first user (cold), by a
    second user with other comments (warm), then the first user's request again by a third (must give the same
    text as the first time)."""
    times: dict[str, list[float]] = {"cold": [], "warm": [], "again": []}
    identical, other_text = [], []
    before = scrape(metrics_url)
    with ViperClient(target, long_timeout=600) as client:
        for repeat in range(repeats):
            seed = random.randrange(1 << 30)
            pngs = {name: repainted(png, seed + index) for index, (name, png) in enumerate(PNGS.items())}
            texts = {}
            for run, shift in (("cold", 0), ("warm", 1), ("again", 0)):
                started = time.perf_counter()
                texts[run] = client.extract_profile(f"warm-{run}-{repeat}",
                                                    rated_images(pngs=pngs, comment_shift=shift)).raw_text
                times[run].append(time.perf_counter() - started)
            identical.append(texts["again"] == texts["cold"])
            other_text.append(texts["warm"] != texts["cold"])
    caches = cache_counts(before, scrape(metrics_url))
    cold, warm, again = (statistics.median(times[run]) for run in ("cold", "warm", "again"))
    figures = {"cold_s": cold, "warm_s": warm, "again_s": again, "speedup": cold / warm,
               "identical": all(identical), "caches": caches}
    table = "\n".join([
        "| 16 images, new bytes | s (median) |",
        "| --- | --- |",
        f"| first extraction (cold) | {cold:.3f} |",
        f"| the same bytes, another user, other comments (warm) | {warm:.3f} |",
        f"| the first request again | {again:.3f} |",
        "",
        f"warm extraction: {cold / warm:.2f}x faster than cold; the same request gave the same text: "
        f"{'yes' if all(identical) else 'NO'} ({sum(identical)}/{repeats}); other comments gave another text in "
        f"{sum(other_text)}/{repeats}; caches in (e): {describe_caches(caches)}",
    ])
    return table, figures


@dataclass
class BenchServer:
    """A bench server on the defaults (with the flags the bench was given), its metrics and memory watched."""

    process: ServerProcess
    metrics_url: str
    memory: MemoryWatch | None = None

    @classmethod
    def start(cls, args: argparse.Namespace, models_dir: Path, db: Path, new_tokens: int | None) -> BenchServer:
        flags = [*(["--device", args.device] if args.device else []),
                 *(["--vpe-max-new-tokens", str(new_tokens)] if new_tokens else [])]
        port = free_port()  # for the cache counters; the metrics port changes nothing of the serving
        env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
        process = ServerProcess(db, models_dir, *flags, "--metrics-port", str(port), *args.server_arg,
                                models=args.models, env=env)
        process.start(timeout=1800)  # full-random makes 13 B parameters on the device first
        server = cls(process, f"http://127.0.0.1:{port}/metrics")
        server.memory = MemoryWatch(process.pid).__enter__()
        return server

    def stop(self) -> dict[str, float]:
        """Stops the server; returns its memory figures (read just before)."""
        self.memory.__exit__()
        figures = self.memory.figures()
        self.process.kill()
        return figures


def describe_memory(name: str, figures: dict[str, float]) -> str:
    return (f"peak resident memory, {name}: server process {figures['server_peak_mib']:.0f} MiB (VmHWM); "
            f"{figures['children']:.0f} child processes {figures['children_peak_mib']:.0f} MiB (their VmHWM "
            f"together); the whole tree, sampled every 0.5 s: {figures['sampled_total_peak_mib']:.0f} MiB")


USERS = [f"user-{n}" for n in range(8)]  # (a) scores for the first, (b) generates for the first 4, (d) scores for all


def setup_users(target: str) -> list[bytes]:
    """The users' profiles, extracted at once; their Score prefixes cached. Returns the 4 queries."""
    query_bytes = queries()

    def extract(number: int) -> Callable[[], object]:
        def call() -> object:
            with ViperClient(target, long_timeout=3600) as client:
                return client.extract_profile(USERS[number], rated_images(number))
        return call

    together([extract(number) for number in range(len(USERS))])
    with ViperClient(target, long_timeout=3600) as client:
        for user in USERS:
            client.score(user, query_bytes)  # the prefixes are cached from here on
    return query_bytes


def throughputs(args: argparse.Namespace, target: str, query_bytes: list[bytes]) -> list[Throughput]:
    """(b), (c) and (d)."""
    def generate(number: int) -> Callable[[], list[bytes]]:
        def call() -> list[bytes]:
            with ViperClient(target, long_timeout=600) as own:
                return [event.png for event in own.generate(
                    USERS[number], "a castle by the sea", width=args.size, height=args.size,
                    steps=args.steps, seed=100 + number) if isinstance(event, GeneratedImage)]
        return call

    def extract(number: int) -> Callable[[], str]:
        def call() -> str:
            with ViperClient(target, long_timeout=600) as own:
                return own.extract_profile(f"extract-{number}", rated_images(number, nonce=uuid.uuid4().hex)).raw_text
        return call

    def score(number: int) -> Callable[[], list[float]]:
        def call() -> list[float]:
            with ViperClient(target) as own:
                return own.score(USERS[number], query_bytes)
        return call

    return [
        compare(f"(b) 4 Generate, {args.size} px, {args.steps} steps", [generate(n) for n in range(4)],
                args.repeats, pixel_difference),
        compare(f"(c) 4 ExtractProfile, 16 images (new bytes), {args.new_tokens} tokens",
                [extract(n) for n in range(4)], args.repeats, text_difference),
        compare("(d) 8 users' Score, the same 4 queries", [score(n) for n in range(8)], args.repeats,
                score_difference),
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="serial / concurrent pairs per comparison")
    parser.add_argument("--scores", type=int, default=30, help="Score calls of each kind per block in (a)")
    parser.add_argument("--warm-repeats", type=int, default=7,
                        help="cold / warm / again rounds in (e) (a round takes about a second on the tiny models; "
                             "the warm request's other comments give another text, of another length: its time "
                             "varies more than the others')")
    parser.add_argument("--size", type=int, default=64, help="generated width and height")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per image (base + refiner)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in the server (OMP_NUM_THREADS; default: the server's own)")
    parser.add_argument("--new-tokens", type=int, default=400,
                        help="tokens the extractions of (a)-(d) generate (the server's --vpe-max-new-tokens)")
    parser.add_argument("--warm-new-tokens", type=int, default=None,
                        help="tokens the extractions of (e) generate (default: the preset's, 64 on tiny, on a "
                             "server of their own; equal to --new-tokens: on the same server)")
    parser.add_argument("--models", choices=("tiny", "full-random"), default="tiny",
                        help="tiny (built here) or full-random (the real architectures, random weights: for a GPU)")
    parser.add_argument("--device", default=None, help="the server's --device (default: the server's, auto)")
    parser.add_argument("--models-dir", type=Path,
                        help="with --models tiny: tiny models already built there, or built there once "
                             "(default: built in a temp folder, removed after)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="an extra viper-server flag, e.g. --server-arg=--scheduling-policy=fifo")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    return parser.parse_args()


class Clock:
    """Seconds each part of the bench took (for sizing its settings, on a GPU host say)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        self.seconds[part] = self.seconds.get(part, 0.0) + now - self._last
        self._last = now


def main() -> None:
    args = parse_args()
    figures: dict[str, object] = {"settings": {key: str(value) for key, value in vars(args).items()}}
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        models_dir = ensure_tiny_models(args.models_dir or Path(tmp) / "models") if args.models == "tiny" else Path(tmp)
        print(f"{args.models} models, one server process on its defaults (torch threads: "
              f"{args.threads or 'the server default'}; flags: {' '.join(args.server_arg) or 'none'}"
              f"{'; device ' + args.device if args.device else ''}), {args.repeats} repeats, {args.new_tokens} new "
              f"tokens per extraction, {os.cpu_count()} cores", flush=True)
        server = BenchServer.start(args, models_dir, Path(tmp) / "profiles.db", args.new_tokens)
        clock.lap("server start")
        same_server = args.warm_new_tokens == args.new_tokens
        try:
            query_bytes = setup_users(server.process.target)
            clock.lap("profiles")
            table, figures["score_under_load"] = score_under_load(
                server.process.target, {"1 query": query_bytes[:1], "4 queries": query_bytes}, args.scores,
                args.repeats)
            clock.lap("(a)")
            print("\n(a) Score latency\n\n" + table, flush=True)
            rows = throughputs(args, server.process.target, query_bytes)
            clock.lap("(b)-(d)")
            if same_server:
                warm_table, figures["warm_extraction"] = warm_extraction(server.process.target, args.warm_repeats,
                                                                         server.metrics_url)
                clock.lap("(e)")
        finally:
            figures["memory"] = {"main": server.stop()}
        if not same_server:  # (e) on a server of its own, with its own token budget
            clock.lap("server stop")
            warm_server = BenchServer.start(args, models_dir, Path(tmp) / "warm.db", args.warm_new_tokens)
            clock.lap("server start")
            try:
                warm_table, figures["warm_extraction"] = warm_extraction(warm_server.process.target,
                                                                         args.warm_repeats, warm_server.metrics_url)
                clock.lap("(e)")
            finally:
                figures["memory"]["warm"] = warm_server.stop()
    figures["seconds"] = clock.seconds
    report(args, rows, warm_table, figures)


def report(args: argparse.Namespace, rows: list[Throughput], warm_table: str, figures: dict[str, object]) -> None:
    print("\n| requests | one after another, s | at once, s | throughput | largest output difference |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(row.row())
    tokens = args.warm_new_tokens or "the preset's"
    print(f"\n(e) Warm extraction ({tokens} new tokens, nothing else running)\n\n{warm_table}\n")
    for name, memory in figures["memory"].items():
        print(describe_memory({"main": "server of (a)-(d)", "warm": "server of (e)"}[name], memory))
    print("seconds per part: " + ", ".join(f"{part} {seconds:.0f}" for part, seconds in figures["seconds"].items()))
    generate_x, extract_x, score_x = (row.speedup for row in rows)
    under_load = figures["score_under_load"]["1 query"]["p95_ratio"]
    warm_x = figures["warm_extraction"]["speedup"]
    figures["throughput"] = {row.name: {"serial_s": row.serial_seconds, "concurrent_s": row.concurrent_seconds,
                                        "speedup": row.speedup, "difference": row.difference} for row in rows}
    figures["last_line"] = (f"concurrency: score-under-load {under_load:.1f}x, generate {generate_x:.2f}x, "
                            f"extract {extract_x:.2f}x, score {score_x:.2f}x, warm-extract {warm_x:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    print("\n" + figures["last_line"])


if __name__ == "__main__":
    main()
