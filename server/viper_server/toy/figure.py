"""A picture of the toy models at work, for the docs: `python -m viper_server.toy.figure MODELS_DIR OUT.png`.

Rows: held-out toy-world images of each colour; then, for one prompt and the same seeds, images generated
for a profile liking red and disliking blue, the reversed profile, and no profile.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from . import evaluate, world

SEEDS = range(len(world.COLOURS))
SCALE = 2  # pixels per image pixel in the picture


def draw_figure(models_dir: Path, out: Path, *, steps: int = 20) -> None:
    from ..domain import FinishedImage, GenerationParams  # model code: imported only when drawing
    from ..models.generation import PersonalizedGenerator
    from ..models.sdxl import load_sdxl

    generator = PersonalizedGenerator(load_sdxl(str(models_dir / "sdxl-base"), str(models_dir / "sdxl-refiner")))

    def generated(profile: tuple[list[str], list[str]], seed: int) -> Image.Image:
        params = GenerationParams(prompt=evaluate.GENERATION_PROMPT, width=world.IMAGE_SIZE, height=world.IMAGE_SIZE,
                                  steps=steps, seed=seed)
        events: list[object] = []
        generator.generate(params, *profile, emit=events.append)
        (png,) = [event.png for event in events if isinstance(event, FinishedImage)]
        return Image.open(io.BytesIO(png)).convert("RGB")

    rng = np.random.default_rng(0)
    rows = [[world.draw_image(rng, colour, "eval") for colour in world.COLOURS]]
    for profile in (evaluate.LIKES_RED, evaluate.LIKES_BLUE, ([], [])):
        rows.append([generated(profile, seed) for seed in SEEDS])
    side = world.IMAGE_SIZE
    canvas = Image.new("RGB", (len(SEEDS) * (side + 4), len(rows) * (side + 4)), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            canvas.paste(image, (c * (side + 4) + 2, r * (side + 4) + 2))
    canvas.resize((canvas.width * SCALE, canvas.height * SCALE), Image.NEAREST).save(out)


if __name__ == "__main__":
    draw_figure(Path(sys.argv[1]), Path(sys.argv[2]))
