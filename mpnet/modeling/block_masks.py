r"""The two-stream BlockMasks from per-tile summaries: no compile step, no L x L mask.

FlexAttention labels every (query tile, key tile) pair EMPTY (skipped), FULL (computed without the
mask_mod) or PARTIAL (computed with the mask_mod evaluated per entry). torch's `create_block_mask`
finds the labels by evaluating the mask_mod on all L x L entries: eagerly that took 12-35 ms per build
up to 8k and 83 ms with a 22 GiB transient at 32k; compiled, the first build of a new shape took from
5 s to minutes. Here the labels come from a few numbers per
tile: O(B x tiles^2) work, a few dozen small kernels, no host synchronisation, nothing compiled. Only
the block tables are built differently: the kernel evaluates the same mask_mod (`two_stream_mask_mods`,
the rules of masks.py and patterns.py) on the PARTIAL tiles.

Measured on an H200 (torch 2.11, `benchmark-mpnet mask-build`: both masks, n = L, m = 15%,
16k tokens per batch, L = 512 .. 32768, no window and window 256): 0.19-0.35 ms per build (0.09-0.19
ms of host time), its kernels replayed as one CUDA graph; 1.0-1.4 ms launched one by one; first build
of a shape 5-12 ms (the graph's capture), 206 ms for the first in the process; 3-44 MiB of memory.
create_block_mask on the same mask_mods: eager 12-83 ms and 0.1-22 GiB, compiled 0.64 ms at L = 512
and 2.9 ms at 32k after first builds of 28 s and 56 s.

Every rule is a comparison between a number of the query row and a number of the key:

- two_stream_visible: each row has a threshold t (CTX and MASK rows 0, PRED of rank i: i + 1, QUERY of
  rank i: i); a CTX key is always visible, a PRED key of rank j iff j < t, a MASK key of rank j iff
  j >= t. Written as one comparison, key value v < row value u: v = -1 (CTX), j (PRED), -j (MASK);
  u = t for CTX and PRED keys, 1 - t for MASK keys. permuted_lm_visible (streams="plm") is the same
  comparison on a layout without MASK entries: the same thresholds, no MASK rows or keys.
- padding (is_real_token) depends on the key alone: padding keys belong to no tile summary, and a
  tile holding one cannot be FULL. Rows and keys past the end of the last tile are treated alike
  (create_block_mask pads the mask with False).
- the window |p_q - p_k| <= W on ORIGINAL positions, and document isolation: one rule |g_q - g_k| <= W
  with g = position (window), g = document and W = 0 (documents alone), or g = document * S + position
  with S wider than any position difference plus W (both: a different document is then always more
  than W away).

For two sets A (rows) and B (keys), "a < b for every pair" holds iff max A < min B and "for no pair"
iff min A >= max B; "|a - b| <= W for every pair" iff max(max A - min B, max B - min A) <= W, and "for
no pair" iff the intervals [min A, max A], [min B, max B] are more than W apart. So each rule's "all"
and "none" are decided by the extremes, and the summaries are min and max per tile and GROUP: rows
grouped by kind (CTX, PRED, MASK, QUERY) with padding rows a fifth group, keys by kind (CTX, PRED,
MASK), so that rows with different rules do not blur each other's intervals.

- FULL: every entry of the tile allowed iff every rule holds for every pair of every group pair (a
  conjunction holds everywhere iff each conjunct does). This is exact: FULL here iff FULL for
  create_block_mask.
- EMPTY: no entry allowed. Marked EMPTY when, for every present (row group, key group) pair, some rule
  holds for no pair. Always sound (never EMPTY where an entry is allowed). Exact (EMPTY iff EMPTY for
  create_block_mask) without a window or documents, since the two-stream comparison is then the only
  rule. With a window or documents, a tile can be truly empty without any single rule being empty on
  a group pair (its in-window pairs are all hidden by the ranks, or the two sets interleave with gaps
  wider than W); such a tile is labelled PARTIAL: computed, masked per entry, the same result.
  Measured: with documents alone none in any test case; in natural order at 128-tiles none in the
  test cases and 2 of the 11,044 empty tiles at L = 8192, window 256 (H200 timing run); 16 of 245 in
  the random cases at tiles of 8-32 with windows of 1-200 (tests/modeling/test_block_masks.py).

Attention patterns other than the window (and its alias neighbourhood) or the score-only ones
(softcap, alibi) fall back to torch's create_block_mask, as attention.py builds them today.
"""
from __future__ import annotations

