"""The Triton kernels of the Triton attention backend (read triton_attention.py's docstring first; the
plan they read is built in triton_plan.py, they are launched from triton_launch.py). Without the triton
package this module still imports and the backend says what is missing (triton_internals.py).
"""
from __future__ import annotations

from .triton_internals import INTERPRET, MAX_COMBINE as _MAX, MIN_COMBINE as _MIN, SUM_COMBINE as _SUM, kernel, tl

LOG2E = 1.4426950408889634
HIDDEN_RANK = 1 << 29  # the rank given to padding keys: no threshold reaches it, so nobody sees them
HIDDEN_CODE = 2 * HIDDEN_RANK
FAR = 1 << 30  # "no position" in tile ranges (larger than any distance); also "no row" in row ranges
_HIDDEN_CODE = tl.constexpr(HIDDEN_CODE)  # the same numbers, as the kernels may read them
_FAR = tl.constexpr(FAR)
PREFIX_FROM = tl.constexpr(11)  # see _bias_gradient
_INTERPRETED = tl.constexpr(INTERPRET)
# Reductions go through tl.reduce with the standard library's own combine functions rather than
# tl.sum/max/min (triton_internals.PRIVATE_APIS says why).


# ---------------------------------------------------------------------------------------- kernels
#
# Orientation: the forward and dQ kernels hold a query tile and loop over key tiles (scores BLOCK_M x
# BLOCK_N); the dK/dV kernel holds a key tile and loops over query tiles (scores transposed, BLOCK_N x
# BLOCK_M). `_scores` and `_bias_gradient` take their row and column vectors already broadcast, so one
# body serves both orientations. Scores are kept in log2 units (scale * log2 e folded in) for exp2.


