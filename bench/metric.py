"""Proxy-metric benchmark on the tiny IDEFICS2: the reference procedure vs the prefix-cached, batched path.

One user (the 8 + 8 fixture images as context), 16 queries (`--queries`: fewer). In process: the reference
procedure, the cached path with the prefix computed in the call (cold) and already cached (warm), and the query
steps of 8 users (8 prefixes, each user's first batch of queries) one user a step vs all in one. End to end: the
same Score request through the client SDK to two real server processes, one with `--metric-cache off` (the
reference procedure) and one with the cache on, interleaved. The last line printed is `speedup: N.NNx`:
reference / cached time per query end to end, in the steady state (the user's prefix cached).

    .venv/bin/python bench/metric.py [--batch-size 4] [--threads 1] [--repeats 3] [--queries 16]

At real scale on a GPU host (`make bench-gpu` runs it so, through bench/gpu.py): IDEFICS2-8b with random weights
and adapters (`--models full-random`, models.full_random), in process and in the servers (one at a time).

    python bench/metric.py --models full-random --device cuda --threads 0 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from flags import add_model_flags, threads_env
from PIL import Image

from viper_client import RatedImage, ViperClient
from viper_client.images import encode_image
from viper_server.models.full_random import FULL, build_idefics2
from viper_server.models.idefics2 import Idefics2Base, load_idefics2
from viper_server.models.metric import MetricScorer, ScoringContext, reference_scores
from viper_server.models.tiny import ensure_tiny_models
from viper_server.models.vision import VisionCache
from viper_server.pixels import ProcessedImage, processed
from viper_server.testing import ServerProcess

EXAMPLES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "viper_examples"
QUERY_COUNT = 16


@dataclass(frozen=True)
class Measurement:
    name: str
    seconds_per_query: float
    scores: list[float]


def timed(name: str, queries: Sequence[Image.Image], score: Callable[[], list[float]]) -> Measurement:
    start = time.perf_counter()
    scores = score()
    return Measurement(name, (time.perf_counter() - start) / len(queries), scores)


def load_examples(query_count: int = QUERY_COUNT) -> tuple[ScoringContext, list[Image.Image]]:
    def open_rgb(name: str) -> Image.Image:
        return Image.open(EXAMPLES / name).convert("RGB")

    liked = [open_rgb(f"liked/{i}.png") for i in range(8)]
    disliked = [open_rgb(f"disliked/{i}.png") for i in range(8)]
    query1, query2 = open_rgb("query1.png"), open_rgb("query2.png")
    # Fixture queries, their crops at other aspect ratios and the context images themselves.
    queries = [query1, query2, query1.crop((0, 0, 448, 224)), query2.crop((0, 0, 224, 448)), *liked[:6], *disliked[:6]]
    return ScoringContext(liked=liked, disliked=disliked, cache_key=("bench-user", 1)), queries[:query_count]


def load_runtime(models: str, models_dir: Path, device: str) -> Idefics2Base:
    """The tiny checkpoints, or IDEFICS2-8b's architecture with random weights (bfloat16 on CUDA, as the server)."""
    if models == "full-random":
        return build_idefics2(FULL, device, torch.bfloat16 if device.startswith("cuda") else torch.float32)
    adapters = {"vpe": str(models_dir / "vpe-lora"), "metric": str(models_dir / "metric-lora")}
    return load_idefics2(str(models_dir / "idefics2"), adapters, device=device)


def measure_reference(runtime: Idefics2Base, context: ScoringContext, queries: list[Image.Image]) -> Measurement:
    return timed(
        "reference procedure (whole prompt per query)",
        queries,
        lambda: reference_scores(runtime, context.liked, context.disliked, queries),
    )


def measure_cached(scorer: MetricScorer, context: ScoringContext, queries: list[Image.Image]) -> Measurement:
    warm = scorer.cache_stats.entries > 0
    name = f"prefix cache, batch {scorer.batch_size}, " + ("warm" if warm else "cold (prefix computed in the call)")
    return timed(name, queries, lambda: scorer.score(context, queries))


def measure_users(runtime: Idefics2Base, context: ScoringContext, queries: list[Image.Image], batch_size: int,
                  users: int = 8, repeats: int = 5) -> tuple[float, float]:
    """Query steps of `users` users (the context's images rotated: a prefix each, cached first), the same first
    batch of queries each, their features cached as a server's vision cache keeps them: seconds for one user a
    step, all of them in turn, and for all in one step (medians)."""
    scorer = MetricScorer(runtime, batch_size=batch_size, vision_cache=VisionCache(1 << 30))
    contexts = [ScoringContext(liked=context.liked[n:] + context.liked[:n],
                               disliked=context.disliked[n:] + context.disliked[:n], cache_key=(f"user-{n}", "bench"))
                for n in range(users)]
    batch = [ProcessedImage(processed(query).values, sha256=f"query-{n}")
             for n, query in enumerate(queries[:batch_size])]
    for user_context in contexts:
        scorer.score(user_context, batch)  # caches the prefix (and the queries' features, once)

    def scorings() -> list:
        prepared = [scorer.prepare(user_context, batch) for user_context in contexts]
        assert all(scorer.take_cached_prefix(scoring) for scoring in prepared)
        return prepared

    one_a_step, together = [], []
    for _ in range(repeats):
        prepared = scorings()
        start = time.perf_counter()
        for scoring in prepared:
            scorer.query_step([scoring])
        one_a_step.append(time.perf_counter() - start)
        prepared = scorings()
        start = time.perf_counter()
        scorer.query_step(prepared)
        together.append(time.perf_counter() - start)
    return statistics.median(one_a_step), statistics.median(together)


