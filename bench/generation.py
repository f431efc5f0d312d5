"""Personalized generation benchmark on the tiny SDXL checkpoints (built into a temporary folder).

Model section: the straightforward reference procedure (testing.reference_guidance: two UNet calls
per base step) against the production path (models.generation: the stock pipelines' loop written out in
steps, both evaluations as one batch-4 UNet call), same params and seeds, runs interleaved.
gRPC section: the same request through a real server process and the client SDK against the
production path in process, interleaved. The last line is `speedup: N.NNx` (reference time per image /
production time per image, in process; not printed with `--only best-of`).
Best-of-N section (issue 21), on the toy models through a server (--generate-batch 4): the time of
num_images=1 with 4 candidates against num_images=4 without ranking (the candidates are made as those 4 are),
and against 4 one-image requests at once (batched: what the candidates would take as requests of their own,
which would make them other images than a Generate's), interleaved; then, on the 20 held-out toy users,
`--repeats` cases each (10 steps), at the default preference strength and at 0 (where the ranking alone
personalizes): the cases' seeds are 1, 5, 9, ... so that no two cases share a candidate; how often the pick is
at least as close to the liked colour (the share of its coloured pixels nearest that colour) as the median
candidate, overall and by how far apart the metric scores the candidates (below 1e-4, the tolerance Score's
equality is promised within, it cannot tell them apart), whether the pick is Score's argmax over a plain
Generate of the 4, and the mean metric score of the pick against a random candidate.

    .venv/bin/python bench/generation.py [--size 64] [--steps 40] [--images 2] [--repeats 5] [--users 20]
                                         [--only best-of]

At real scale on a GPU host (`make bench-gpu` runs it so, through bench/gpu.py): SDXL base + refiner at full size
with random weights (`--models full-random`, models.full_random), in process and in the server; best of N, a
figure of the toy models, is left out then.

    python bench/generation.py --models full-random --device cuda --size 1024 --steps 20 --images 1 --repeats 2
"""

from __future__ import annotations

import argparse
import functools
import io
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from flags import add_model_flags, threads_env
from PIL import Image

from viper_client import RatedImage, ViperClient
from viper_client.types import GeneratedImage
from viper_server.domain import FinishedImage, GenerationParams
from viper_server.models.full_random import FULL, build_sdxl
from viper_server.models.generation import PersonalizedGenerator
from viper_server.models.sdxl import SdxlPipelines, load_sdxl
from viper_server.models.tiny import ensure_tiny_models
from viper_server.testing import ServerProcess
from viper_server.testing.reference_guidance import reference_generate
from viper_server.toy import ensure_toy_models, evaluate

# Like what the VPE extracts for a user with strong tastes (each list within CLIP's 77 tokens).
LIKED = (
    "soft pastel colors, warm golden light, dreamy mood, airy brushwork, luminous sky, "
    "watercolor texture, delicate details, whimsical style"
).split(", ")
DISLIKED = (
    "dark shadows, cold blue palette, chaotic strokes, cluttered composition, gloomy mood, gothic style"
).split(", ")


@dataclass(frozen=True)
class ModelFigures:
    reference_seconds_per_image: float
    production_seconds_per_image: float
    max_pixel_difference: int

    @property
    def speedup(self) -> float:
        return self.reference_seconds_per_image / self.production_seconds_per_image

    def report(self) -> str:
        return "\n".join(
            [
                f"reference  (two UNet calls per base step): {1000 * self.reference_seconds_per_image:8.1f} ms/image",
                f"production (one batch-4 UNet call):        {1000 * self.production_seconds_per_image:8.1f} ms/image",
                f"production / reference: {1 / self.speedup:.2f}",
                f"max pixel difference: {self.max_pixel_difference}/255",
            ]
        )


def make_sdxl(models: str, models_dir: Path, device: str) -> SdxlPipelines:
    """The in-process pipelines: the tiny checkpoints, or the full-size architectures with random weights."""
    if models == "full-random":
        pipelines = build_sdxl(FULL, device, torch.float16 if device.startswith("cuda") else torch.float32)
    else:
        pipelines = load_sdxl(str(models_dir / "sdxl-base"), str(models_dir / "sdxl-refiner"), device=device)
    for pipeline in (pipelines.base, pipelines.refiner):
        pipeline.set_progress_bar_config(disable=True)
    return pipelines


