"""Concurrency benchmark: the step schedulers and continuous batching, end to end through gRPC.

One server process on the tiny models; each comparison side by side in one run, the two ways interleaved:
  (a) Score latency (one user, 4 queries, prefix cached) alone vs with three extractions running all along
      (16 commented images each);
  (b) four Generate calls (one image each) at once vs the same four one after another (throughput);
  (c) four extractions at once vs one after another;
  (d) eight users' Score calls (4 queries each) at once vs one after another.
Each reports the largest difference between the outputs of the concurrent and the serial run (which must
be equal: batching changes no result). The last line is
`concurrency: score-under-load N.Nx, generate N.NNx, extract N.NNx, score N.NNx`: the Score p95 under load
over its p95 alone (lower is better), then the throughput of each concurrent run over the serial one.

    nice -n 10 .venv/bin/python bench/concurrency.py [--repeats 3] [--scores 30] [--threads 1] [--new-tokens N]

At real scale on a GPU host (random weights, nothing downloaded; see README "Real scale without weights"):

    python bench/concurrency.py --models full-random --device cuda --size 1024 --steps 40 --new-tokens 2000
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from viper_client import GeneratedImage, RatedImage, ViperClient
from viper_server.models.tiny import ensure_tiny_models
from viper_server.testing import ServerProcess

EXAMPLES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "viper_examples"


def rated_images(rotation: int = 0) -> list[RatedImage]:
    """The 16 commented fixture images (8 liked, 8 disliked), each user's in its own order: their prompts,
    contexts and so their outputs differ."""
    comments = json.loads((EXAMPLES / "comments.json").read_text())
    images = [RatedImage(EXAMPLES / name, comment=comments[name], rating=name.split("/")[0])
              for rating in ("liked", "disliked") for name in sorted(c for c in comments if c.startswith(rating))]
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

    def run(index: int) -> None:
        results[index] = calls[index]()

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(calls))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
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


def score_under_load(target: str, query_bytes: list[bytes], scores: int, repeats: int) -> tuple[str, float]:
    """(a): blocks of `scores` Score calls alone, then with three extractions looping, interleaved."""
    alone: list[float] = []
    loaded: list[float] = []
    results: dict[str, list[float]] = {}

    def measure(into: list[float], key: str) -> None:
        with ViperClient(target) as client:
            for _ in range(scores):
                started = time.perf_counter()
                result = client.score("scorer", query_bytes)
                into.append(time.perf_counter() - started)
                results.setdefault(key, result)
                if result != results[key]:
                    results[key + " changed"] = result

    extractions = 0
    for _ in range(repeats):
        measure(alone, "alone")
        stop = threading.Event()
        counted = []

        def extract_loop(number: int, stop: threading.Event = stop, counted: list = counted) -> None:
            with ViperClient(target, long_timeout=600) as client:
                while not stop.is_set():
                    client.extract_profile(f"load-{number}", rated_images(number))
                    counted.append(1)

        loops = [threading.Thread(target=extract_loop, args=(number,)) for number in range(3)]
        for loop in loops:
            loop.start()
        time.sleep(1.0)  # all three are prefilling or decoding
        measure(loaded, "loaded")
        stop.set()
        for loop in loops:
            loop.join()
        extractions += len(counted)
    worst = max(abs(a - b) for a, b in zip(results["alone"], results["loaded"]))
    changed = any(key.endswith("changed") for key in results)
    p50a, p95a, p50l, p95l = (percentile(values, share) * 1e3 for values, share in
                              ((alone, 0.5), (alone, 0.95), (loaded, 0.5), (loaded, 0.95)))
    table = "\n".join([
        "| Score (4 queries, prefix cached) | p50 ms | p95 ms | calls |",
        "| --- | --- | --- | --- |",
        f"| alone | {p50a:.0f} | {p95a:.0f} | {len(alone)} |",
        f"| with three extractions running | {p50l:.0f} | {p95l:.0f} | {len(loaded)} |",
        "",
        f"p95 under load / alone: {p95l / p95a:.2f}x; {extractions} extractions ran meanwhile; largest score "
        f"difference: {'none' if worst == 0 and not changed else f'{worst:.1e}'}",
    ])
    return table, p95l / p95a


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="serial / concurrent pairs per comparison")
    parser.add_argument("--scores", type=int, default=30, help="Score calls per block in (a)")
    parser.add_argument("--size", type=int, default=64, help="generated width and height")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per image (base + refiner)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the server (the cores are shared)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="tokens an extraction generates (default: the tiny preset's 64; real VPE: up to 2000)")
    parser.add_argument("--models", choices=("tiny", "full-random"), default="tiny",
                        help="tiny (built here) or full-random (the real architectures, random weights: for a GPU)")
    parser.add_argument("--device", default="auto", help="the server's --device")
    parser.add_argument("--models-dir", type=Path,
                        help="with --models tiny: tiny models already built there, or built there once "
                             "(default: built in a temp folder, removed after)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="an extra viper-server flag, e.g. --server-arg=--scheduling-policy=fifo")
    args = parser.parse_args()

    query_bytes = queries()
    with tempfile.TemporaryDirectory() as tmp:
        models_dir = ensure_tiny_models(args.models_dir or Path(tmp) / "models") if args.models == "tiny" else Path(tmp)
        tokens = ["--vpe-max-new-tokens", str(args.new_tokens)] if args.new_tokens else []
        server = ServerProcess(Path(tmp) / "profiles.db", models_dir, "--device", args.device, *tokens,
                               *args.server_arg, models=args.models, env={"OMP_NUM_THREADS": str(args.threads)})
        server.start(timeout=1800)  # full-random makes 13 B parameters on the device first
        with server, ViperClient(server.target, long_timeout=3600) as client:
            print(f"{args.models} models, one server process, {args.threads} torch thread(s), {args.repeats} repeats, "
                  f"{args.new_tokens or 64} new tokens per extraction, server flags: "
                  f"{' '.join(args.server_arg) or 'defaults'}")
            users = ["scorer", *(f"gen-{n}" for n in range(4)), *(f"score-{n}" for n in range(8))]
            for number, user in enumerate(users):
                client.extract_profile(user, rated_images(number % 8))
            for user in ["scorer", *(f"score-{n}" for n in range(8))]:
                client.score(user, query_bytes)  # the prefixes are cached from here on

            table, under_load = score_under_load(server.target, query_bytes, args.scores, args.repeats)
            print("\n(a) Score latency\n\n" + table)

            def generate(number: int) -> Callable[[], list[bytes]]:
                def call() -> list[bytes]:
                    with ViperClient(server.target, long_timeout=600) as own:
                        return [event.png for event in own.generate(
                            f"gen-{number}", "a castle by the sea", width=args.size, height=args.size,
                            steps=args.steps, seed=100 + number) if isinstance(event, GeneratedImage)]
                return call

            def extract(number: int) -> Callable[[], str]:
                def call() -> str:
                    with ViperClient(server.target, long_timeout=600) as own:
                        return own.extract_profile(f"extract-{number}", rated_images(number)).raw_text
                return call

            def score(number: int) -> Callable[[], list[float]]:
                def call() -> list[float]:
                    with ViperClient(server.target) as own:
                        return own.score(f"score-{number}", query_bytes)
                return call

            rows = [
                compare(f"(b) 4 Generate, {args.size} px, {args.steps} steps", [generate(n) for n in range(4)],
                        args.repeats, pixel_difference),
                compare(f"(c) 4 ExtractProfile, 16 images, {args.new_tokens or 64} tokens",
                        [extract(n) for n in range(4)], args.repeats,
                        text_difference),
                compare("(d) 8 users' Score, 4 queries", [score(n) for n in range(8)], args.repeats,
                        score_difference),
            ]
        print("\n| requests | one after another, s | at once, s | throughput | largest output difference |")
        print("| --- | --- | --- | --- | --- |")
        for row in rows:
            print(row.row())
        generate_x, extract_x, score_x = (row.speedup for row in rows)
        print(f"\nconcurrency: score-under-load {under_load:.1f}x, generate {generate_x:.2f}x, "
              f"extract {extract_x:.2f}x, score {score_x:.2f}x")


if __name__ == "__main__":
    main()
