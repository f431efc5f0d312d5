"""Bounded steps and the vision cache, side by side in one run (issue 19, items 2 and 3).

Servers on the tiny models, each on the server's defaults but for the flags compared (`--bound IMAGES:TOKENS`
sets --prefill-images and --prefill-tokens; 16:100000 is no bound: a whole metric context, a whole query batch
in one step). All are started at once and measured in turns, so the machine's noise falls on all alike:
  (a) a 1-query Score (the user's prefix cached) alone, then while three users extract in a loop (16 images,
      --new-tokens tokens); each extraction's images are new bytes (a new sha256, their features computed):
      the worst case for the bound;
  (e) the same 16 images extracted the first time (new bytes: features computed) and then by another user with
      other comments (features cached), and the first request sent again (the same text must come back).
The last line is `bounded-steps: score-under-load A.Ax (bound) vs B.Bx (none), warm-extract N.NNx`.

    .venv/bin/python bench/bounded_steps.py [--bound 1:256 --bound 16:100000] [--rounds 3] [--scores 20]
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image

from viper_client import RatedImage, ViperClient
from viper_server.models.tiny import ensure_tiny_models
from viper_server.testing import ServerProcess

EXAMPLES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "viper_examples"


def rated_images(rotation: int = 0) -> list[RatedImage]:
    """The 16 commented fixture images (8 liked, 8 disliked), each user's in its own order."""
    comments = json.loads((EXAMPLES / "comments.json").read_text())
    images = [RatedImage(EXAMPLES / name, comment=comments[name], rating=name.split("/")[0])
              for rating in ("liked", "disliked") for name in sorted(c for c in comments if c.startswith(rating))]
    liked, disliked = images[:8], images[8:]
    return liked[rotation:] + liked[:rotation] + disliked[rotation:] + disliked[:rotation]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def fresh(images: list[RatedImage], tag: int) -> list[RatedImage]:
    """The same pictures as new bytes (one pixel changed): a new sha256 each, so nothing of them is cached."""
    out = []
    for image in images:
        picture = Image.open(image.image).convert("RGB")
        picture.putpixel((0, 0), (tag % 256, (tag // 256) % 256, 7))
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        out.append(RatedImage(buffer.getvalue(), comment=image.comment, rating=image.rating))
    return out


def score_latency(target: str, query: bytes, calls: int) -> list[float]:
    times = []
    with ViperClient(target) as client:
        for _ in range(calls):
            started = time.perf_counter()
            client.score("scorer", [query])
            times.append(time.perf_counter() - started)
    return times


def under_load(target: str, query: bytes, calls: int, tags: itertools.count) -> list[float]:
    """Score latencies while three users extract new images in a loop."""
    stop = threading.Event()
    running = threading.Barrier(4)

    def extract_loop(number: int) -> None:
        with ViperClient(target, long_timeout=600) as client:
            running.wait()
            while not stop.is_set():
                client.extract_profile(f"load-{number}", fresh(rated_images(number), next(tags)))

    loops = [threading.Thread(target=extract_loop, args=(number,)) for number in range(3)]
    for loop in loops:
        loop.start()
    running.wait()
    time.sleep(1.0)  # all three are under way
    try:
        return score_latency(target, query, calls)
    finally:
        stop.set()
        for loop in loops:
            loop.join()


def warm_vs_cold(target: str, tag: int) -> tuple[float, float, bool]:
    """(cold s, warm s, the first request's text came back the same)."""
    images = fresh(rated_images(0), tag)
    others = [RatedImage(image.image, comment=f"{image.comment} Seen by someone else.", rating=image.rating)
              for image in images]
    with ViperClient(target, long_timeout=600) as client:
        started = time.perf_counter()
        first = client.extract_profile(f"cold-{tag}", images).raw_text
        cold = time.perf_counter() - started
        started = time.perf_counter()
        client.extract_profile(f"warm-{tag}", others)
        warm = time.perf_counter() - started
        again = client.extract_profile(f"cold-{tag}", images).raw_text
    return cold, warm, again == first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bound", action="append", help="IMAGES:TOKENS per step (default: 1:256 and 16:100000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scores", type=int, default=20, help="Score calls per block")
    parser.add_argument("--new-tokens", type=int, default=400, help="tokens each loading extraction generates")
    parser.add_argument("--models-dir", type=Path)
    args = parser.parse_args()
    bounds = args.bound or ["1:256", "16:100000"]
    query = (EXAMPLES / "query1.png").read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        models = ensure_tiny_models(args.models_dir or Path(tmp) / "models")
        servers = {}
        for bound in bounds:
            images, tokens = bound.split(":")
            servers[bound] = ServerProcess(Path(tmp) / f"{images}-{tokens}.db", models, "--prefill-images", images,
                                           "--prefill-tokens", tokens, "--vpe-max-new-tokens", str(args.new_tokens))
        try:
            for server in servers.values():
                server.start()
                with ViperClient(server.target, long_timeout=600) as client:
                    client.extract_profile("scorer", rated_images(0))
                    client.score("scorer", [query])  # the prefix and the query's features cached
            alone = {bound: [] for bound in bounds}
            loaded = {bound: [] for bound in bounds}
            tags = itertools.count(1000)
            for _ in range(args.rounds):
                for bound, server in servers.items():
                    alone[bound] += score_latency(server.target, query, args.scores)
                    loaded[bound] += under_load(server.target, query, args.scores, tags)
                    print(f"# {bound}: p95 alone {percentile(alone[bound], 0.95) * 1e3:.0f} ms, loaded "
                          f"{percentile(loaded[bound], 0.95) * 1e3:.0f} ms so far", flush=True)
            first = servers[bounds[0]]
            ratios = []
            same = True
            for _ in range(args.rounds):
                cold, warm, equal = warm_vs_cold(first.target, next(tags))
                ratios.append(cold / warm)
                print(f"# cold {cold:.2f} s, warm {warm:.2f} s, same text: {equal}", flush=True)
                same = same and equal
        finally:
            for server in servers.values():
                server.kill()
    print("| --prefill-images:--prefill-tokens | 1-query Score p50 / p95 alone, ms | p50 / p95 with three "
          f"{args.new_tokens}-token extractions of new images, ms | p95 ratio |")
    print("| --- | --- | --- | --- |")
    factors = {}
    for bound in bounds:
        a50, a95, l50, l95 = (percentile(values, share) * 1e3 for values, share in
                              ((alone[bound], 0.5), (alone[bound], 0.95), (loaded[bound], 0.5), (loaded[bound], 0.95)))
        factors[bound] = l95 / a95
        print(f"| {bound} | {a50:.0f} / {a95:.0f} | {l50:.0f} / {l95:.0f} | {factors[bound]:.1f}x |")
    warm_x = statistics.median(ratios)
    print(f"\n(e) the 16 images extracted cold, then warm by another user (server {bounds[0]}): "
          f"{warm_x:.2f}x faster (rounds: {', '.join(f'{r:.2f}' for r in ratios)}); "
          f"the same request gave the same text: {same}")
    rest = ", ".join(f"{factors[bound]:.1f}x ({bound})" for bound in bounds)
    print(f"\nbounded-steps: score-under-load {rest}, warm-extract {warm_x:.2f}x")


if __name__ == "__main__":
    main()
