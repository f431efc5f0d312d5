"""Personalized generation benchmark on the tiny SDXL checkpoints (built into a temporary folder).

Model section: the straightforward reference procedure (testing.reference_guidance: two UNet calls
per base step) against the production path (models.generation: the stock pipelines' loop written out in
steps, both evaluations as one batch-4 UNet call), same params and seeds, runs interleaved.
gRPC section: the same request through a real server process and the client SDK against the
production path in process, interleaved. The last line is `speedup: N.NNx` (reference time per image /
production time per image, in process).

    .venv/bin/python bench/generation.py [--size 64] [--steps 40] [--images 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from PIL import Image

from viper_client import RatedImage, ViperClient
from viper_server.domain import FinishedImage, GenerationParams
from viper_server.models.generation import PersonalizedGenerator
from viper_server.models.sdxl import load_sdxl
from viper_server.models.tiny import ensure_tiny_models
from viper_server.testing import ServerProcess
from viper_server.testing.reference_guidance import reference_generate

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


def bench_model(models_dir: Path, params: GenerationParams, repeats: int) -> ModelFigures:
    pipelines = load_sdxl(str(models_dir / "sdxl-base"), str(models_dir / "sdxl-refiner"))
    pipelines.refiner.set_progress_bar_config(disable=True)
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


def bench_grpc(models_dir: Path, db: Path, params: GenerationParams, repeats: int, threads: int) -> GrpcFigures:
    """The same request in process and through the server; the profile's features guide both."""
    generator = PersonalizedGenerator(load_sdxl(str(models_dir / "sdxl-base"), str(models_dir / "sdxl-refiner")))
    server = ServerProcess(db, models_dir, env={"OMP_NUM_THREADS": str(threads)})
    with server, ViperClient(server.target) as client:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="image width and height (the tiny default)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--images", type=int, default=2, help="images per request")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the cores are shared)")
    parser.add_argument("--models-dir", type=Path,
                        help="tiny models already built there, or built there once "
                             "(default: built in a temp folder, removed after)")
    args = parser.parse_args()
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
        models_dir = ensure_tiny_models(args.models_dir or Path(tmp) / "tiny-models")
        print(
            f"tiny SDXL, {args.size}x{args.size}, {args.steps} steps (base to {params.high_noise_frac:.0%}, "
            f"then refiner), {args.images} images x {args.repeats} repeats, {args.threads} torch thread(s)"
        )
        model = bench_model(models_dir, params, args.repeats)
        print(model.report())
        print(bench_grpc(models_dir, Path(tmp) / "profiles.db", params, args.repeats, args.threads).report())
    print(f"speedup: {model.speedup:.2f}x")


if __name__ == "__main__":
    main()
