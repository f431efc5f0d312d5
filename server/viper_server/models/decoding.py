"""Greedy decoding of several sequences with one forward pass per token (continuous batching).

Each sequence keeps its own token history, position and key/value states; a DecodeGroup holds the states of
the sequences decoding together in one cache, left-padded to the longest: row i of every layer is sequence
i's keys and values, preceded by zeros that the attention mask hides, and each row's new token gets its own
position. Sequences join after their prefill and leave when they end or are cancelled; the cache is rebuilt
only then, never between steps, and a step writes its token into room kept at the end of each layer (not a
new copy of the whole cache, as transformers' DynamicCache makes each step).

The token choice is transformers' `generate(do_sample=False, repetition_penalty=p)`: float32 logits of the
last position, the repetition penalty over the whole history (prompt included) exactly as its
RepetitionPenaltyLogitsProcessor applies it, argmax; a sequence ends after an end-of-sequence token or
max_new_tokens tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

# (input ids [B, 1], attention mask [B, past + 1], position ids [B, 1], cache) -> last-position logits [B, V]
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache], torch.Tensor]


History = Sequence[Sequence[int]] | torch.Tensor


def history_ids(histories: Sequence[Sequence[int]], width: int = 0) -> torch.Tensor:
    """The rows' token histories as one [rows, at least width] tensor, -1 after each row's last token."""
    ids = torch.full((len(histories), max(width, *(len(history) for history in histories))), -1, dtype=torch.long)
    for row, history in enumerate(histories):
        ids[row, : len(history)] = torch.as_tensor(history, dtype=torch.long)
    return ids


def apply_repetition_penalty(logits: torch.Tensor, histories: History, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor, row by row over each row's own history (lists of ids,
    or history_ids' tensor of them).

    A token in the history has its logit divided by penalty if positive, multiplied if negative. Rows'
    histories differ in length: the missing entries point at an extra column that is dropped afterwards."""
    vocab = logits.shape[-1]
    ids = histories if isinstance(histories, torch.Tensor) else history_ids(histories)
    ids = ids.to(logits.device).masked_fill(ids < 0, vocab).clamp(max=vocab)
    padded = torch.nn.functional.pad(logits, (0, 1))
    score = torch.gather(padded, 1, ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return padded.scatter(1, ids, score)[..., :vocab]


def greedy_tokens(logits: torch.Tensor, histories: History, penalty: float) -> list[int]:
    """The next token of each row: argmax after the repetition penalty (logits in float32, as generate)."""
    return _greedy(logits, histories, penalty).tolist()


def _greedy(logits: torch.Tensor, histories: History, penalty: float) -> torch.Tensor:
    scores = apply_repetition_penalty(logits.to(dtype=torch.float32), histories, penalty)
    return torch.argmax(scores, dim=-1)


@dataclass(eq=False)
class DecodingSequence:
    """One sequence being generated: its history (prompt + new tokens) and, until it joins a group, the
    key/value states of its prefill (per layer, [1, heads, length, head_dim])."""

    history: list[int]
    prompt_length: int
    max_new_tokens: int
    eos_token_ids: frozenset[int]
    pending_states: list[tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)

    @property
    def new_tokens(self) -> list[int]:
        return self.history[self.prompt_length :]

    @property
    def done(self) -> bool:
        new = self.new_tokens
        return len(new) >= self.max_new_tokens or (bool(new) and new[-1] in self.eos_token_ids)

    def append(self, token: int) -> None:
        self.history.append(token)
        if self.done:
            self.pending_states = None


class DecodeGroup:
    """The sequences decoding together and their shared, left-padded key/value cache."""

    def __init__(self, penalty: float) -> None:
        self.penalty = penalty
        self.rows: list[DecodingSequence] = []
        self._layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._cache_layers: list[_GrowingLayer] = []
        self._mask: torch.Tensor | None = None  # [rows, cached length], 1 = a real token
        # The rows' histories for the repetition penalty, kept beside the cache and written a token a step
        # (not rebuilt from the lists each step: thousands of ids a row).
        self._seen: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def cached_length(self) -> int:
        return 0 if self._mask is None else self._mask.shape[1]

    def step(self, sequences: Iterable[DecodingSequence], forward: Forward) -> None:
        """One new token for each of sequences (joining those not yet in the group); finished ones leave."""
        self._regroup(list(sequences))
        if not self.rows:
            return
        device = self._layers[0][0].device
        input_ids = torch.tensor([[row.history[-1]] for row in self.rows], device=device)
        # The last token's position in its own sequence: the tokens before it, padding not counted.
        positions = torch.tensor([[len(row.history) - 1] for row in self.rows], device=device)
        mask = torch.cat([self._mask, torch.ones(len(self.rows), 1, dtype=self._mask.dtype)], dim=1)
        logits = forward(input_ids, mask.to(device), positions, _GroupCache(self._cache_layers))
        tokens = _greedy(logits, self._seen, self.penalty)
        lengths = [len(row.history) for row in self.rows]
        if max(lengths) >= self._seen.shape[1]:
            self._seen = torch.nn.functional.pad(self._seen, (0, _GrowingLayer.GROWTH), value=-1)
        rows = torch.arange(len(self.rows), device=self._seen.device)
        self._seen[rows, torch.tensor(lengths, device=self._seen.device)] = tokens.to(self._seen.device)
        for row, token in zip(self.rows, tokens.tolist()):
            row.append(token)
        self._layers = [(layer.keys, layer.values) for layer in self._cache_layers]
        self._mask = mask
        self._regroup([row for row in self.rows if not row.done])

    @torch.inference_mode()
    def discard(self, sequence: DecodingSequence) -> None:
        """Drops a sequence (e.g. cancelled) and its states."""
        if sequence in self.rows:
            self._regroup([row for row in self.rows if row is not sequence])
        sequence.pending_states = None

    def _regroup(self, wanted: list[DecodingSequence]) -> None:
        """Makes the rows exactly `wanted`: drops leavers' rows, appends joiners' states, re-pads."""
        wanted_ids = {id(sequence) for sequence in wanted}
        keep = [index for index, row in enumerate(self.rows) if id(row) in wanted_ids]
        changed = len(keep) != len(self.rows)
        if changed:
            self._keep_rows(keep)
        present = {id(row) for row in self.rows}
        joiners = [sequence for sequence in wanted if id(sequence) not in present]
        if joiners:
            self._join(joiners)
        if changed or joiners:  # new rows: new buffers
            self._cache_layers = [_GrowingLayer(keys, values) for keys, values in self._layers]
            self._seen = None
            if self.rows:
                width = max(len(row.history) for row in self.rows) + _GrowingLayer.GROWTH
                self._seen = history_ids([row.history for row in self.rows], width).to(self._layers[0][0].device)

    def _keep_rows(self, keep: list[int]) -> None:
        self.rows = [self.rows[index] for index in keep]
        if not keep:
            self._layers, self._mask = [], None
            return
        index = torch.tensor(keep)
        mask = self._mask[index]
        # Columns that are padding in every remaining row hold nothing: cut them.
        first = int(mask.any(dim=0).nonzero()[0])
        self._mask = mask[:, first:]
        rows = index.to(self._layers[0][0].device)
        self._layers = [(keys[rows, :, first:], values[rows, :, first:]) for keys, values in self._layers]

    def _join(self, joiners: list[DecodingSequence]) -> None:
        for sequence in joiners:
            if sequence.pending_states is None:
                raise ValueError("a sequence joins a decode group with the key/value states of its prefill")
        length = max([self.cached_length, *(s.pending_states[0][0].shape[2] for s in joiners)])
        blocks = ([(self._layers, self._mask)] if self.rows else []) + [
            (s.pending_states, torch.ones(1, s.pending_states[0][0].shape[2], dtype=torch.long)) for s in joiners
        ]
        padded = [(_left_pad_layers(layers, length), _left_pad(mask, length)) for layers, mask in blocks]
        self._mask = torch.cat([mask for _, mask in padded])
        self._layers = [
            (torch.cat([layers[n][0] for layers, _ in padded]), torch.cat([layers[n][1] for layers, _ in padded]))
            for n in range(len(padded[0][0]))
        ]
        self.rows.extend(joiners)
        for sequence in joiners:
            sequence.pending_states = None


def _left_pad(tensor: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _left_pad_layers(layers, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(_left_pad(keys, length, dim=2), _left_pad(values, length, dim=2)) for keys, values in layers]


class _GrowingLayer(DynamicLayer):
    """One layer's keys and values in a buffer with room to grow: a step writes its token in place, and the
    buffer is copied only every GROWTH tokens."""

    GROWTH = 256

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.is_initialized = True
        self.device = keys.device
        self._length = keys.shape[2]
        self._keys = self._buffer(keys, self._length + self.GROWTH)
        self._values = self._buffer(values, self._length + self.GROWTH)
        self._expose()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self._length + key_states.shape[2]
        if end > self._keys.shape[2]:
            self._keys = self._buffer(self.keys, end + self.GROWTH)
            self._values = self._buffer(self.values, end + self.GROWTH)
        self._keys[:, :, self._length : end] = key_states
        self._values[:, :, self._length : end] = value_states
        self._length = end
        self._expose()
        return self.keys, self.values

    @staticmethod
    def _buffer(states: torch.Tensor, capacity: int) -> torch.Tensor:
        batch, heads, length, width = states.shape
        buffer = states.new_empty(batch, heads, capacity, width)
        buffer[:, :, :length] = states
        return buffer

    def _expose(self) -> None:
        self.keys = self._keys[:, :, : self._length]
        self.values = self._values[:, :, : self._length]


class _GroupCache(Cache):
    """A cache over a group's layers (the model writes each step's token into them)."""

    def __init__(self, layers: list[_GrowingLayer]) -> None:
        super().__init__(layers=layers)
