"""Trains the toy IDEFICS2 base and its two LoRA adapters in the toy world, in four stages.

1. Perception (every weight): single-image chats with fresh images: an image's colour, whether it is a named
   colour ("+" / "-"), and what a comment on it says, in VPE's format for that one image (so the base can
   write every word of the ViPer answers); and the tone of a word or phrase of the toy language alone
   (world.tones, held-out sentiment words included: the base's "English", which no training comment uses
   beyond the training phrasings).
2. Reasoning (the vision encoder frozen, so its outputs for a pool of images are computed once): multi-image
   chats: in-context labels in the metric prompt's shape (each colour gets a random label, later images of a
   colour get its label; read-outs of the intermediate layers, _Probes, make this learnable on a toy
   budget) and summaries of commented images ("likes red, dislikes blue"), plus the single-image chats.
3. Adapters (the base frozen; the reference LoRA configuration): the VPE adapter learns the VPE prompt and
   answer ("Liked Art Features: red\\nDisliked Art Features: blue"), the metric adapter the metric prompt
   ("+" for a query of the colour of the context's "+" images, "-" for the "-" images' colour, either for
   another colour; with read-outs as in stage 2). Both use the service's exact prompts and token ids
   (models.vpe, models.metric).
4. Graded metric (train_graded_metric; the metric adapter alone, from the files stage 3 wrote, with its own
   random state): queries mixing colours in measured shares, P("+") rising with the liked colour's share and
   falling with the disliked one's, so that images mostly of the liked colour are ranked, not scored alike; a
   read-out asks for the query's colour shares.

The base's skills are generic; the ViPer prompts and answer formats are the adapters' (the base alone gives
no usable VPE answer or metric score; tests/test_toy_models.py checks it).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file
from transformers import DynamicCache, Idefics2ForConditionalGeneration, Idefics2Processor

from ..models.metric import DISLIKED_ANSWER, LIKED_ANSWER, metric_prompt_ids
from ..models.prompt_ids import encode_as_trained, expand_image_tokens
from ..models.tiny_idefics2 import VIPER_LORA_CONFIG
from ..models.vpe import DISLIKED_MARKER, LIKED_MARKER, build_vpe_messages
from . import evaluate, world
from .idefics2_arch import (
    CAPTION_QUESTION,
    CHECK_QUESTION,
    END_OF_UTTERANCE,
    LABEL_QUESTION,
    LABELS,
    SUMMARY_WORDS,
    TONE_QUESTION,
    build_config,
    build_processor,
    generation_config,
)

log = logging.getLogger(__name__)

ADAPTERS = ("vpe", "metric")


@dataclass(frozen=True)
class Idefics2Schedule:
    perception_steps: int = 400
    perception_batch: int = 24
    perception_lr: float = 2e-3
    reasoning_steps: int = 1500
    reasoning_lr: float = 2e-3
    # Sequences per step of each reasoning task: in-context labels take longest to learn.
    reasoning_batches: tuple[tuple[str, int], ...] = (("chat", 6), ("labels", 12), ("summary", 8))
    adapter_steps: int = 800  # the metric adapter's
    vpe_steps: int = 1200  # the VPE adapter's (README "The VPE adapter and phrasings it never read")
    adapter_lr: float = 4e-3
    batch: int = 8  # sequences per adapter and step
    vpe_chat_batch: int = 4  # single-image chats per step through the VPE adapter (_train_adapters)
    vpe_probe_layers: tuple[int, ...] = (2, 2)  # the VPE read-outs' layers: a comment's sentiment, its colour
    vpe_masked_rate: float = 0.7  # VPE prompts with one side's sentiment words masked (_vpe_sequence)
    vpe_masked_liked: float = 0.5  # of those, the share whose masked side is the liked one
    vpe_tone_rate: float = 0.0  # chat turns through the VPE adapter that ask a training word's tone
    vpe_negation_rate: float = 0.6  # VPE complaints negating a praise word ("not lovely"), per slot (base: 0.3)
    pool_per_colour: int = 250  # training images per colour the last two stages see
    answer_spread: float = 2.5  # the base's "+" and "-" output rows drawn apart by this factor (_spread_answer_rows)
    # Stage 4, the graded metric (train_graded_metric): the metric adapter alone, from its stage 3 state.
    graded_steps: int = 600
    graded_lr: float = 4e-3
    graded_batch: int = 8
    graded_pool_per_colour: int = 60  # context images per colour (the queries are drawn fresh)
    graded_mixed_rate: float = 0.65  # the other queries are of one colour, as in stage 3


def train_idefics2(out_dir: Path, *, seed: int = 0, schedule: Idefics2Schedule = Idefics2Schedule()) -> None:
    """Writes out_dir/"idefics2" (model, processor, tokenizer), out_dir/"vpe-lora" and out_dir/"metric-lora"."""
    out_dir = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        processor = build_processor()
        model = Idefics2ForConditionalGeneration(build_config(processor))
        model.generation_config = generation_config(processor)
        texts = _Texts(processor)

        started = time.perf_counter()
        _train_perception(model, processor, texts, rng, schedule)
        model.eval()
        pool = _ImagePool(model, processor, rng, schedule.pool_per_colour)
        _train_reasoning(model, texts, rng, pool, schedule)
        model.eval()
        log.info("idefics2 base trained in %.0f s", time.perf_counter() - started)
        model.save_pretrained(out_dir / "idefics2")
        processor.save_pretrained(out_dir / "idefics2")
    # Stages 3 and 4 from the files just written, as runs of each alone do: the same seed gives the same files.
    # The VPE adapter learns on the base as stages 1-2 leave it, the metric adapter after its "+" / "-" rows
    # are drawn apart (which changes no VPE answer: the VPE never writes them).
    train_adapters(out_dir, seed=seed, schedule=schedule, names=("vpe",))
    spread_answer_rows(out_dir, schedule.answer_spread)
    train_adapters(out_dir, seed=seed, schedule=schedule, names=("metric",))
    train_graded_metric(out_dir, seed=seed, schedule=schedule)


def spread_answer_rows(out_dir: Path, factor: float) -> None:
    """Draws the output rows of "+" and "-" of the base out_dir/"idefics2" apart about their middle by factor,
    and rewrites its weights (before the metric adapter trains; every other tensor stays bit for bit).

    An adapter cannot change the output layer, so the distance of these two rows bounds the metric's score:
    |P("+") - 0.5| at most where the last hidden state, normalised, lies along their difference. The lexicon
    task (issue 20) took a share of the check questions that answer "+" / "-", and weight decay drew the rows
    together (0.135 apart before it, 0.053 after: every score within 0.32-0.68 whatever the adapter learned);
    2.5 gives the bound stages 3-4 were tuned with (0.13-0.87)."""
    processor, model = _load_base(Path(out_dir))
    texts = _Texts(processor)
    with torch.no_grad():
        head = model.lm_head.weight
        middle = (head[texts.plus] + head[texts.minus]) / 2
        half = (head[texts.plus] - head[texts.minus]) / 2
        head[texts.plus] = middle + factor * half
        head[texts.minus] = middle - factor * half
    model.save_pretrained(Path(out_dir) / "idefics2")


def _save_adapter(model, state: dict[str, torch.Tensor], adapter_dir: Path) -> None:
    """A fresh wrap of the plain base per adapter: the same files the tiny builder writes."""
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**VIPER_LORA_CONFIG))
    set_peft_model_state_dict(peft_model, state)
    peft_model.save_pretrained(adapter_dir)


# --- Token ids ------------------------------------------------------------------------------------


class _Texts:
    """Token ids of the prompts, built with the service's own prompt code."""

    def __init__(self, processor: Idefics2Processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.eou = self.tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE)
        self.image_token = processor.image_token_id
        self.plus = self.encode(LIKED_ANSWER)[-1]
        self.minus = self.encode(DISLIKED_ANSWER)[-1]
        self.metric_prompts = {n: metric_prompt_ids(processor, n) for n in range(1, 9)}
        self.tones = world.tones()
        self.train_tones = world.tones(("train",))  # the words training comments use: the VPE adapter's chats
        # The VPE prompt up to its first image: the same for every user.
        self.fake = fake = processor.tokenizer.convert_tokens_to_ids(processor.fake_image_token)
        self.vpe_prefix_length = self.vpe_prompt(["x"]).index(fake)

    def encode(self, text: str) -> list[int]:
        return encode_as_trained(self.tokenizer, expand_image_tokens(text, self.processor), add_bos=False)

    def vpe_prompt(self, comments: list[str]) -> list[int]:
        prompt = self.processor.apply_chat_template(build_vpe_messages(comments), add_generation_prompt=True)
        return encode_as_trained(self.tokenizer, expand_image_tokens(prompt, self.processor), add_bos=True)

    def vpe_answer(self, liked: str, disliked: str) -> list[int]:
        """ " Liked Art Features: <liked>\\nDisliked Art Features: <disliked>" and <end_of_utterance>."""
        text = f" {LIKED_MARKER}" + (f" {liked}" if liked else "") + f"\n{DISLIKED_MARKER}"
        return self.encode(text + (f" {disliked}" if disliked else "")) + [self.eou]


