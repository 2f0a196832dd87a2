"""Mask rules, brute force: the attention rules of docs/ARCHITECTURE.md, entry by entry.

The oracle is `helpers.rule_visible`, a case-by-case pure-Python transcription of the four rules
(kinds CTX / PRED / MASK / QUERY and ranks), independent of `mpnet.modeling.masks`. It is compared
with `two_stream_visible` on full index grids, with the dense backend's materialised mask, and with
the mask_mods actually stored in the FlexAttention BlockMasks (evaluated per entry through
`create_mask(block_mask.mask_mod, ...)`), and the BlockMasks' block tables are checked against
those entries (no block holding a visible entry is skipped; every "full" block is entirely visible).
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from helpers import (assert_mask_mod_matches, generator, kind_and_rank, pretraining_batch, rule_mask, rule_visible,
                     stacked_positions)
from mpnet.modeling import make_two_stream_block_masks
from mpnet.modeling.patterns import window_spec
from mpnet.modeling.attention import make_dense_attention_state
from mpnet.modeling.masks import relative_bias_by_distance, relative_position_bucket, two_stream_visible

GRIDS = [(1, 0), (6, 0), (5, 1), (1, 1), (4, 4), (9, 3), (16, 8), (130, 20), (232, 35)]


# ----------------------------------------------------------------------------- the oracle itself


def test_oracle_spot_checks():
    """The oracle against hand-derived entries of a small layout (n=5, m=2: c=3)."""
    n, m = 5, 2  # rows: CTX 0-2, PRED 3-4, MASK 5-6, QUERY 7-8; keys 0-6
    assert [kind_and_rank(i, n, m) for i in range(9)] == [
        ("CTX", None), ("CTX", None), ("CTX", None), ("PRED", 0), ("PRED", 1),
        ("MASK", 0), ("MASK", 1), ("QUERY", 0), ("QUERY", 1)]
    # query rank 0: CTX, no PRED, MASK 0 and 1; query rank 1: CTX, PRED 0, MASK 1
    assert [rule_visible(7, k, n, m) for k in range(7)] == [1, 1, 1, 0, 0, 1, 1]
    assert [rule_visible(8, k, n, m) for k in range(7)] == [1, 1, 1, 1, 0, 0, 1]
    # content PRED rank 0: CTX, PRED 0, MASK 1; PRED rank 1: CTX, PRED 0-1, no MASK
    assert [rule_visible(3, k, n, m) for k in range(7)] == [1, 1, 1, 1, 0, 0, 1]
    assert [rule_visible(4, k, n, m) for k in range(7)] == [1, 1, 1, 1, 1, 0, 0]
    # CTX and MASK rows: CTX and all MASK, no PRED
    for row in (0, 2, 5, 6):
        assert [rule_visible(row, k, n, m) for k in range(7)] == [1, 1, 1, 0, 0, 1, 1]


# ------------------------------------------------------------------------ two_stream_visible


@pytest.mark.parametrize("n,m", GRIDS)
def test_two_stream_visible_matches_rules_on_index_grid(n, m):
    rows, kv_len = n + 2 * m, n + m
    got = two_stream_visible(torch.arange(rows)[:, None], torch.arange(kv_len)[None, :], n, m)
    assert got.shape == (rows, kv_len) and got.dtype == torch.bool
    expected = torch.tensor([[rule_visible(q, k, n, m) for k in range(kv_len)] for q in range(rows)])
    mismatch = (got != expected).nonzero().tolist()
    assert not mismatch, f"(n={n}, m={m}) first mismatches (row, key): {mismatch[:5]}"


def test_two_stream_visible_on_scalars():
    """The rule must work on 0-d tensors (what FlexAttention's vmap feeds a mask_mod)."""
    n, m = 9, 3
    for q in range(n + 2 * m):
        for k in range(n + m):
            assert bool(two_stream_visible(torch.tensor(q), torch.tensor(k), n, m)) == rule_visible(q, k, n, m)


# -------------------------------------------------------------------- batches with padding/window

# (n, m, pad counts per row, window): n not a multiple of 128, m = 0 and m = 1, padding that differs
# per row, windows small and large, and a window wider than the sequence.
CASES = [
    (232, 35, (0, 17), None),
    (232, 35, (0, 17), 5),
    (232, 35, (3, 0), 64),
    (24, 0, (0, 7), None),
    (24, 0, (0, 7), 3),
    (7, 1, (0, 2), None),
    (7, 1, (2, 0), 2),
    (40, 6, (5,), 1000),
]


def _case(n, m, pads):
    ids, positions, mask = pretraining_batch(generator(0), n, m, pads)
    return stacked_positions(positions, mask, n, m)


@functools.lru_cache(maxsize=None)
def _expected_all_rows(n, m, pads, window):
    positions = _case(n, m, pads)
    return torch.stack([rule_mask(row, n, m, window, range(n + 2 * m), n + m) for row in positions])


def _expected(n, m, pads, window, rows):
    return _expected_all_rows(n, m, pads, window)[:, rows.start:rows.stop].clone()


@pytest.mark.parametrize("n,m,pads,window", CASES)
def test_dense_mask_matches_rules(n, m, pads, window):
    positions = _case(n, m, pads)
    state = make_dense_attention_state(positions, n, m, torch.zeros(4, 2 * 128 + 1), 128, window_spec(window))
    allowed = state.allowed[:, 0]
    assert allowed.shape == (len(pads), n + 2 * m, n + m)
    expected = _expected(n, m, pads, window, range(n + 2 * m))
    assert torch.equal(allowed, expected)


def _block_tables(block_mask):
    """Per (batch, q-block): the set of partial kv blocks and the set of full kv blocks."""
    def table(num, idx):
        if num is None:
            return None
        return [[set(idx[b, 0, qb, : num[b, 0, qb]].tolist()) for qb in range(num.shape[2])]
                for b in range(num.shape[0])]
    return (table(block_mask.kv_num_blocks, block_mask.kv_indices),
            table(block_mask.full_kv_num_blocks, block_mask.full_kv_indices))


def _check_block_mask(block_mask, expected, label):
    """Per entry through the stored mask_mod, then the block tables against those entries."""
    batch, q_len, kv_len = expected.shape
    assert_mask_mod_matches(block_mask, expected, label)

    bq, bk = block_mask.BLOCK_SIZE
    partial, full = _block_tables(block_mask)
    blocks = block_mask.to_dense()[:, 0].bool()  # (B, q blocks, kv blocks): partial | full
    assert blocks.shape == (batch, math.ceil(q_len / bq), math.ceil(kv_len / bk)), label
    for b in range(batch):
        for qb in range(blocks.shape[1]):
            for kb in range(blocks.shape[2]):
                tile = expected[b, qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk]
                in_partial = kb in partial[b][qb]
                in_full = full is not None and kb in full[b][qb]
                assert bool(blocks[b, qb, kb]) == (in_partial or in_full), label
                assert not (in_partial and in_full), f"{label}: block {(b, qb, kb)} both partial and full"
                if tile.any():
                    assert in_partial or in_full, f"{label}: block {(b, qb, kb)} holds visible entries but is skipped"
                if in_full:
                    assert tile.all(), f"{label}: block {(b, qb, kb)} is marked full but hides entries"


@pytest.mark.parametrize("n,m,pads,window", CASES)
def test_flex_block_masks_match_rules(n, m, pads, window):
    positions = _case(n, m, pads)
    content, query = make_two_stream_block_masks(positions, n, m, window_spec(window))
    _check_block_mask(content, _expected(n, m, pads, window, range(n + m)), "content")
    if m == 0:
        assert query is None
    else:
        _check_block_mask(query, _expected(n, m, pads, window, range(n + m, n + 2 * m)), "query")


def test_flex_window_is_block_sparse_in_natural_order():
    """Single stream in natural order, n=512, w=64: far-apart 128-blocks must be skipped for real."""
    n, window = 512, 64
    positions = torch.arange(n)[None]
    content, _ = make_two_stream_block_masks(positions, n, 0, window_spec(window))
    blocks = content.to_dense()[0, 0].bool()
    qb, kb = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    assert torch.equal(blocks, (qb - kb).abs() <= 1)  # blocks two apart are >= 129 positions apart
    assert content.sparsity() > 0


# ------------------------------------------------------------------------- relative positions


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 64), (64, 256), (32, 64)])
def test_relative_position_bucket_matches_transformers(num_buckets, max_distance):
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

    distance = torch.arange(-600, 601)
    ours = relative_position_bucket(distance, num_buckets, max_distance)
    theirs = MPNetEncoder.relative_position_bucket(distance, num_buckets=num_buckets, max_distance=max_distance)
    assert torch.equal(ours, theirs)
    # on a 2-d grid too (what both backends feed it)
    grid = torch.arange(300)[None, :] - torch.arange(300)[:, None]
    assert torch.equal(relative_position_bucket(grid, num_buckets, max_distance),
                       MPNetEncoder.relative_position_bucket(grid, num_buckets=num_buckets, max_distance=max_distance))


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 64), (64, 256)])
def test_relative_position_bucket_saturates_beyond_max_distance(num_buckets, max_distance):
    half = num_buckets // 2
    far = torch.arange(max_distance, 601)
    right = relative_position_bucket(far, num_buckets, max_distance)   # key to the right: +half
    left = relative_position_bucket(-far, num_buckets, max_distance)
    assert torch.all(right == 2 * half - 1) and torch.all(left == half - 1)
    # exact below max_exact = num_buckets / 4 and symmetric halves
    exact = torch.arange(half // 2)
    assert torch.equal(relative_position_bucket(-exact, num_buckets, max_distance), exact)
    assert torch.equal(relative_position_bucket(exact[1:], num_buckets, max_distance), half + exact[1:])
    # monotone in |distance| on each side, all buckets in range
    d = torch.arange(0, 601)
    assert torch.all(relative_position_bucket(-d, num_buckets, max_distance).diff() >= 0)
    assert torch.all(relative_position_bucket(d, num_buckets, max_distance).diff()[1:] >= 0)
    every = relative_position_bucket(torch.arange(-600, 601), num_buckets, max_distance)
    assert every.min() >= 0 and every.max() < num_buckets


def test_bias_by_distance_equals_bucket_lookup_at_every_distance():
    """The clamped per-distance table (what both backends gather from) equals table[bucket(d)] for all d."""
    from mpnet.modeling.masks import distance_index

    table = torch.randn(32, 4, generator=generator(1))
    by_distance = relative_bias_by_distance(table, 128, 32)  # (heads, 257)
    assert by_distance.shape == (4, 257)
    q_pos = torch.tensor(300)
    kv_pos = torch.arange(-300, 901)  # distance -600 .. 600
    got = by_distance[:, distance_index(q_pos, kv_pos, 128)]
    expected = table[relative_position_bucket(kv_pos - q_pos, 32, 128)].t()
    assert torch.equal(got, expected)
