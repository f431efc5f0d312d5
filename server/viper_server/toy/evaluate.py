"""Held-out toy-world data and the figures issue 14 asks of the toy models, for tests at any level (model
classes in process, or gRPC) and for the training report.

Everything here is drawn from the "eval" split (shades, comment frames and random draws training never
saw) with fixed seeds, so every caller measures the same cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from . import world

HELD_OUT_USER_COUNT = 20
# Issue 20's check of the VPE on phrasings no training comment has: more users, from a seed of their own.
PHRASING_USER_COUNT = 60
PHRASING_SEED = 2000
# A subject the SDXL captions never had, and the two opposite profiles of the generation check.
GENERATION_PROMPT = "a castle by the sea"
LIKES_RED = (["red"], ["blue"])
LIKES_BLUE = (["blue"], ["red"])


def held_out_users(count: int = HELD_OUT_USER_COUNT) -> list[world.User]:
    """Users with held-out images and comments; liked and disliked colours cover the colour pairs evenly."""
    return world.eval_users(count)


def phrasing_users(count: int = PHRASING_USER_COUNT) -> list[world.User]:
    """Held-out users apart from held_out_users': comment frames and sentiment words (negations included) that
    no training comment has, images that training never saw."""
    return world.eval_users(count, seed=PHRASING_SEED)


def rated_in_mixed_order(user: world.User, seed: int = 0) -> list[world.RatedImage]:
    """The user's 16 rated images in a fixed shuffled order (liked and disliked mixed)."""
    rated = user.rated
    return [rated[i] for i in np.random.default_rng(seed).permutation(len(rated))]


def held_out_queries(user: world.User, per_side: int = 4, *,
                     seed: int = 0) -> tuple[list[Image.Image], list[Image.Image]]:
    """New held-out images of the user's liked colour and of the disliked one (not among the rated ones)."""
    colours = [world.COLOURS.index(user.liked_colour), world.COLOURS.index(user.disliked_colour)]
    rng = np.random.default_rng([seed, *colours])
    liked = [world.draw_image(rng, user.liked_colour, "eval") for _ in range(per_side)]
    disliked = [world.draw_image(rng, user.disliked_colour, "eval") for _ in range(per_side)]
    return liked, disliked


def held_out_mixes(user: world.User, count: int = 8, *, seed: int = 0) -> list[Image.Image]:
    """Held-out images of the user's liked colour with 0 to 50% of their pixels (evenly spaced) from an image of
    one of its hue neighbours: what a generator's candidates for the user look like (world.draw_mixed_image)."""
    rng = np.random.default_rng([seed, world.COLOURS.index(user.liked_colour), 21])
    neighbours = world.neighbours(user.liked_colour)
    return [world.draw_mixed_image(rng, user.liked_colour, neighbours[i % 2], float(area), "eval")
            for i, area in enumerate(np.linspace(0, 0.5, count))]


def rank_correlation(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's: the correlation of the two sequences' ranks (ties ranked by position)."""
    ranks = [np.argsort(np.argsort(values, kind="stable"), kind="stable") for values in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def names_colours(user: world.User, liked_features: Sequence[str], disliked_features: Sequence[str]) -> bool:
    """The VPE target: the liked colour among the liked features and the disliked one among the disliked."""
    return user.liked_colour in liked_features and user.disliked_colour in disliked_features


@dataclass(frozen=True)
class MetricFigures:
    pairs_ranked_right: float  # share of (liked query, disliked query) pairs the liked one scores higher
    mean_swap_shift: float  # mean |score - score with liked and disliked context swapped|


def metric_figures(scores: Sequence[tuple[Sequence[float], Sequence[float], Sequence[float], Sequence[float]]]
                   ) -> MetricFigures:
    """Per user: (liked-query scores, disliked-query scores, the same two with the context swapped)."""
    right = total = 0
    shifts = []
    for liked, disliked, liked_swapped, disliked_swapped in scores:
        right += sum(a > b for a in liked for b in disliked)
        total += len(liked) * len(disliked)
        shifts += [abs(a - b) for a, b in zip([*liked, *disliked], [*liked_swapped, *disliked_swapped])]
    return MetricFigures(pairs_ranked_right=right / total, mean_swap_shift=float(np.mean(shifts)))


def dominant_colour(image: Image.Image) -> str | None:
    """The colour most of the image's coloured pixels (not grey, not near black) are closest to in hue."""
    hsv = np.asarray(image.convert("RGB").convert("HSV"), dtype=np.float64)
    coloured = (hsv[..., 1] > 64) & (hsv[..., 2] > 64)
    if not coloured.any():
        return None
    counts = np.bincount(world.nearest_colours(hsv[..., 0][coloured] * 360 / 256), minlength=len(world.COLOURS))
    return world.COLOURS[int(counts.argmax())]


def colour_share(image: Image.Image, colour: str) -> float:
    """How close an image is to a colour: the share of its coloured pixels (as dominant_colour counts them) whose
    hue is nearest that colour's; 0 for an image without coloured pixels."""
    hsv = np.asarray(image.convert("RGB").convert("HSV"), dtype=np.float64)
    coloured = (hsv[..., 1] > 64) & (hsv[..., 2] > 64)
    if not coloured.any():
        return 0.0
    nearest = world.nearest_colours(hsv[..., 0][coloured] * 360 / 256)
    return float((nearest == world.COLOURS.index(colour)).mean())


def red_minus_blue(image: Image.Image) -> float:
    """Mean (R - B) channel value over the image, in 0-255 units."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    return float((pixels[..., 0] - pixels[..., 2]).mean())