@dataclass
class _Sequence:
    ids: list[int]
    images: list  # per <image> run, in order: a PIL image (base stage) or a pool index (adapter stage)
    targets: list[tuple[int, int]]  # (position whose next token is predicted, token id)
    plus_probability: float | None = None  # metric: soft target for the last position
    # Deep supervision of the in-context tasks: (probe, position, colour index or shares), see _Probes.
    probes: list[tuple[int, int, int | tuple[float, ...]]] = field(default_factory=list)


class _Probes(torch.nn.Module):
    """Linear read-outs of the text model's hidden states, used only while training (not saved).

    In-context labelling (the metric's skill) is a chain of attention steps that plain next-token loss finds
    slowly, if at all, on a toy budget (it stayed at chance): with these read-outs asking each intermediate
    step for its result, it is learned within the reasoning stage (the metric adapter alone: ~300 steps).
    Read-out 0 (after layer 1, at an answer token): its image's colour; 1 (after layer 1, where a label is
    predicted): the current image's colour; 2 and 3 (after layer 2, there): the colour the first / second
    label went with so far ("+" / "-" in the metric).
    """

    LAYERS = (1, 1, 2, 2)

    def __init__(self, hidden_size: int, layers: tuple[int, ...] = LAYERS):
        super().__init__()
        self.layers = layers
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden_size, len(world.COLOURS)) for _ in layers)

    def loss(self, hidden_states: tuple[torch.Tensor, ...], sequences: list[_Sequence],
             offset: int = 0) -> torch.Tensor:
        """A probe's colour is an index, or (stage 4) a distribution over COLOURS: an image's colour shares.
        hidden_states start at position offset (a cached prefix before them)."""
        rows = [(b, probe, position, colour) for b, s in enumerate(sequences) for probe, position, colour in s.probes]
        total = hidden_states[0].new_zeros(())
        for probe, head in enumerate(self.heads):
            for soft in (False, True):
                mine = [(b, position, colour) for b, p, position, colour in rows
                        if p == probe and isinstance(colour, tuple) == soft]
                if mine:
                    batch, positions, colours = (torch.tensor(column) for column in zip(*mine))
                    states = hidden_states[self.layers[probe]][batch, positions - offset]
                    total = total + F.cross_entropy(head(states), colours, reduction="sum") / len(sequences)
        return total


