"""What the Triton attention kernels read besides q, k and v (triton_attention.py's docstring says why
it looks like this): the MPNet rules as per-row integers, the plan of one batch (the orders in which
the kernels visit rows, and the key and query ranges each row may meet), and the relative-bias table as
the kernels read it (buckets by distance, the bias in log2 units). Pure torch: it runs without triton.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from .masks import relative_position_bucket, stream_lengths
from .triton_kernels import FAR, HIDDEN_CODE, LOG2E


# --------------------------------------------------------------------------- the rules as integers


def two_stream_codes(slots, n: int, m: int, streams: str = "mpnet"):
    """Per-row integers equivalent to `masks.two_stream_visible` (streams "mpnet") or
    `masks.permuted_lm_visible` ("plm": the same rules without the MASK section, QUERY rows right after
    the n content rows) for rows in layout `slots`.

    Returns (threshold, code): threshold for every row as a query, code for every row as a key, with
    two_stream_visible(q, k) == ((code[k] >> 1) < threshold[q]) != (code[k] & 1 == 1).
    A query sees the PRED keys of rank < threshold and the MASK keys of rank >= threshold: CTX and MASK
    rows see no PRED and every MASK (0), PRED of rank i sees PRED <= i and MASK > i (i + 1), QUERY of
    rank i sees PRED < i and MASK >= i (i). A key's code is 2 * rank + (1 if MASK): CTX keys have rank
    -1, below every threshold, and are seen by all.
    """
    c = n - m
    pred = (slots >= c) & (slots < n)
    query_start = n + m if streams == "mpnet" else n
    mask = (slots >= n) & (slots < query_start)
    query = slots >= query_start
    threshold = torch.where(pred, slots - c + 1, torch.where(query, slots - query_start, 0))
    rank = torch.where(pred, slots - c, torch.where(mask, slots - n, -1))
    return threshold, 2 * rank + mask.long()


# ------------------------------------------------------------------------------------------ plan


@dataclass
class VisitOrder:
    """One order in which kernels visit the rows: (B, L) int32 vectors, contiguous.

    q_rows[b, i]: the query row (of q and of the output) visited i-th, padding rows last; q_pos,
    q_threshold, q_doc: its position, rule threshold and document. k_*: the same for the keys (the
    first n + m rows; padding keys last, code HIDDEN_CODE). q_key_lo/hi: the visited keys [lo, hi) a
    query row may see (its kernels loop over those key tiles only); k_query_lo/hi: the real visited
    query rows that may see a key (padding query rows, last, are visited by every key tile apart).
    An order made for one pass holds only the ranges that pass reads (the others None).
    """

    q_rows: torch.Tensor
    q_pos: torch.Tensor
    q_threshold: torch.Tensor
    q_doc: torch.Tensor
    k_rows: torch.Tensor
    k_pos: torch.Tensor
    k_code: torch.Tensor
    k_doc: torch.Tensor
    q_key_lo: torch.Tensor | None = None
    q_key_hi: torch.Tensor | None = None
    k_query_lo: torch.Tensor | None = None
    k_query_hi: torch.Tensor | None = None

    def query_vectors(self):  # q_doc / k_doc may be (B, 1) zeros when there are no documents
        return self.q_rows, self.q_pos, self.q_threshold, self.q_doc.expand_as(self.q_rows)

    def key_vectors(self):
        return self.k_rows, self.k_pos, self.k_code, self.k_doc.expand_as(self.k_rows)


@dataclass
class TritonAttentionPlan:
    """Everything the kernels read about one batch.

    forward: the order of the forward and dQ kernels (they hold query tiles: q_key_lo/hi); keys: the
    order of the dK/dV kernel (it holds key tiles: k_query_lo/hi). Both visit rows by position within
    each document, which keeps a tile's distances in a narrow range (one saturated bucket, or a few);
    without a window or documents the forward order groups the rows by kind first (see
    `make_triton_attention_plan`). q_real: (B,) real query rows per batch row.
    """

    forward: VisitOrder
    keys: VisitOrder
    q_real: torch.Tensor
    window: int | None
    has_documents: bool
    forward_packed: torch.Tensor = field(init=False)  # what the forward and dQ kernels read
    keys_packed: torch.Tensor = field(init=False)  # what the dK/dV kernel reads

    def __post_init__(self):
        self.forward_packed = pack_forward_order(self.forward)
        self.keys_packed = pack_keys_order(self.keys, self.q_real)

    @property
    def query_len(self) -> int:
        return self.forward.q_rows.shape[1]

    @property
    def key_len(self) -> int:
        return self.forward.k_rows.shape[1]


def _int32(x):
    return x.to(torch.int32).contiguous()


# One tensor per kernel, because a Triton launch costs host time per argument (triton_kernels._forward_plan
# and _keys_plan read these layouts back).
def pack_forward_order(visit: VisitOrder) -> torch.Tensor:
    """Flat int32: q_rows, q_pos, q_threshold, q_doc, q_key_lo, q_key_hi (each B x LQ), then k_rows,
    k_pos, k_code, k_doc (each B x LK)."""
    queries = torch.stack([*visit.query_vectors(), visit.q_key_lo, visit.q_key_hi])
    return torch.cat([queries.flatten(), torch.stack(visit.key_vectors()).flatten()])


def pack_keys_order(visit: VisitOrder, q_real: torch.Tensor) -> torch.Tensor:
    """Flat int32: q_rows, q_pos, q_threshold, q_doc (each B x LQ), q_real (B), then k_rows, k_pos, k_code,
    k_doc, k_query_lo, k_query_hi (each B x LK)."""
    keys = torch.stack([*visit.key_vectors(), visit.k_query_lo, visit.k_query_hi])
    return torch.cat([torch.stack(visit.query_vectors()).flatten(), q_real, keys.flatten()])


def make_triton_attention_plan(positions, n: int, m: int, *, window: int | None = None, document_ids=None,
                               layout=None, query_rows: slice | None = None, streams: str = "mpnet"
                               ) -> TritonAttentionPlan:
    """Everything the kernels need about one batch, built once per forward and shared by the layers.

    positions: (B, n + 2m) original positions of the rows (-1 = padding: never attended as a key);
    layout: the rows' slots in the permuted two-stream layout when the rows are in natural order
    (masks.natural_order), else None; document_ids: (B, n + 2m) or None (attention within a document);
    window: |p_q - p_k| <= window on original positions, or None. query_rows: the rows that will be
    the queries (default all n + 2m); the keys are always the first n + m rows. streams="plm": the
    permuted-LM layout instead (n + m rows, the first n the keys; masks.stream_lengths).

    Rows are visited by (document, position), padding last. Without a window or documents nothing
    needs one position order across kinds, and the forward and dQ kernels visit rows in groups by what
    the rules let them see, each group by position: keys CTX | MASK | PRED, queries that see no PRED key
    (threshold 0: CTX, MASK, QUERY rank 0) | the others. Then ~74% of the key tiles hold only CTX keys
    (no rule mask to apply) and the first query group's key range stops before the PRED keys. The dK/dV
    kernel keeps one position order: grouped, a PRED or MASK key tile spans several times the
    positions, hence many buckets to reduce its bias gradient over. Measured on the H200 pairs
    (L=512 / 2048 / 4096): keys by position 2.03 / 4.85 / 8.72 ms; CTX keys first, then PRED and MASK
    by position 2.49 / 5.79 / 10.16 ms; the forward's three groups +0.6 ms at L=512.
    """
    batch, length = positions.shape
    device = positions.device
    kv_len, total = stream_lengths(n, m, streams)
    if length != total or not 0 <= m <= n:
        raise UserError(f"positions have {length} rows; the {streams} layout has {total} (n={n}, m={m})")
    slots = torch.arange(length, device=device).expand(batch, -1) if layout is None else layout.long()
    threshold, code = two_stream_codes(slots, n, m, streams)
    positions = positions.long()
    real = positions >= 0
    # Sort value: (document, position) for real rows, padding last. Positions restart per document.
    # span exceeds any position (int32), so no read of the positions' maximum is needed: such a read
    # waits for the GPU, once per forward, in a step that is otherwise host-bound at fine-tuning sizes.
    span = 1 << 32
    documents = doc_start = None
    value = positions
    if document_ids is not None:
        documents = document_ids.long()
        doc_start = (documents - documents.min()) * span
        value = doc_start + positions
    last = torch.iinfo(torch.int64).max
    value = torch.where(real, value, last)
    rows = torch.arange(length, device=device)
    if query_rows is not None:
        rows = rows[query_rows]
    q_real = real[:, rows].sum(1)
    k_real = real[:, :kv_len].sum(1, keepdim=True)

    def order(q_value, k_value):
        """The visit order of these sort values, and the sorted values (queries, keys)."""
        q_order = torch.argsort(q_value, dim=1, stable=True)
        k_order = torch.argsort(k_value, dim=1, stable=True)
        q_rows = rows[q_order]  # rows of the stacked layout (positions, slots); q_order indexes q itself
        visit = VisitOrder(
            q_rows=_int32(q_order), q_pos=_int32(positions.gather(1, q_rows)),
            q_threshold=_int32(threshold.gather(1, q_rows)),
            q_doc=_int32(documents.gather(1, q_rows) if documents is not None else q_order[:, :1] * 0),
            k_rows=_int32(k_order), k_pos=_int32(positions.gather(1, k_order)),
            k_code=_int32(torch.where(real.gather(1, k_order), code.gather(1, k_order), HIDDEN_CODE)),
            k_doc=_int32(documents.gather(1, k_order) if documents is not None else k_order[:, :1] * 0))
        return visit, q_rows, k_order, q_value.gather(1, q_order), k_value.gather(1, k_order)

    def bounds(sorted_rows, sorted_value):
        """Inclusive [lo, hi] of the sort values a row may meet (window, same document)."""
        lo = torch.full_like(sorted_value, torch.iinfo(torch.int64).min)
        hi = torch.full_like(sorted_value, last - 1)
        if window is not None:
            lo, hi = sorted_value - window, sorted_value + window
        if documents is not None:
            start = doc_start.gather(1, sorted_rows)
            lo, hi = torch.maximum(lo, start), torch.minimum(hi, start + span - 1)
        return lo.contiguous(), hi.contiguous()

    def key_ranges(q_rows, q_sorted, k_sorted):
        """q_key_lo/hi in this order: the window's and documents' bounds found by binary search."""
        if window is None and documents is None:
            lo, hi = torch.zeros_like(q_sorted), k_real.expand_as(q_sorted)
        else:
            lo_value, hi_value = bounds(q_rows, q_sorted)
            lo = torch.searchsorted(k_sorted, lo_value, side="left")
            hi = torch.searchsorted(k_sorted, hi_value, side="right")
        return lo, hi

    def finish_key_ranges(visit, q_rows, lo, hi):
        # A padding query row has position -1 and may still see keys (dense does too): let it try them all.
        q_real_rows = real.gather(1, q_rows)
        visit.q_key_lo = _int32(torch.where(q_real_rows, lo, 0))
        visit.q_key_hi = _int32(torch.where(q_real_rows, hi, k_real))

    def query_ranges(visit, k_rows, q_sorted, k_sorted):
        if window is None and documents is None:
            lo, hi = torch.zeros_like(k_sorted), q_real[:, None].expand_as(k_sorted)
        else:
            lo_value, hi_value = bounds(k_rows, k_sorted)
            lo = torch.searchsorted(q_sorted, lo_value, side="left")
            hi = torch.searchsorted(q_sorted, hi_value, side="right")
        k_real_rows = real.gather(1, k_rows)
        visit.k_query_lo = _int32(torch.where(k_real_rows, lo, FAR))  # padding keys are seen by nobody
        visit.k_query_hi = _int32(torch.where(k_real_rows, hi, 0))

    by_position, q_rows, k_rows, q_sorted, k_sorted = order(value[:, rows], value[:, :kv_len])
    query_ranges(by_position, k_rows, q_sorted, k_sorted)
    if window is not None or documents is not None or m == 0:  # m = 0: every row CTX, one group, one order
        finish_key_ranges(by_position, q_rows, *key_ranges(q_rows, q_sorted, k_sorted))
        forward = by_position
    else:
        key_code = code[:, :kv_len]
        k_group = torch.where(key_code < 0, 0, torch.where(key_code % 2 == 1, 1, 2))  # CTX | MASK | PRED
        k_value = torch.where(real[:, :kv_len], k_group * span + positions[:, :kv_len], last)
        q_value = torch.where(real[:, rows], (threshold[:, rows] > 0).long() * span + positions[:, rows], last)
        forward, q_rows, _, q_sorted, _ = order(q_value, k_value)
        seen_by_all = (real[:, :kv_len] & (k_group < 2)).sum(1, keepdim=True)  # CTX and MASK keys
        hi = torch.where(threshold.gather(1, q_rows) > 0, k_real, seen_by_all)
        finish_key_ranges(forward, q_rows, torch.zeros_like(q_sorted), hi)
    return TritonAttentionPlan(forward=forward, keys=by_position, q_real=_int32(q_real), window=window,
                               has_documents=documents is not None)



# ------------------------------------------------------------------------------------ bias tables


@dataclass(frozen=True)
class BucketLayout:
    """The relative-bias buckets read by distance: index = clamp(p_k - p_q, -D, D) + D, D = max_distance.
    Host-side Python ints: what the launchers pass as compile-time constants.

    saturated_left / saturated_right: the smallest |distance| from which every farther distance on
    that side is in the same (last) bucket (91 at 32 buckets / 128).
    """

    num_buckets: int
    max_distance: int
    saturated_left: int
    saturated_right: int
    bucket_left: int  # the bucket of every distance <= -saturated_left
    bucket_right: int  # the bucket of every distance >= saturated_right


def bucket_slots(num_buckets: int) -> int:
    """The bucket tables' and the bias gradient's slots per bucket list: a power of two (tl.arange's)."""
    return 1 << max(num_buckets - 1, 1).bit_length()


@functools.lru_cache(maxsize=None)
def bucket_layout(num_buckets: int, max_distance: int) -> BucketLayout:
    buckets = _bucket_tables(num_buckets, max_distance, "cpu")[:2 * max_distance + 1]

    def saturated(side):  # side: the bucket values from |d| = 0 outwards
        far, first = side[-1], len(side) - 1
        while first > 0 and side[first - 1] == far:
            first -= 1
        return max(first, 1)

    left = buckets[:max_distance + 1].flip(0)  # d = 0, -1, ..., -D
    right = buckets[max_distance:]  # d = 0, 1, ..., D
    return BucketLayout(num_buckets, max_distance, saturated(left.tolist()),
                        saturated(right.tolist()), int(buckets[0]), int(buckets[-1]))


def _bucket_tables(num_buckets: int, max_distance: int, device) -> torch.Tensor:
    distance = torch.arange(-max_distance, max_distance + 1, device=device)
    bucket = relative_position_bucket(distance, num_buckets, max_distance)
    slots = bucket_slots(num_buckets)
    first = torch.full((slots,), FAR, device=device).scatter_reduce(0, bucket, distance, "amin")
    last = torch.full((slots,), -FAR, device=device).scatter_reduce(0, bucket, distance, "amax")
    ids = torch.arange(slots, device=device)
    first = torch.where(ids == bucket[0], -FAR, first)  # the saturated buckets hold every farther distance
    last = torch.where(ids == bucket[-1], FAR, last)
    return torch.cat([bucket, first, last]).to(torch.int32)


@functools.lru_cache(maxsize=None)
def _bucket_tables_on(num_buckets: int, max_distance: int, device: torch.device) -> torch.Tensor:
    return _bucket_tables(num_buckets, max_distance, "cpu").to(device)


def bucket_tables(num_buckets: int, max_distance: int, device) -> torch.Tensor:
    """The dK/dV kernel's bucket tables, one int32 tensor: the bucket of each distance index (2D + 1),
    then the first and the last distance of each bucket (a power of two of slots each; unused slots
    empty, the two saturated buckets open-ended at -/+ FAR). Eager: a cached copy on `device`. Under
    torch.compile: computed in the graph, never a cached tensor: one first made while inductor warms up
    or records a CUDA graph (training.compile_mode=reduce-overhead) lives in the graph's memory pool,
    which CUDA graph trees refuse ("tensors in the cudagraph pool not tracked as outputs", seen on the
    H200 when the first call of a run was the compiled one)."""
    if torch.compiler.is_compiling():
        return _bucket_tables(num_buckets, max_distance, device)
    return _bucket_tables_on(num_buckets, max_distance, torch.device(device))


def log2_bias_by_index(table, max_distance: int):
    """(buckets, heads) table -> (heads, 2D + 1) float32 bias times log2(e), for the kernels' exp2: entry
    [h, d + D] = table[bucket(d), h], D = max_distance. Built once per forward for all
    layers (`make_triton_attention_state`): two small kernels (index_select writes its result contiguous)."""
    index = bucket_tables(table.shape[0], max_distance, table.device)[:2 * max_distance + 1]  # int32 works
    return table.detach().t().float().index_select(1, index).mul_(LOG2E)