import functools
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from .masks import STREAM_RULES, is_real_token, stream_lengths
from .patterns import AttentionPattern, as_pattern

DEFAULT_BLOCK_SIZE = 128  # FlexAttention's sparse tile (its kernels' tiles divide it)

ROW_GROUPS = 5  # CTX, PRED, MASK, QUERY rows, then padding rows of any kind
KEY_GROUPS = 3  # CTX, PRED, MASK keys (padding keys are in none)
_PADDING_ROW_GROUP = 4
_ABSENT = -1  # group of padding keys and of the entries past the end of the last tile
_NONE = 2**60  # the min of an empty group (and minus its max): larger than any summarised number


def kernel_ints(tensor: torch.Tensor) -> torch.Tensor:
    """An integer table as the flex kernels read it: int32 (positions, slots and document ids all fit). A
    mask_mod or score_mod over int64 tables makes every lookup an 8-byte load and every difference and
    comparison on it two 32-bit instructions, per score."""
    return tensor.to(torch.int32)


def two_stream_mask_mods(positions, n, m, pattern: AttentionPattern, document_ids=None, layer=0, layout=None,
                         streams="mpnet"):
    """The content-stream and query-stream mask_mods: the rules of masks.py and the pattern, per entry."""
    query_offset, _ = stream_lengths(n, m, streams)  # query-stream row i is row n + m + i (plm: n + i)
    visible = STREAM_RULES[streams]
    positions, document_ids, layout = (None if x is None else kernel_ints(x) for x in (positions, document_ids, layout))

    def content_mask_mod(b, h, q_idx, kv_idx):
        kv_pos = positions[b, kv_idx]
        q_doc, kv_doc = (None, None) if document_ids is None else (document_ids[b, q_idx], document_ids[b, kv_idx])
        q_slot, kv_slot = (q_idx, kv_idx) if layout is None else (layout[b, q_idx], layout[b, kv_idx])
        return (visible(q_slot, kv_slot, n, m) & is_real_token(kv_pos)
                & pattern.visible(positions[b, q_idx], kv_pos, layer, q_doc, kv_doc))

    def query_mask_mod(b, h, q_idx, kv_idx):
        return content_mask_mod(b, h, q_idx + query_offset, kv_idx)

    return content_mask_mod, query_mask_mod


def summarised_window(pattern: AttentionPattern):
    """(covered, W): whether the pattern's masks are all windows (then W, the narrowest, or None when it
    has no mask) so that the tile summaries decide its blocks; covered False sends the build to
    create_block_mask. Score modifications leave the blocks alone."""
    covered = pattern.masks_are_windows
    return covered, pattern.window if covered else None