# An image source: colour index -> what _Sequence.images holds (a PIL image, or an _ImagePool index).
ImageSource = Callable[[int], object]


def _answer(ids: list[int], targets: list[tuple[int, int]], answer: list[int], *, learn: bool = True) -> None:
    """Appends answer to ids; with learn, each of its tokens becomes a target."""
    for token in answer:
        if learn:
            targets.append((len(ids) - 1, token))
        ids.append(token)


def _chat_sequence(texts: _Texts, rng: np.random.Generator, image: ImageSource, tone_rate: float = 0.25,
                   tones: list[tuple[str, str]] | None = None) -> _Sequence:
    """1-3 chat turns: about one image each, its colour, whether it is a given colour ("+" / "-"), or what a
    comment on it says, answered in VPE's format for that one image; or, without an image, the tone of a word
    or phrase of the toy language (world.tones: every word of both splits, so the base knows words that no
    training comment uses)."""
    ids = [texts.tokenizer.bos_token_id]
    images, targets = [], []
    for _ in range(rng.integers(1, 4)):
        index = int(rng.integers(len(world.COLOURS)))
        colour = world.COLOURS[index]
        roll = rng.random()
        if roll < tone_rate:
            lexicon = texts.tones if tones is None else tones
            entry, tone = lexicon[rng.integers(len(lexicon))]
            ids += texts.encode(f"User:{TONE_QUESTION.format(entry)}{END_OF_UTTERANCE}\nAssistant:")
            _answer(ids, targets, texts.encode(f" {tone}") + [texts.eou])
            ids += texts.encode("\n")
            continue
        images.append(image(index))
        if roll < 0.45:
            question, answer = CAPTION_QUESTION, texts.encode(f" {colour}")
        elif roll < 0.65:
            asked = colour if rng.random() < 0.5 else world.COLOURS[rng.integers(len(world.COLOURS))]
            words = world.COLOUR_WORDS[asked]
            question = CHECK_QUESTION.format(words[0] if rng.random() < 0.5 else words[rng.integers(len(words))])
            answer = texts.encode(" " + (LIKED_ANSWER if asked == colour else DISLIKED_ANSWER))
        else:
            liked = bool(rng.random() < 0.5)
            question = world.comment(rng, colour, liked, "train", colourless_rate=0.25)
            answer = texts.vpe_answer(colour if liked else "", "" if liked else colour)[:-1]
        ids += texts.encode(f"User:<image>{question}{END_OF_UTTERANCE}\nAssistant:")
        _answer(ids, targets, answer + [texts.eou])
        ids += texts.encode("\n")
    return _Sequence(ids, images, targets)


def _label_sequence(texts: _Texts, rng: np.random.Generator, image: ImageSource) -> _Sequence:
    """In-context labels, in the shape of the metric's prompt: turns "User:<image>Label?<eou>\nAssistant: yes"
    over images of two colours, each colour given one of the two labels at random; every label after a
    colour's first is learned. (Not the metric's "+" / "-" nor its question: turning this skill into the
    metric's answers is the metric adapter's job.)"""
    colours = [int(c) for c in rng.choice(len(world.COLOURS), size=2, replace=False)]
    labels = dict(zip(colours, (0, 1) if rng.random() < 0.5 else (1, 0)))
    label_ids = [texts.encode(f" {label}")[-1] for label in LABELS]
    ids = [texts.tokenizer.bos_token_id]
    images, targets, probes = [], [], []
    seen: dict[int, int] = {}  # label -> colour
    for _ in range(rng.integers(3, 18)):
        colour = colours[rng.integers(len(colours))]
        images.append(image(colour))
        ids += texts.encode(f"User:<image>{LABEL_QUESTION}{END_OF_UTTERANCE}\nAssistant:")
        label = labels[colour]
        if colour in seen.values():
            probes.append((1, len(ids) - 1, colour))
            probes += [(2 + known, len(ids) - 1, c) for known, c in seen.items()]
        _answer(ids, targets, [label_ids[label]], learn=colour in seen.values())
        probes.append((0, len(ids) - 1, colour))
        seen[label] = colour
        ids += [texts.eou] + texts.encode("\n")
    return _Sequence(ids, images, targets, probes=probes)


