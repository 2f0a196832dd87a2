r"""A third attention backend: hand-written Triton kernels for exactly MPNet's attention.

It computes what the dense reference computes (`RelativeMultiHeadAttention` on a
`make_dense_attention_state`, without attention-probability dropout, which FlexAttention omits too):
scores q.k * D^-0.5 + bias[h, bucket(p_k - p_q)], the two-stream rules, padding keys hidden, an optional
sliding window on ORIGINAL positions and optional document isolation, softmax in float32, rows that see
nothing output 0. Its backward returns dq, dk, dv and the gradient of the (buckets, heads) bias table.

Why: with FlexAttention the bias is the whole cost (the per-score gather is recomputed in both backward
kernels, and its gradient is atomic adds onto a tiny table). Three things make it cheap here.

1. The rules are per-row integers. `two_stream_codes` turns `masks.two_stream_visible` into one threshold
   t per query row and one code per key: a query row sees the PRED keys of rank < t and the MASK keys of
   rank >= t (t = 0 for CTX and MASK rows, i + 1 for PRED of rank i, i for QUERY of rank i), and every CTX
   key. Per tile the mask is then a compare and an xor on two contiguous vector loads.
2. Rows are visited sorted by ORIGINAL position. Each query row's output is independent of the others and
   a softmax over keys does not depend on their order, so the kernels may visit both in any order; they
   visit them sorted by (document, position), padding last, through index vectors (the tensors stay where
   they are). A tile then covers ~BLOCK neighbouring positions, so (a) a tile whose distances are all
   >= 91 (or all <= -91, at 32 buckets / 128) lies in ONE saturated bucket: its bias is a scalar and its
   bias gradient one sum; (b) the other tiles read the bias from a (heads, 257) table by distance and
   reduce their gradient over only the few buckets their distance range touches (in the single stream,
   where a tile's rows are often at consecutive positions, one bucket's pairs in a row are contiguous
   columns: a near tile sums them as differences of prefix sums); (c) a window or documents hide whole
   tiles: each row's first and last visible key is found once per batch (`searchsorted`) and the loops
   run over those tiles only.
3. The bias gradient needs no atomics: each dK/dV program sums its buckets in registers and writes them
   to its own slot; the slots are summed by torch (deterministic).

Without a window or documents the forward and dQ kernels visit rows grouped by kind first, each group
by position (keys CTX | MASK | PRED): most key tiles then hold CTX keys only and skip the rule mask, and
rows that see no PRED key stop before them; the dK/dV kernel keeps the position order (see
`make_triton_attention_plan`). The saturated-bucket bias gradient is accumulated per score and summed
once per program.

Use: build a `TritonAttentionPlan` once per forward (`make_triton_attention_plan`, from positions,
n, m, layout, window, document ids; shared by all layers), then call `triton_two_stream_attention(q, k,
v, relative_bias_table, plan)` per layer. Eager calls are host-bound at fine-tuning sizes, so the host
work per call is kept small: the plan's vectors reach each kernel packed into one tensor, the scalars a
model fixes are compile-time constants (a Triton launch costs host time per argument: on the H200's
host an empty kernel took 17 us with 2 arguments, 28-68 us with 36), and the state builds the kernels'
view of the bias table once for all layers. `make_triton_attention_state` / `TritonTwoStreamAttention`
mirror the dense and flex backends' interfaces (attention.ATTENTION_BACKENDS registers them as
"triton"), except that the state takes the (buckets, heads) table itself rather than
`relative_bias_by_distance(table)`: the gradient is reduced per bucket, which the per-distance view
cannot carry.

Under torch.compile (`training.compile=true`, `finetune-mpnet --compile`) the plan is traced with the
model and the kernels appear in the graph as two opaque torch.library ops,
`mpnet::triton_attention_forward` / `_backward`, with fake implementations for their shapes and their
autograd registered; eager calls use an autograd.Function over the same launchers (less host time per
call). On the H200 the compiled mpnet-base pretraining step took 49.4 ms with CUDA graphs against
79.9 ms eager (docs/bench/benchmark.md).

Kernels run compiled on CUDA. Without a GPU, and with TRITON_INTERPRET=1 set, they run in Triton's
interpreter on CPU tensors: exact, very slow, meant for tests at small shapes (without the variable a
CPU-only machine gets a one-line error instead).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from .masks import relative_position_bucket, stream_lengths
from .patterns import AttentionPattern, as_pattern
from .projections import AttentionProjections
from .triton_kernels import (FAR, HIDDEN_CODE, INTERPRET, LOG2E, _delta_kernel, _forward_kernel, _key_gradients_kernel,
                             _query_gradients_kernel, triton)

class TritonAttentionUnavailable(UserError):
    """The Triton backend cannot run here (no triton package, CPU tensors without the interpreter)."""


class UnsupportedTritonPattern(UserError):
    """The Triton backend implements the MPNet rules, a sliding window and document isolation only."""


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


def supported_window(pattern: str | AttentionPattern | None = None) -> int | None:
    """The sliding window a pattern asks for (None: none). Anything beyond windows raises: the kernels
    implement the MPNet rules, padding, one window on original positions and document isolation."""
    spec = as_pattern(pattern).spec
    sizes = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, *numbers = part.split(":")
        if name.strip().lower() not in ("window", "neighbourhood", "neighborhood"):
            raise UnsupportedTritonPattern(
                f"the Triton attention backend supports sliding windows (window:W) and document isolation only, "
                f"not '{part}'; use the flex or dense backend for attention pattern '{spec}'")
        sizes.append(int(numbers[0]))
    return min(sizes) if sizes else None  # windows intersect: the smallest one rules


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
    slots = _bucket_slots(num_buckets)
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


# ------------------------------------------------------------------------------------- launching


@dataclass(frozen=True)
class Tiles:
    """Block shape and launch settings of one kernel. They change speed only, never the result."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class KernelTiles:
    forward: Tiles
    key_gradients: Tiles  # the dK/dV kernel: block_n keys held, block_m query rows per step
    query_gradients: Tiles
    # Timing only, to price each part: "bias" (no relative bias in any kernel), "bias_gradient" (the
    # dK/dV kernel skips the bucket sums), "mask" (every pair visible). The results are then WRONG;
    # never set it otherwise.
    leave_out: frozenset = frozenset()


