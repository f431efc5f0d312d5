"""Tiny IDEFICS2 checkpoints and the loader shared by the real and tiny models."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from viper_server.models.idefics2 import ModelLoadError, load_idefics2
from viper_server.models.tiny_idefics2 import SPECIAL_TOKENS, build_tiny_idefics2
from viper_server.models.vpe import VPE_PROMPT_TEMPLATE

FIXTURES = Path(__file__).parent / "fixtures" / "viper_examples"


def adapter_dirs(models_dir: Path, *names: str) -> dict[str, str]:
    folders = {"vpe": "vpe-lora", "metric": "metric-lora"}
    return {name: str(models_dir / folders[name]) for name in names}


@pytest.fixture(scope="module")
def runtime(tiny_models_dir):
    return load_idefics2(str(tiny_models_dir / "idefics2"), adapter_dirs(tiny_models_dir, "vpe", "metric"))


@pytest.fixture(scope="module")
def query_inputs(runtime):
    prompt = "User:<image>Score for this image?<end_of_utterance>\nAssistant:"
    image = Image.open(FIXTURES / "query1.png").convert("RGB")
    return runtime.processor(text=prompt, images=[image], return_tensors="pt")


def last_logits(model, inputs) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs).logits[0, -1]


def files_by_name(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_build_is_deterministic_per_seed(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        build_tiny_idefics2(tmp_path / name, seed=seed)
    first, again, other_seed = (files_by_name(tmp_path / name) for name in "abc")
    assert set(first) >= {
        "idefics2/model.safetensors",
        "idefics2/processor_config.json",
        "idefics2/tokenizer.json",
        "vpe-lora/adapter_model.safetensors",
        "metric-lora/adapter_model.safetensors",
    }
    assert first == again
    assert first["idefics2/model.safetensors"] != other_seed["idefics2/model.safetensors"]
    assert first["vpe-lora/adapter_model.safetensors"] != first["metric-lora/adapter_model.safetensors"]


def test_tiny_tokenizer_has_idefics2_tokens_and_encodes_any_text(runtime):
    tokenizer = runtime.processor.tokenizer
    assert tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(len(SPECIAL_TOKENS)))
    assert runtime.model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    for text in ("+", "-", VPE_PROMPT_TEMPLATE, "Liked Art Features: pastel, ünïcode ✓"):
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer("+").input_ids[-1] != tokenizer("-").input_ids[-1]


def test_tiny_chat_template_is_idefics2s(runtime):
    content = [{"type": "text", "text": "Hi"}, {"type": "image"}, {"type": "text", "text": "x"}]
    messages = [{"role": "user", "content": content}]
    prompt = runtime.processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "User: Hi<image>x<end_of_utterance>\nAssistant:"


def test_load_gives_one_peft_model_with_named_adapters_in_eval_mode(runtime):
    assert runtime.adapter_names == ["vpe", "metric"]
    assert runtime.model.active_adapter == "vpe"
    assert runtime.dtype == torch.float32 and runtime.device == torch.device("cpu")
    assert not runtime.model.training
    assert not any(parameter.requires_grad for parameter in runtime.model.parameters())
    image_processor = runtime.processor.image_processor
    assert (image_processor.size.longest_edge, image_processor.size.shortest_edge) == (448, 378)
    assert image_processor.do_image_splitting is False


def test_viper_processor_settings_override_the_checkpoints(tiny_models_dir, tmp_path):
    # The real idefics2-8b processor splits images and allows 980 px: the loader must override both.
    base = tmp_path / "idefics2"
    shutil.copytree(tiny_models_dir / "idefics2", base)
    config_path = base / "processor_config.json"
    config = json.loads(config_path.read_text())
    config["image_processor"].update(do_image_splitting=True, size={"longest_edge": 980, "shortest_edge": 378})
    config_path.write_text(json.dumps(config))

    image_processor = load_idefics2(str(base), adapter_dirs(tiny_models_dir, "vpe")).processor.image_processor
    assert image_processor.do_image_splitting is False
    assert image_processor.size.longest_edge == 448


def test_adapters_change_outputs(runtime, query_inputs):
    with runtime.use_adapter("vpe") as model:
        vpe = last_logits(model, query_inputs)
        with model.disable_adapter():
            base = last_logits(model, query_inputs)
    with runtime.use_adapter("metric") as model:
        metric = last_logits(model, query_inputs)
    assert not torch.allclose(vpe, base, atol=1e-4)
    assert not torch.allclose(metric, base, atol=1e-4)
    assert not torch.allclose(vpe, metric, atol=1e-4)


@pytest.mark.parametrize("adapter", ["vpe", "metric"])
def test_shared_base_matches_a_dedicated_model_per_adapter(runtime, tiny_models_dir, query_inputs, adapter):
    dedicated = load_idefics2(str(tiny_models_dir / "idefics2"), adapter_dirs(tiny_models_dir, adapter))
    with runtime.use_adapter(adapter) as model:
        shared_logits = last_logits(model, query_inputs)
    assert torch.equal(shared_logits, last_logits(dedicated.model, query_inputs))


def test_two_adapters_share_one_copy_of_the_base_weights(runtime, tiny_models_dir):
    base_parameters = [p for name, p in runtime.model.named_parameters(remove_duplicate=False) if "lora_" not in name]
    plain = AutoModelForImageTextToText.from_pretrained(tiny_models_dir / "idefics2")
    assert sum(p.numel() for p in base_parameters) == sum(p.numel() for p in plain.parameters())
    assert len({p.data_ptr() for p in base_parameters}) == len(base_parameters)
    lora_names = [name for name, _ in runtime.model.named_parameters() if "lora_A" in name]
    assert any(".vpe." in name for name in lora_names) and any(".metric." in name for name in lora_names)


def test_use_adapter_rejects_unknown_names(runtime):
    with pytest.raises(ValueError, match="unknown adapter"):
        with runtime.use_adapter("nope"):
            pass


@pytest.mark.parametrize(
    "base, adapter",
    [
        ("{tiny}/missing-folder", "{tiny}/vpe-lora"),
        ("viper-serve-tests/not-in-the-cache", "{tiny}/vpe-lora"),
        ("{tiny}/idefics2", "viper-serve-tests/no-such-adapter"),
    ],
)
def test_unavailable_models_raise_model_load_error(tiny_models_dir, base, adapter):
    with pytest.raises(ModelLoadError, match="local"):
        load_idefics2(base.format(tiny=tiny_models_dir), {"vpe": adapter.format(tiny=tiny_models_dir)})


def test_unreadable_checkpoint_raises_model_load_error(tmp_path, tiny_models_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="could not load"):
        load_idefics2(str(tmp_path / "empty"), adapter_dirs(tiny_models_dir, "vpe"))
