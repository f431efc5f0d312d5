"""The real architectures at full size with random weights: IDEFICS2-8b (+ the two ViPer LoRA adapters) and
SDXL base + refiner, built in memory from their configurations written out below. Nothing is downloaded or
read from disk, so a benchmark runs at real scale on any GPU host (`--models full-random`); the outputs are
noise, the compute and memory are the real models'.

The configurations are the architecture fields of HuggingFaceM4/idefics2-8b and of
stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0 (UNets, VAE, CLIP ViT-L and OpenCLIP bigG text
encoders). The tokenizers are the tiny checkpoints' (a small byte-level BPE with IDEFICS2's special tokens,
and CLIP BPE over bytes and common words): prompts come out somewhat longer in tokens than with the real
vocabularies, so a bench errs on the side of more work. `shrunken()` is the same architecture with small
widths and depths, for building and running through this same code on a CPU (tests/test_full_random.py).
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Idefics2Config,
    Idefics2ForConditionalGeneration,
)

from .idefics2 import Idefics2Base
from .sdxl import SdxlPipelines
from .tiny_idefics2 import VIPER_LORA_CONFIG, build_idefics2_processor
from .tiny_sdxl import clip_tokenizers

# HuggingFaceM4/idefics2-8b: SigLIP-so400m vision encoder at 980 px, a 3-layer perceiver resampler to 64
# latents per image, Mistral-7B (sliding window 4096) as the language model. ~8.4 B parameters.
IDEFICS2_8B: dict[str, Any] = dict(
    vision_config=dict(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        patch_size=14, image_size=980, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
    ),
    perceiver_config=dict(
        hidden_act="silu", resampler_n_latents=64, resampler_depth=3, resampler_n_heads=16,
        resampler_head_dim=96, num_key_value_heads=4, rms_norm_eps=1e-6,
    ),
    text_config=dict(
        model_type="mistral", vocab_size=32003, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, hidden_act="silu", max_position_embeddings=32768,
        rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False,
    ),
    tie_word_embeddings=False,
)

# stabilityai/stable-diffusion-xl-base-1.0/unet: ~2.6 B parameters.
SDXL_BASE_UNET: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, norm_num_groups=32, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # pooled bigG (1280) + 6 time ids x 256
)
# stabilityai/stable-diffusion-xl-refiner-1.0/unet: ~2.3 B parameters.
SDXL_REFINER_UNET: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(384, 768, 1536, 1536),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=4, attention_head_dim=(6, 12, 24, 24), cross_attention_dim=1280,
    use_linear_projection=True, norm_num_groups=32, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2560,  # pooled bigG (1280) + 5 time ids (with the aesthetic score) x 256
)
# The SDXL VAE (shared by base and refiner): ~84 M parameters.
SDXL_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)
# text_encoder: CLIP ViT-L/14's text tower (~123 M); text_encoder_2: OpenCLIP ViT-bigG/14's (~695 M).
CLIP_L_TEXT: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
CLIP_BIGG_TEXT: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
)


@dataclass(frozen=True)
class Architecture:
    idefics2: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(IDEFICS2_8B))
    base_unet: dict[str, Any] = field(default_factory=lambda: dict(SDXL_BASE_UNET))
    refiner_unet: dict[str, Any] = field(default_factory=lambda: dict(SDXL_REFINER_UNET))
    vae: dict[str, Any] = field(default_factory=lambda: dict(SDXL_VAE))
    text_encoder: dict[str, Any] = field(default_factory=lambda: dict(CLIP_L_TEXT))
    text_encoder_2: dict[str, Any] = field(default_factory=lambda: dict(CLIP_BIGG_TEXT))


FULL = Architecture()


def shrunken() -> Architecture:
    """The same architectures with small widths and one or two layers per stack (every kind of block kept),
    for building and running on a CPU. Dimensions that must agree still agree (the base UNet's cross
    attention is the two text encoders' widths together; the perceiver's latents are the processor's 64)."""
    full = Architecture()
    idefics2 = copy.deepcopy(full.idefics2)
    idefics2["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    idefics2["perceiver_config"].update(resampler_depth=2, resampler_n_heads=2, resampler_head_dim=16,
                                        num_key_value_heads=1)
    idefics2["text_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2)
    unet_common = dict(layers_per_block=1, norm_num_groups=8, addition_time_embed_dim=8)
    return replace(
        full,
        idefics2=idefics2,
        base_unet={**full.base_unet, **unet_common, "block_out_channels": (32, 64, 128),
                   "transformer_layers_per_block": (1, 1, 2), "attention_head_dim": (1, 2, 4),
                   "cross_attention_dim": 48 + 80, "projection_class_embeddings_input_dim": 80 + 6 * 8},
        refiner_unet={**full.refiner_unet, **unet_common, "block_out_channels": (32, 64, 64, 64),
                      "transformer_layers_per_block": 1, "attention_head_dim": (1, 2, 2, 2),
                      "cross_attention_dim": 80, "projection_class_embeddings_input_dim": 80 + 5 * 8},
        vae={**full.vae, "block_out_channels": (8, 16, 16, 16), "layers_per_block": 1, "norm_num_groups": 8},
        text_encoder={**full.text_encoder, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "projection_dim": 48},
        text_encoder_2={**full.text_encoder_2, "hidden_size": 80, "intermediate_size": 160, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "projection_dim": 80},
    )


def build_full_random(device: str, idefics2_dtype: torch.dtype, *, architecture: Architecture = FULL,
                      seed: int = 0) -> tuple[Idefics2Base, SdxlPipelines]:
    """Both models with random weights, made directly on device (IDEFICS2 in idefics2_dtype; SDXL in float16
    on CUDA, float32 elsewhere, as load_sdxl)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        idefics2 = build_idefics2(architecture, device, idefics2_dtype)
        sdxl = build_sdxl(architecture, device, torch.float16 if device.startswith("cuda") else torch.float32)
    return idefics2, sdxl


def idefics2_config(architecture: Architecture, processor) -> Idefics2Config:
    special_ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # the real vocabulary's, and the tiny one's
    config = copy.deepcopy(architecture.idefics2)
    config["perceiver_config"]["hidden_size"] = config["text_config"]["hidden_size"]
    config["text_config"].update(special_ids)
    return Idefics2Config(**config, image_token_id=processor.image_token_id, **special_ids)


def build_idefics2(architecture: Architecture, device: str, dtype: torch.dtype) -> Idefics2Base:
    processor = build_idefics2_processor()
    config = idefics2_config(architecture, processor)
    with torch.device(device):
        model = Idefics2ForConditionalGeneration._from_config(config, dtype=dtype)
        peft_model = _with_random_adapters(model.eval())
    return Idefics2Base(model=peft_model, processor=processor, device=torch.device(device), dtype=dtype,
                        revision="full-random")


def _with_random_adapters(model: Idefics2ForConditionalGeneration) -> PeftModel:
    """The VPE and metric LoRA adapters (the reference's LoRA configuration) on one base, random and distinct."""
    peft_model = get_peft_model(model, LoraConfig(**VIPER_LORA_CONFIG), adapter_name="vpe")
    peft_model.add_adapter("metric", LoraConfig(**VIPER_LORA_CONFIG))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # LoRA starts B at zero (a no-op adapter); random makes the adapters matter
                parameter.normal_(std=0.02)
    for name in ("metric", "vpe"):  # frozen, as adapters loaded for inference are; "vpe" active, as after loading
        peft_model.set_adapter(name, inference_mode=True)
    peft_model.eval()
    return peft_model


def build_sdxl(architecture: Architecture, device: str, dtype: torch.dtype) -> SdxlPipelines:
    with tempfile.TemporaryDirectory() as vocab_dir:
        tokenizer, tokenizer_2 = clip_tokenizers(Path(vocab_dir))
    special_ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    with torch.device(device):
        text_encoder = CLIPTextModel(CLIPTextConfig(**architecture.text_encoder, **special_ids))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**architecture.text_encoder_2, **special_ids))
        vae = AutoencoderKL(**architecture.vae)
        base_unet = UNet2DConditionModel(**architecture.base_unet)
        refiner_unet = UNet2DConditionModel(**architecture.refiner_unet)
    scheduler = EulerDiscreteScheduler(  # SDXL's own scheduler settings
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
    )
    base = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=base_unet, scheduler=scheduler, add_watermarker=False,
    )
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=tokenizer_2,
        unet=refiner_unet, scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    for pipeline in (base, refiner):
        pipeline.to(device=device, dtype=dtype)
    return SdxlPipelines(base=base, refiner=refiner)
