"""Loads one IDEFICS2 base carrying the ViPer LoRA adapters (VPE and proxy metric).

The same code loads the real checkpoints and the tiny test ones (see tiny_idefics2).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor, Idefics2ImageProcessorPil, ProcessorMixin

from . import shared_prefix

# The processor settings of both ViPer uses of IDEFICS2. Passed explicitly when loading, because
# the real checkpoint's own processor config differs (it splits images and allows 980 px).
VIPER_PROCESSOR_SETTINGS = dict(size={"longest_edge": 448, "shortest_edge": 378}, do_image_splitting=False)


class ModelLoadError(OSError):
    """A model or adapter is unavailable (not a local folder, not in the local HF cache) or unreadable."""


@dataclass
class Idefics2Base:
    """One loaded IDEFICS2 base with its processor and the LoRA adapters attached to it."""

    model: PeftModel  # ONE base model carrying named adapters, e.g. "vpe" and "metric"
    processor: ProcessorMixin
    device: torch.device
    dtype: torch.dtype
    # Names the weights (base and adapters, as loaded): part of the key of what is cached from them.
    revision: str = "in-memory"
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.model.peft_config)

    def require_adapter(self, name: str) -> str:
        """name, if an adapter of that name is loaded; else ValueError naming the loaded ones."""
        if name not in self.model.peft_config:
            raise ValueError(f"unknown adapter {name!r}; loaded: {self.adapter_names}")
        return name

    @contextmanager
    def use_adapter(self, name: str) -> Iterator[PeftModel]:
        """Holds the model exclusively with adapter `name` active, for one inference call.

        Per-call selection without global state (peft's `adapter_names=[...]`) cannot be used:
        peft matches it against the batch size of every LoRA layer, and IDEFICS2's
        modality projection and perceiver run on a batch of images, not of prompts. So the
        active adapter is global, and callers on other threads must wait their turn.
        """
        self.require_adapter(name)
        with self._lock:
            # Switching walks every LoRA layer (milliseconds on the 8B model): only when another adapter is active,
            # as a scheduler steps the same adapter many times in a row. inference_mode keeps the adapter frozen
            # (set_adapter alone makes it trainable).
            if self.model.active_adapter != name:
                self.model.set_adapter(name, inference_mode=True)
            yield self.model


def load_idefics2(
    base: str,
    adapters: Mapping[str, str],
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
) -> Idefics2Base:
    """Loads `base` once and attaches every adapter in `adapters` (name -> folder or hub id).

    The first adapter is active after loading. dtype defaults to bfloat16 on CUDA, float32 elsewhere.
    Never downloads: raises ModelLoadError when a model is not available locally or is unreadable.
    """
    if not adapters:
        raise ValueError("at least one adapter is required")
    torch_device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if torch_device.type == "cuda" else torch.float32
    base_source = _resolve(base)
    adapter_sources = {name: _resolve(source) for name, source in adapters.items()}

    try:
        processor = AutoProcessor.from_pretrained(
            base_source, local_files_only=True, **VIPER_PROCESSOR_SETTINGS
        )
        # transformers 5 picks the torchvision image processor whenever torchvision imports (usual on a
        # GPU host); only the PIL one resizes as the adapters' training-time processor (4.40) did.
        processor.image_processor = Idefics2ImageProcessorPil.from_pretrained(
            base_source, local_files_only=True, **VIPER_PROCESSOR_SETTINGS
        )
        base_model = AutoModelForImageTextToText.from_pretrained(
            base_source, dtype=dtype, device_map=str(torch_device), local_files_only=True
        )
        (first_name, first_source), *other_adapters = adapter_sources.items()
        model = PeftModel.from_pretrained(base_model, first_source, adapter_name=first_name)
        for name, source in other_adapters:
            # load_adapter adds LoRA weights to the same base: one copy of the 8B weights, not two.
            model.load_adapter(source, adapter_name=name)
    except (OSError, ValueError) as error:  # what transformers/peft raise for missing or unusable files
        raise ModelLoadError(
            f"could not load IDEFICS2 from {base!r} with adapters {dict(adapters)}: {error}"
        ) from error

    # The text model's attention: SDPA, and over a shared cached prefix where a metric query step names one.
    base_model.set_attn_implementation({"text_config": shared_prefix.IMPLEMENTATION})
    model.eval()
    # A hub model resolves to its snapshot folder, whose name is the commit: the path names the revision.
    revision = ";".join([base_source, *(f"{name}={source}" for name, source in adapter_sources.items())])
    return Idefics2Base(model=model, processor=processor, device=torch_device, dtype=dtype, revision=revision)


def _resolve(name_or_path: str) -> str:
    """A local folder as is; a hub id as its folder in the local HF cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    try:
        return snapshot_download(name_or_path, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError) as error:
        raise ModelLoadError(
            f"{name_or_path!r} is neither a local folder nor a model in the local Hugging Face cache"
        ) from error
