"""ViPer guidance as a UNet wrapper, so the stock SDXL pipeline runs it without a copied loop.

With classifier-free guidance the stock pipeline asks the UNet for the pair (u, c) (encoder states
[N', P']) and steps with u + g * (c - u). ViPer's step is u + g * (c + s * vp - u - s * vn), where vn
and vp are the UNet's predictions with the disliked / liked feature embeddings [V-, V+] as encoder
states. Handing the pipeline (u, c + s * (vp - vn)) makes its own step compute exactly that, and
both evaluations run as one batch.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel

# Keys of the pipeline's `cross_attention_kwargs`, which it hands to the UNet untouched: the
# preference inputs travel with each call, so the wrapper holds no request state.
PREFERENCE_EMBEDS = "viper_preference_embeds"
PREFERENCE_STRENGTH = "viper_preference_strength"


def preference_kwargs(disliked_embeds: torch.Tensor, liked_embeds: torch.Tensor, strength: float) -> dict[str, Any]:
    """`cross_attention_kwargs` for a guided pipeline call; the embeds are V- and V+."""
    return {PREFERENCE_EMBEDS: torch.cat([disliked_embeds, liked_embeds]), PREFERENCE_STRENGTH: strength}


class ViperGuidedUNet(torch.nn.Module):
    """Stands in for a pipeline's UNet; the CFG pair it returns carries ViPer's preference terms."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *,
        added_cond_kwargs: dict[str, torch.Tensor],
        cross_attention_kwargs: dict[str, Any],
        **unet_kwargs: Any,
    ) -> tuple[torch.Tensor]:
        attention_kwargs = dict(cross_attention_kwargs)
        preference_embeds = attention_kwargs.pop(PREFERENCE_EMBEDS)
        strength = attention_kwargs.pop(PREFERENCE_STRENGTH)
        # sample is the latents twice (uncond, text); the preference pass sees the same latents,
        # time ids and pooled embeds, with [V-, V+] as encoder states.
        noise = self.unet(
            torch.cat([sample, sample]),
            timestep,
            encoder_hidden_states=torch.cat([encoder_hidden_states, preference_embeds]),
            added_cond_kwargs={name: torch.cat([value, value]) for name, value in added_cond_kwargs.items()},
            cross_attention_kwargs=attention_kwargs or None,
            **unet_kwargs,
        )[0]
        uncond, text, disliked, liked = noise.chunk(4)
        return (torch.cat([uncond, text + strength * (liked - disliked)]),)

    def __getattr__(self, name: str) -> Any:
        # The pipeline also reads the UNet's config, dtype, device, add_embedding and offload hooks.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "unet":
                raise
            return getattr(self.unet, name)