def _summary_sequence(texts: _Texts, rng: np.random.Generator, image: ImageSource) -> _Sequence:
    """Commented images of one liked and one disliked colour in one turn, summed up as "likes <colour>,
    dislikes <colour>" (not VPE's format: turning this skill into VPE's answer is the VPE adapter's job)."""
    liked, disliked = (int(c) for c in rng.choice(len(world.COLOURS), size=2, replace=False))
    rated = _rated_images(rng, liked, disliked, int(rng.integers(1, 9)))
    text = "".join(f"<image>{world.comment(rng, world.COLOURS[c], is_liked, 'train')}" for c, is_liked in rated)
    ids = [texts.tokenizer.bos_token_id] + texts.encode(f"User:{text}{END_OF_UTTERANCE}\nAssistant:")
    targets: list[tuple[int, int]] = []
    summary = f" {SUMMARY_WORDS[0]} {world.COLOURS[liked]}, {SUMMARY_WORDS[1]} {world.COLOURS[disliked]}"
    _answer(ids, targets, texts.encode(summary) + [texts.eou])
    return _Sequence(ids, [image(c) for c, _ in rated], targets)


def _rated_images(rng: np.random.Generator, liked: int, disliked: int, per_side: int) -> list[tuple[int, bool]]:
    """per_side (colour, liked) pairs of each side, shuffled."""
    rated = [(colour, is_liked) for colour, is_liked in ((liked, True), (disliked, False)) for _ in range(per_side)]
    return [rated[i] for i in rng.permutation(len(rated))]


def _vpe_sequence(texts: _Texts, rng: np.random.Generator, image: ImageSource,
                  masked_rate: float = 0.0, masked_liked: float = 0.5, negation_rate: float = 0.3) -> _Sequence:
    """The VPE prompt for commented images of one liked and one disliked colour, and its answer; read-outs at
    each comment's last token: whether it praises or complains (not for masked ones), and its image's colour."""
    liked, disliked = (int(c) for c in rng.choice(len(world.COLOURS), size=2, replace=False))
    rated = _rated_images(rng, liked, disliked, int(rng.choice([2, 4, 6, 8, 8, 8])))
    # With probability masked_rate one side's comments have their sentiment words masked (world.comment's
    # masked: as words the adapter never read would be): that side's colour is then the one the other side's
    # comments do not name.
    masked_side = bool(rng.random() < masked_liked) if rng.random() < masked_rate else None
    # Complaints may negate a praise word more often than the base's comments do (negation_rate): "not" and a
    # praise the adapter never read ("not sublime") is read as a complaint then.
    comments = [world.comment(rng, world.COLOURS[c], is_liked, "train", masked=is_liked == masked_side,
                              negation_rate=negation_rate) for c, is_liked in rated]
    ids = texts.vpe_prompt(comments)
    ends = _comment_ends(texts, ids)
    probes = [(1, end, colour) for end, (colour, _) in zip(ends, rated)]
    probes += [(0, end, int(not is_liked)) for end, (_, is_liked) in zip(ends, rated) if is_liked != masked_side]
    targets: list[tuple[int, int]] = []
    _answer(ids, targets, texts.vpe_answer(world.COLOURS[liked], world.COLOURS[disliked]))
    return _Sequence(ids, [image(c) for c, _ in rated], targets, probes=probes)


def _comment_ends(texts: _Texts, ids: list[int]) -> list[int]:
    """The position of each comment's last token in a VPE prompt: before the next image, or the end of the turn."""
    starts = [i for i in range(len(ids) - 1) if ids[i] == texts.fake and ids[i + 1] == texts.image_token]
    turn_end = len(ids) - 1 - ids[::-1].index(texts.eou)
    return [start - 1 for start in starts[1:]] + [turn_end - 1]


def _metric_sequence(texts: _Texts, rng: np.random.Generator, image: ImageSource) -> _Sequence:
    """The metric prompt for one liked and one disliked colour; the query is of the liked colour ("+"), the
    disliked one ("-") or another one (either, as likely)."""
    liked, disliked = (int(c) for c in rng.choice(len(world.COLOURS), size=2, replace=False))
    pairs = int(rng.choice([1, 2, 4, 6, 8, 8, 8, 8]))
    roll = rng.random()
    query, probability = (liked, 1.0) if roll < 0.4 else (disliked, 0.0) if roll < 0.8 else (None, 0.5)
    if query is None:
        others = [c for c in range(len(world.COLOURS)) if c not in (liked, disliked)]
        query = others[rng.integers(len(others))]
    images, colours = [], []
    for _ in range(pairs):  # d0, l0, d1, l1, ...
        colours += [disliked, liked]
    colours.append(query)
    images = [image(colour) for colour in colours]
    ids = list(texts.metric_prompts[pairs])
    # The probes as in _label_sequence: "+" is the first label, "-" the second.
    answers = [position for position, token in enumerate(ids) if token in (texts.plus, texts.minus)]
    last = len(ids) - 1
    probes = [(0, position, colour) for position, colour in zip(answers, colours)]
    probes += [(1, last, query), (2, last, liked), (3, last, disliked)]
    return _Sequence(ids, images, [], plus_probability=probability, probes=probes)


