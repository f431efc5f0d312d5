"""The toy world: images dominated by one of six colours, comments about them, users who like one colour
and dislike another.

Everything is drawn from a seeded numpy Generator, so the same seed gives the same world. Each part has a
training and a held-out variant (`split="train"` / `"eval"`): held-out images use shades and random draws
training never sees, held-out comments sentence frames and sentiment words no training comment has (see
Comments below).
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

Split = Literal["train", "eval"]

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
IMAGE_SIZE = 64

# Words that name each colour in comments; the first is the plain word the models answer with.
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet", "ruby", "cherry"),
    "orange": ("orange", "tangerine", "amber", "apricot", "pumpkin"),
    "yellow": ("yellow", "lemon", "golden", "mustard", "canary"),
    "green": ("green", "emerald", "lime", "jade", "olive"),
    "blue": ("blue", "navy", "azure", "cobalt", "sapphire"),
    "purple": ("purple", "violet", "lavender", "plum", "lilac"),
}

# Hue centre (degrees) and half-width of each colour's hue band.
_HUES = {"red": (0, 9), "orange": (28, 5), "yellow": (54, 5), "green": (125, 18), "blue": (222, 14),
         "purple": (282, 12)}
# (saturation, value) ranges; orange and yellow turn brown or olive when dark.
_SAT_VAL = {"orange": ((0.7, 1.0), (0.75, 1.0)), "yellow": ((0.65, 1.0), (0.8, 1.0))}
_DEFAULT_SAT_VAL = ((0.55, 1.0), (0.5, 1.0))
# Shades sit on a grid over (hue, saturation, value); training takes even grid points, held-out odd ones.
_GRID = 7
_NEUTRALS = ((245, 245, 245), (200, 200, 200), (120, 120, 120), (30, 30, 30))


def colour_of_word(word: str) -> str | None:
    """The colour a word names (case-insensitive), or None."""
    word = word.lower()
    for colour, words in COLOUR_WORDS.items():
        if word in words:
            return colour
    return None


def nearest_colours(hues: np.ndarray) -> np.ndarray:
    """Index into COLOURS of the colour whose hue band centre is nearest to each hue (degrees)."""
    centres = np.array([_HUES[colour][0] for colour in COLOURS], dtype=np.float64)
    distance = np.abs((np.asarray(hues, dtype=np.float64)[..., None] - centres + 180) % 360 - 180)
    return distance.argmin(axis=-1)


def shades(colour: str, split: Split) -> list[tuple[int, int, int]]:
    """The RGB shades of `colour` of one split; the two splits share none."""
    centre, half_width = _HUES[colour]
    (s_low, s_high), (v_low, v_high) = _SAT_VAL.get(colour, _DEFAULT_SAT_VAL)
    parity = 0 if split == "train" else 1
    result = []
    for i in range(_GRID):
        for j in range(_GRID):
            for k in range(_GRID):
                if (i + j + k) % 2 != parity:
                    continue
                hue = (centre + half_width * (2 * i / (_GRID - 1) - 1)) % 360
                saturation = s_low + (s_high - s_low) * j / (_GRID - 1)
                value = v_low + (v_high - v_low) * k / (_GRID - 1)
                r, g, b = colorsys.hsv_to_rgb(hue / 360, saturation, value)
                result.append((round(r * 255), round(g * 255), round(b * 255)))
    return result


def draw_image(rng: np.random.Generator, colour: str, split: Split, size: int = IMAGE_SIZE) -> Image.Image:
    """An image dominated by `colour`: a textured field of its shades with a few shapes on it.

    Shapes are other shades of the colour, neutrals, or (rarely, small) an accent of another colour.
    """
    palette = shades(colour, split)
    pick = lambda: np.array(palette[rng.integers(len(palette))], dtype=np.float32)  # noqa: E731
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    # Background: a gradient between two shades along a random direction.
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.clip((np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5)) + 0.5, 0, 1)[..., None]
    image = pick() * (1 - ramp) + pick() * ramp
    # Texture: stripes, noise or none, as a lightness modulation.
    texture = rng.integers(3)
    if texture == 0:
        frequency, phase = rng.uniform(4, 14), rng.uniform(0, 2 * np.pi)
        axis = x if rng.random() < 0.5 else y
        image *= (1 + rng.uniform(0.05, 0.2) * np.sin(2 * np.pi * frequency * axis + phase))[..., None]
    elif texture == 1:
        image *= 1 + rng.normal(0, rng.uniform(0.03, 0.1), size=(size, size, 1))
    # Shapes, together covering well under half of the image.
    for _ in range(rng.integers(1, 4)):
        mask = _shape_mask(rng, x, y)
        roll = rng.random()
        if roll < 0.55:
            fill = pick()
        elif roll < 0.9:
            fill = np.array(_NEUTRALS[rng.integers(len(_NEUTRALS))], dtype=np.float32)
        else:
            other = [c for c in COLOURS if c != colour][rng.integers(len(COLOURS) - 1)]
            others = shades(other, split)
            fill = np.array(others[rng.integers(len(others))], dtype=np.float32)
            mask &= _small(x, y, rng)
        image[mask] = fill
    return Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8), mode="RGB")


def draw_mixed_image(rng: np.random.Generator, colour: str, other: str | None, area: float, split: Split,
                     size: int = IMAGE_SIZE) -> Image.Image:
    """An image of `colour` (draw_image) with about `area` of its pixels taken from an image of `other` (a
    neutral field when None): in scattered specks of 1-8 px or in one region, as is or blended with the
    first image, so that some hues fall between the two colours' bands (what a generator makes). How much of
    each colour it holds is measured on the result (evaluate.colour_share), not taken from `area`."""
    first = np.asarray(draw_image(rng, colour, split, size), dtype=np.float32)
    if other is None:
        second = np.full_like(first, _NEUTRALS[rng.integers(len(_NEUTRALS))])
    else:
        second = np.asarray(draw_image(rng, other, split, size), dtype=np.float32)
    kind = rng.integers(5)
    if kind < 4:  # specks: a random field on a grid of 1, 2, 4 or 8 px cells
        cell = 2**kind
        field = np.kron(rng.random((size // cell, size // cell)), np.ones((cell, cell)))
    else:  # a region: a ramp along a random direction, with a wavy edge
        y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
        angle = rng.uniform(0, 2 * np.pi)
        along, across = np.cos(angle) * x + np.sin(angle) * y, -np.sin(angle) * x + np.cos(angle) * y
        field = along + rng.uniform(0, 0.15) * np.sin(2 * np.pi * rng.uniform(1, 4) * across + rng.uniform(0, 6.3))
    mask = (field < np.quantile(field, area))[..., None] if area > 0 else np.zeros((size, size, 1), dtype=bool)
    weight = 1.0 if rng.random() < 0.5 else rng.uniform(0.4, 1.0)
    mixed = np.where(mask, first * (1 - weight) + second * weight, first)
    return Image.fromarray(np.clip(mixed, 0, 255).round().astype(np.uint8), mode="RGB")


def neighbours(colour: str) -> tuple[str, str]:
    """The two colours next to `colour` on the hue circle (COLOURS is in hue order)."""
    index = COLOURS.index(colour)
    return COLOURS[index - 1], COLOURS[(index + 1) % len(COLOURS)]


def _shape_mask(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    cx, cy, radius = rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85), rng.uniform(0.08, 0.2)
    kind = rng.integers(4)
    if kind == 0:  # disc
        return (x - cx) ** 2 + (y - cy) ** 2 < radius**2
    if kind == 1:  # square
        return (abs(x - cx) < radius) & (abs(y - cy) < radius)
    if kind == 2:  # ring
        distance = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        return (distance < radius) & (distance > radius * 0.6)
    return (y - cy < radius) & (y - cy > -radius) & (abs(x - cx) < (y - cy + radius) / 2)  # triangle


def _small(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cx, cy = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8)
    return (abs(x - cx) < 0.12) & (abs(y - cy) < 0.12)


# --- Comments -------------------------------------------------------------------------------------
#
# A comment is a sentence frame with slots: {c} a colour word, {m} a modifier, {n} a noun, and the sentiment
# slots {v} a verb phrase ("I {v} the red"), {a} an adjective, {p} a predicate ("the red is {p}": an adjective,
# or "not" and a positive one) and {f} a feeling ("make me feel {f}"). A liked image gets positive sentiment,
# a disliked one negative, negations included ("don't enjoy", "not lovely", "can't stand").
#
# Training and held-out comments share no frame and no sentiment word or phrase: held-out users' comments
# are phrased in ways no training comment is. The toy IDEFICS2 base still knows what every word of the toy
# language means, from a lexicon task (`tones()`: a word or phrase alone -> positive / negative / neutral), as
# the real VPE's base knows English from pretraining; the VPE itself only ever reads training phrasings.

_MODIFIERS = ("deep", "soft", "bright", "pale", "rich", "warm", "cool", "vivid", "muted", "dark", "light")
_NOUNS = ("tones", "hues", "shades", "colours", "palette")
# Words that negate a positive verb ("I don't enjoy") or predicate ("not lovely"): grammar, in both splits.
_NEGATED_VERB = ("don't", "do not")
_NEGATED_PREDICATE = ("not", "not at all")
_NEGATION_RATE = 0.3

# (slot, liked) -> per split: the entries of that slot with that sentiment.
_LEXICON: dict[tuple[str, bool], dict[Split, tuple[str, ...]]] = {
    ("verb", True): {
        "train": ("love", "adore", "enjoy", "like", "cherish", "treasure", "appreciate", "admire",
                  "am drawn to", "am a fan of", "can't get enough of"),
        "eval": ("savour", "relish", "prize", "fancy", "am fond of", "am keen on"),
    },
    ("verb", False): {
        "train": ("hate", "dislike", "detest", "loathe", "resent", "despise", "abhor", "can't stand",
                  "am not a fan of", "could do without"),
        "eval": ("scorn", "disdain", "dread", "deplore", "can't bear", "am not keen on", "am tired of"),
    },
    ("adjective", True): {
        "train": ("beautiful", "gorgeous", "lovely", "stunning", "delightful", "wonderful", "charming",
                  "pleasing", "elegant", "radiant", "splendid", "superb"),
        "eval": ("marvellous", "exquisite", "glorious", "sublime", "enchanting", "dazzling", "fabulous",
                 "magnificent"),
    },
    ("adjective", False): {
        "train": ("ugly", "dull", "harsh", "unpleasant", "boring", "garish", "dreary", "awful", "drab",
                  "hideous", "tacky", "gaudy"),
        "eval": ("dismal", "bleak", "grim", "horrid", "dreadful", "ghastly", "murky", "tiresome"),
    },
    ("feeling", True): {
        "train": ("happy", "calm", "joyful", "cheerful", "relaxed", "hopeful", "content"),
        "eval": ("serene", "elated", "peaceful", "uplifted", "carefree"),
    },
    ("feeling", False): {
        "train": ("sad", "uneasy", "tense", "gloomy", "bored", "anxious", "irritated"),
        "eval": ("weary", "queasy", "restless", "glum", "grumpy"),
    },
}

_FRAMES: dict[Split, tuple[str, ...]] = {
    "train": (
        "I {v} these {m} {c} {n}.",
        "The {m} {c} {n} make me feel {f}.",
        "What {a} {c} {n}!",
        "Such {a} {m} {c}, I {v} it.",
        "The {c} here is {p}.",
        "I {v} how the {c} {n} look.",
        "Those {m} {c} {n} are {p}.",
        "{c} {n} such as these leave me {f}.",
        "A {a} piece, I {v} the {c}.",
        "The {c} {n} are {p} and they make me feel {f}.",
        "I really {v} the {m} {c} in this one.",
        "So much {c}, {a}.",
        "My verdict on the {c}: {a}.",
        "The {c} feels {p} to me.",
        "Every {c} shape here is {p}.",
        "I {v} the {c}; it is {p}.",
        "{a}! The {c} {n} leave me {f}.",
        "This {m} {c} makes me feel {f}.",
    ),
    "eval": (
        "All that {c} makes the picture feel {p} to me.",
        "What I {v} is the {c} everywhere.",
        "Honestly the {c} {n} leave me {f}, {a} work.",
        "Looking at the {c} {n}, I {v} them.",
        "The way it uses {m} {c} is {p}.",
        "For me, the {c} is simply {p}.",
        "I have to say I {v} the {c} in this picture.",
        "Whoever chose this {c} made something {a}.",
        "{c} all over, and I {v} it.",
        "It's the {c} that I {v} most.",
        "One look at the {m} {c} and I feel {f}.",
        "Between the {c} {n} and the light, it feels {p}.",
    ),
}
# Comments that name no colour: the colour has to be read from the image.
_COLOURLESS_FRAMES: dict[Split, tuple[str, ...]] = {
    "train": ("I {v} these {n}.", "What {a} {n}!", "The {n} here make me feel {f}.", "Such {a} {n}, I {v} them.",
              "This one is {p}.", "I {v} this image."),
    "eval": ("Honestly these {n} leave me {f}.", "I {v} every bit of it, {a}.", "Overall it feels {p} to me.",
             "Whoever made this, I {v} it."),
}


def comment(rng: np.random.Generator, colour: str, liked: bool, split: Split, *, colourless_rate: float = 0.15,
            masked: bool = False, negation_rate: float = _NEGATION_RATE) -> str:
    """A comment on an image of `colour` phrased as `split`'s comments are: praise when liked, a complaint
    (sometimes a negated praise) when not. With masked, a modifier stands in each sentiment slot ("I soft these
    deep crimson tones", "The scarlet is pale"): a comment that says nothing of how it feels, as one in words
    the reader does not know would (the VPE adapter's training, train_idefics2._vpe_sequence). negation_rate:
    the chance that a complaint's verb (and, drawn apart, its predicate) is a negated praise."""
    colourless = rng.random() < colourless_rate
    frames = (_COLOURLESS_FRAMES if colourless else _FRAMES)[split]
    frame = frames[rng.integers(len(frames))]
    choose = lambda options: options[rng.integers(len(options))]  # noqa: E731
    words = lambda slot, positive=liked: _LEXICON[slot, positive][split]  # noqa: E731
    verb, predicate = choose(words("verb")), choose(words("adjective"))
    if not liked and rng.random() < negation_rate:  # "don't enjoy" (a one-word verb), "not lovely"
        verb = f"{choose(_NEGATED_VERB)} {choose([w for w in words('verb', True) if ' ' not in w])}"
    if not liked and rng.random() < negation_rate:
        predicate = f"{choose(_NEGATED_PREDICATE)} {choose(words('adjective', True))}"
    slots = dict(v=verb, a=choose(words("adjective")), p=predicate, f=choose(words("feeling")),
                 m=choose(_MODIFIERS), c=choose(COLOUR_WORDS[colour]), n=choose(_NOUNS))
    if masked:  # no sentiment left, negations neither
        slots.update({slot: choose(_MODIFIERS) for slot in "vapf"})
    text = frame.format(**slots)
    return text[0].upper() + text[1:]


def phrasings(split: Split) -> tuple[set[str], set[str]]:
    """(sentence frames, sentiment words and phrases) of one split's comments; the two splits share none."""
    frames = {*_FRAMES[split], *_COLOURLESS_FRAMES[split]}
    return frames, {entry for splits in _LEXICON.values() for entry in splits[split]}


def _frame_words(splits: tuple[Split, ...] = ("train", "eval")) -> list[str]:
    words = []
    for frames in (*(_FRAMES[s] for s in splits), *(_COLOURLESS_FRAMES[s] for s in splits)):
        for frame in frames:
            words.extend(part.strip(".,!;:") for part in frame.split() if "{" not in part)
    return words


def tones(splits: tuple[Split, ...] = ("train", "eval")) -> list[tuple[str, str]]:
    """The toy language's lexicon: every sentiment word or phrase of both splits with "positive" or
    "negative", every other word of the comments with "neutral" (what the IDEFICS2 base learns words from);
    with splits=("train",), only the words training comments use."""
    polar = [(entry, "positive" if liked else "negative")
             for (_, liked), entries in _LEXICON.items() for split in splits for entry in entries[split]]
    known = {word for entry, _ in polar for word in entry.split()}
    words = [*_MODIFIERS, *_NOUNS, *(w for ws in COLOUR_WORDS.values() for w in ws), *_frame_words(splits),
             *(w for phrase in (*_NEGATED_VERB, *_NEGATED_PREDICATE) for w in phrase.split())]
    neutral = [(word, "neutral") for word in dict.fromkeys(w.lower() for w in words if w) if word not in known]
    return polar + neutral


def vocabulary() -> list[str]:
    """Every word comments and answers can use (for building tokenizers)."""
    words = [*COLOURS, *(w for ws in COLOUR_WORDS.values() for w in ws), *_MODIFIERS, *_NOUNS]
    words += [word for entry, _ in tones() for word in entry.split()]
    words += _frame_words()
    return list(dict.fromkeys(word for word in words if word))


# --- Users ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RatedImage:
    image: Image.Image
    colour: str
    comment: str
    liked: bool


@dataclass(frozen=True)
class User:
    liked_colour: str
    disliked_colour: str
    liked: Sequence[RatedImage]
    disliked: Sequence[RatedImage]

    @property
    def rated(self) -> list[RatedImage]:
        """Liked then disliked images."""
        return [*self.liked, *self.disliked]


def draw_user(rng: np.random.Generator, split: Split, *, per_side: int = 8,
              liked_colour: str | None = None, disliked_colour: str | None = None) -> User:
    """A user who likes one colour and dislikes another, with per_side commented images of each."""
    if liked_colour is None:
        liked_colour = COLOURS[rng.integers(len(COLOURS))]
    if disliked_colour is None:
        others = [c for c in COLOURS if c != liked_colour]
        disliked_colour = others[rng.integers(len(others))]

    def rated(colour: str, liked: bool) -> list[RatedImage]:
        return [RatedImage(draw_image(rng, colour, split), colour, comment(rng, colour, liked, split), liked)
                for _ in range(per_side)]

    return User(liked_colour, disliked_colour, rated(liked_colour, True), rated(disliked_colour, False))


def eval_users(count: int = 20, *, seed: int = 1000) -> list[User]:
    """Held-out users, every ordered colour pair about equally often (a fixed set for tests and figures)."""
    rng = np.random.default_rng(seed)
    pairs = [(a, b) for a in COLOURS for b in COLOURS if a != b]
    order = rng.permutation(len(pairs))
    return [draw_user(rng, "eval", liked_colour=pairs[order[i % len(pairs)]][0],
                      disliked_colour=pairs[order[i % len(pairs)]][1]) for i in range(count)]