def bench_model(pipelines: SdxlPipelines, params: GenerationParams, repeats: int) -> ModelFigures:
    generator = PersonalizedGenerator(pipelines)

    def production() -> list[bytes]:
        events: list[object] = []
        generator.generate(params, LIKED, DISLIKED, emit=events.append)
        return [event.png for event in events if isinstance(event, FinishedImage)]

    def reference() -> list[bytes]:
        return reference_generate(pipelines, params, LIKED, DISLIKED)

    production_pngs, reference_pngs = production(), reference()  # also warms both paths up
    production_times, reference_times = [], []
    for _ in range(repeats):  # interleaved, so both see the same load on the shared cores
        production_times.append(_seconds(production))
        reference_times.append(_seconds(reference))
    return ModelFigures(
        reference_seconds_per_image=statistics.median(reference_times) / params.num_images,
        production_seconds_per_image=statistics.median(production_times) / params.num_images,
        max_pixel_difference=max(map(_max_pixel_difference, production_pngs, reference_pngs)),
    )


@dataclass(frozen=True)
class GrpcFigures:
    in_process_seconds_per_image: float
    grpc_seconds_per_image: float

    def report(self) -> str:
        return "\n".join(
            [
                f"in process (production path):              {1000 * self.in_process_seconds_per_image:8.1f} ms/image",
                f"gRPC end to end (server process + SDK):    {1000 * self.grpc_seconds_per_image:8.1f} ms/image",
                f"gRPC / in process: {self.grpc_seconds_per_image / self.in_process_seconds_per_image:.2f}",
            ]
        )


def bench_grpc(pipelines: SdxlPipelines, server: ServerProcess, params: GenerationParams,
               repeats: int) -> GrpcFigures:
    """The same request in process and through the server; the profile's features guide both."""
    generator = PersonalizedGenerator(pipelines)
    with server.start(timeout=1800), ViperClient(server.target, long_timeout=3600) as client:
        profile = client.extract_profile("bench", [
            RatedImage(_png(color), comment=comment, rating=rating)
            for color, comment, rating in (((250, 200, 220), "soft pastel pink, lovely", "liked"),
                                           ((20, 20, 60), "dark and gloomy", "disliked"))
        ])
        def in_process() -> None:
            generator.generate(params, profile.liked_features, profile.disliked_features, emit=lambda event: None)

        def through_grpc() -> None:
            list(client.generate("bench", params.prompt, num_images=params.num_images, width=params.width,
                                 height=params.height, steps=params.steps, seed=params.seed))

        in_process(), through_grpc()  # warm-up
        in_process_times, grpc_times = [], []
        for _ in range(repeats):
            in_process_times.append(_seconds(in_process))
            grpc_times.append(_seconds(through_grpc))
    return GrpcFigures(
        in_process_seconds_per_image=statistics.median(in_process_times) / params.num_images,
        grpc_seconds_per_image=statistics.median(grpc_times) / params.num_images,
    )


SCORE_TOLERANCE = 1e-4  # a ranked image's score equals Score's within it (README "Best of N")


@dataclass(frozen=True)
class PickCase:
    """One best of 4: the pick, and the 4 candidates as a plain Generate of 4 with score_images makes them."""

    pick: int  # the candidate the ranked request streamed (its seed - the case's seed)
    pick_is_argmax: bool  # its PNG is that candidate's and its score Score's best, within SCORE_TOLERANCE
    scores: tuple[float, ...]
    shares: tuple[float, ...]  # of the candidates' coloured pixels, nearest the liked colour

    @property
    def at_least_median(self) -> bool:
        return self.shares[self.pick] >= np.median(self.shares)

    @property
    def spread(self) -> float:
        """How far apart the metric scores the candidates: below SCORE_TOLERANCE, it cannot tell them apart."""
        return max(self.scores) - min(self.scores)