# --- Images ---------------------------------------------------------------------------------------


def _pixel_values(processor: Idefics2Processor, images: list[Image.Image]) -> torch.Tensor:
    """[n, 3, H, W] as the service's processor makes them (the toy images are square: no padding)."""
    batch = processor.image_processor(images=[[image] for image in images], return_tensors="pt")
    return batch["pixel_values"][:, 0]


def _vision_states(model: Idefics2ForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision encoder's last hidden states [n, patches, width], every patch real."""
    patch = model.config.vision_config.patch_size
    mask = torch.ones(pixel_values.shape[0], pixel_values.shape[2] // patch, pixel_values.shape[3] // patch,
                      dtype=torch.bool)
    return model.model.vision_model(pixel_values=pixel_values, patch_attention_mask=mask).last_hidden_state


def _connect(model: Idefics2ForConditionalGeneration, vision_states: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(vision_states.shape[:2], dtype=torch.bool)
    return model.model.connector(vision_states, attention_mask=mask)


class _ImagePool:
    """Training images per colour with their (frozen) vision encoder states."""

    def __init__(self, model, processor, rng: np.random.Generator, per_colour: int):
        images, self.by_colour = [], []
        for colour in world.COLOURS:
            start = len(images)
            images += [world.draw_image(rng, colour, "train") for _ in range(per_colour)]
            self.by_colour.append(range(start, len(images)))
        with torch.no_grad():
            self.states = torch.cat([_vision_states(model, _pixel_values(processor, images[i : i + 64]))
                                     for i in range(0, len(images), 64)])

    def sample(self, rng: np.random.Generator, colour: int) -> int:
        indices = self.by_colour[colour]
        return indices[rng.integers(len(indices))]


# --- Training -------------------------------------------------------------------------------------


def _losses(model, texts: _Texts, sequences: list[_Sequence], image_states: torch.Tensor,
            prefix_length: int = 0, probes: _Probes | None = None,
) -> torch.Tensor:
    """Mean loss over the batch: cross-entropy on answer tokens, or on ("+", "-") for metric sequences.

    image_states: [images in batch order, IMAGE_SEQ_LEN, hidden], the connector's output. With
    prefix_length, every sequence starts with the same prefix_length text tokens: they run once, without
    gradient (the forward pass is exact; only the prefix positions' own gradient is left out).
    """
    inner = model.model
    embed = inner.text_model.get_input_embeddings()
    cache = None
    if prefix_length:
        prefix = torch.tensor([sequences[0].ids[:prefix_length]])
        with torch.no_grad():
            layers = inner.text_model(inputs_embeds=embed(prefix), use_cache=True).cache.layers
        rows = len(sequences)
        cache = DynamicCache(
            ddp_cache_data=[(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1))
                            for layer in layers]
        )
    length = max(len(s.ids) for s in sequences)
    pad = texts.tokenizer.pad_token_id
    ids = torch.tensor([s.ids[prefix_length:] + [pad] * (length - len(s.ids)) for s in sequences])
    mask = torch.tensor([[1] * len(s.ids) + [0] * (length - len(s.ids)) for s in sequences])
    embeds = embed(ids)
    image_mask = (ids == texts.image_token).unsqueeze(-1)
    embeds = embeds.masked_scatter(image_mask, image_states.reshape(-1, image_states.shape[-1]).to(embeds.dtype))
    probed = probes is not None and any(s.probes for s in sequences)
    output = inner.text_model(inputs_embeds=embeds, attention_mask=mask, cache=cache,
                              use_cache=cache is not None, output_hidden_states=probed)
    hidden = F.pad(output.last_hidden_state, (0, 0, prefix_length, 0))  # positions as in the whole sequence

    losses = [probes.loss(output.hidden_states, sequences, prefix_length)] if probed else []
    token_rows = [(b, p, t) for b, s in enumerate(sequences) for p, t in s.targets]
    if token_rows:
        rows, positions, tokens = (torch.tensor(column) for column in zip(*token_rows))
        logits = model.lm_head(hidden[rows, positions])
        losses.append(F.cross_entropy(logits, tokens, reduction="sum") / len(sequences))
    metric_rows = [(b, len(s.ids) - 1, s.plus_probability) for b, s in enumerate(sequences)
                   if s.plus_probability is not None]
    if metric_rows:
        rows, positions, probability = zip(*metric_rows)
        logits = model.lm_head(hidden[list(rows), list(positions)])[:, [texts.plus, texts.minus]]
        target = torch.tensor([[p, 1 - p] for p in probability])
        losses.append(-(target * F.log_softmax(logits, dim=-1)).sum() / len(sequences))
    return sum(losses)


def _lr_schedule(step: int, total: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _optimise(groups: list[list[torch.nn.Parameter]], steps: int, peak_lr: float,
              losses_at: Callable[[int], dict[str, torch.Tensor]], label: str) -> None:
    """AdamW with warm-up and cosine decay on the sum of the named losses losses_at(step) returns.

    Each group's gradient is clipped on its own: one adapter's large gradients do not slow the other's."""
    optimiser = torch.optim.AdamW([{"params": group} for group in groups], lr=peak_lr, weight_decay=0.01,
                                  betas=(0.9, 0.98))
    running: dict[str, float] = {}
    for step in range(steps):
        for group in optimiser.param_groups:
            group["lr"] = _lr_schedule(step, steps, peak_lr)
        losses = losses_at(step)
        optimiser.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        for group in groups:
            torch.nn.utils.clip_grad_norm_(group, 1.0)
        optimiser.step()
        for name, loss in losses.items():
            running[name] = loss.item() if name not in running else 0.95 * running[name] + 0.05 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            log.info("%s step %d/%d loss %s", label, step, steps,
                     " ".join(f"{name} {value:.4f}" for name, value in running.items()))


def _train_perception(model, processor, texts: _Texts, rng: np.random.Generator,
                      schedule: Idefics2Schedule) -> None:
    """Every weight, on single-image chats with freshly drawn images."""
    model.train()

    def losses_at(step: int) -> dict[str, torch.Tensor]:
        draw = lambda colour: world.draw_image(rng, world.COLOURS[colour], "train")  # noqa: E731
        sequences = [_chat_sequence(texts, rng, draw) for _ in range(schedule.perception_batch)]
        pixels = _pixel_values(processor, [image for s in sequences for image in s.images])
        return {"chat": _losses(model, texts, sequences, _connect(model, _vision_states(model, pixels)))}

    _optimise([list(model.parameters())], schedule.perception_steps, schedule.perception_lr, losses_at, "perception")


def _train_reasoning(model, texts: _Texts, rng: np.random.Generator, pool: _ImagePool,
                     schedule: Idefics2Schedule) -> None:
    """Connector and text model (the vision encoder frozen), on multi-image chats: in-context labels and
    summaries of commented images, with single-image chats so the first stage's skills stay."""
    model.train()
    makers = {"chat": _chat_sequence, "labels": _label_sequence, "summary": _summary_sequence}
    probes = _Probes(model.config.text_config.hidden_size)

    def losses_at(step: int) -> dict[str, torch.Tensor]:
        losses = {}
        for name, batch in schedule.reasoning_batches:
            make = makers[name]
            sequences = [make(texts, rng, lambda colour: pool.sample(rng, colour)) for _ in range(batch)]
            states = pool.states[[index for s in sequences for index in s.images]]
            losses[name] = _losses(model, texts, sequences, _connect(model, states), probes=probes)
        return losses

    parameters = [p for n, p in model.named_parameters() if not n.startswith("model.vision_model.")]
    parameters += list(probes.parameters())
    _optimise([parameters], schedule.reasoning_steps, schedule.reasoning_lr, losses_at, "reasoning")


ADAPTER_SEED = 20  # stage 3's random draws come from [seed, ADAPTER_SEED], apart from stages 1-2' (issue 20)


def train_adapters(out_dir: Path, *, seed: int = 0, schedule: Idefics2Schedule = Idefics2Schedule(),
                   names: tuple[str, ...] = ADAPTERS) -> None:
    """Stage 3: trains each adapter named, alone, on the frozen base out_dir/"idefics2" into out_dir/"<name>-lora".

    Own random state, from the files alone (as train_graded_metric), the same for each adapter: an adapter's
    files depend on the base, the seed and its own schedule only, not on the other adapter's training."""
    out_dir = Path(out_dir)
    for name in names:
        with _stage_on_base(out_dir, seed, ADAPTER_SEED, schedule.pool_per_colour) as (rng, _, model, texts, pool):
            started = time.perf_counter()
            state = _train_adapter(model, texts, rng, pool, schedule, name)
            log.info("idefics2 %s adapter trained in %.0f s", name, time.perf_counter() - started)
            _save_adapter(model, state, out_dir / f"{name}-lora")


@contextmanager
def _stage_on_base(out_dir: Path, seed: int, stage_seed: int, pool_per_colour: int):
    """A stage's own random state (forked, from the seed and the stage alone) and the frozen base with its
    texts and image pool, drawn in that order: a stage's files depend on the base, the seed and its schedule."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + stage_seed)
        rng = np.random.default_rng([seed, stage_seed])
        processor, model = _load_base(out_dir)
        texts = _Texts(processor)
        yield rng, processor, model, texts, _ImagePool(model, processor, rng, pool_per_colour)


def _load_base(out_dir: Path) -> tuple[Idefics2Processor, Idefics2ForConditionalGeneration]:
    processor = Idefics2Processor.from_pretrained(out_dir / "idefics2")
    model = Idefics2ForConditionalGeneration.from_pretrained(out_dir / "idefics2").eval()
    model.name_or_path = model.config._name_or_path = ""  # as built from a config: no base path in the files
    return processor, model


def _train_adapter(model, texts: _Texts, rng: np.random.Generator, pool: _ImagePool,
                   schedule: Idefics2Schedule, name: str) -> dict[str, torch.Tensor]:
    """One adapter on a frozen copy of the base; returns its peft state dict.

    The VPE adapter also answers the base's single-image chats (vpe_chat_batch: it keeps the base's reading
    of one comment, which holds for words no VPE prompt uses) and has read-outs at each comment's end
    (vpe_probe_layers: the comment's sentiment and colour, read where the base reads them)."""
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**VIPER_LORA_CONFIG), adapter_name=name)
    hidden = model.config.text_config.hidden_size
    probes = {"metric": _Probes(hidden)}  # both made whichever adapter trains: the same torch draws
    if schedule.vpe_probe_layers:
        probes["vpe"] = _Probes(hidden, schedule.vpe_probe_layers)
    peft_model.train()
    inner = peft_model.base_model.model
    parameters = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    # Streams of the adapter's own (numpy's and torch's, for its dropout), as when both adapters trained together.
    seeds = rng.integers(2**62, size=len(ADAPTERS))
    stream = np.random.default_rng(seeds[ADAPTERS.index(name)])
    torch.set_rng_state(torch.Generator().manual_seed(int(seeds[ADAPTERS.index(name)])).get_state())
    draw = lambda colour: pool.sample(stream, colour)  # noqa: E731

    def losses_at(step: int) -> dict[str, torch.Tensor]:
        if name == "metric":
            sequences = [_metric_sequence(texts, stream, draw) for _ in range(schedule.batch)]
            states = pool.states[[index for s in sequences for index in s.images]]
            return {name: _losses(inner, texts, sequences, _connect(inner, states), probes=probes[name])}
        sequences = [_vpe_sequence(texts, stream, draw, schedule.vpe_masked_rate, schedule.vpe_masked_liked,
                                   schedule.vpe_negation_rate) for _ in range(schedule.batch)]
        states = pool.states[[index for s in sequences for index in s.images]]
        losses = {name: _losses(inner, texts, sequences, _connect(inner, states), texts.vpe_prefix_length,
                                probes=probes.get(name))}
        if schedule.vpe_chat_batch:
            chats = [_chat_sequence(texts, stream, draw, schedule.vpe_tone_rate, texts.train_tones)
                     for _ in range(schedule.vpe_chat_batch)]
            states = pool.states[[index for s in chats for index in s.images]]
            losses["vpe chat"] = _losses(inner, texts, chats, _connect(inner, states))
        return losses

    extra = list(probes[name].parameters()) if name in probes else []
    steps = schedule.vpe_steps if name == "vpe" else schedule.adapter_steps
    _optimise([parameters + extra], steps, schedule.adapter_lr, losses_at, f"{name} adapter")
    return get_peft_model_state_dict(peft_model, adapter_name=name)


