"""The metric's query-step attention over shared, uncopied prefixes (models/shared_prefix.py) equals attention over
each row's prefix and suffix concatenated (what a cache of the prefix gives), with both ways of getting the
log-sum-exp: the CPU's fused kernel and the full scores used elsewhere. The model-level equality (scores of
the prefix cache within 1e-6 of the reference procedure) is tests/test_metric_model.py's."""

from __future__ import annotations

import pytest
import torch

from viper_server.models.shared_prefix import (
    SharedPrefix,
    full_attention_with_lse,
    fused_attention_with_lse,
)

HEADS, KV_HEADS, DIM, SUFFIX = 4, 2, 16, 7
TOLERANCE = 1e-5
SCALE = DIM**-0.5


def reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor],
              scale: float) -> torch.Tensor:
    """SDPA over [prefix; suffix], causal within the suffix, for rows that share one prefix: [rows, L, heads, d]."""
    rows, prefix_length = query.shape[0], prefix[0].shape[-2]
    groups = HEADS // KV_HEADS
    keys = torch.cat([prefix[0].expand(rows, -1, -1, -1), key], dim=2).repeat_interleave(groups, dim=1)
    values = torch.cat([prefix[1].expand(rows, -1, -1, -1), value], dim=2).repeat_interleave(groups, dim=1)
    visible = torch.ones(SUFFIX, prefix_length + SUFFIX, dtype=torch.bool).tril(prefix_length)
    out = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=visible, scale=scale)
    return out.transpose(1, 2)


def two_users(seed: int):
    """Two users' prefixes of equal length (as a step's rows have), 3 rows after the first, 2 after the second:
    (prefixes, rows, query, key, value, expected), expected the reference attention of every row."""
    generator = torch.Generator().manual_seed(seed)

    def states(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 2

    prefixes = [tuple((states(1, KV_HEADS, 40, DIM), states(1, KV_HEADS, 40, DIM))) for _ in range(2)]
    query = states(5, HEADS, SUFFIX, DIM)
    key, value = states(5, KV_HEADS, SUFFIX, DIM), states(5, KV_HEADS, SUFFIX, DIM)
    expected = torch.cat([reference(query[:3], key[:3], value[:3], prefixes[0], SCALE),
                          reference(query[3:], key[3:], value[3:], prefixes[1], SCALE)])
    return prefixes, [3, 2], query, key, value, expected


@pytest.mark.parametrize("lse", [fused_attention_with_lse, full_attention_with_lse])
def test_rows_of_two_prefixes_attend_as_with_their_prefix_concatenated(lse, monkeypatch):
    monkeypatch.setattr("viper_server.models.shared_prefix._attention_with_lse", lse)
    prefixes, rows, query, key, value, expected = two_users(0)
    layers = [tuple([prefix]) for prefix in prefixes]  # one layer

    shared = SharedPrefix(layers, rows).attend(0, query, key, value, SCALE)

    assert shared.shape == (5, SUFFIX, HEADS, DIM)
    torch.testing.assert_close(shared, expected, atol=TOLERANCE, rtol=0)
    # What is compared moves with the prefix by far more than the tolerance: the other user's prefix.
    swapped = SharedPrefix(layers[::-1], rows).attend(0, query, key, value, SCALE)
    assert (swapped - expected).abs().max().item() > 1000 * TOLERANCE


@pytest.mark.parametrize("lse", [fused_attention_with_lse, full_attention_with_lse])
def test_at_the_last_token_layer_only_each_rows_last_token_attends(lse, monkeypatch):
    monkeypatch.setattr("viper_server.models.shared_prefix._attention_with_lse", lse)
    prefixes, rows, query, key, value, expected = two_users(1)
    layers = [(prefix, prefix) for prefix in prefixes]  # two layers, the second the last token's

    every_token = SharedPrefix(layers, rows, last_token_layer=1).attend(0, query, key, value, SCALE)
    last_token = SharedPrefix(layers, rows, last_token_layer=1).attend(1, query, key, value, SCALE)

    torch.testing.assert_close(every_token, expected, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(last_token[:, -1], expected[:, -1], atol=TOLERANCE, rtol=0)
    assert not last_token[:, :-1].any()  # the tokens nothing reads are not computed
    # The last token sees every key of its suffix: without its own suffix keys after the first it would differ.
    first_key_only = SharedPrefix(layers, rows, last_token_layer=1).attend(1, query, key[:, :, :1], value[:, :, :1],
                                                                          SCALE)
    assert (first_key_only[:, -1] - expected[:, -1]).abs().max().item() > 1000 * TOLERANCE