def measure_grpc(name: str, target: str, queries: list[bytes], repeats: int) -> Measurement:
    """Median over repeats of one Score call for all queries, after a warm-up call."""
    with ViperClient(target) as client:
        client.score("bench-user", queries)
        times, scores = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            scores = client.score("bench-user", queries)
            times.append(time.perf_counter() - started)
    return Measurement(name, statistics.median(times) / len(queries), scores)


def start_server(args: argparse.Namespace, models_dir: Path, db_path: Path, *flags: str) -> ServerProcess:
    """A started server process with the bench user's profile extracted from the fixture images."""
    env = threads_env(args.threads)
    server = ServerProcess(db_path, models_dir, "--device", args.device, *flags, models=args.models, env=env)
    server.start(timeout=1800)
    comments = json.loads((EXAMPLES / "comments.json").read_text())
    images = [RatedImage(EXAMPLES / key, comment=comment, rating=key.split("/")[0])
              for key, comment in comments.items() if "/" in key]
    with ViperClient(server.target, long_timeout=3600) as client:
        client.extract_profile("bench-user", images)
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4)
    add_model_flags(parser)
    parser.add_argument("--repeats", type=int, default=3, help="end-to-end calls timed per server")
    parser.add_argument("--queries", type=int, default=QUERY_COUNT, choices=range(1, QUERY_COUNT + 1),
                        metavar=f"1..{QUERY_COUNT}", help=f"images scored per call (default {QUERY_COUNT})")
    parser.add_argument("--server-tokens", type=int, default=None,
                        help="the servers' --vpe-max-new-tokens for the bench user's extraction (default: the "
                             "preset's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, tmp: Path) -> None:
    """The bench, with every file in tmp; the servers it starts are stopped before it returns."""
    context, queries = load_examples(args.queries)
    models_dir = ensure_tiny_models(args.models_dir or tmp / "tiny-models") if args.models == "tiny" else tmp
    runtime = load_runtime(args.models, models_dir, args.device)
    scorer = MetricScorer(runtime, batch_size=args.batch_size)
    reference = measure_reference(runtime, context, queries)
    cold = measure_cached(scorer, context, queries)
    warm = measure_cached(scorer, context, queries)

    print(f"{args.models} IDEFICS2 on {args.device}: {len(queries)} queries, one user with {len(context.liked)} liked "
          f"+ {len(context.disliked)} disliked images")
    for measurement in (reference, cold, warm):
        print(f"{measurement.name}: {measurement.seconds_per_query * 1e3:.1f} ms/query")
    for measurement in (cold, warm):
        difference = max(abs(a - b) for a, b in zip(measurement.scores, reference.scores))
        print(f"max |score difference|, {measurement.name} vs reference: {difference:.1e}")
    print(f"in process: cold-cache speedup {reference.seconds_per_query / cold.seconds_per_query:.2f}x, "
          f"warm {reference.seconds_per_query / warm.seconds_per_query:.2f}x")
    one_a_step, together = measure_users(runtime, context, queries, args.batch_size)
    print(f"query steps of 8 users ({scorer.batch_size} queries each, prefixes cached): one user a step "
          f"{one_a_step * 1e3:.1f} ms in all, the 8 in one step {together * 1e3:.1f} ms: "
          f"{one_a_step / together:.2f}x")

    del runtime, scorer  # the servers hold their own copies (one at a time: on a GPU, memory is what limits)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    query_bytes = [encode_image(query) for query in queries]
    flags = ("--metric-batch-size", str(args.batch_size),
             *(("--vpe-max-new-tokens", str(args.server_tokens)) if args.server_tokens else ()))
    with start_server(args, models_dir, tmp / "reference.db", "--metric-cache", "off", *flags) as reference_server:
        grpc_reference = measure_grpc("gRPC, server with --metric-cache off", reference_server.target, query_bytes,
                                      args.repeats)
    with start_server(args, models_dir, tmp / "cached.db", *flags) as cached_server:
        grpc_cached = measure_grpc("gRPC, server with the prefix cache", cached_server.target, query_bytes,
                                   args.repeats)
    for measurement in (grpc_reference, grpc_cached):
        print(f"{measurement.name}: {measurement.seconds_per_query * 1e3:.1f} ms/query")
    print(f"gRPC / in process (cached, warm): {grpc_cached.seconds_per_query / warm.seconds_per_query:.2f}")
    difference = max(abs(a - b) for a, b in zip(grpc_cached.scores, grpc_reference.scores))
    print(f"max |score difference| end to end, cached vs reference: {difference:.1e}")
    print(f"speedup: {grpc_reference.seconds_per_query / grpc_cached.seconds_per_query:.2f}x")


if __name__ == "__main__":
    main()