# --- Stage 4: the graded metric -------------------------------------------------------------------

GRADED_SEED = 21  # the stage's random draws come from [seed, GRADED_SEED] (issue 21), apart from stages 1-3'


def train_graded_metric(out_dir: Path, *, seed: int = 0, schedule: Idefics2Schedule = Idefics2Schedule()) -> None:
    """Stage 4: continues out_dir/"metric-lora" on the frozen base out_dir/"idefics2" with queries that mix
    colours, the target a degree (_graded_target), and rewrites it (the base and the VPE adapter stay).

    Stage 3's metric has one target per query colour, so it scores every image mostly of the liked colour
    alike (within 1e-4: best of N's ranking among such candidates was noise); here P("+") rises with the liked
    colour's share of the query and falls with the disliked one's, densely over the liked-dominated mixes a
    generator makes, with one-colour queries as in stage 3 beside them. Own random state, from the files
    alone: run on the committed weights it gives what train_idefics2 gives for that seed.
    """
    out_dir = Path(out_dir)
    with _stage_on_base(out_dir, seed, GRADED_SEED, schedule.graded_pool_per_colour) as (rng, processor, model,
                                                                                          texts, pool):
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**VIPER_LORA_CONFIG))
        state = load_file(out_dir / "metric-lora" / "adapter_model.safetensors")
        if unexpected := set_peft_model_state_dict(peft_model, state).unexpected_keys:
            raise ValueError(f"{out_dir / 'metric-lora'} is not this base's adapter: {unexpected[:3]}")
        started = time.perf_counter()
        _train_graded(peft_model, model, processor, texts, rng, pool, schedule)
        log.info("graded metric trained in %.0f s", time.perf_counter() - started)
        _save_adapter(model, get_peft_model_state_dict(peft_model), out_dir / "metric-lora")