LEAVE_OUT_PARTS = ("bias", "bias_gradient", "mask")  # what KernelTiles.leave_out may name


def default_tiles(dtype: torch.dtype, single_stream: bool = False) -> KernelTiles:
    """single_stream: the queries are the keys' rows (LQ == LK: fine-tuning, inference)."""
    if INTERPRET:  # numpy: small tiles keep the test shapes' padding small
        tiles = Tiles(32, 32)
        return KernelTiles(tiles, tiles, tiles)
    if dtype == torch.float32:  # IEEE fp32 dots (the parity tests) need many registers: small tiles
        return KernelTiles(Tiles(32, 32, 4, 1), Tiles(32, 32, 4, 1), Tiles(32, 32, 4, 1))
    # bf16/fp16, head size 64, H200 (scripts/triton_attention_timing.py --sweep, one kernel's tiles
    # changed at a time): 4-warp tiles beat the largest spill-free 8-warp ones (128x64 / 32x128 /
    # 128x64) by 1.3x on the L=512 and 2048 pairs: more programs in flight, and the bias gather and the
    # masks are elementwise work that a larger tile does not amortise. Forward 64x128 was 0.48 / 1.30 ms
    # against 0.63 / 1.61 for 64x64 (L=512 / 2048); dQ with 3 stages 0.06 / 0.07 ms faster than 2.
    # The single stream's dK/dV (its NATURAL variant) gains from a third stage where the pair's loses
    # (--sweep / --configs default,dkdv32x64s3: single 128 0.203 -> 0.193 ms, single 512 0.470 -> 0.439;
    # pair 512 0.80 -> 0.90, pair 2048 1.92 -> 2.33); its other kernels' best tiles are the pair's.
    return KernelTiles(Tiles(64, 128, 4, 2), Tiles(32, 64, 4, 3 if single_stream else 2), Tiles(64, 32, 4, 3))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _bucket_slots(num_buckets: int) -> int:
    return 1 << max(num_buckets - 1, 1).bit_length()


