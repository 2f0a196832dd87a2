r"""The attention rules, each written once.

Both backends use these functions: the dense backend evaluates them on broadcast index tensors to
materialise a boolean mask; FlexAttention evaluates them inside its kernel as a mask_mod. They use
only elementwise torch ops, so they work on 0-d tensors (flex's vmap) and on full grids alike.
Polarity: True means "may attend" (FlexAttention's and SDPA's convention; the original fairseq code
used True = hidden).

Two-stream layout (rows = queries, length n + 2m; keys/values = the first n + m rows):

    [ CTX: n - m context tokens | PRED: m predicted tokens | MASK: m appended <mask> | QUERY: m <mask> ]
      \______________________ content stream (keys/values) ___________________/    query stream

The PRED, MASK and QUERY entries have a rank 0..m-1: the order in which they are predicted. (The
rules care about slots, not inputs: by default MASK and QUERY hold the corrupted predicted tokens,
data.corrupted_input, docs/objectives.md.)
Single-stream encoding is the same layout with m = 0 (everything is context).

The permuted-LM objective (plm, XLNet-style; docs/objectives.md) lays the streams out without the
MASK section, so without position compensation (rows n + m, keys the first n):

    [ CTX: n - m | PRED: m | QUERY: m ]
      \_ content _/         query stream

`STREAM_RULES` names the two layouts; with m = 0 both are single-stream encoding.
"""
from __future__ import annotations

import math

import torch


def two_stream_visible(q_idx, kv_idx, n: int, m: int):
    """MPNet visibility (docs/ARCHITECTURE.md, "The attention rules") for row q_idx in [0, n+2m) and key kv_idx in [0, n+m).

    - content CTX / MASK rows: all CTX, no PRED, all MASK;
    - content PRED row of rank i: all CTX, PRED j <= i, MASK j > i;
    - QUERY row of rank i: all CTX, PRED j < i, MASK j >= i.
    So the query of rank i never sees the predicted tokens of rank >= i, through any number of layers.
    """
    c = n - m
    k_ctx = kv_idx < c
    k_pred = (kv_idx >= c) & (kv_idx < n)
    k_mask = kv_idx >= n
    k_rank = torch.where(k_pred, kv_idx - c, kv_idx - n)
    q_pred = (q_idx >= c) & (q_idx < n)
    q_query = q_idx >= n + m
    q_rank = torch.where(q_pred, q_idx - c, q_idx - n - m)
    sees_pred = (q_pred & (k_rank <= q_rank)) | (q_query & (k_rank < q_rank))
    sees_mask = (~q_pred & ~q_query) | (q_pred & (k_rank > q_rank)) | (q_query & (k_rank >= q_rank))
    return k_ctx | (k_pred & sees_pred) | (k_mask & sees_mask)


def permuted_lm_visible(q_idx, kv_idx, n: int, m: int):
    """XLNet-style permuted-LM visibility for row q_idx in [0, n+m) and key kv_idx in [0, n): the
    original MPNet code's kind='PLM' masks (make_query_and_content_mask), True = may attend.

    - content CTX rows: all CTX, no PRED;
    - content PRED row of rank i: all CTX, PRED j <= i;
    - QUERY row of rank i: all CTX, PRED j < i.
    No MASK entries: a prediction sees the positions of the context and of the tokens predicted
    before it only (what MPNet's position compensation adds is the positions of the others).
    """
    c = n - m
    k_pred = kv_idx >= c
    k_rank = kv_idx - c
    q_pred = (q_idx >= c) & (q_idx < n)
    q_query = q_idx >= n
    q_rank = torch.where(q_pred, q_idx - c, q_idx - n)
    return ~k_pred | (q_pred & (k_rank <= q_rank)) | (q_query & (k_rank < q_rank))


# The two-stream layouts by name: "mpnet" (content n + m, with the m appended <mask> entries) and
# "plm" (content n). The backends take the name as `streams`.
STREAM_RULES = {"mpnet": two_stream_visible, "plm": permuted_lm_visible}


def stream_lengths(n: int, m: int, streams: str = "mpnet") -> tuple[int, int]:
    """(content length = keys, all rows) of a layout: (n + m, n + 2m) for mpnet, (n, n + m) for plm."""
    content = n + m if streams == "mpnet" else n
    return content, content + m


def natural_order(positions, n: int, m: int, document_ids=None, streams: str = "mpnet"):
    """Row order that keeps the stacked two-stream layout sorted by ORIGINAL position within each section.

    positions: (B, n + 2m) of the permuted layout (plm: (B, n + m), `stream_lengths`). Returns order,
    of the same shape: natural row r is permuted row order[b, r]. Gathering rows by it makes a window
    or any position-local pattern block-sparse (in permuted order it is scattered over almost every
    tile); the rules stay the same function, evaluated on two_stream_visible(order[q], order[kv]).
    Content rows stay among the first n + m (plm: n), so keys/values are still the first rows. Only
    worth it for sparse patterns: in natural order the PRED columns are scattered, so without a window
    nearly every tile becomes partial.
    """
    key = positions
    if document_ids is not None:  # packed documents restart their positions: sort by (document, position)
        key = torch.where(positions >= 0, document_ids * (n + 1) + positions, -1)
    content = torch.argsort(key[:, :n], dim=1, stable=True)  # padding (-1) first
    predicted = torch.argsort(key[:, n:n + m], dim=1, stable=True)
    copies = 2 if streams == "mpnet" else 1  # the predicted entries appended: MASK and QUERY, or QUERY
    return torch.cat([content] + [n + copy * m + predicted for copy in range(copies)], dim=1)


def is_real_token(position):
    """Padding carries position -1 (so its absolute position id is padding_idx = 1, as in HF)."""
    return position >= 0


def within_window(q_position, kv_position, window: int):
    """Sliding window on ORIGINAL positions: a token sees positions p with |p - q| <= window."""
    return (q_position - kv_position).abs() <= window


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int = 32, max_distance: int = 128):
    """Bidirectional log-bucketing of (key position - query position), as MPNet/T5 define it.

    Half the buckets per direction; distances below a quarter of num_buckets are exact, the rest are
    log-spaced up to max_distance and saturate beyond; +num_buckets/2 when the key is to the right.
    """
    half = num_buckets // 2
    n = -relative_position
    bucket = (n < 0).long() * half
    n = n.abs()
    max_exact = half // 2
    log_ratio = torch.log(n.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (half - max_exact)).long()).clamp(max=half - 1)
    return bucket + torch.where(n < max_exact, n, large)


def relative_bias_by_distance(table: torch.Tensor, max_distance: int, num_buckets: int) -> torch.Tensor:
    """(buckets, heads) table -> (heads, 2*max_distance + 1) bias indexed by clamp(distance) + max_distance.

    Buckets saturate at max_distance, so clamping the distance there changes nothing; the dense and flex
    backends then read the bias with one gather, and its gradient flows back to the table through autograd.
    """
    distance = torch.arange(-max_distance, max_distance + 1, device=table.device)
    return table[relative_position_bucket(distance, num_buckets, max_distance)].t()


def distance_index(q_position, kv_position, max_distance: int):
    """Index into `relative_bias_by_distance` for a (query, key) pair of original positions."""
    return (kv_position - q_position).clamp(-max_distance, max_distance) + max_distance