@kernel
def _query_tile(start_m, b, q_rows, q_pos, q_threshold, q_doc, LQ, HAS_DOCUMENTS: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """A tile of visited query rows: indices, in-range mask, row numbers, positions, thresholds,
    documents, and the tile's position range."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < LQ
    at = b * LQ + offs_m
    rows = tl.load(q_rows + at, mask=row_ok, other=0)
    qp = tl.load(q_pos + at, mask=row_ok, other=0)
    qt = tl.load(q_threshold + at, mask=row_ok, other=0)
    qd = qp
    if HAS_DOCUMENTS:
        qd = tl.load(q_doc + at, mask=row_ok, other=0)
    q_min = tl.reduce(tl.where(row_ok, qp, _FAR), 0, _MIN)
    q_max = tl.reduce(tl.where(row_ok, qp, -_FAR), 0, _MAX)
    return offs_m, row_ok, rows, qp, qt, qd, q_min, q_max


@kernel
def _key_tile(start_n, b, k_rows, k_pos, k_code, k_doc, LK, HAS_DOCUMENTS: tl.constexpr, BLOCK_N: tl.constexpr):
    """A tile of visited keys: like `_query_tile`; out-of-range keys read as padding (hidden) and the
    position range covers real keys only."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    col_ok = offs_n < LK
    at = b * LK + offs_n
    rows = tl.load(k_rows + at, mask=col_ok, other=0)
    kp = tl.load(k_pos + at, mask=col_ok, other=-1)
    kc = tl.load(k_code + at, mask=col_ok, other=_HIDDEN_CODE)
    kd = kp
    if HAS_DOCUMENTS:
        kd = tl.load(k_doc + at, mask=col_ok, other=0)
    k_min = tl.reduce(tl.where(kp >= 0, kp, _FAR), 0, _MIN)
    k_max = tl.reduce(tl.where(kp >= 0, kp, -_FAR), 0, _MAX)
    # Every key a CTX key (code -2; PRED, MASK and padding codes are >= 0): the two-stream rules hide
    # nothing in this tile, whatever the query rows, so the scores skip the rule mask.
    rule_free = tl.reduce(kc, 0, _MAX) < 0
    return offs_n, col_ok, rows, kp, kc, kd, k_min, k_max, rule_free


@kernel
def _load_rows(X, b, h, stride_b, stride_h, stride_l, rows, ok, HEAD_DIM: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    return tl.load(X + b * stride_b + h * stride_h + rows[:, None] * stride_l + offs_d[None, :],
                   mask=ok[:, None], other=0.0)


@kernel
def _store_rows(X, value, b, h, stride_b, stride_h, stride_l, rows, ok, HEAD_DIM: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    tl.store(X + b * stride_b + h * stride_h + rows[:, None] * stride_l + offs_d[None, :],
             value.to(X.dtype.element_ty), mask=ok[:, None])


@kernel
def _gather_f32(table, index):
    """Elementwise load of table[index] for a float32 table (a gather from an L1-resident table).

    Compiled, it is the load instruction itself as inline PTX, so the result stays in the layout of
    the scores it is added to: a tl.load gather gets a memory-friendly layout of its own, and the
    conversions back (through shared memory) took registers and time (seen in the compiled IR: three
    copies of the score tile and two conversions per bucket of the bias gradient). The address is
    formed inside the asm from the 32-bit index and the table's address: a tile of 64-bit pointers
    held two registers per score and made the forward kernel spill."""
    if _INTERPRETED:
        return tl.load(table + index)
    address = tl.zeros_like(index).to(tl.int64) + table.to(tl.int64, bitcast=True)  # one splat register
    return tl.inline_asm_elementwise("{ .reg .u64 a; mad.wide.s32 a, $1, 4, $2; ld.global.nc.f32 $0, [a]; }",
                                     "=f,r,l", [index, address], dtype=tl.float32, is_pure=True, pack=1)


@kernel
def _gather_i32(table, index):
    if _INTERPRETED:
        return tl.load(table + index)
    address = tl.zeros_like(index).to(tl.int64) + table.to(tl.int64, bitcast=True)
    return tl.inline_asm_elementwise("{ .reg .u64 a; mad.wide.s32 a, $1, 4, $2; ld.global.nc.b32 $0, [a]; }",
                                     "=r,r,l", [index, address], dtype=tl.int32, is_pure=True, pack=1)


@kernel
def _scores(s, q_pos, q_threshold, q_doc, k_pos, k_code, k_doc, distance_lo, distance_hi, rule_free, bias,
            bias_left, bias_right, window, MAX_DISTANCE, SAT_LEFT, SAT_RIGHT, HAS_WINDOW: tl.constexpr,
            HAS_DOCUMENTS: tl.constexpr, PARTS: tl.constexpr):
    """Scaled scores (log2 units) + relative bias, hidden pairs -inf. distance_lo/hi bound p_k - p_q
    over the tile: a tile inside one saturated bucket adds a scalar (bias_left / bias_right, loaded once
    per program: a scalar load inside the loop is a dependent global read every tile) instead of
    gathering; rule_free: the tile's keys are all CTX keys, which every row sees. The masks go first and
    the bias after (-inf + bias = -inf): the other way round the gather's indices and values were live
    beside the masks' operands, and the forward kernel spilled (H200: 255 registers, 60 spilled)."""
    if PARTS & 2 != 0:  # timing only (Tiles.leave_out): without it, no mask
        if not rule_free:
            s = tl.where(((k_code >> 1) < q_threshold) != ((k_code & 1) == 1), s, float("-inf"))
        if HAS_WINDOW:
            s = tl.where(tl.abs(k_pos - q_pos) <= window, s, float("-inf"))
        if HAS_DOCUMENTS:
            s = tl.where(q_doc == k_doc, s, float("-inf"))
    if PARTS & 1 == 0:  # timing only: no bias
        pass
    elif distance_lo >= SAT_RIGHT:
        s = s + bias_right
    elif distance_hi <= -SAT_LEFT:
        s = s + bias_left
    else:
        index = tl.minimum(tl.maximum(k_pos - q_pos, -MAX_DISTANCE), MAX_DISTANCE) + MAX_DISTANCE
        s = s + _gather_f32(bias, index)
    return s


@kernel
def _total(x):
    return tl.reduce(tl.reduce(x, 1, _SUM), 0, _SUM)


@kernel
def _add_row_sums(db, ds, bucket, bucket_ids, j):
    """db (BLOCK_N, BUCKETS) plus, in column j, each key row's sum of dS over the pairs in bucket j."""
    row_sums = tl.reduce(tl.where(bucket == j, ds, 0.0), 1, _SUM)
    return db + tl.where(bucket_ids[None, :] == j, row_sums[:, None], 0.0)


@kernel
def _bias_gradient_in_natural_order(db, ds, offset, bucket_first, bucket_last, BLOCK_N: tl.constexpr,
                                    BLOCK_M: tl.constexpr):
    """`_bias_gradient` of a tile whose key row r and query column c are at positions start_n + r and
    start_m + c (offset = start_n - start_m): in row r the pairs of bucket j, distances [first_j, last_j],
    are the CONTIGUOUS columns [offset + r - last_j, offset + r - first_j], so their sum is a difference
    of two prefix sums of the row. One scan and two gathers per tile replace a masked pass over the tile
    per bucket (a tile near the diagonal touches ~25 of the 32)."""
    prefix = tl.associative_scan(ds, 1, _SUM)  # inclusive, along the query columns
    rows = tl.arange(0, BLOCK_N)[:, None]
    first = tl.maximum(offset + rows - bucket_last[None, :], 0)  # (BLOCK_N, BUCKETS) column ranges
    last = tl.minimum(offset + rows - bucket_first[None, :], BLOCK_M - 1)
    through_last = tl.gather(prefix, tl.maximum(last, 0), 1)
    before_first = tl.gather(prefix, tl.minimum(tl.maximum(first - 1, 0), BLOCK_M - 1), 1)
    sums = through_last - tl.where(first > 0, before_first, 0.0)
    return db + tl.where(first <= last, sums, 0.0)


@kernel
def _bias_gradient(db, far_left, far_right, ds, q_pos, k_pos, distance_lo, distance_hi, BUCKET, MAX_DISTANCE,
                   SAT_LEFT, SAT_RIGHT, BUCKETS: tl.constexpr, natural, offset, bucket_first, bucket_last,
                   NATURAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """The tile's dS summed per bucket. A saturated tile adds dS to far_left or far_right, tile-shaped
    accumulators summed once after the loop (an add per score instead of a block-wide reduction per
    tile); any other tile adds, for each bucket its distance range [distance_lo, distance_hi] touches,
    that bucket's masked row sums to db (BLOCK_N, BUCKETS), reduced over the key rows once after the
    loop: a row sum stays inside a warp, a whole-tile sum per bucket crossed warps through shared memory
    (H200, per-kernel GPU time, docs/benchmarks.md: dK/dV kernel 1.007 -> 0.906 ms on the L = 512 pair,
    0.606 -> 0.526 ms on the L = 512 single stream). A tile in natural order (NATURAL: the kernel may
    meet one; `natural`: this one is) touching more than PREFIX_FROM buckets takes
    `_bias_gradient_in_natural_order` instead."""
    bucket_ids = tl.arange(0, BUCKETS)
    if distance_lo >= SAT_RIGHT:
        far_right += ds
    elif distance_hi <= -SAT_LEFT:
        far_left += ds
    else:
        lo = tl.minimum(tl.maximum(distance_lo, -MAX_DISTANCE), MAX_DISTANCE)
        hi = tl.minimum(tl.maximum(distance_hi, -MAX_DISTANCE), MAX_DISTANCE)
        # Left of the query (d <= 0) the bucket grows with |d|, and so it does right of it (d >= 1).
        first_left = tl.load(BUCKET + tl.minimum(hi, 0) + MAX_DISTANCE)
        last_left = tl.where(lo <= 0, tl.load(BUCKET + lo + MAX_DISTANCE), first_left - 1)
        first_right = tl.load(BUCKET + tl.maximum(lo, 1) + MAX_DISTANCE)
        last_right = tl.where(hi >= 1, tl.load(BUCKET + hi + MAX_DISTANCE), first_right - 1)
        by_prefix = False
        if NATURAL:  # the prefix sums cost about 11 masked passes (H200, L = 128 single stream: ~20 buckets
            # per tile, dK/dV 0.277 -> 0.201 ms with them, 0.13 ms without any bias gradient: docs/benchmarks.md)
            by_prefix = natural & (last_left - first_left + last_right - first_right + 2 > PREFIX_FROM)
        if by_prefix:
            db = _bias_gradient_in_natural_order(db, ds, offset, bucket_first, bucket_last, BLOCK_N, BLOCK_M)
        else:
            index = tl.minimum(tl.maximum(k_pos - q_pos, -MAX_DISTANCE), MAX_DISTANCE) + MAX_DISTANCE
            bucket = _gather_i32(BUCKET, index)
            for j in range(first_left, last_left + 1):
                db = _add_row_sums(db, ds, bucket, bucket_ids, j)
            for j in range(first_right, last_right + 1):
                db = _add_row_sums(db, ds, bucket, bucket_ids, j)
    return db, far_left, far_right


# The plan's vectors reach the kernels as ONE int32 tensor (triton_plan.pack_forward_order and
# pack_keys_order): a Triton launch costs host time per argument (on the H200's host an empty kernel: 17 us
# with 2 arguments, 28-68 us with 36; docs/benchmarks.md, host time).
@kernel
def _forward_plan(PLAN, H: tl.constexpr, LQ, LK):
    """The forward order's vectors: six of B x LQ (rows, positions, thresholds, documents, key range),
    then four of B x LK (rows, positions, codes, documents)."""
    batch = (tl.num_programs(1) // H).to(tl.int64)
    bq = batch * LQ
    bk = batch * LK
    keys = PLAN + 6 * bq
    return (PLAN, PLAN + bq, PLAN + 2 * bq, PLAN + 3 * bq, PLAN + 4 * bq, PLAN + 5 * bq,
            keys, keys + bk, keys + 2 * bk, keys + 3 * bk)


@kernel
def _keys_plan(PLAN, H: tl.constexpr, LQ, LK):
    """The dK/dV order's vectors: four of B x LQ (rows, positions, thresholds, documents), q_real (B),
    then six of B x LK (rows, positions, codes, documents, query range)."""
    batch = (tl.num_programs(1) // H).to(tl.int64)
    bq = batch * LQ
    bk = batch * LK
    keys = PLAN + 4 * bq + batch
    return (PLAN, PLAN + bq, PLAN + 2 * bq, PLAN + 3 * bq, PLAN + 4 * bq,
            keys, keys + bk, keys + 2 * bk, keys + 3 * bk, keys + 4 * bk, keys + 5 * bk)


@kernel
def _query_program(Q, PLAN, stride_qb, stride_qh, stride_ql, LQ, LK, H: tl.constexpr, HAS_DOCUMENTS: tl.constexpr,
                   BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The query tile of a forward or dQ program: batch row and head, the tile's visit indices and rows,
    its q with the rows' positions, thresholds, documents and position range (`query`), then the plan's
    key ranges of the forward order and its key vectors (`keys`)."""
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    q_rows, q_pos, q_threshold, q_doc, q_key_lo, q_key_hi, k_rows, k_pos, k_code, k_doc = _forward_plan(PLAN, H, LQ, LK)
    offs_m, row_ok, rows, qp, qt, qd, q_min, q_max = _query_tile(
        tl.program_id(0) * BLOCK_M, b, q_rows, q_pos, q_threshold, q_doc, LQ, HAS_DOCUMENTS, BLOCK_M)
    q = _load_rows(Q, b, h, stride_qb, stride_qh, stride_ql, rows, row_ok, HEAD_DIM)
    query, keys = (q, qp, qt, qd, q_min, q_max), (k_rows, k_pos, k_code, k_doc)
    return bh, b, h, offs_m, rows, row_ok, query, (q_key_lo, q_key_hi), keys


@kernel
def _key_range_and_bias(key_ranges, b, h, offs_m, row_ok, LQ, BIAS, ND: tl.constexpr, MAX_DISTANCE: tl.constexpr):
    """The visited keys [key_lo, key_hi) the query tile's rows may see, and the head's bias row with its
    two saturated values (`bias_row`)."""
    q_key_lo, q_key_hi = key_ranges
    key_lo = tl.reduce(tl.load(q_key_lo + b * LQ + offs_m, mask=row_ok, other=_FAR), 0, _MIN)
    key_hi = tl.reduce(tl.load(q_key_hi + b * LQ + offs_m, mask=row_ok, other=0), 0, _MAX)
    bias = BIAS + h * ND
    bias_left, bias_right = tl.load(bias), tl.load(bias + 2 * MAX_DISTANCE)
    return key_lo, key_hi, (bias, bias_left, bias_right)


@kernel
def _key_tile_scores(start_n, b, h, query, keys, bias_row, K, V, stride_kb, stride_kh, stride_kl, stride_vb,
                     stride_vh, stride_vl, LK, qk_scale, window, MAX_DISTANCE, SAT_LEFT, SAT_RIGHT,
                     HAS_WINDOW: tl.constexpr, HAS_DOCUMENTS: tl.constexpr, PARTS: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One key tile as the forward and dQ kernels visit it: its k and v rows and the query tile's
    scores against them (`_scores`); query, keys from `_query_program`, bias_row from
    `_key_range_and_bias`. Triton inlines it:
    the same code as written out in each kernel."""
    q, qp, qt, qd, q_min, q_max = query
    k_rows, k_pos, k_code, k_doc = keys
    bias, bias_left, bias_right = bias_row
    offs_n, col_ok, krows, kp, kc, kd, k_min, k_max, rule_free = _key_tile(
        start_n, b, k_rows, k_pos, k_code, k_doc, LK, HAS_DOCUMENTS, BLOCK_N)
    k = _load_rows(K, b, h, stride_kb, stride_kh, stride_kl, krows, col_ok, HEAD_DIM)
    v = _load_rows(V, b, h, stride_vb, stride_vh, stride_vl, krows, col_ok, HEAD_DIM)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    s = _scores(s, qp[:, None], qt[:, None], qd[:, None], kp[None, :], kc[None, :], kd[None, :],
                k_min - q_max, k_max - q_min, rule_free, bias, bias_left, bias_right, window, MAX_DISTANCE,
                SAT_LEFT, SAT_RIGHT, HAS_WINDOW, HAS_DOCUMENTS, PARTS)
    return k, v, s


@kernel
def _forward_kernel(Q, K, V, O, LSE, BIAS, PLAN,
                    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                    stride_vb, stride_vh, stride_vl, stride_ob, stride_oh, stride_ol,
                    LQ, LK, H: tl.constexpr, ND: tl.constexpr, qk_scale: tl.constexpr, window: tl.constexpr,
                    MAX_DISTANCE: tl.constexpr, SAT_LEFT: tl.constexpr, SAT_RIGHT: tl.constexpr,
                    HAS_WINDOW: tl.constexpr, HAS_DOCUMENTS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
                    PARTS: tl.constexpr):
    bh, b, h, offs_m, rows, row_ok, query, key_ranges, keys = _query_program(
        Q, PLAN, stride_qb, stride_qh, stride_ql, LQ, LK, H, HAS_DOCUMENTS, BLOCK_M, HEAD_DIM)
    key_lo, key_hi, bias_row = _key_range_and_bias(key_ranges, b, h, offs_m, row_ok, LQ, BIAS, ND, MAX_DISTANCE)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)
    for start_n in range(key_lo // BLOCK_N * BLOCK_N, key_hi, BLOCK_N):
        k, v, s = _key_tile_scores(start_n, b, h, query, keys, bias_row, K, V, stride_kb, stride_kh, stride_kl,
                                   stride_vb, stride_vh, stride_vl, LK, qk_scale, window, MAX_DISTANCE, SAT_LEFT,
                                   SAT_RIGHT, HAS_WINDOW, HAS_DOCUMENTS, PARTS, PRECISION, BLOCK_N, HEAD_DIM)
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]  # a row that sees nothing outputs 0
    _store_rows(O, out, b, h, stride_ob, stride_oh, stride_ol, rows, row_ok, HEAD_DIM)
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf"))  # +inf: p = 0 in backward
    tl.store(LSE + bh * LQ + rows, lse, mask=row_ok)  # by row: the backward kernels visit rows in their own order


@kernel
def _delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_ol, stride_gb, stride_gh, stride_gl,
                  H, LQ, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """delta = rowsum(dO * O) in float32, by row: the softmax backward's per-row term."""
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < LQ
    o = _load_rows(O, b, h, stride_ob, stride_oh, stride_ol, rows, row_ok, HEAD_DIM).to(tl.float32)
    do = _load_rows(DO, b, h, stride_gb, stride_gh, stride_gl, rows, row_ok, HEAD_DIM).to(tl.float32)
    tl.store(DELTA + bh * LQ + rows, tl.reduce(o * do, 1, _SUM), mask=row_ok)


@kernel
def _key_tile_step(dk, dv, db, far_left, far_right, start_m, b, h, k, v, kp, kc, kd, k_min, k_max, rule_free,
                   Q, DO, lse_row, delta_row, bias, bias_left, bias_right, BUCKET, q_rows, q_pos, q_threshold,
                   q_doc, stride_qb, stride_qh, stride_ql, stride_gb, stride_gh, stride_gl, LQ, qk_scale, window,
                   MAX_DISTANCE, SAT_LEFT, SAT_RIGHT, BUCKETS: tl.constexpr, HAS_WINDOW: tl.constexpr,
                   HAS_DOCUMENTS: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                   PRECISION: tl.constexpr, PARTS: tl.constexpr, WITH_BIAS_GRADIENT: tl.constexpr,
                   start_n, keys_natural, bucket_first, bucket_last, NATURAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query tile's share of a key tile's dK, dV and bias gradient (scores transposed: keys x rows)."""
    offs_m, row_ok, rows, qp, qt, qd, q_min, q_max = _query_tile(
        start_m, b, q_rows, q_pos, q_threshold, q_doc, LQ, HAS_DOCUMENTS, BLOCK_M)
    q = _load_rows(Q, b, h, stride_qb, stride_qh, stride_ql, rows, row_ok, HEAD_DIM)
    do = _load_rows(DO, b, h, stride_gb, stride_gh, stride_gl, rows, row_ok, HEAD_DIM)
    lse = tl.load(lse_row + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_row + rows, mask=row_ok, other=0.0)
    distance_lo = k_min - q_max
    distance_hi = k_max - q_min
    s = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
    s = _scores(s, qp[None, :], qt[None, :], qd[None, :], kp[:, None], kc[:, None], kd[:, None],
                distance_lo, distance_hi, rule_free, bias, bias_left, bias_right, window, MAX_DISTANCE, SAT_LEFT,
                SAT_RIGHT, HAS_WINDOW, HAS_DOCUMENTS, PARTS)
    p = tl.math.exp2(s - lse[None, :])
    dv += tl.dot(p.to(do.dtype), do, input_precision=PRECISION)
    dp = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds = p * (dp - delta[None, :])
    dk += tl.dot(ds.to(q.dtype), q, input_precision=PRECISION)
    if WITH_BIAS_GRADIENT:
        natural = keys_natural
        if NATURAL:  # the query rows at positions start_m, start_m + 1, ... (padding rows are not)
            natural = keys_natural & (tl.reduce(tl.where(row_ok & (qp != offs_m), 1, 0), 0, _MAX) == 0)
        db, far_left, far_right = _bias_gradient(db, far_left, far_right, ds, qp[None, :], kp[:, None], distance_lo,
                                                 distance_hi, BUCKET, MAX_DISTANCE, SAT_LEFT, SAT_RIGHT, BUCKETS,
                                                 natural, start_n - start_m, bucket_first, bucket_last, NATURAL,
                                                 BLOCK_N, BLOCK_M)
    return dk, dv, db, far_left, far_right


@kernel
def _key_gradients_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, BIAS, BUCKET, DB, PLAN,
                          stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                          stride_vb, stride_vh, stride_vl, stride_gb, stride_gh, stride_gl,
                          stride_dkb, stride_dkh, stride_dkl, stride_dvb, stride_dvh, stride_dvl,
                          LQ, LK, H: tl.constexpr, ND: tl.constexpr, qk_scale: tl.constexpr,
                          sm_scale: tl.constexpr, window: tl.constexpr, MAX_DISTANCE: tl.constexpr,
                          SAT_LEFT: tl.constexpr, SAT_RIGHT: tl.constexpr, BUCKET_LEFT: tl.constexpr,
                          BUCKET_RIGHT: tl.constexpr, BUCKETS: tl.constexpr, HAS_WINDOW: tl.constexpr,
                          HAS_DOCUMENTS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                          PRECISION: tl.constexpr, PARTS: tl.constexpr, WITH_BIAS_GRADIENT: tl.constexpr,
                          NATURAL: tl.constexpr):
    """dK, dV of one key tile and its bias-gradient partial sums (one slot per program, no atomics).
    BUCKET: the bucket of each distance index (ND), then each bucket's first and last distance (BUCKETS
    each; unused slots empty, the saturated buckets open-ended)."""
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    q_rows, q_pos, q_threshold, q_doc, q_real, k_rows, k_pos, k_code, k_doc, k_query_lo, k_query_hi = _keys_plan(
        PLAN, H, LQ, LK)
    offs_n, col_ok, krows, kp, kc, kd, k_min, k_max, rule_free = _key_tile(
        tl.program_id(0) * BLOCK_N, b, k_rows, k_pos, k_code, k_doc, LK, HAS_DOCUMENTS, BLOCK_N)
    k = _load_rows(K, b, h, stride_kb, stride_kh, stride_kl, krows, col_ok, HEAD_DIM)
    v = _load_rows(V, b, h, stride_vb, stride_vh, stride_vl, krows, col_ok, HEAD_DIM)
    row_lo = tl.reduce(tl.load(k_query_lo + b * LK + offs_n, mask=col_ok, other=_FAR), 0, _MIN)
    row_hi = tl.reduce(tl.load(k_query_hi + b * LK + offs_n, mask=col_ok, other=0), 0, _MAX)
    lse_row = LSE + bh * LQ
    delta_row = DELTA + bh * LQ
    bias = BIAS + h * ND
    bias_left, bias_right = tl.load(bias), tl.load(bias + 2 * MAX_DISTANCE)
    dk = tl.full([BLOCK_N, HEAD_DIM], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, HEAD_DIM], 0.0, tl.float32)
    db = tl.full([BLOCK_N, BUCKETS], 0.0, tl.float32)  # per key row and bucket: see _bias_gradient
    far_left = tl.full([BLOCK_N, BLOCK_M], 0.0, tl.float32)
    far_right = tl.full([BLOCK_N, BLOCK_M], 0.0, tl.float32)
    start_n = tl.program_id(0) * BLOCK_N
    keys_natural = False
    bucket_first = tl.arange(0, BUCKETS)  # read only where NATURAL
    bucket_last = bucket_first
    if NATURAL:  # the real keys at positions start_n, start_n + 1, ... (padding keys see nobody: dS = 0)
        keys_natural = tl.reduce(tl.where((kp >= 0) & (kp != offs_n), 1, 0), 0, _MAX) == 0
        bucket_first = tl.load(BUCKET + ND + tl.arange(0, BUCKETS))
        bucket_last = tl.load(BUCKET + ND + BUCKETS + tl.arange(0, BUCKETS))
    # Two runs of query tiles: those holding the real rows that may see these keys, then the padding
    # rows (visited last; position -1 puts them outside the real rows' ranges), for a tile with a real
    # key, from the first tile the first run did not visit. One loop over both keeps one copy of the body.
    first = row_lo // BLOCK_M * BLOCK_M
    main_tiles = tl.maximum((row_hi - first + BLOCK_M - 1) // BLOCK_M, 0)
    padding_start = tl.load(q_real + b).to(tl.int32) // BLOCK_M * BLOCK_M
    padding_start = tl.where(main_tiles > 0, tl.maximum(padding_start, first + main_tiles * BLOCK_M), padding_start)
    padding_tiles = tl.where(k_max >= 0, tl.maximum((LQ - padding_start + BLOCK_M - 1) // BLOCK_M, 0), 0)
    for tile in range(0, main_tiles + padding_tiles):
        start_m = tl.where(tile < main_tiles, first + tile * BLOCK_M, padding_start + (tile - main_tiles) * BLOCK_M)
        dk, dv, db, far_left, far_right = _key_tile_step(
            dk, dv, db, far_left, far_right, start_m, b, h, k, v, kp, kc, kd, k_min, k_max, rule_free, Q, DO,
            lse_row, delta_row, bias, bias_left, bias_right, BUCKET, q_rows, q_pos, q_threshold, q_doc,
            stride_qb, stride_qh, stride_ql, stride_gb, stride_gh, stride_gl, LQ, qk_scale, window, MAX_DISTANCE,
            SAT_LEFT, SAT_RIGHT, BUCKETS, HAS_WINDOW, HAS_DOCUMENTS, BLOCK_M, HEAD_DIM, PRECISION, PARTS,
            WITH_BIAS_GRADIENT, start_n, keys_natural, bucket_first, bucket_last, NATURAL, BLOCK_N)
    _store_rows(DK, dk * sm_scale, b, h, stride_dkb, stride_dkh, stride_dkl, krows, col_ok, HEAD_DIM)
    _store_rows(DV, dv, b, h, stride_dvb, stride_dvh, stride_dvl, krows, col_ok, HEAD_DIM)
    db = tl.reduce(db, 0, _SUM)
    if WITH_BIAS_GRADIENT:
        bucket_ids = tl.arange(0, BUCKETS)
        db += tl.where(bucket_ids == BUCKET_LEFT, _total(far_left), 0.0)
        db += tl.where(bucket_ids == BUCKET_RIGHT, _total(far_right), 0.0)
    # DB is (batch x key tiles, BUCKETS, H): summed over its first axis it is the (buckets, heads) gradient.
    slot = b * tl.num_programs(0) + tl.program_id(0)
    tl.store(DB + (slot * BUCKETS + tl.arange(0, BUCKETS)) * H + h, db)


@kernel
def _query_gradients_kernel(Q, K, V, DO, DQ, LSE, DELTA, BIAS, PLAN,
                            stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                            stride_vb, stride_vh, stride_vl, stride_gb, stride_gh, stride_gl,
                            stride_dqb, stride_dqh, stride_dql,
                            LQ, LK, H: tl.constexpr, ND: tl.constexpr, qk_scale: tl.constexpr,
                            sm_scale: tl.constexpr, window: tl.constexpr, MAX_DISTANCE: tl.constexpr,
                            SAT_LEFT: tl.constexpr, SAT_RIGHT: tl.constexpr,
                            HAS_WINDOW: tl.constexpr, HAS_DOCUMENTS: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
                            PARTS: tl.constexpr):
    bh, b, h, offs_m, rows, row_ok, query, key_ranges, keys = _query_program(
        Q, PLAN, stride_qb, stride_qh, stride_ql, LQ, LK, H, HAS_DOCUMENTS, BLOCK_M, HEAD_DIM)
    do = _load_rows(DO, b, h, stride_gb, stride_gh, stride_gl, rows, row_ok, HEAD_DIM)
    lse = tl.load(LSE + bh * LQ + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh * LQ + rows, mask=row_ok, other=0.0)
    key_lo, key_hi, bias_row = _key_range_and_bias(key_ranges, b, h, offs_m, row_ok, LQ, BIAS, ND, MAX_DISTANCE)
    dq = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)
    # The forward kernel's key-tile visit and score recomputation (`_key_tile_scores`).
    for start_n in range(key_lo // BLOCK_N * BLOCK_N, key_hi, BLOCK_N):
        k, v, s = _key_tile_scores(start_n, b, h, query, keys, bias_row, K, V, stride_kb, stride_kh, stride_kl,
                                   stride_vb, stride_vh, stride_vl, LK, qk_scale, window, MAX_DISTANCE, SAT_LEFT,
                                   SAT_RIGHT, HAS_WINDOW, HAS_DOCUMENTS, PARTS, PRECISION, BLOCK_N, HEAD_DIM)
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    _store_rows(DQ, dq * sm_scale, b, h, stride_dqb, stride_dqh, stride_dql, rows, row_ok, HEAD_DIM)
