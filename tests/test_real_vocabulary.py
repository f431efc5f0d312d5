"""Token ids on the real IDEFICS2-8b text vocabulary (Mistral-7B v1 SentencePiece, shipped by mistral-common).

"Training-time ids" are what transformers ~4.40 fed the adapters: its processor put no space after an
image, and its fast Llama tokenizer (idefics2-8b's tokenizer.json, legacy style) normalized each text
piece between added tokens on its own, prepending the "▁" word marker to every piece. The fixture
below rebuilds that pipeline with the `tokenizers` library, independently of the service's code.
"""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from tokenizers import Tokenizer, normalizers
from transformers import Idefics2ImageProcessorPil, Idefics2Processor, LlamaTokenizer

from viper_server.models.idefics2 import VIPER_PROCESSOR_SETTINGS
from viper_server.models.metric import build_metric_prompt, metric_prompt_ids, resolve_score_token_ids
from viper_server.models.prompt_ids import expand_image_tokens
from viper_server.models.tiny_idefics2 import IDEFICS2_CHAT_TEMPLATE
from viper_server.models.vpe import build_vpe_inputs, build_vpe_messages

FIXTURES = Path(__file__).parent / "fixtures" / "viper_examples"
# IDEFICS2-8b's additions to the 32000-token Mistral vocabulary, in its order.
ADDED_TOKENS = {"<fake_token_around_image>": 32000, "<image>": 32001, "<end_of_utterance>": 32002}
WORD_MARKER, NEWLINE, END_OF_UTTERANCE = 28705, 13, 32002  # "▁", "<0x0A>"


def find_vocabulary() -> Path:
    try:
        import mistral_common
    except ImportError:
        pytest.skip("mistral-common is not installed: it ships the real vocabulary")
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        pytest.skip(f"{path} not found: this mistral-common version does not ship tokenizer.model.v1")
    return path


def build_processor(vocabulary: Path, folder: Path, *, legacy: bool) -> Idefics2Processor:
    """An IDEFICS2-8b processor as transformers 5 builds it, on the real vocabulary."""
    shutil.copy(vocabulary, folder / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(folder, legacy=legacy, add_bos_token=True)
    tokenizer.add_special_tokens({"additional_special_tokens": list(ADDED_TOKENS)})
    assert tokenizer.convert_tokens_to_ids(list(ADDED_TOKENS)) == list(ADDED_TOKENS.values())
    image_processor = Idefics2ImageProcessorPil(**VIPER_PROCESSOR_SETTINGS)
    return Idefics2Processor(image_processor, tokenizer, image_seq_len=64, chat_template=IDEFICS2_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def vocabulary() -> Path:
    return find_vocabulary()


@pytest.fixture(scope="module")
def processor(vocabulary, tmp_path_factory) -> Idefics2Processor:
    # legacy=False: transformers 5's default, and what its Idefics2Processor's inserted space compensates for.
    return build_processor(vocabulary, tmp_path_factory.mktemp("real-vocabulary"), legacy=False)


@pytest.fixture(scope="module")
def training_ids(processor):
    legacy = Tokenizer.from_str(processor.tokenizer.backend_tokenizer.to_str())
    legacy.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    legacy.pre_tokenizer = None

    def encode(prompt: str) -> list[int]:
        """Ids of a prompt with <image> placeholders, as transformers 4.40's processor produced them."""
        image = "<fake_token_around_image>" + "<image>" * 64 + "<fake_token_around_image>"
        text = prompt.replace("<image>", image).replace("<fake_token_around_image>" * 2, "<fake_token_around_image>")
        return legacy.encode(text).ids

    return encode


def without_marker_before_newline_after_end_of_utterance(ids: list[int]) -> list[int]:
    def dropped(position: int) -> bool:
        return ids[position - 1 : position + 2] == [END_OF_UTTERANCE, WORD_MARKER, NEWLINE]

    return [token for position, token in enumerate(ids) if not dropped(position)]


def fixture_comments() -> list[str]:
    comments = json.loads((FIXTURES / "comments.json").read_text())
    del comments["about"]
    return list(comments.values())


def test_metric_token_ids_resolve_to_the_references(processor):
    assert resolve_score_token_ids(processor.tokenizer) == (648, 387)


def test_a_space_after_an_image_changes_the_next_word(processor, training_ids):
    tokenizer = processor.tokenizer
    attached = tokenizer("<fake_token_around_image>Score", add_special_tokens=False).input_ids
    spaced = tokenizer("<fake_token_around_image> Score", add_special_tokens=False).input_ids
    assert tokenizer.convert_ids_to_tokens(attached) == ["<fake_token_around_image>", "Score"]
    assert tokenizer.convert_ids_to_tokens(spaced) == ["<fake_token_around_image>", "▁Score"]
    # In training the word after an image carried the marker: transformers 5's space restores it.
    assert training_ids("<image>Score")[-1] == spaced[-1]


@pytest.mark.parametrize("legacy", [False, True])
def test_metric_prompt_ids_are_the_training_ids(vocabulary, tmp_path, training_ids, legacy):
    # Whichever way the checkpoint's tokenizer config sets `legacy` (transformers 5 honours it).
    processor = build_processor(vocabulary, tmp_path, legacy=legacy)
    for num_pairs in (1, 8):
        assert metric_prompt_ids(processor, num_pairs) == training_ids(build_metric_prompt(num_pairs))


def test_transformers5_processor_drops_the_marker_after_each_end_of_utterance(processor, training_ids):
    # The metric path does not use the processor's text handling; this records why.
    prompt = build_metric_prompt(8)
    expected = training_ids(prompt)
    fed_by_processor = processor(text=prompt).input_ids[0]
    assert fed_by_processor != expected
    assert fed_by_processor == without_marker_before_newline_after_end_of_utterance(expected)
    assert len(expected) - len(fed_by_processor) == prompt.count("<end_of_utterance>\n") == 33
    # Without the space the processor adds, the words after images would differ as well.
    unspaced = processor.tokenizer(expand_image_tokens(prompt, processor)).input_ids
    assert unspaced != fed_by_processor


def test_vpe_inputs_are_the_training_ids(processor, training_ids):
    comments = fixture_comments()
    images = [Image.new("RGB", (32, 32))] * len(comments)
    prompt = processor.apply_chat_template(build_vpe_messages(comments), add_generation_prompt=True)
    assert prompt.count("<image>") == len(comments) == 16
    assert prompt.endswith("<end_of_utterance>\nAssistant:")
    expected = training_ids(prompt)
    # The transformers 5 processor on the chat-template text misses the "▁" before "\nAssistant:" ...
    fed_by_processor = processor(text=prompt, images=images).input_ids[0]
    assert fed_by_processor == without_marker_before_newline_after_end_of_utterance(expected)
    assert len(expected) - len(fed_by_processor) == 1
    # ... so vpe.py builds its inputs with the training-time encoding.
    assert build_vpe_inputs(processor, images, comments)["input_ids"][0].tolist() == expected
