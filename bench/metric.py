"""Proxy-metric benchmark on the tiny IDEFICS2: the reference procedure vs the prefix-cached, batched path.

One user (the 8 + 8 fixture images as context), 16 queries. Each measurement is a function returning a
Measurement, so further ones (e.g. end to end through gRPC) can be added to main() beside them.
The last line printed is `speedup: N.NNx`: reference / cached time per query with the user's prefix
already cached (the steady state); the cold-cache figure, prefix computed inside the call, precedes it.

    .venv/bin/python bench/metric.py [--batch-size 4] [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from viper_server.models.idefics2 import Idefics2Runtime, load_idefics2
from viper_server.models.metric import MetricScorer, ScoringContext, reference_scores
from viper_server.models.tiny_idefics2 import build_tiny_idefics2

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


def load_examples() -> tuple[ScoringContext, list[Image.Image]]:
    def open_rgb(name: str) -> Image.Image:
        return Image.open(EXAMPLES / name).convert("RGB")

    liked = [open_rgb(f"liked/{i}.png") for i in range(8)]
    disliked = [open_rgb(f"disliked/{i}.png") for i in range(8)]
    query1, query2 = open_rgb("query1.png"), open_rgb("query2.png")
    # Fixture queries, their crops at other aspect ratios and the context images themselves.
    queries = [query1, query2, query1.crop((0, 0, 448, 224)), query2.crop((0, 0, 224, 448)), *liked[:6], *disliked[:6]]
    return ScoringContext(liked=liked, disliked=disliked, cache_key=("bench-user", 1)), queries[:QUERY_COUNT]


def load_tiny_runtime(models_dir: Path) -> Idefics2Runtime:
    build_tiny_idefics2(models_dir)
    adapters = {"vpe": str(models_dir / "vpe-lora"), "metric": str(models_dir / "metric-lora")}
    return load_idefics2(str(models_dir / "idefics2"), adapters)


def measure_reference(runtime: Idefics2Runtime, context: ScoringContext, queries: list[Image.Image]) -> Measurement:
    return timed(
        "reference procedure (whole prompt per query)",
        queries,
        lambda: reference_scores(runtime, context.liked, context.disliked, queries),
    )


def measure_cached(scorer: MetricScorer, context: ScoringContext, queries: list[Image.Image]) -> Measurement:
    warm = scorer.cache_stats.entries > 0
    name = f"prefix cache, batch {scorer.batch_size}, " + ("warm" if warm else "cold (prefix computed in the call)")
    return timed(name, queries, lambda: scorer.score(context, queries))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    context, queries = load_examples()
    with tempfile.TemporaryDirectory() as models_dir:
        runtime = load_tiny_runtime(Path(models_dir))
    scorer = MetricScorer(runtime, batch_size=args.batch_size)
    reference = measure_reference(runtime, context, queries)
    cold = measure_cached(scorer, context, queries)
    warm = measure_cached(scorer, context, queries)

    print(f"{len(queries)} queries, one user with {len(context.liked)} liked + {len(context.disliked)} disliked images")
    for measurement in (reference, cold, warm):
        print(f"{measurement.name}: {measurement.seconds_per_query * 1e3:.1f} ms/query")
    for measurement in (cold, warm):
        difference = max(abs(a - b) for a, b in zip(measurement.scores, reference.scores))
        print(f"max |score difference|, {measurement.name} vs reference: {difference:.1e}")
    print(f"cold-cache speedup: {reference.seconds_per_query / cold.seconds_per_query:.2f}x")
    print(f"speedup: {reference.seconds_per_query / warm.seconds_per_query:.2f}x")


if __name__ == "__main__":
    main()
