"""Attention of query rows over a cached prefix that is never copied (the shared-prefix decomposition of
Hydragen, Juravsky et al. 2024, and FlashInfer's cascade attention).

A metric query step scores several queries of several users, each query a row that follows its user's cached
context (the prefix, ~1,600 tokens on the tiny models, the most of a row's keys). Feeding the prefix to the
model as a cache copies it once per row and layer (and the mask over it), and each row's queries meet the
prefix's keys on their own. Here the rows of one prefix attend to it as ONE sequence of all their query tokens
(one kernel call per prefix, the prefix read once), each row attends causally to its own suffix, and the two
partial results merge by their log-sum-exps: softmax over the union of the keys, exactly, up to rounding.

`SharedPrefix` travels to the attention layers as a keyword argument of the model's forward (transformers
hands such kwargs to the attention function); `attention` is registered as the text model's attention
implementation and runs the stock SDPA whenever no shared prefix is given (extraction, prefill steps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from .prefix_cache import KVLayers

IMPLEMENTATION = "viper_shared_prefix"


@dataclass(frozen=True)
class SharedPrefix:
    """The prefixes of a batch's rows: prefixes[g] (per layer: keys, values [1, kv_heads, length, head_dim]) is
    followed by rows[g] consecutive rows of the batch.

    last_token_layer: the model's last layer when only each row's last token is read after it (the metric's
    logits_to_keep=1). There the other tokens' outputs reach nothing (their keys and values, made before the
    attention, still do), so only the last token attends: most of 1/N of the attention spared on an N-layer model."""

    prefixes: Sequence[KVLayers]
    rows: Sequence[int]
    last_token_layer: int | None = None

    @property
    def length(self) -> int:
        return self.prefixes[0][0][0].shape[-2]

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scale: float) -> torch.Tensor:
        """query [rows, heads, L, d], key / value [rows, kv_heads, L, d] (the suffix's own); returns the
        attention output as transformers' attention functions do, [rows, L, heads, d]."""
        if layer == self.last_token_layer:
            out = torch.zeros_like(query)  # what no later layer or logit reads
            out[:, :, -1:] = self._attend(layer, query[:, :, -1:], key, value, scale, causal=False)
            return out.transpose(1, 2).contiguous()
        return self._attend(layer, query, key, value, scale, causal=True).transpose(1, 2).contiguous()

    def _attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, *,
                causal: bool) -> torch.Tensor:
        """[rows, heads, L, d]; causal=False for the suffix's last token alone, which sees every suffix key."""
        heads, kv_heads = query.shape[1], key.shape[1]
        groups, length = heads // kv_heads, query.shape[2]
        prefix_outputs, prefix_lses, start = [], [], 0
        for prefix, count in zip(self.prefixes, self.rows):
            # All the rows' query tokens as one sequence against the one prefix (no mask: every key visible),
            # grouped by the key/value head they read (query head j reads head j // groups), so the prefix's
            # keys and values are read as they lie, not repeated per query head.
            shared = query[start : start + count].transpose(0, 1).reshape(1, kv_heads, groups * count * length, -1)
            out, lse = _attention_with_lse(shared, *prefix[layer], causal=False, scale=scale)
            prefix_outputs.append(out.reshape(heads, count, length, -1).transpose(0, 1))
            prefix_lses.append(lse.reshape(heads, count, length).transpose(0, 1))
            start += count
        out_p, lse_p = torch.cat(prefix_outputs), torch.cat(prefix_lses)
        # Each row's own suffix, causally: one call for all rows (the suffix is not shared).
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        out_s, lse_s = _attention_with_lse(query, key, value, causal=causal, scale=scale)
        lse = torch.logaddexp(lse_p, lse_s)
        return (out_p * (lse_p - lse).exp().unsqueeze(-1).to(out_p.dtype)
                + out_s * (lse_s - lse).exp().unsqueeze(-1).to(out_s.dtype))

def _attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, causal: bool,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its log-sum-exp per query token (float32): on CPU from the fused flash kernel, which
    returns both; elsewhere computed in full (not measured on a GPU yet: CUDA's fused kernels return it too)."""
    if query.device.type == "cpu":
        return fused_attention_with_lse(query, key, value, causal=causal, scale=scale)
    return full_attention_with_lse(query, key, value, causal=causal, scale=scale)


def fused_attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, causal: bool,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, causal, scale=scale)[:2]
    return output, lse


def full_attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, causal: bool,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The scores in full, softmax in float32; causal: the query tokens are the keys' last ones."""
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    if causal:
        queries, keys = scores.shape[-2:]
        hidden = torch.ones(queries, keys, dtype=torch.bool, device=scores.device).triu(keys - queries + 1)
        scores = scores.masked_fill(hidden, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    output = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), value.float())
    return output.to(query.dtype), lse


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, *, shared_prefix: SharedPrefix | None = None,
              scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The text model's attention: over a shared prefix when the forward pass names one, else SDPA as is."""
    if shared_prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return shared_prefix.attend(module.layer_idx, query, key, value, scale), None


AttentionInterface.register(IMPLEMENTATION, attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)  # its masks are SDPA's
