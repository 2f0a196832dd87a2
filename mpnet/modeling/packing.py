"""Sequence packing for inference and fine-tuning: several short examples share one row, isolated.

A batch of short, uneven examples padded to the longest wastes most of its compute on padding.
`pack` places the examples into rows with a best-fit-decreasing packer (each example, longest first,
goes into the fullest row it still fits in), writes a per-token document id, and `encode(...,
document_ids=...)` then restarts positions per document and lets a token attend only within its
own document. With the relative bias depending only on position differences and positions
restarting, each example's encoding equals the one it gets alone (tests/modeling/test_packing.py proves it,
for the dense and flex backends). `PackedBatch.unpack` / `first_tokens` cut the outputs back per example.

Rows are as wide as the fullest row (at most `max_length`); padding only fills the ends of rows.
Compiled kernels (FlexAttention) compile once per shape: `pad_width_to_multiple_of` and
`pad_rows_to_multiple_of` round the (rows, width) shape up to a few buckets; extra rows are all
padding (document -1), which attends to nothing and changes no result.

A classifier reads every example's <s> at `PackedBatch.starts` (row, column), in input order;
`document_starts` finds the documents of packed rows without the PackedBatch (row-major order).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import UserError

PADDING_DOCUMENT = -1


def best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: rows of example indices, each row's lengths summing to <= capacity.

    Longest first, each example into the row with the least room left that still holds it (a new row
    when none does); ties keep input order, so the result is deterministic.
    """
    for index, length in enumerate(lengths):
        if length > capacity:
            raise UserError(f"example {index} has {length} tokens, more than the row length {capacity}; "
                            "truncate it or pack with a larger max_length")
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (room left, row), sorted: bisect finds the tightest fit
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = bisect.bisect_left(room, (lengths[index], -1))
        if slot == len(room):
            rows.append([])
            left, row = capacity, len(rows) - 1
        else:
            left, row = room.pop(slot)
        rows[row].append(index)
        bisect.insort(room, (left - lengths[index], row))
    return rows


@dataclass
class PackedBatch:
    """Packed rows plus where each example went. document_ids: 0, 1, ... per row, -1 on padding."""

    input_ids: torch.Tensor  # (R, L)
    attention_mask: torch.Tensor  # (R, L), 1 = real token
    document_ids: torch.Tensor  # (R, L)
    placements: list[tuple[int, int, int]]  # per example, in input order: (row, start, length)

    def unpack(self, outputs: torch.Tensor) -> list[torch.Tensor]:
        """(R, L, ...) per-token outputs -> one (length, ...) tensor per example, in input order."""
        return [outputs[row, start:start + length] for row, start, length in self.placements]

    @property
    def starts(self) -> torch.Tensor:
        """(N, 2) long: (row, column) of every example's first token, in input order."""
        return torch.tensor([(row, start) for row, start, _ in self.placements], dtype=torch.long).view(-1, 2)

    @property
    def num_real_tokens(self) -> int:
        return sum(length for _, _, length in self.placements)

    def first_tokens(self, outputs: torch.Tensor) -> torch.Tensor:
        """The <s> (first-token) features of every example, (N, ...): what a classification head reads."""
        starts = self.starts.to(outputs.device)
        return outputs[starts[:, 0], starts[:, 1]]

    def to(self, device) -> "PackedBatch":
        """The same batch with its tensors on `device` (placements stay Python ints)."""
        return PackedBatch(self.input_ids.to(device, non_blocking=True), self.attention_mask.to(device, non_blocking=True),
                           self.document_ids.to(device, non_blocking=True), self.placements)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def pack(examples: Sequence[Sequence[int]], max_length: int, pad_token_id: int = 1, *,
         pad_width_to_multiple_of: int = 1, pad_rows_to_multiple_of: int = 1) -> PackedBatch:
    """Pack tokenized examples (lists of ids, special tokens included) into rows of <= max_length.

    The width is the fullest row's length rounded up to `pad_width_to_multiple_of`, never past
    max_length (so `pad_width_to_multiple_of=max_length` gives rows of exactly max_length); the
    number of rows is rounded up to `pad_rows_to_multiple_of` with rows of padding only.
    """
    if not examples:
        raise UserError("nothing to pack: the list of examples is empty")
    if pad_width_to_multiple_of < 1 or pad_rows_to_multiple_of < 1:
        raise UserError("pad_width_to_multiple_of and pad_rows_to_multiple_of must be positive integers")
    lengths = [len(example) for example in examples]
    if min(lengths) == 0:
        raise UserError(f"example {lengths.index(0)} is empty; every packed example needs at least one token")
    rows = best_fit(lengths, max_length)
    fullest = max(sum(lengths[i] for i in row) for row in rows)
    width = min(_round_up(fullest, pad_width_to_multiple_of), max(max_length, fullest))
    num_rows = _round_up(len(rows), pad_rows_to_multiple_of)
    input_ids = torch.full((num_rows, width), pad_token_id, dtype=torch.long)
    document_ids = torch.full((num_rows, width), PADDING_DOCUMENT, dtype=torch.long)
    placements: list[tuple[int, int, int]] = [(0, 0, 0)] * len(examples)
    for r, row in enumerate(rows):
        start = 0
        for document, index in enumerate(row):
            end = start + lengths[index]
            input_ids[r, start:end] = torch.as_tensor(examples[index], dtype=torch.long)
            document_ids[r, start:end] = document
            placements[index] = (r, start, lengths[index])
            start = end
    return PackedBatch(input_ids, (document_ids != PADDING_DOCUMENT).long(), document_ids, placements)


def positions_within_documents(real: torch.Tensor, document_ids: torch.Tensor) -> torch.Tensor:
    """0-based positions that restart at every document, -1 on padding. (B, n) -> (B, n).

    A document is a run of equal ids (as `pack` writes them): a position counts the real tokens
    since the run began, so padding inside a row shifts nothing.
    """
    real = real.bool()
    counts = real.long().cumsum(1)  # real tokens up to and including each index
    starts = torch.ones_like(real)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    # Real tokens before the current run: recorded at each run start, carried forward (non-decreasing).
    before = torch.where(starts, counts - real.long(), 0).cummax(1).values
    return torch.where(real, counts - before - 1, -1)


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """(row, column) of every document's first token in packed rows, row-major order: (N, 2) long.

    A document is a run of equal ids other than -1 (padding), as `pack` writes them.
    """
    real = document_ids != PADDING_DOCUMENT
    starts = real.clone()
    starts[:, 1:] &= document_ids[:, 1:] != document_ids[:, :-1]
    return starts.nonzero()
