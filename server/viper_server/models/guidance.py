"""ViPer guidance: the rows one image gives a UNet call, and how its predictions combine.

With classifier-free guidance the stock pipeline asks the UNet for the pair (u, c) (encoder states
[N', P'], where N' = N + s * V- and P' = P + s * V+) and steps with u + g * (c - u). ViPer's step is
u + g * (c + s * vp - u - s * vn), where vn and vp are the UNet's predictions with the disliked / liked
feature embeddings [V-, V+] as encoder states. All four evaluations of an image run as rows of one call
(the same latents, timestep, time ids and pooled embeds), and c + s * (vp - vn) stands in for c, so the
arithmetic is the stock pipeline's own.
"""

from __future__ import annotations

import torch


def cfg_rows(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """A CFG pair's rows in the pipelines' order: negative (unconditional) first."""
    return torch.cat([negative, positive])


def preference_rows(prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor, liked_embeds: torch.Tensor,
                    disliked_embeds: torch.Tensor) -> torch.Tensor:
    """An image's four encoder-state rows: [N', P', V-, V+] (prompt_embeds and negative_embeds already carry
    the preference terms)."""
    return torch.cat([negative_embeds, prompt_embeds, disliked_embeds, liked_embeds])


def viper_noise(predictions: torch.Tensor, guidance_scale: float, strength: float) -> torch.Tensor:
    """The guided noise of one image from its four predictions (rows as preference_rows)."""
    uncond, text, disliked, liked = predictions.chunk(4)
    text = text + strength * (liked - disliked)
    return uncond + guidance_scale * (text - uncond)