def _common(settings, buckets, heads, q, k, bias):
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    return dict(H=heads, LQ=q.shape[2], LK=k.shape[2], ND=bias.shape[1], window=settings.window,
                MAX_DISTANCE=buckets.max_distance, SAT_LEFT=buckets.saturated_left,
                SAT_RIGHT=buckets.saturated_right, HAS_WINDOW=settings.has_window,
                HAS_DOCUMENTS=settings.has_documents, HEAD_DIM=q.shape[-1], PRECISION=precision)


def _left_out(tiles, gradient=False):
    """The kernels' PARTS flags (1: relative bias, 2: mask) and, for the dK/dV kernel, the bias gradient."""
    flags = dict(PARTS=("bias" not in tiles.leave_out) + 2 * ("mask" not in tiles.leave_out))
    if gradient:
        flags["WITH_BIAS_GRADIENT"] = "bias_gradient" not in tiles.leave_out and "bias" not in tiles.leave_out
    return flags


@dataclass(frozen=True)
class LaunchSettings:
    """The launchers' scalars: what the plan, the bias table and the tiles fix besides tensors."""

    window: int
    has_window: bool
    has_documents: bool
    num_buckets: int
    max_distance: int
    scale: float
    tiles: KernelTiles

    def numbers(self) -> list:
        """Flat ints for the torch.library op's schema (and `from_numbers` back)."""
        t = self.tiles
        tiles = [x for k in (t.forward, t.key_gradients, t.query_gradients)
                 for x in (k.block_m, k.block_n, k.num_warps, k.num_stages)]
        left_out = sum(1 << i for i, part in enumerate(LEAVE_OUT_PARTS) if part in t.leave_out)
        return [self.window, int(self.has_window), int(self.has_documents), self.num_buckets, self.max_distance,
                left_out, *tiles]

    @classmethod
    def from_numbers(cls, numbers, scale):
        window, has_window, has_documents, num_buckets, max_distance, left_out, *tiles = (int(x) for x in numbers)
        kernels = [Tiles(*tiles[i:i + 4]) for i in range(0, 12, 4)]
        leave_out = frozenset(part for i, part in enumerate(LEAVE_OUT_PARTS) if left_out >> i & 1)
        return cls(window, bool(has_window), bool(has_documents), num_buckets, max_distance, scale,
                   KernelTiles(*kernels, leave_out=leave_out))



def _launch_forward(q, k, v, bias, forward_vectors, settings: LaunchSettings):
    """(out, lse): the forward kernel over the plan's forward order; bias from `log2_bias_by_index`."""
    batch, heads, q_len, _ = q.shape
    buckets = bucket_layout(settings.num_buckets, settings.max_distance)
    out = torch.empty_like(q)  # keeps the (B, L, H, D) memory of the projections' head views
    lse = torch.empty(batch, heads, q_len, device=q.device, dtype=torch.float32)
    t = settings.tiles.forward
    _forward_kernel[(_cdiv(q_len, t.block_m), batch * heads)](
        q, k, v, out, lse, bias, forward_vectors,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], qk_scale=settings.scale * LOG2E,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.num_warps, num_stages=t.num_stages,
        **_common(settings, buckets, heads, q, k, bias), **_left_out(settings.tiles))
    return out, lse


