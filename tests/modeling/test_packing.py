"""Packing (mpnet/modeling/packing.py): best-fit rows with document isolation give every example the
encoding it gets alone.

The oracle is the example run by itself (batch of one, no padding) on the same backend; the packed
batch must reproduce its per-token encodings and its <s> features to 1e-5 in fp32, on the dense and
the FlexAttention backend, with and without an attention pattern on top.
"""
from __future__ import annotations

import pytest
import torch

from helpers import generator, make_model, max_abs, ordinary_ids, with_backend
from mpnet.errors import UserError
from mpnet.modeling.packing import best_fit, pack, positions_within_documents

TINY = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2)
LENGTHS = [5, 17, 9, 30, 3, 12]
ROW = 32


def examples(lengths, seed=0):
    """<s> ordinary tokens </s>, as a tokenizer writes a sentence."""
    gen = generator(seed)
    return [[0, *ordinary_ids(gen, (length - 2,)).tolist(), 2] for length in lengths]


def test_best_fit_decreasing_on_a_hand_derived_case():
    # Longest first into the tightest row that holds it: 30 | 21 | 17 -> new row, 12 -> 17's row
    # (room 15; 21's row has only 11), 9 -> 21's row, 8 -> new row, 5 -> 8's row, 3 -> 17+12's row.
    lengths = [5, 17, 9, 30, 3, 12, 21, 8]
    assert best_fit(lengths, 32) == [[3], [6, 2], [1, 5, 4], [7, 0]]


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_places_every_example_once_within_capacity(seed):
    lengths = torch.randint(1, 50, (40,), generator=generator(seed)).tolist()
    rows = best_fit(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(40))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    # best fit never leaves two rows that could have been merged
    fills = sorted(sum(lengths[i] for i in row) for row in rows)
    assert len(fills) < 2 or fills[0] + fills[1] > 64


def test_pack_rejects_what_cannot_be_packed():
    with pytest.raises(UserError, match="more than the row length"):
        pack(examples([10, 40]), max_length=32)
    with pytest.raises(UserError, match="empty"):
        pack([[0, 2], []], max_length=32)
    with pytest.raises(UserError, match="nothing to pack"):
        pack([], max_length=32)


def test_positions_restart_per_document():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [0, 1, 1, 1, 1, 1, 1, 1]])
    real = docs >= 0
    assert positions_within_documents(real, docs).tolist() == [[0, 1, 2, 0, 1, 0, -1, -1], [0, 0, 1, 2, 3, 4, 5, 6]]


def test_pack_layout_and_unpack_round_trip():
    batch = pack(examples(LENGTHS), max_length=ROW)
    assert batch.input_ids.shape == (3, ROW)  # rows: 30 | 17+12+3 | 9+5
    fills = batch.attention_mask.sum(1)
    for r in range(3):  # padding only at the end of a row
        assert batch.attention_mask[r, : fills[r]].all() and not batch.attention_mask[r, fills[r]:].any()
    assert [t.tolist() for t in batch.unpack(batch.input_ids)] == examples(LENGTHS)
    assert batch.first_tokens(batch.input_ids).tolist() == [0] * len(LENGTHS)
    assert (batch.document_ids[batch.attention_mask == 0] == -1).all()
    narrow = pack(examples([5, 9]), max_length=ROW)
    assert narrow.input_ids.shape == (1, 14)  # rows no wider than the fullest one


@pytest.fixture(scope="module")
def dense_model():
    return make_model(seed=17, **TINY)


@pytest.mark.parametrize("pattern", [None, "global:3:0,alibi"])
@pytest.mark.parametrize("flex", [False, True], ids=["dense", "flex"])
def test_packed_encoding_equals_one_by_one(dense_model, flex, pattern):
    model = with_backend(dense_model, flex, attention_pattern=pattern)
    items = examples(LENGTHS)
    batch = pack(items, max_length=ROW)
    with torch.no_grad():
        packed = model.encode(batch.input_ids, batch.attention_mask, document_ids=batch.document_ids)
        alone = [model.encode(torch.tensor([item]))[0] for item in items]
    for index, (got, expected) in enumerate(zip(batch.unpack(packed), alone)):
        assert got.shape == expected.shape
        assert max_abs(got, expected) <= 1e-5, f"example {index}"
    assert max_abs(batch.first_tokens(packed), torch.stack([e[0] for e in alone])) <= 1e-5


def test_packing_without_document_ids_would_leak(dense_model):
    """The isolation is what makes packing exact: without document ids the examples mix."""
    items = examples(LENGTHS)
    batch = pack(items, max_length=ROW)
    with torch.no_grad():
        mixed = dense_model.encode(batch.input_ids, batch.attention_mask)
        alone = dense_model.encode(torch.tensor([items[2]]))[0]
    assert max_abs(batch.unpack(mixed)[2], alone) > 1e-3
