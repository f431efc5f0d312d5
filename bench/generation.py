"""Personalized generation benchmark on the tiny SDXL checkpoints (built into a temporary folder).

Model section: the straightforward reference procedure (models.reference_guidance: two UNet calls
per base step) against the production path (models.generation: the stock pipeline with both
evaluations as one batch-4 UNet call), same params and seeds, runs interleaved. The last line is
`speedup: N.NNx` (reference time per image / production time per image).

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

from viper_server.models.generation import FinishedImage, GenerationParams, PersonalizedGenerator
from viper_server.models.reference_guidance import reference_generate
from viper_server.models.sdxl import load_sdxl
from viper_server.models.tiny_sdxl import build_tiny_sdxl

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
        generator.generate(params, emit=events.append)
        return [event.png for event in events if isinstance(event, FinishedImage)]

    def reference() -> list[bytes]:
        return reference_generate(pipelines, params)

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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # Figures only: no progress bars or load-time notices from the libraries.
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    params = GenerationParams(
        prompt="a cat sitting on a windowsill in the city at dusk",
        liked_features=LIKED,
        disliked_features=DISLIKED,
        num_images=args.images,
        width=args.size,
        height=args.size,
        steps=args.steps,
        seed=1234,
    )
    with tempfile.TemporaryDirectory() as tmp:
        models_dir = Path(tmp)
        build_tiny_sdxl(models_dir)
        print(
            f"tiny SDXL, {args.size}x{args.size}, {args.steps} steps (base to {params.high_noise_frac:.0%}, "
            f"then refiner), {args.images} images x {args.repeats} repeats, {args.threads} torch thread(s)"
        )
        model = bench_model(models_dir, params, args.repeats)
        print(model.report())
        # Further sections (e.g. gRPC end to end) take models_dir and print their figures here.
    print(f"speedup: {model.speedup:.2f}x")


if __name__ == "__main__":
    main()