@functools.lru_cache(maxsize=64)
def _static_tables(n, m, q_block, kv_block, device, streams="mpnet"):
    """What depends on the shape only: per-slot kind / threshold / key value, and the rows of each tile.

    The query tiles of both masks are summarised in one pass: the content rows 0 .. n+m-1, then the
    query rows n+m .. n+2m-1, each padded to whole tiles with row n+2m (the absent sentinel row); for
    plm the content rows 0 .. n-1, then the query rows n .. n+m-1 (no MASK slots).
    """
    kv_len, rows = stream_lengths(n, m, streams)
    c = n - m
    slot = torch.arange(rows)
    kind = (slot >= c).long() + (slot >= n).long() + (slot >= kv_len).long()  # 0 CTX 1 PRED 2 MASK 3 QUERY
    rank = slot - torch.tensor([0, c, n, kv_len])[kind]
    threshold = torch.where(kind == 1, rank + 1, torch.where(kind == 3, rank, 0))
    key_value = torch.where(kind == 0, -1, torch.where(kind == 1, rank, -rank))
    per_slot = torch.stack([kind, threshold, key_value], dim=-1)

    def tiled(first, count, tile):
        tiles = -(-count // tile)
        index = torch.full((tiles * tile,), rows)
        index[:count] = torch.arange(first, first + count)
        return index, tiles

    content_rows, content_tiles = tiled(0, kv_len, q_block)
    query_rows, query_tiles = tiled(kv_len, m, q_block)
    q_rows = torch.cat([content_rows, query_rows])
    q_tile_complete = (q_rows.view(-1, q_block) < rows).all(-1)
    kv_rows, _ = tiled(0, kv_len, kv_block)
    key_is_upper = torch.tensor([False, False, True])  # MASK keys compare against 1 - t
    return (per_slot.to(device), q_rows.to(device), q_tile_complete.to(device), kv_rows.to(device),
            key_is_upper.to(device), content_tiles, query_tiles)


def _tile_extremes(features, tile, groups):
    """features (B, rows, 1 + V): group id, then V numbers. -> (min, max), each (B, tiles, groups, V);
    an empty group has min _NONE and max -_NONE."""
    batch, rows, width = features.shape
    features = features.view(batch, rows // tile, tile, width)
    member = features[..., :1] == torch.arange(groups, device=features.device)  # (B, T, tile, G)
    numbers = features[..., None, 1:]
    lows = torch.where(member[..., None], torch.cat([numbers, -numbers], -1), _NONE).amin(2)
    values = width - 1
    return lows[..., :values], -lows[..., values:]


def _ordered(blocks):
    """(..., rows, cols) bool -> per row: how many, and their column indices first (create_block_mask's order).

    Contiguous first: sort keeps its input's strides, and the kernels read the tables as contiguous rows
    (transposed tables sorted in place gave the backward pass wrong gradients on the H200)."""
    blocks = blocks.contiguous()
    count = blocks.sum(-1, dtype=torch.int32)
    indices = torch.argsort(blocks, dim=-1, descending=True, stable=True).to(torch.int32)
    return count, indices


def _ordered_tables(partial, full):
    """(B, q tiles, kv tiles) labels -> the BlockMask tables: per q tile the partial, then full, kv tiles
    (count, indices), and per kv tile the q tiles (the backward pass's transposed tables)."""
    labels = torch.stack([partial, full])[:, :, None]  # (2, B, 1, q tiles, kv tiles)
    return [*_ordered(labels), *_ordered(labels.transpose(-1, -2))]


def _label_tables(positions, document_ids, layout, n, m, window, q_block, kv_block, streams="mpnet"):
    """Every tile labelled from the summaries; the tables of the content mask, then of the query mask."""
    per_slot, q_rows, q_tile_complete, kv_rows, key_is_upper, content_tiles, query_tiles = _static_tables(
        n, m, q_block, kv_block, positions.device, streams)
    kind, threshold, key_value = (per_slot if layout is None else per_slot[layout]).unbind(-1)
    positions = positions.long()
    real = is_real_token(positions)
    row_group = torch.where(real, kind, _PADDING_ROW_GROUP)
    key_group = torch.where(real, kind, _ABSENT)  # query rows are never keys: kv_rows stop at the content

    # The pattern's rule as |g_q - g_k| <= reach (see the module docstring), or none.
    g, reach = None, window
    if document_ids is not None:
        document_ids = document_ids.long()
        if window is None:
            g, reach = document_ids, 0
        else:
            span = positions.amax() - positions.amin()  # a 0-d device tensor: no host sync
            g = document_ids * (span + window + 1) + positions
    elif window is not None:
        g = positions
    batch = positions.shape[0]
    row_numbers = [row_group, threshold] + ([] if g is None else [g])
    key_numbers = [key_group, key_value] + ([] if g is None else [g])
    # One (B, rows + 1, .) table each, the extra row being the absent sentinel, then each tile's rows.
    row_features = F.pad(torch.stack(torch.broadcast_tensors(*row_numbers), -1), (0, 0, 0, 1), value=_ABSENT)
    key_features = F.pad(torch.stack(torch.broadcast_tensors(*key_numbers), -1), (0, 0, 0, 1), value=_ABSENT)
    row_features, key_features = row_features[:, q_rows], key_features[:, kv_rows]
    row_min, row_max = _tile_extremes(row_features, q_block, ROW_GROUPS)  # (B, Qt, 5, V)
    key_min, key_max = _tile_extremes(key_features, kv_block, KEY_GROUPS)  # (B, Kt, 3, V)
    key_tile_complete = (key_features[..., 0].view(batch, -1, kv_block) != _ABSENT).all(-1)  # (B, Kt)

    # Broadcast to (B, q tiles, kv tiles, row group, key group).
    def rows_(x):
        return x[:, :, None, :, None]

    def keys_(x):
        return x[:, None, :, None, :]

    t_min, t_max = rows_(row_min[..., 0]), rows_(row_max[..., 0])
    u_min = torch.where(key_is_upper, 1 - t_max, t_min)
    u_max = torch.where(key_is_upper, 1 - t_min, t_max)
    v_min, v_max = keys_(key_min[..., 0]), keys_(key_max[..., 0])
    present = (t_min < _NONE) & (v_min < _NONE)
    everywhere = v_max < u_min
    nowhere = v_min >= u_max
    if g is not None:
        gq_min, gq_max = rows_(row_min[..., 1]), rows_(row_max[..., 1])
        gk_min, gk_max = keys_(key_min[..., 1]), keys_(key_max[..., 1])
        everywhere = everywhere & (torch.maximum(gq_max - gk_min, gk_max - gq_min) <= reach)
        nowhere = nowhere | (gk_min - gq_max > reach) | (gq_min - gk_max > reach)
    full = ((~present | everywhere).flatten(-2).all(-1)
            & q_tile_complete[None, :, None] & key_tile_complete[:, None, :])
    empty = (~present | nowhere).flatten(-2).all(-1)
    partial = ~full & ~empty
    tables = _ordered_tables(partial[:, :content_tiles], full[:, :content_tiles])
    if m:
        tables += _ordered_tables(partial[:, content_tiles:], full[:, content_tiles:])
    return tables


class _GraphedTables:
    """_label_tables for one shape, captured once as a CUDA graph and replayed.

    Eagerly the build is a few dozen small kernels, and on the H200 their launches, not the GPU, set its
    time: 1.0-1.4 ms per build at every L. Replayed, the launches cost one (0.19-0.35 ms): the inputs are
    copied into the graph's buffers, the graph runs, and its output (all tables in one buffer) is copied
    out, so that masks built earlier stay valid while later ones are built. Capturing (once per shape)
    synchronises the device and empties torch's allocator cache, as torch.cuda.graph does.
    """

    def __init__(self, compute, inputs):
        device = inputs[0].device
        self.compute, self.inputs = compute, [x.clone() for x in inputs]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: caches and lazy initialisation stay out of the graph
            self.shapes = [table.shape for table in compute(*self.inputs)]
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.output = torch.cat([table.reshape(-1) for table in compute(*self.inputs)])

    def __call__(self, inputs):
        for mine, new in zip(self.inputs, inputs):
            mine.copy_(new)
        self.graph.replay()
        pieces = self.output.clone().split([shape.numel() for shape in self.shapes])
        return [piece.view(shape) for piece, shape in zip(pieces, self.shapes)]


USE_CUDA_GRAPHS = True  # False: launch the kernels one by one on CUDA too (timing, tests)
GRAPH_CACHE_SIZE = 8  # shapes kept captured (each holds its intermediates: ~10-40 MiB at 32k)
_GRAPHS: OrderedDict = OrderedDict()


def _tables(positions, document_ids, layout, n, m, window, q_block, kv_block, streams="mpnet"):
    inputs = [x for x in (positions, document_ids, layout) if x is not None]

    def compute(*given):
        given = iter(given)
        return _label_tables(next(given), next(given) if document_ids is not None else None,
                             next(given) if layout is not None else None, n, m, window, q_block, kv_block, streams)

    device = positions.device
    if (not USE_CUDA_GRAPHS or device.type != "cuda" or torch.compiler.is_compiling()
            or torch.cuda.is_current_stream_capturing()):
        return compute(*inputs)
    key = (device, n, m, streams, window, q_block, kv_block, document_ids is not None, layout is not None,
           *((tuple(x.shape), x.dtype) for x in inputs))
    graphed = _GRAPHS.pop(key, None)
    if graphed is None:
        with torch.cuda.device(device):
            graphed = _GraphedTables(compute, inputs)
    _GRAPHS[key] = graphed  # most recently used last
    while len(_GRAPHS) > GRAPH_CACHE_SIZE:
        _GRAPHS.popitem(last=False)
    return graphed(inputs)


def _block_mask(tables, mask_mod, q_len, kv_len, block_size):
    kv_count, kv_indices, q_count, q_indices = tables
    block_mask = BlockMask.from_kv_blocks(kv_count[0], kv_indices[0], kv_count[1], kv_indices[1],
                                          BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(q_len, kv_len),
                                          compute_q_blocks=False)
    block_mask.q_num_blocks, block_mask.q_indices = q_count[0], q_indices[0]
    block_mask.full_q_num_blocks, block_mask.full_q_indices = q_count[1], q_indices[1]
    return block_mask


def _fallback(positions, n, m, content_mod, query_mod, streams="mpnet"):
    # Patterns the summaries do not cover (block, swin, dilated, global, prefix): torch's create_block_mask
    # evaluates the mask_mod on every entry, eagerly. Compiling it made later builds cheap but the first
    # build of each new shape took 5 s to minutes on an H200; eagerly a build costs 12-35 ms up to L = 8k
    # (83 ms and a 22 GiB transient at 32k), once per forward.
    batch, (kv_len, _), device = positions.shape[0], stream_lengths(n, m, streams), positions.device
    content = create_block_mask(content_mod, batch, None, kv_len, kv_len, device=device, _compile=False)
    query = create_block_mask(query_mod, batch, None, m, kv_len, device=device, _compile=False) if m else None
    return content, query


def make_two_stream_block_masks(positions, n, m, pattern=None, *, document_ids=None, layer=0, layout=None,
                                block_size=DEFAULT_BLOCK_SIZE, streams="mpnet"):
    """Content-stream ((n+m) x (n+m)) and query-stream (m x (n+m), None when m = 0) BlockMasks.

    The flex backend's masks (attention.make_flex_attention_state builds them here): positions (B, n + 2m) original
    positions (-1 padding), document_ids likewise or None, layout the rows' permuted-layout slots when
    the rows are in natural order (masks.natural_order), else None. block_size: an int or (q, kv).
    streams="plm": the permuted-LM layout (n x n and m x n, positions (B, n + m); masks.stream_lengths).
    On CUDA the tables are built by a CUDA graph captured at the first build of each shape.
    """
    pattern = as_pattern(pattern)
    content_mod, query_mod = two_stream_mask_mods(positions, n, m, pattern, document_ids, layer, layout, streams)
    covered, window = summarised_window(pattern)
    if not covered:
        return _fallback(positions, n, m, content_mod, query_mod, streams)
    q_block, kv_block = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    tables = _tables(positions, document_ids, layout, n, m, window, q_block, kv_block, streams)
    kv_len, _ = stream_lengths(n, m, streams)
    content = _block_mask(tables[:4], content_mod, kv_len, kv_len, (q_block, kv_block))
    query = _block_mask(tables[4:], query_mod, m, kv_len, (q_block, kv_block)) if m else None
    return content, query


def tile_counts(block_mask: BlockMask) -> tuple[int, int]:
    """(tiles computed, tiles in all): full + partial tiles over the batch and heads, and batch x heads x
    q tiles x kv tiles on the padded grid. Their ratio is the share of the attention the kernel
    computes (BlockMask.sparsity() divides by the unpadded size and goes negative below 128)."""
    q_len, kv_len = block_mask.seq_lengths
    q_block, kv_block = block_mask.BLOCK_SIZE
    q_tiles, kv_tiles = -(-q_len // q_block), -(-kv_len // kv_block)
    computed = block_mask.kv_num_blocks[..., :q_tiles].sum()
    if block_mask.full_kv_num_blocks is not None:
        computed = computed + block_mask.full_kv_num_blocks[..., :q_tiles].sum()
    heads_and_batch = block_mask.kv_num_blocks[..., 0].numel()
    return int(computed), heads_and_batch * q_tiles * kv_tiles