def _train_graded(peft_model, model, processor, texts: _Texts, rng: np.random.Generator, pool: _ImagePool,
                  schedule: Idefics2Schedule) -> None:
    """The metric adapter alone; the context images from pool, the queries drawn fresh at each step (their
    vision states from the frozen base, after the pool's in the states' index)."""
    peft_model.train()
    inner = peft_model.base_model.model
    probes = _Probes(model.config.text_config.hidden_size)
    parameters = [p for n, p in peft_model.named_parameters() if "lora_" in n] + list(probes.parameters())

    def losses_at(step: int) -> dict[str, torch.Tensor]:
        sequences, queries = [], []
        for _ in range(schedule.graded_batch):
            sequence, query = _graded_metric_sequence(texts, rng, lambda colour: pool.sample(rng, colour),
                                                      schedule.graded_mixed_rate)
            sequence.images[-1] = len(pool.states) + len(queries)
            sequences.append(sequence)
            queries.append(query)
        with torch.no_grad():
            states = torch.cat([pool.states, _vision_states(model, _pixel_values(processor, queries))])
        states = states[[index for s in sequences for index in s.images]]
        return {"metric": _losses(inner, texts, sequences, _connect(inner, states), probes=probes)}

    _optimise([parameters], schedule.graded_steps, schedule.graded_lr, losses_at, "graded metric")