def _launch_backward(q, k, v, out, lse, table, bias, bucket, grad_out, forward_vectors, key_vectors,
                     settings: LaunchSettings):
    """(dq, dk, dv, grad_table): the delta, dK/dV (with the bias gradient per bucket) and dQ kernels;
    bucket from `bucket_tables`."""
    batch, heads, q_len, head_dim = q.shape
    tiles, scale = settings.tiles, settings.scale
    buckets = bucket_layout(settings.num_buckets, settings.max_distance)
    common, qk_scale = _common(settings, buckets, heads, q, k, bias), scale * LOG2E
    grad_out = grad_out.contiguous() if grad_out.stride(-1) != 1 else grad_out
    delta = torch.empty_like(lse)
    _delta_kernel[(_cdiv(q_len, 64), batch * heads)](
        out, grad_out, delta, *out.stride()[:3], *grad_out.stride()[:3], H=heads, LQ=q_len,
        BLOCK_M=64, HEAD_DIM=head_dim)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    t = tiles.key_gradients
    key_tiles = _cdiv(k.shape[2], t.block_n)
    slots = _bucket_slots(buckets.num_buckets)
    db = torch.empty(batch * key_tiles, slots, heads, device=q.device, dtype=torch.float32)
    _key_gradients_kernel[(key_tiles, batch * heads)](
        q, k, v, grad_out, dk, dv, lse, delta, bias, bucket, db, key_vectors,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3], *dk.stride()[:3],
        *dv.stride()[:3], qk_scale=qk_scale, sm_scale=scale, BUCKET_LEFT=buckets.bucket_left,
        BUCKET_RIGHT=buckets.bucket_right, BUCKETS=slots, BLOCK_M=t.block_m,
        BLOCK_N=t.block_n, num_warps=t.num_warps, num_stages=t.num_stages, **common,
        NATURAL=q_len == k.shape[2], **_left_out(tiles, gradient=True))
    t = tiles.query_gradients
    _query_gradients_kernel[(_cdiv(q_len, t.block_m), batch * heads)](
        q, k, v, grad_out, dq, lse, delta, bias, forward_vectors, *q.stride()[:3], *k.stride()[:3],
        *v.stride()[:3], *grad_out.stride()[:3], *dq.stride()[:3], qk_scale=qk_scale, sm_scale=scale,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.num_warps, num_stages=t.num_stages, **common,
        **_left_out(tiles))
    grad_table = db.sum(0)[:buckets.num_buckets]  # (buckets, heads), contiguous: the table's layout
    return dq, dk, dv, grad_table.to(table.dtype)


class _TritonAttentionFunction(torch.autograd.Function):
    """The eager path: an autograd.Function costs less host time per call than a torch.library op."""

    @staticmethod
    def forward(ctx, q, k, v, table, bias, bucket, forward_vectors, key_vectors, settings):
        out, lse = _launch_forward(q, k, v, bias, forward_vectors, settings)
        ctx.save_for_backward(q, k, v, out, lse, table, bias, bucket)
        ctx.vectors, ctx.settings = (forward_vectors, key_vectors), settings
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, table, bias, bucket = ctx.saved_tensors
        grads = _launch_backward(q, k, v, out, lse, table, bias, bucket, grad_out, *ctx.vectors, ctx.settings)
        return *grads, None, None, None, None, None


