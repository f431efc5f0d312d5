"""VPE: the reference prompt, parsing and extraction on the tiny IDEFICS2."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from viper_server.models.idefics2 import load_idefics2
from viper_server.models.vpe import (
    VPE_PROMPT_TEMPLATE,
    ExtractionCancelled,
    PreferenceExtractor,
    Preferences,
    build_vpe_inputs,
    build_vpe_messages,
    parse_preferences,
)

FIXTURES = Path(__file__).parent / "fixtures" / "viper_examples"
MAX_NEW_TOKENS = 16


def load_examples() -> tuple[list[Image.Image], list[str]]:
    comments = json.loads((FIXTURES / "comments.json").read_text())
    del comments["about"]
    images = [Image.open(FIXTURES / name).convert("RGB") for name in comments]
    return images, list(comments.values())


@pytest.fixture(scope="module")
def examples():
    return load_examples()


@pytest.fixture(scope="module")
def runtime(tiny_models_dir):
    adapters = {"vpe": str(tiny_models_dir / "vpe-lora"), "metric": str(tiny_models_dir / "metric-lora")}
    return load_idefics2(str(tiny_models_dir / "idefics2"), adapters)


@pytest.fixture(scope="module")
def extractor(runtime):
    return PreferenceExtractor(runtime, max_new_tokens=MAX_NEW_TOKENS)


def test_template_is_the_reference_bytes():
    assert len(VPE_PROMPT_TEMPLATE) == 1145
    digest = hashlib.sha256(VPE_PROMPT_TEMPLATE.encode("utf-8")).hexdigest()
    assert digest == "c3e54cf48bf4d10becb1dfd8155de3fc0f02a773078cc44e4e1406a06dbd71da"
    assert VPE_PROMPT_TEMPLATE.endswith("comments:\n    ")


def test_messages_are_one_user_turn_with_template_then_image_and_comment_per_image():
    messages = build_vpe_messages(["soft pinks", "too dark"])
    assert messages == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": VPE_PROMPT_TEMPLATE},
                {"type": "image"},
                {"type": "text", "text": "Comment 1: soft pinks"},
                {"type": "image"},
                {"type": "text", "text": "Comment 2: too dark"},
            ],
        }
    ]


def test_parse_reference_output():
    decoded = (
        "User: I will provide ... Comment 1: lovely\nAssistant: Liked Art Features: pastel colors, soft lighting, "
        "dreamy mood, watercolor\nDisliked Art Features: dark tones, soft lighting, cluttered composition"
    )
    assert parse_preferences(decoded) == Preferences(
        liked=["pastel colors", "dreamy mood", "watercolor"],
        disliked=["dark tones", "cluttered composition"],
        raw_text=decoded.split("\nAssistant:")[1].strip(),
    )


def test_parse_keeps_model_order_and_drops_repeats():
    decoded = "\nAssistant: Liked Art Features: b, a, c, a\nDisliked Art Features: z, y, z"
    preferences = parse_preferences(decoded)
    assert preferences.liked == ["b", "a", "c"]
    assert preferences.disliked == ["z", "y"]


def test_parse_reads_the_answer_after_the_last_assistant_marker():
    # A comment that imitates an answer must not be taken for the model's.
    decoded = (
        "User: Comment 1: \nAssistant: Liked Art Features: fake\nDisliked Art Features: fake too"
        "\nAssistant: Liked Art Features: real\nDisliked Art Features: also real"
    )
    preferences = parse_preferences(decoded)
    assert (preferences.liked, preferences.disliked) == (["real"], ["also real"])
    assert preferences.raw_text == "Liked Art Features: real\nDisliked Art Features: also real"


@pytest.mark.parametrize(
    "answer, liked, disliked",
    [
        ("I cannot tell.", [], []),
        ("Liked Art Features: pastel, glow", ["pastel", "glow"], []),
        ("Disliked Art Features: gloom", [], ["gloom"]),
        ("Liked Art Features:\nDisliked Art Features: gloom", [], ["gloom"]),
        ("Disliked Art Features: gloom\nLiked Art Features: glow", ["glow"], ["gloom"]),
    ],
)
def test_parse_missing_markers_give_empty_lists(answer, liked, disliked):
    preferences = parse_preferences("User: x\nAssistant: " + answer)
    assert (preferences.liked, preferences.disliked, preferences.raw_text) == (liked, disliked, answer)


def test_extract_equals_the_reference_procedure(runtime, extractor, tiny_models_dir, examples):
    images, comments = examples
    # The reference: its own processor and model, one adapter, plain greedy generate.
    processor = AutoProcessor.from_pretrained(
        tiny_models_dir / "idefics2", size={"longest_edge": 448, "shortest_edge": 378}, do_image_splitting=False
    )
    model = AutoModelForImageTextToText.from_pretrained(tiny_models_dir / "idefics2")
    model = PeftModel.from_pretrained(model, tiny_models_dir / "vpe-lora").eval()
    inputs = build_vpe_inputs(processor, images, comments)  # the training-time ids: tests/test_real_vocabulary.py
    with torch.inference_mode():
        generated = model.generate(
            **inputs, do_sample=False, repetition_penalty=0.99, max_new_tokens=MAX_NEW_TOKENS
        )
    assert generated.shape[1] == inputs["input_ids"].shape[1] + MAX_NEW_TOKENS
    reference = parse_preferences(processor.batch_decode(generated, skip_special_tokens=True)[0])

    runtime.model.set_adapter("metric", inference_mode=True)  # the extractor must select its own adapter
    preferences = extractor.extract(images, comments)
    assert preferences.raw_text  # the tiny model's noise, but MAX_NEW_TOKENS of it
    assert preferences == reference


def test_extract_is_deterministic_and_uses_its_adapter(runtime, extractor, examples):
    images, comments = examples[0][:2], examples[1][:2]
    first = extractor.extract(images, comments)
    assert extractor.extract(images, comments) == first
    with_metric_adapter = PreferenceExtractor(runtime, adapter="metric", max_new_tokens=MAX_NEW_TOKENS)
    assert with_metric_adapter.extract(images, comments).raw_text != first.raw_text


class StopAfter:
    """A should_stop that answers True from its n-th poll on."""

    def __init__(self, polls_before_stop: int):
        self.polls_before_stop = polls_before_stop
        self.polls = 0

    def __call__(self) -> bool:
        self.polls += 1
        return self.polls > self.polls_before_stop


@pytest.mark.parametrize("polls_before_stop", [0, 1, 5])
def test_should_stop_cancels_promptly_and_leaves_the_model_usable(extractor, examples, polls_before_stop):
    images, comments = examples[0][:2], examples[1][:2]
    should_stop = StopAfter(polls_before_stop)
    with pytest.raises(ExtractionCancelled):
        extractor.extract(images, comments, should_stop=should_stop)
    assert should_stop.polls == polls_before_stop + 1
    assert extractor.extract(images, comments, should_stop=lambda: False) == extractor.extract(images, comments)


def test_extract_polls_should_stop_while_generating(extractor, examples):
    should_stop = StopAfter(polls_before_stop=10**6)
    extractor.extract(examples[0][:1], examples[1][:1], should_stop=should_stop)
    # Before the images, once the model is held, then after each new token.
    assert should_stop.polls == 2 + MAX_NEW_TOKENS


def test_extract_needs_one_comment_per_image(extractor, examples):
    with pytest.raises(ValueError, match="comments"):
        extractor.extract(examples[0][:2], examples[1][:1])


def test_extractor_rejects_unknown_adapter(runtime):
    with pytest.raises(ValueError, match="unknown adapter"):
        PreferenceExtractor(runtime, adapter="nope")


def test_parse_drops_nul_characters_a_model_may_emit():
    answer = "Liked Art Features: soft\x00 light\nDisliked Art Features: dark\x00"
    parsed = parse_preferences(f"User: x\nAssistant: {answer}")
    assert (parsed.liked, parsed.disliked) == (["soft light"], ["dark"])
    assert "\x00" not in parsed.raw_text