def _graded_metric_sequence(texts: _Texts, rng: np.random.Generator, image: ImageSource,
                            mixed_rate: float) -> tuple[_Sequence, Image.Image]:
    """The metric prompt as in _metric_sequence, with a query image (returned apart; its place in images is
    left None) that mixes colours with probability mixed_rate, and _graded_target as the target."""
    liked, disliked = (world.COLOURS[int(c)] for c in rng.choice(len(world.COLOURS), size=2, replace=False))
    pairs = int(rng.choice([1, 2, 4, 6, 8, 8, 8, 8]))
    query = _graded_query(rng, liked, disliked, mixed_rate)
    colours = [world.COLOURS.index(colour) for _ in range(pairs) for colour in (disliked, liked)]
    ids = list(texts.metric_prompts[pairs])
    # The probes as in _metric_sequence, the query's colour now its colours' shares.
    answers = [position for position, token in enumerate(ids) if token in (texts.plus, texts.minus)]
    probes = [(0, position, colour) for position, colour in zip(answers, colours)]
    shares = tuple(evaluate.colour_share(query, colour) for colour in world.COLOURS)
    last = len(ids) - 1
    probes += [(1, last, shares)] if sum(shares) else []
    probes += [(2, last, colours[1]), (3, last, colours[0])]
    sequence = _Sequence(ids, [*(image(colour) for colour in colours), None], [],
                         plus_probability=_graded_target(query, liked, disliked), probes=probes)
    return sequence, query


def _graded_query(rng: np.random.Generator, liked: str, disliked: str, mixed_rate: float) -> Image.Image:
    """One colour (as stage 3: liked, disliked or another) or, with probability mixed_rate, a mix: mostly the
    liked colour with a share of a hue neighbour, of the disliked colour, of another or of neutrals, small
    shares (up to 10%) as often as larger ones (up to 50%): the candidates a generator makes for a user."""
    roll = rng.random()
    others = [c for c in world.COLOURS if c not in (liked, disliked)]
    if rng.random() >= mixed_rate:
        colour = liked if roll < 0.4 else disliked if roll < 0.8 else others[rng.integers(len(others))]
        return world.draw_image(rng, colour, "train")
    main = liked if roll < 0.7 else disliked if roll < 0.85 else others[rng.integers(len(others))]
    second_roll = rng.random()
    if second_roll < 0.5:
        second = world.neighbours(main)[rng.integers(2)]
    elif second_roll < 0.75:
        second = disliked if main == liked else liked
    elif second_roll < 0.9:
        second = [c for c in world.COLOURS if c != main][rng.integers(len(world.COLOURS) - 1)]
    else:
        second = None
    area = rng.uniform(0, 0.1 if rng.random() < 0.5 else 0.5)
    return world.draw_mixed_image(rng, main, second, area, "train")


# P("+") moves by this much per unit of (liked share - disliked share). Not 0.5: stage 3 leaves the metric's
# scores at most ~0.87 (and at least ~0.13) however sure it is (spread_answer_rows), so targets far past that
# push every mostly-liked image to the same ceiling, where the ranking among them is lost. 0.3 was chosen on
# the former base; on issue 20's, 0.4 ranks generated candidates better (best of N's picks at strength 0.85:
# 93 of 100 against 86; grade rank correlation 0.72 against 0.54), though its targets for images almost all
# of the liked colour pass that bound.
GRADED_SCALE = 0.4


def _graded_target(image: Image.Image, liked: str, disliked: str) -> float:
    """P("+") for a query: 0.5 + GRADED_SCALE * (share of the liked colour - share of the disliked one), the
    shares as evaluate.colour_share measures them (0.8 for an image all of the liked colour, 0.2 for the
    disliked one, 0.5 for others: stage 3's order)."""
    return 0.5 + GRADED_SCALE * (evaluate.colour_share(image, liked) - evaluate.colour_share(image, disliked))