@dataclass(frozen=True)
class PickFigures:
    """The picks of best of 4 on held-out toy users at one preference strength."""

    strength: float
    cases: list[PickCase]

    def report(self) -> str:
        cases = self.cases
        pick_score, pick_share = (float(np.mean([getattr(case, name)[case.pick] for case in cases]))
                                  for name in ("scores", "shares"))
        # A random candidate's mean: the mean over all candidates.
        random_score, random_share = (float(np.mean([getattr(case, name) for case in cases]))
                                      for name in ("scores", "shares"))
        at_least = sum(case.at_least_median for case in cases)
        by_spread = []  # by how far apart the metric scores the 4 candidates
        for label, low, high in (("< 1e-4", 0, SCORE_TOLERANCE), ("1e-4 to 1e-3", SCORE_TOLERANCE, 1e-3),
                                 ("> 1e-3", 1e-3, float("inf"))):
            some = [case.at_least_median for case in cases if low <= case.spread < high]
            by_spread.append(f"{sum(some)}/{len(some)} with scores spread {label}")
        return (f"strength {self.strength:.2f}: pick at least as close to the liked colour as the median candidate "
                f"in {at_least}/{len(cases)} ({at_least / len(cases):.0%}): {', '.join(by_spread)}; "
                f"pick = Score's argmax over a plain Generate of the 4 in "
                f"{sum(case.pick_is_argmax for case in cases)}/{len(cases)}; "
                f"mean score pick {pick_score:.4f} vs random candidate {random_score:.4f}; "
                f"liked-colour share pick {pick_share:.3f} vs random candidate {random_share:.3f}")


@dataclass(frozen=True)
class BestOfFigures:
    plain_seconds: float  # num_images=4, no ranking
    together_seconds: float  # 4 requests of num_images=1 at once: batched, no ranking
    ranked_seconds: float  # num_images=1, candidates=4
    paired_ratios: tuple[float, float]  # median per round of ranked / plain and ranked / together
    picks: list[PickFigures]

    def report(self) -> str:
        return "\n".join(
            [
                f"num_images=4, no ranking:                  {self.plain_seconds:8.2f} s",
                f"4 x num_images=1 at once, no ranking:      {self.together_seconds:8.2f} s",
                f"num_images=1, candidates=4 (best of 4):    {self.ranked_seconds:8.2f} s",
                f"best of 4 / num_images=4: {self.ranked_seconds / self.plain_seconds:.2f}x; "
                f"/ 4 at once: {self.ranked_seconds / self.together_seconds:.2f}x (medians; median of each round's "
                f"ratio: {self.paired_ratios[0]:.2f}x, {self.paired_ratios[1]:.2f}x)",
                *(figures.report() for figures in self.picks),
            ]
        )


def bench_best_of_n(models_dir: Path, params: GenerationParams, repeats: int, threads: int,
                    user_count: int = evaluate.HELD_OUT_USER_COUNT) -> BestOfFigures:
    """Best of 4 against generating 4, timed interleaved; then the picks on the held-out users, `repeats` seeds
    each, at the default preference strength and at 0 (where the ranking alone personalizes)."""
    server = ServerProcess(models_dir / "best-of.db", models_dir, "--generate-batch", "4", models="toy",
                           env=threads_env(threads))
    with server, ViperClient(server.target) as client:
        users = evaluate.held_out_users(user_count)
        for index, user in enumerate(users):
            rated = evaluate.rated_in_mixed_order(user, seed=index)
            client.extract_profile(f"user-{index}", [
                RatedImage(r.image, comment=r.comment, rating="liked" if r.liked else "disliked") for r in rated])
        times = _time_best_of(client, params, repeats)
        picks = [_picks(client, users, strength, repeats, min(params.steps, 10)) for strength in (0.85, 0.0)]
    return BestOfFigures(
        plain_seconds=statistics.median(times["plain"]),
        together_seconds=statistics.median(times["together"]),
        ranked_seconds=statistics.median(times["ranked"]),
        paired_ratios=tuple(statistics.median(r / o for r, o in zip(times["ranked"], times[other]))
                            for other in ("plain", "together")),
        picks=picks,
    )