# The compiled path: torch.compile cannot trace into Triton launches that read a plan object, so under
# torch.compile the same launchers run as two opaque torch.library ops with a flat schema (tensors, ints
# and the scale), their shapes told to the compiler by the fake implementations below.
@torch.library.custom_op("mpnet::triton_attention_forward", mutates_args=())
def _attention_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                          bias: torch.Tensor, bucket: torch.Tensor, forward_vectors: torch.Tensor,
                          key_vectors: torch.Tensor, numbers: list[int], scale: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse); the table (bias is its by-index view), bucket and key_vectors are only kept for the
    backward."""
    return _launch_forward(q, k, v, bias, forward_vectors, LaunchSettings.from_numbers(numbers, scale))


@_attention_forward_op.register_fake
def _(q, k, v, table, bias, bucket, forward_vectors, key_vectors, numbers, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("mpnet::triton_attention_backward", mutates_args=())
def _attention_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                           table: torch.Tensor, bias: torch.Tensor, bucket: torch.Tensor, grad_out: torch.Tensor,
                           forward_vectors: torch.Tensor, key_vectors: torch.Tensor, numbers: list[int],
                           scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_backward(q, k, v, out, lse, table, bias, bucket, grad_out, forward_vectors, key_vectors,
                            LaunchSettings.from_numbers(numbers, scale))


@_attention_backward_op.register_fake
def _(q, k, v, out, lse, table, bias, bucket, grad_out, forward_vectors, key_vectors, numbers, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(table)


def _op_setup_context(ctx, inputs, output):
    q, k, v, table, bias, bucket, forward_vectors, key_vectors, numbers, scale = inputs
    ctx.save_for_backward(q, k, v, *output, table, bias, bucket, forward_vectors, key_vectors)
    ctx.numbers, ctx.scale = numbers, scale


def _op_backward(ctx, grad_out, grad_lse):  # grad_lse: lse is internal, never used outside
    q, k, v, out, lse, table, bias, bucket, forward_vectors, key_vectors = ctx.saved_tensors
    dq, dk, dv, grad_table = _attention_backward_op(q, k, v, out, lse, table, bias, bucket, grad_out,
                                                    forward_vectors, key_vectors, ctx.numbers, ctx.scale)
    return dq, dk, dv, grad_table, None, None, None, None, None, None


_attention_forward_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def _check_can_run(*tensors):
    if triton is None:
        raise TritonAttentionUnavailable(
            "the Triton attention backend needs the triton package (pip install triton) and a CUDA GPU; "
            "use the flex or dense backend")
    if INTERPRET and os.environ.get("TRITON_INTERPRET") != "1":
        raise TritonAttentionUnavailable(
            "the Triton attention backend needs a CUDA GPU (none was found when it was imported); use the flex "
            "or dense backend, or set TRITON_INTERPRET=1 to run its kernels in Triton's interpreter on the CPU "
            "(exact, very slow: meant for tests)")
    for tensor in tensors:
        if not INTERPRET and tensor.device.type != "cuda":
            raise TritonAttentionUnavailable(
                "the Triton attention backend runs on CUDA tensors (set TRITON_INTERPRET=1 before starting to "
                "run its kernels on the CPU, slowly); move the model to a GPU or use the dense backend")
        if INTERPRET and tensor.device.type != "cpu":
            raise TritonAttentionUnavailable(
                "Triton's interpreter (TRITON_INTERPRET=1, or no GPU found at start) runs on CPU tensors only")


def triton_two_stream_attention(q, k, v, relative_bias_table, plan: TritonAttentionPlan, *, max_distance: int = 128,
                                scale: float | None = None, tiles: KernelTiles | None = None,
                                bias_by_index: torch.Tensor | None = None, buckets: torch.Tensor | None = None):
    """MPNet attention of the plan's query rows over the content stream, with gradients.

    q: (B, H, Lq, D) for the rows the plan was built for (default all n + 2m); k, v: (B, H, n + m, D)
    from the content stream; all bf16, fp16 or fp32, D a power of two from 16 to 256;
    relative_bias_table: (num_buckets, H), the encoder's `relative_attention_bias.weight`;
    max_distance: the buckets' saturation distance (config.relative_attention_max_distance);
    bias_by_index: `log2_bias_by_index(relative_bias_table, max_distance)` when the caller has it
    (the state builds it once for all layers), else built here; buckets: `bucket_tables(num_buckets,
    max_distance, device)`, likewise.
    Returns (B, H, Lq, D) like q. Equals the dense reference without attention-probability dropout.
    """
    _check_can_run(q, k, v, relative_bias_table, plan.q_real)
    batch, heads, q_len, head_dim = q.shape
    if k.shape != v.shape or k.shape[:2] != (batch, heads) or k.shape[3] != head_dim:
        raise UserError(f"keys {tuple(k.shape)} and values {tuple(v.shape)} do not match queries {tuple(q.shape)}")
    if (q_len, k.shape[2]) != (plan.query_len, plan.key_len) or plan.q_real.shape[0] != batch:
        raise UserError(f"the attention plan is for {plan.q_real.shape[0]} x {plan.query_len} queries over "
                        f"{plan.key_len} keys; got {batch} x {q_len} queries over {k.shape[2]} keys")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise UserError(f"the Triton attention backend takes float32, float16 or bfloat16 q, k, v of one dtype; "
                        f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise UserError(f"the Triton attention backend needs a head size that is a power of two from 16 to 256, "
                        f"got {head_dim}")
    if relative_bias_table.dim() != 2 or relative_bias_table.shape[1] != heads:
        raise UserError(f"the relative bias table should be (num_buckets, {heads}), "
                        f"got {tuple(relative_bias_table.shape)}")
    scale = head_dim ** -0.5 if scale is None else scale
    settings = LaunchSettings(plan.window or 0, plan.window is not None, plan.has_documents,
                              relative_bias_table.shape[0], max_distance, scale,
                              tiles or default_tiles(q.dtype, single_stream=q_len == k.shape[2]))
    forward_vectors, key_vectors = plan.forward_packed, plan.keys_packed  # as the kernels read the plan
    if bias_by_index is None:
        bias_by_index = log2_bias_by_index(relative_bias_table, max_distance)
    if buckets is None:
        buckets = bucket_tables(relative_bias_table.shape[0], max_distance, q.device)
    if torch.compiler.is_compiling():
        out, _ = _attention_forward_op(q, k, v, relative_bias_table, bias_by_index, buckets, forward_vectors,
                                       key_vectors, settings.numbers(), scale)
        return out
    return _TritonAttentionFunction.apply(q, k, v, relative_bias_table, bias_by_index, buckets, forward_vectors,
                                          key_vectors, settings)


# ---------------------------------------------------------------------- the backend's module interface


@dataclass
class TritonAttentionState:
    plan: TritonAttentionPlan
    relative_bias_table: torch.Tensor  # (num_buckets, heads)
    max_distance: int
    kv_len: int
    bias_by_index: torch.Tensor  # the table as the kernels read it, built once per forward for every layer
    buckets: torch.Tensor  # bucket_tables: the buckets by distance and their ranges, likewise


def make_triton_attention_state(positions, n, m, relative_bias_table, max_distance, pattern=None, *, document_ids=None,
                                layer=0, layout=None, streams="mpnet"):
    """Like make_dense/flex_attention_state, but given the (buckets, heads) table itself."""
    plan = make_triton_attention_plan(positions, n, m, window=supported_window(pattern),
                                      document_ids=document_ids, layout=layout, streams=streams)
    return TritonAttentionState(plan, relative_bias_table, max_distance, stream_lengths(n, m, streams)[0],
                                log2_bias_by_index(relative_bias_table, max_distance),
                                bucket_tables(relative_bias_table.shape[0], max_distance, positions.device))


class TritonTwoStreamAttention(AttentionProjections):
    """Triton backend: both streams in one kernel call per layer; no attention-probability dropout
    (`attention_probs_dropout_prob` is not applied, as with FlexAttention)."""

    def forward(self, hidden, state: TritonAttentionState):
        q, k, v = self.project(hidden, state.kv_len)
        context = triton_two_stream_attention(q, k, v, state.relative_bias_table, state.plan,
                                              max_distance=state.max_distance, bias_by_index=state.bias_by_index,
                                              buckets=state.buckets)
        return self.merge(context)