def _time_best_of(client: ViperClient, params: GenerationParams, repeats: int) -> dict[str, list[float]]:
    """Seconds of each way to make 4 images for user-0, 2 x repeats rounds, the ways interleaved in each round
    (the same load on the shared cores)."""
    request = dict(prompt=evaluate.GENERATION_PROMPT, width=params.width, height=params.height, steps=params.steps)
    runs = {
        "plain": lambda seed: list(client.generate("user-0", **request, num_images=4, seed=seed)),
        "together": lambda seed: _at_once([
            lambda i=i: list(client.generate("user-0", **request, seed=seed + i)) for i in range(4)]),
        "ranked": lambda seed: list(client.generate("user-0", **request, candidates=4, seed=seed)),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(2 * repeats + 1):  # the first round warms up (and caches user-0's metric prefix)
        for name, run in runs.items():
            seconds = _seconds(functools.partial(run, 100 + repeat))
            if repeat:
                times[name].append(seconds)
    return times


def _picks(client: ViperClient, users: list, strength: float, cases: int, steps: int) -> PickFigures:
    """Per user, `cases` best of 4 with seeds 1, 5, 9, ... (no two share a candidate): the pick, and the 4
    candidates as a plain Generate of 4 with score_images makes them (the same images)."""
    picks = []
    for index, user in enumerate(users):
        for seed in range(1, 4 * cases, 4):
            request = dict(prompt=evaluate.GENERATION_PROMPT, width=64, height=64, steps=steps, seed=seed,
                           preference_strength=strength)
            [pick] = _images(client.generate(f"user-{index}", **request, num_images=1, candidates=4))
            scored = _images(client.generate(f"user-{index}", **request, num_images=4, score_images=True))
            scores = [image.score for image in scored]
            best = min(range(len(scores)), key=lambda i: (-scores[i], i))
            chosen = pick.seed - seed
            picks.append(PickCase(
                pick=chosen,
                pick_is_argmax=(chosen == best and pick.png == scored[best].png
                                and abs(pick.score - scores[best]) <= SCORE_TOLERANCE),
                scores=tuple(scores),
                shares=tuple(evaluate.colour_share(image.image(), user.liked_colour) for image in scored),
            ))
    return PickFigures(strength=strength, cases=picks)


def _images(events) -> list[GeneratedImage]:
    return [event for event in events if isinstance(event, GeneratedImage)]


def _at_once(calls: list[Callable[[], object]]) -> None:
    with ThreadPoolExecutor(len(calls)) as pool:
        for future in [pool.submit(call) for call in calls]:
            future.result()  # re-raises a call's error


def _png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _seconds(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def _max_pixel_difference(png: bytes, other_png: bytes) -> int:
    pixels, other = (np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16) for data in (png, other_png))
    return int(np.abs(pixels - other).max())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="image width and height (the tiny default)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--images", type=int, default=2, help="images per request")
    parser.add_argument("--repeats", type=int, default=5)
    add_model_flags(parser)
    parser.add_argument("--server-tokens", type=int, default=None,
                        help="the gRPC section's server --vpe-max-new-tokens, for the profile it extracts first "
                             "(default: the preset's)")
    parser.add_argument("--users", type=int, default=evaluate.HELD_OUT_USER_COUNT,
                        help="held-out toy users whose picks best of N scores (default: all of them)")
    parser.add_argument("--only", choices=["best-of"], help="run that section alone")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # Figures only: no progress bars or load-time notices from the libraries.
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    params = GenerationParams(
        prompt="a cat sitting on a windowsill in the city at dusk",
        num_images=args.images,
        width=args.size,
        height=args.size,
        steps=args.steps,
        seed=1234,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tiny = args.models == "tiny"
        if args.only is None:
            models_dir = ensure_tiny_models(args.models_dir or Path(tmp) / "tiny-models") if tiny else Path(tmp)
            print(
                f"{args.models} SDXL on {args.device}, {args.size}x{args.size}, {args.steps} steps (base to "
                f"{params.high_noise_frac:.0%}, then refiner), {args.images} images x {args.repeats} repeats, "
                f"{args.threads or 'default'} torch thread(s)", flush=True
            )
            pipelines = make_sdxl(args.models, models_dir, args.device)
            model = bench_model(pipelines, params, args.repeats)
            print(model.report(), flush=True)
            tokens = ["--vpe-max-new-tokens", str(args.server_tokens)] if args.server_tokens else []
            server = ServerProcess(Path(tmp) / "profiles.db", models_dir, "--device", args.device, *tokens,
                                   models=args.models, env=threads_env(args.threads))
            print(bench_grpc(pipelines, server, params, args.repeats).report(), flush=True)
            del pipelines
        if tiny:
            print(f"best of N: toy models, {args.size}x{args.size}, {args.steps} steps, generate batch 4")
            toy_dir = ensure_toy_models(Path(tmp) / "toy-models")
            print(bench_best_of_n(toy_dir, params, args.repeats, args.threads, args.users).report())
        else:
            print("best of N: left out with --models full-random (a figure of the toy models)")
    if args.only is None:
        print(f"speedup: {model.speedup:.2f}x")


if __name__ == "__main__":
    main()
