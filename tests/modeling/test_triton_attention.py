"""The Triton attention backend against the dense reference: forward and every gradient.

Oracle: `make_dense_attention_state` + the dense module's arithmetic (scores in float32, masked,
softmax, rows that see nothing -> 0), differentiated by autograd; the same inputs go to
`triton_two_stream_attention`. Compared: the output, dq, dk, dv and the gradient of the (buckets,
heads) relative-bias table.

CPU: the kernels run in Triton's interpreter (numpy) on CPU tensors when there is no GPU (or with
TRITON_INTERPRET=1); skipped when triton is not installed. Shapes are small (n = 40, m = 8) so that
each case takes about a second. Float32 throughout: the interpreter's dots are numpy's float32
products, so what remains is summation order (~1e-7 relative); we allow 1e-5 by norm, and a wrong
mask entry, bias index, bucket or head moves results by 1e-2 or more.

GPU (marked `gpu`): `python -m pytest -m gpu tests/modeling/test_triton_attention.py -q -s`.
- fp32: the kernels' dots in IEEE fp32 (input_precision "ieee"), the dense side with TF32 off:
  1e-4 relative by norm, as the flex backend's GPU parity tests.
- bf16 at realistic shapes (12 heads x 64, n = 512, m = 77): both the Triton kernels and the dense
  backend run on bf16 q, k, v and are compared to the fp32 dense truth; the Triton error must be at
  most 1.5 x the dense backend's own bf16 error + 2e-3 on every tensor (the yardstick of
  tests/modeling/test_gpu_backends.py).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from helpers import generator, max_abs, pretraining_batch, rel_err, rule_visible, stacked_positions, tiny_config
from mpnet.errors import UserError
from mpnet.modeling.attention import RelativeMultiHeadAttention, make_dense_attention_state
from mpnet.modeling.patterns import window_spec
from mpnet.modeling.masks import (natural_order, permuted_lm_visible, relative_bias_by_distance, relative_position_bucket,
                                 two_stream_visible)
from mpnet.modeling import triton_attention as T
from mpnet.modeling import triton_launch as L
from mpnet.modeling import triton_plan as P
from mpnet.modeling.triton_internals import INTERPRET, triton
from mpnet.modeling.triton_kernels import LOG2E

MAX_DISTANCE = 128
BUCKETS = 32
FP32_REL = 1e-5
GPU_FP32_REL = 1e-4
BF16_VS_DENSE = 1.5
BF16_SLACK = 2e-3

interpreted = pytest.mark.skipif(not (triton is not None and INTERPRET),
                                 reason="needs triton, run by its interpreter (no GPU, or TRITON_INTERPRET=1)")
compiled = pytest.mark.skipif(not (triton is not None and not INTERPRET and torch.cuda.is_available()),
                              reason="needs triton and CUDA (compiled kernels)")


@pytest.fixture(autouse=True)
def _interpreter_allowed(request, monkeypatch):
    """The interpreter runs only when asked for (TRITON_INTERPRET=1); the CPU tests ask."""
    if "gpu" not in request.keywords:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


# ------------------------------------------------------------------------------------- oracle


def dense_attention(q, k, v, table, positions, n, m, window=None, document_ids=None, layout=None, streams="mpnet"):
    """The dense backend's arithmetic (RelativeMultiHeadAttention.forward minus projections/dropout)."""
    distance_bias = relative_bias_by_distance(table, MAX_DISTANCE, table.shape[0])
    state = make_dense_attention_state(positions, n, m, distance_bias, MAX_DISTANCE, window_spec(window),
                                       document_ids=document_ids, layout=layout, streams=streams)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5 + state.bias
    scores = scores.masked_fill(~state.allowed, float("-inf"))
    probs = torch.where(state.allowed.any(-1, keepdim=True), torch.softmax(scores, dim=-1), 0.0)
    return torch.matmul(probs.to(v.dtype), v)


def run(fn, inputs, cotangent):
    """Output and gradients of (q, k, v, table) for one cotangent."""
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, cotangent)
    return [out.detach()] + [g.detach() for g in grads]


NAMES = ("out", "dq", "dk", "dv", "dtable")


# ------------------------------------------------------------------------------------- batches


def two_stream_case(n, m, pads, heads, head_dim, seed, device="cpu", dtype=torch.float32, documents=False,
                    natural=False):
    """Random q, k, v, table and a two-stream batch (padding per row, optional two documents per row,
    optional natural-order layout). Returns inputs, positions, document_ids, layout."""
    gen = generator(seed)
    _, positions, mask = pretraining_batch(gen, n, m, pads)
    positions = stacked_positions(positions, mask, n, m)
    document_ids = None
    if documents:  # two documents per row: the first third of the original positions, then the rest
        split = (positions.max(1, keepdim=True).values + 1) // 3
        document_ids = torch.where(positions >= 0, (positions >= split).long(), -1)
        positions = torch.where(positions >= 0, positions - split * document_ids, -1)
    layout = None
    if natural:
        layout = natural_order(positions, n, m, document_ids)
        positions = positions.gather(1, layout)
        if document_ids is not None:
            document_ids = document_ids.gather(1, layout)
    batch = positions.shape[0]
    q = torch.randn(batch, heads, n + 2 * m, head_dim, generator=gen)
    k = torch.randn(batch, heads, n + m, head_dim, generator=gen)
    v = torch.randn(batch, heads, n + m, head_dim, generator=gen)
    table = 2.0 * torch.randn(BUCKETS, heads, generator=gen)  # large enough to move the softmax
    inputs = [x.to(device) for x in (q, k, v)] + [table.to(device)]
    inputs[:3] = [x.to(dtype) for x in inputs[:3]]
    move = (lambda x: None if x is None else x.to(device))
    return inputs, move(positions), move(document_ids), move(layout)


def single_stream_case(n, lengths, heads, head_dim, seed, device="cpu", dtype=torch.float32):
    gen = generator(seed)
    real = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
    positions = torch.where(real, torch.arange(n)[None], -1)
    q, k, v = (torch.randn(len(lengths), heads, n, head_dim, generator=gen) for _ in range(3))
    table = 2.0 * torch.randn(BUCKETS, heads, generator=gen)
    return [x.to(device, dtype) for x in (q, k, v)] + [table.to(device)], positions.to(device)


def _cotangent(inputs, seed):
    """Random, bf16-representable (the same cotangent for a bf16 run and its fp32 truth)."""
    cotangent = torch.randn(inputs[0].shape, generator=generator(seed)).bfloat16()
    return cotangent.to(inputs[0].device, inputs[0].dtype)


def triton_run(inputs, positions, n, m, window=None, document_ids=None, layout=None, tiles=None, seed=7,
               streams="mpnet"):
    plan = P.make_triton_attention_plan(positions, n, m, window=window, document_ids=document_ids, layout=layout,
                                        streams=streams)
    return run(lambda q, k, v, t: L.triton_two_stream_attention(q, k, v, t, plan, max_distance=MAX_DISTANCE,
                                                                tiles=tiles), inputs, _cotangent(inputs, seed))


def dense_run(inputs, positions, n, m, window=None, document_ids=None, layout=None, seed=7, streams="mpnet"):
    return run(lambda q, k, v, t: dense_attention(q, k, v, t, positions, n, m, window, document_ids, layout,
                                                  streams), inputs, _cotangent(inputs, seed))


def compare(inputs, positions, n, m, window=None, document_ids=None, layout=None, tiles=None, streams="mpnet"):
    return (triton_run(inputs, positions, n, m, window, document_ids, layout, tiles, streams=streams),
            dense_run(inputs, positions, n, m, window, document_ids, layout, streams=streams))


def permuted_lm_case(n, m, pads, heads, head_dim, seed):
    """The plm layout of a two-stream case: its n content rows and its m query rows (no MASK section);
    keys and values are the n content rows."""
    (q, k, v, table), positions, _, _ = two_stream_case(n, m, pads, heads, head_dim, seed)
    keep = torch.cat([torch.arange(n), torch.arange(n + m, n + 2 * m)])
    return [q[:, :, keep], k[:, :, :n].contiguous(), v[:, :, :n].contiguous(), table], positions[:, keep]


def assert_close(ours, reference, tolerance, label):
    errors = {name: rel_err(a, b) for name, a, b in zip(NAMES, ours, reference)}
    print(f"\n[{label}] relative errors: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    for name, a in zip(NAMES, ours):
        assert torch.isfinite(a).all(), f"{label}: {name} is not finite"
    assert reference[4].abs().max() > 0, "the bias table got no gradient: the case tests nothing"
    bad = {name: error for name, error in errors.items() if not error <= tolerance}
    assert not bad, f"{label}: {bad}"


# ------------------------------------------------------------------------------ rules as integers


@pytest.mark.parametrize("permuted", [False, True])
def test_codes_equal_two_stream_visible(permuted):
    """Every (query row, key) pair of a small layout, in the permuted layout and in natural order
    (slots scrambled), against masks.two_stream_visible. Pure torch: runs without triton."""
    n, m = 11, 4
    slots = torch.arange(n + 2 * m)
    if permuted:
        slots = torch.cat([torch.randperm(n + m, generator=generator(3)),
                           n + m + torch.randperm(m, generator=generator(4))])
    threshold, code = P.two_stream_codes(slots, n, m)
    key_code = code[:n + m]
    codes_say = ((key_code[None] >> 1) < threshold[:, None]) != ((key_code[None] & 1) == 1)
    rules_say = two_stream_visible(slots[:, None], slots[None, :n + m], n, m)
    assert torch.equal(codes_say, rules_say)


def test_only_windows_are_supported():
    assert T.supported_window(None) is None
    assert T.supported_window("window:8") == 8
    assert T.supported_window("window:20,window:8,neighbourhood:5") == 5
    for spec in ("block:4", "window:8,softcap:30", "alibi", "dilated:4:2"):
        with pytest.raises(T.UnsupportedTritonPattern) as info:
            T.supported_window(spec)
        assert isinstance(info.value, UserError) and "window" in str(info.value)


def test_saturation_distance_is_where_the_last_bucket_starts():
    layout = P.bucket_layout(BUCKETS, MAX_DISTANCE)
    assert (layout.saturated_left, layout.saturated_right) == (91, 91)
    buckets = P.bucket_tables(BUCKETS, MAX_DISTANCE, "cpu")[:2 * MAX_DISTANCE + 1].tolist()
    assert buckets[MAX_DISTANCE + 90] != buckets[MAX_DISTANCE + 91] == buckets[-1]
    assert buckets[MAX_DISTANCE - 90] != buckets[MAX_DISTANCE - 91] == buckets[0]


def test_bias_by_index_is_the_table_read_by_distance():
    """What the kernels read: (heads, 2D + 1) contiguous, entry [h, d + D] = table[bucket(d), h] * log2(e)
    for every d in [-D, D]."""
    reach = MAX_DISTANCE
    table = torch.randn(BUCKETS, 3, generator=generator(5))
    bias = P.log2_bias_by_index(table, MAX_DISTANCE)
    assert bias.shape == (3, 2 * reach + 1) and bias.is_contiguous() and bias.dtype == torch.float32
    buckets = relative_position_bucket(torch.arange(-reach, reach + 1), BUCKETS, MAX_DISTANCE)
    for index, bucket in enumerate(buckets.tolist()):
        assert torch.equal(bias[:, index], table[bucket] * LOG2E)


def test_bucket_tables_give_each_bucket_its_distances():
    """What the dK/dV kernel reads: the bucket of each distance index, then each bucket's first and last
    distance: every distance in [-3D, 3D] lies in its bucket's range and in no other (unused slots empty,
    the saturated buckets open-ended), against relative_position_bucket itself."""
    tables = P.bucket_tables(BUCKETS, MAX_DISTANCE, "cpu").long()
    reach = MAX_DISTANCE
    count = 2 * reach + 1
    slots = (len(tables) - count) // 2
    first, last = tables[count:count + slots], tables[count + slots:]
    distance = torch.arange(-3 * reach, 3 * reach + 1)
    bucket = relative_position_bucket(distance, BUCKETS, MAX_DISTANCE)
    inside = (first[None, :] <= distance[:, None]) & (distance[:, None] <= last[None, :])
    assert torch.equal(inside, bucket[:, None] == torch.arange(slots)[None, :])
    assert torch.equal(tables[:count], relative_position_bucket(torch.arange(-reach, reach + 1), BUCKETS,
                                                                MAX_DISTANCE))


@pytest.mark.parametrize("window", [None, 6])
def test_plan_visit_order(window):
    """The dK/dV order, and the forward order with a window: rows in position order, padding last. The
    forward order without a window: rows grouped by what the rules let them see (keys CTX | MASK |
    PRED, queries threshold 0 | the others), each group in position order, padding last. Every row's
    key range [lo, hi) and every key's row range hold every pair the rules allow (brute force over the
    rules' own visibility)."""
    n, m = 40, 8
    (_, _, _, _), positions, _, _ = two_stream_case(n, m, (0, 7), 1, 16, seed=1)
    plan = P.make_triton_attention_plan(positions, n, m, window=window)
    threshold, code = P.two_stream_codes(torch.arange(n + 2 * m), n, m)
    kind = torch.where(code < 0, 0, torch.where(code % 2 == 1, 1, 2))
    for b, visit in ((b, visit) for b in range(2) for visit in (plan.forward, plan.keys)):
        grouped = window is None and visit is plan.forward
        pos = visit.q_pos[b].long()
        real, q_rows, k_rows = int(plan.q_real[b]), visit.q_rows[b].long(), visit.k_rows[b].long()
        assert torch.equal(pos, positions[b, q_rows])
        assert (pos[:real] >= 0).all() and (pos[real:] < 0).all()
        assert sorted(q_rows.tolist()) == list(range(n + 2 * m)) and sorted(k_rows.tolist()) == list(range(n + m))
        k_pos = positions[b, k_rows]
        k_real = int((k_pos >= 0).sum())
        assert (k_pos[:k_real] >= 0).all() and (k_pos[k_real:] < 0).all()
        q_key = (threshold[q_rows[:real]] > 0).long() if grouped else torch.zeros(real, dtype=torch.long)
        k_key = kind[k_rows[:k_real]] if grouped else torch.zeros(k_real, dtype=torch.long)
        for group_key, order in ((q_key, pos[:real]), (k_key, k_pos[:k_real])):
            assert (group_key.diff() >= 0).all()
            for g in group_key.unique():
                assert (order[group_key == g].diff() >= 0).all()
        for i in range(real):
            for j in range(k_real):
                row, key = int(q_rows[i]), int(k_rows[j])
                seen = rule_visible(row, key, n, m) and (
                    window is None or abs(int(positions[b, row]) - int(positions[b, key])) <= window)
                if seen and visit is plan.forward:
                    assert visit.q_key_lo[b, i] <= j < visit.q_key_hi[b, i], (b, i, j)
                if seen and visit is plan.keys:
                    assert visit.k_query_lo[b, j] <= i < visit.k_query_hi[b, j], (b, i, j)


def test_codes_equal_permuted_lm_visible():
    """The plm layout (n content rows, then m QUERY rows; keys the content rows), every pair, against
    masks.permuted_lm_visible, rows permuted."""
    n, m = 11, 4
    slots = torch.cat([torch.randperm(n, generator=generator(5)), n + torch.randperm(m, generator=generator(6))])
    threshold, code = P.two_stream_codes(slots, n, m, streams="plm")
    key_code = code[:n]
    codes_say = ((key_code[None] >> 1) < threshold[:, None]) != ((key_code[None] & 1) == 1)
    assert torch.equal(codes_say, permuted_lm_visible(slots[:, None], slots[None, :n], n, m))


# ----------------------------------------------------------------------------- CPU (interpreter)


@interpreted
@pytest.mark.parametrize("window", [None, 6])
def test_two_stream_with_padding_matches_dense(window):
    inputs, positions, _, _ = two_stream_case(40, 8, (0, 9), heads=1, head_dim=16, seed=2)
    ours, reference = compare(inputs, positions, 40, 8, window=window)
    assert_close(ours, reference, FP32_REL, f"two-stream w={window}")


@interpreted
def test_several_heads_and_tiles_with_window_and_padding_tail():
    """16-row tiles: many tiles per row, a window that skips whole key tiles, padding query rows in
    the last tiles (visited by every key tile's extra loop), two heads."""
    inputs, positions, _, _ = two_stream_case(40, 8, (0, 13), heads=2, head_dim=16, seed=3)
    tiles = L.KernelTiles(*(L.Tiles(16, 16),) * 3)
    ours, reference = compare(inputs, positions, 40, 8, window=4, tiles=tiles)
    assert_close(ours, reference, FP32_REL, "16x16 tiles, w=4, 2 heads")


@interpreted
@pytest.mark.parametrize("spread", [1, 12])
def test_small_tiles_without_window_skip_and_trim_exactly(spread):
    """16-row tiles without a window: CTX-only key tiles skip the rule mask and the threshold-0 query
    tiles stop before the PRED keys; padding in both streams. spread 12: positions 12 apart, so most
    tiles lie in a saturated bucket (scalar bias; the dK/dV kernel's far accumulators)."""
    inputs, positions, _, _ = two_stream_case(40, 8, (0, 13), heads=2, head_dim=16, seed=14)
    positions = torch.where(positions >= 0, positions * spread, positions)
    tiles = L.KernelTiles(*(L.Tiles(16, 16),) * 3)
    ours, reference = compare(inputs, positions, 40, 8, tiles=tiles)
    assert_close(ours, reference, FP32_REL, f"16x16 tiles, no window, 2 heads, positions x{spread}")


@interpreted
@pytest.mark.parametrize("window", [None, 6])
def test_permuted_lm_layout_matches_dense(window):
    """The plm objective's layout (XLNet-style: no MASK rows, no position compensation), padding, 16-row
    tiles, with and without a window: output and every gradient equal the dense backend's."""
    inputs, positions = permuted_lm_case(40, 8, (0, 9), heads=2, head_dim=16, seed=15)
    tiles = L.KernelTiles(*(L.Tiles(16, 16),) * 3)
    ours, reference = compare(inputs, positions, 40, 8, window=window, tiles=tiles, streams="plm")
    assert_close(ours, reference, FP32_REL, f"plm layout w={window}")


@interpreted
def test_documents_in_natural_order_match_dense():
    """Two documents per row (positions restart), rows in natural order (kinds from layout slots)."""
    inputs, positions, documents, layout = two_stream_case(40, 8, (0, 5), heads=1, head_dim=16, seed=4,
                                                           documents=True, natural=True)
    ours, reference = compare(inputs, positions, 40, 8, document_ids=documents, layout=layout)
    assert_close(ours, reference, FP32_REL, "documents, natural order")


@interpreted
def test_documents_with_window_match_dense():
    inputs, positions, documents, _ = two_stream_case(40, 8, (3,), heads=1, head_dim=32, seed=5, documents=True)
    ours, reference = compare(inputs, positions, 40, 8, window=5, document_ids=documents)
    assert_close(ours, reference, FP32_REL, "documents + window")


@interpreted
def test_single_stream_with_padding_matches_dense():
    """m = 0: every row is context. Rows 0..L-1, right padding, one fully padded row (sees nothing)."""
    inputs, positions = single_stream_case(48, (48, 30, 0), heads=1, head_dim=16, seed=6)
    ours, reference = compare(inputs, positions, 48, 0)
    assert_close(ours, reference, FP32_REL, "single stream")
    assert ours[0][2].abs().max() == 0, "a row that sees nothing must output 0"


@interpreted
def test_single_stream_window_and_documents_match_dense():
    """The single stream's natural-order tiles (the bias gradient from prefix sums, the dK/dV kernel's
    NATURAL path) beside tiles that are not in natural order: a window, and documents (positions restart
    at each document, so later tiles are not at their row indices)."""
    inputs, positions = single_stream_case(80, (80, 57), heads=1, head_dim=16, seed=12)
    ours, reference = compare(inputs, positions, 80, 0, window=9)
    assert_close(ours, reference, FP32_REL, "single stream, window 9")
    document_ids = (torch.arange(80) >= 45).long()[None].repeat(2, 1)
    restarted = torch.where(positions >= 0, torch.arange(80) - 45 * document_ids, -1)
    ours, reference = compare(inputs, restarted, 80, 0, document_ids=document_ids)
    assert_close(ours, reference, FP32_REL, "single stream, documents")


@interpreted
@pytest.mark.parametrize("spread", [10, 40])
def test_long_distances_use_the_saturated_buckets(spread):
    """Positions spread over 0..630 or 0..2520 (single stream, sorted): most tiles lie wholly beyond
    distance 91 and take the scalar path, forward and backward (the nearer tiles read the tables by
    distance clamped at D = 128). The table gradient must still match."""
    inputs, _ = single_stream_case(64, (64, 64), heads=1, head_dim=16, seed=8)
    positions = (torch.arange(64) * spread)[None].repeat(2, 1)
    ours, reference = compare(inputs, positions, 64, 0)
    assert_close(ours, reference, FP32_REL, "spread positions")


@interpreted
def test_query_rank_never_depends_on_predicted_tokens_of_its_rank_or_later():
    """Black box, one layer: batch copy j perturbs the key and value of the predicted token of rank j;
    a row's output changes iff the rules let it see that key (the query of rank i: iff j < i)."""
    n, m = 40, 8
    (q, k, v, table), positions, _, _ = two_stream_case(n, m, (0,), heads=1, head_dim=16, seed=9)
    copies = m + 1
    q, k, v, positions = (x.repeat(copies, *([1] * (x.dim() - 1))) for x in (q, k, v, positions))
    for j in range(m):
        k[1 + j, :, n - m + j] += 10.0
        v[1 + j, :, n - m + j] += 10.0
    plan = P.make_triton_attention_plan(positions, n, m)
    with torch.no_grad():
        out = L.triton_two_stream_attention(q, k, v, table, plan)
    change = (out[1:] - out[:1]).abs().amax(dim=(1, 3))  # (copy j, row)
    for j in range(m):
        for row in range(n + 2 * m):
            if rule_visible(row, n - m + j, n, m):
                assert change[j, row] > 1e-6, f"row {row} ignores the predicted token of rank {j}"
            else:
                assert change[j, row] == 0, f"row {row} changed by {change[j, row]:.3g} (rank {j} hidden from it)"


@interpreted
def test_module_matches_the_dense_module():
    """TritonTwoStreamAttention (projections + kernel + merge) equals RelativeMultiHeadAttention with
    the same weights, output and parameter gradients."""
    config = tiny_config(hidden_size=32, num_attention_heads=2)
    dense = RelativeMultiHeadAttention(config)
    ours = T.TritonTwoStreamAttention(config)
    ours.load_state_dict(dense.state_dict())
    n, m = 40, 8
    _, positions, _, _ = two_stream_case(n, m, (0, 6), heads=1, head_dim=16, seed=10)
    hidden = torch.randn(2, n + 2 * m, 32, generator=generator(11))
    table = torch.randn(BUCKETS, 2, generator=generator(12), requires_grad=True)
    weights = torch.randn(2, n + 2 * m, 32, generator=generator(13))
    distance_bias = relative_bias_by_distance(table, MAX_DISTANCE, BUCKETS)
    a = dense(hidden, make_dense_attention_state(positions, n, m, distance_bias, MAX_DISTANCE, "window:5"))
    b = ours(hidden, T.make_triton_attention_state(positions, n, m, table, MAX_DISTANCE, "window:5"))
    names = ["table"] + [name for name, _ in dense.named_parameters()]
    grads_a = torch.autograd.grad((a * weights).sum(), [table, *dense.parameters()])
    grads_b = torch.autograd.grad((b * weights).sum(), [table, *ours.parameters()])
    assert max_abs(a, b) <= 1e-5 * a.abs().max()
    for name, ga, gb in zip(names, grads_a, grads_b):
        if name == "k.bias":  # zero in exact arithmetic (softmax is shift-invariant): rounding noise on both sides
            assert gb.norm() <= 1e-4 * grads_b[names.index("k.weight")].norm()
        else:
            assert rel_err(gb, ga) <= FP32_REL, name


@interpreted
@pytest.mark.parametrize("objective", ["mpnet", "mlm", "plm"])
def test_pretraining_model_matches_dense_for_every_objective(objective):
    """MPNetForPretraining with the triton backend against the dense one, same weights: the logits of
    the predicted tokens and every parameter gradient, for each objective (plm: its own layout; mlm:
    the single stream), one padded row."""
    from mpnet.modeling.model import MPNetForPretraining

    config = tiny_config(hidden_size=32, num_attention_heads=2, num_hidden_layers=2)
    torch.manual_seed(0)
    dense = MPNetForPretraining(config).eval()
    ours = MPNetForPretraining(tiny_config(hidden_size=32, num_attention_heads=2, num_hidden_layers=2,
                                           attention_backend="triton")).eval()
    ours.load_state_dict(dense.state_dict())
    n, m = 24, 4
    input_ids, positions, mask = pretraining_batch(generator(16), n, m, (0, 5))
    weights = torch.randn(2, m, config.vocab_size, generator=generator(17))
    results = []
    for model in (dense, ours):
        logits = model(input_ids, positions, m, attention_mask=mask, objective=objective)
        grads = torch.autograd.grad((logits * weights).sum(), list(model.parameters()), allow_unused=True)
        results.append((logits, grads))
    (a, grads_a), (b, grads_b) = results
    assert rel_err(b, a) <= FP32_REL, "logits"
    for (name, _), ga, gb in zip(dense.named_parameters(), grads_a, grads_b):
        if ga is None or name.endswith("attn.k.bias"):  # k.bias: zero up to rounding (shift-invariant softmax)
            continue
        assert rel_err(gb, ga) <= FP32_REL, name


def _pretraining_gradients(model, forward, seed=16, n=24, m=4, window=None):
    """Logits and every parameter gradient of one padded pretraining batch through `forward`."""
    input_ids, positions, mask = pretraining_batch(generator(seed), n, m, (0, 5))
    weights = torch.randn(2, m, model.config.vocab_size, generator=generator(seed + 1), device=input_ids.device)
    device = next(model.parameters()).device
    logits = forward(input_ids.to(device), positions.to(device), m, attention_mask=mask.to(device))
    grads = torch.autograd.grad((logits * weights.to(device)).sum(), list(model.parameters()), allow_unused=True)
    return logits.detach(), grads


def _assert_same_training_function(model, a, b, tolerance):
    (logits_a, grads_a), (logits_b, grads_b) = a, b
    assert rel_err(logits_b, logits_a) <= tolerance, "logits"
    for (name, _), ga, gb in zip(model.named_parameters(), grads_a, grads_b):
        if ga is None or name.endswith("attn.k.bias"):  # k.bias: zero up to rounding (shift-invariant softmax)
            continue
        assert rel_err(gb, ga) <= tolerance, name


@interpreted
def test_the_compiled_path_ops_pass_opcheck():
    """The torch.library ops that torch.compile sees: schema, fake (meta) shapes and strides, autograd
    registration, each checked by torch.library.opcheck on a real call (a window and padding)."""
    (q, k, v, table), positions, _, _ = two_stream_case(20, 4, (0, 3), heads=1, head_dim=16, seed=3)
    plan = P.make_triton_attention_plan(positions, 20, 4, window=9)
    settings = L.LaunchSettings(9, True, False, BUCKETS, MAX_DISTANCE, 0.25, L.default_tiles(q.dtype))
    vectors = plan.forward_packed, plan.keys_packed
    q, k, v, table = (x.requires_grad_(True) for x in (q, k, v, table))
    bias = P.log2_bias_by_index(table, MAX_DISTANCE)
    buckets = P.bucket_tables(BUCKETS, MAX_DISTANCE, q.device)
    torch.library.opcheck(L._attention_forward_op, (q, k, v, table, bias, buckets, *vectors, settings.numbers(), 0.25))
    with torch.no_grad():
        out, lse = L._attention_forward_op(q, k, v, table, bias, buckets, *vectors, settings.numbers(), 0.25)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(L._attention_backward_op, (q.detach(), k.detach(), v.detach(), out, lse, table.detach(),
                                                     bias, buckets, grad_out, *vectors, settings.numbers(), 0.25))
    assert L.LaunchSettings.from_numbers(settings.numbers(), 0.25) == settings


@interpreted
def test_pretraining_model_compiles_to_one_graph_equal_to_eager():
    """torch.compile(fullgraph=True) of the whole pretraining model with the triton backend: no graph
    break (the plan is traced, the kernels are the opaque ops), and the compiled forward and backward
    compute what the eager model computes (aot_eager: the graph dynamo and AOTAutograd build, without
    code generation; inductor's code runs in the GPU test below)."""
    from mpnet.modeling.model import MPNetForPretraining

    torch.manual_seed(0)
    model = MPNetForPretraining(tiny_config(hidden_size=32, num_attention_heads=2, num_hidden_layers=2,
                                            attention_backend="triton")).eval()
    eager = _pretraining_gradients(model, model)
    torch._dynamo.reset()
    compiled = _pretraining_gradients(model, torch.compile(model, backend="aot_eager", fullgraph=True))
    _assert_same_training_function(model, eager, compiled, 1e-6)


@interpreted
def test_compiled_classifier_follows_new_widths_with_one_dynamic_graph():
    """Fine-tuning batches change width (dynamic padding): under torch.compile the second width makes
    dynamo trace the model with a symbolic length, through the plan and the ops' fake shapes. Every
    width still computes what the eager model computes (logits and parameter gradients), padded rows
    included."""
    from mpnet.modeling.model import MPNetForSequenceClassification

    torch.manual_seed(0)
    model = MPNetForSequenceClassification(tiny_config(hidden_size=32, num_attention_heads=2, num_hidden_layers=2,
                                                       attention_backend="triton", num_labels=3)).eval()
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for width, seed in ((20, 30), (28, 31), (36, 32)):
        gen = generator(seed)
        ids = torch.randint(5, 30, (2, width), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, width - 7:] = 0
        results = []
        for forward in (model, compiled):
            logits = forward(ids, attention_mask=mask)
            grads = torch.autograd.grad((logits * torch.arange(1.0, 4.0)).sum(), list(model.parameters()),
                                        allow_unused=True)
            results.append((logits.detach(), grads))
        _assert_same_training_function(model, *results, 1e-6)
    assert counter.frame_count == 2  # the first width, then one graph with a symbolic width for the others


@interpreted
def test_query_rows_subset_matches_dense():
    """A plan for the query stream alone (rows n + m ..): its outputs are those rows of the full call."""
    n, m = 40, 8
    inputs, positions, _, _ = two_stream_case(n, m, (0, 4), heads=1, head_dim=16, seed=14)
    rows = slice(n + m, n + 2 * m)
    plan = P.make_triton_attention_plan(positions, n, m, window=7, query_rows=rows)
    q, k, v, table = inputs
    with torch.no_grad():
        ours = L.triton_two_stream_attention(q[:, :, rows], k, v, table, plan)
        reference = dense_attention(q, k, v, table, positions, n, m, 7)[:, :, rows]
    assert rel_err(ours, reference) <= FP32_REL


@interpreted
def test_without_a_gpu_the_interpreter_must_be_asked_for(monkeypatch):
    (q, k, v, table), positions, _, _ = two_stream_case(40, 8, (0,), heads=1, head_dim=16, seed=1)
    plan = P.make_triton_attention_plan(positions, 40, 8)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(L.TritonAttentionUnavailable, match="CUDA GPU"):
        L.triton_two_stream_attention(q, k, v, table, plan)


@interpreted
def test_user_errors():
    (q, k, v, table), positions, _, _ = two_stream_case(40, 8, (0,), heads=1, head_dim=16, seed=1)
    plan = P.make_triton_attention_plan(positions, 40, 8)
    with pytest.raises(UserError, match="power of two"):
        L.triton_two_stream_attention(q[..., :12], k[..., :12], v[..., :12], table, plan)
    with pytest.raises(UserError, match="plan"):
        L.triton_two_stream_attention(q[:, :, :50], k, v, table, plan)
    with pytest.raises(UserError, match="table"):
        L.triton_two_stream_attention(q, k, v, table.t(), plan)
    with pytest.raises(T.UnsupportedTritonPattern):
        T.make_triton_attention_state(positions, 40, 8, table, MAX_DISTANCE, pattern="block:8")


# ------------------------------------------------------------------------------------------- GPU


@contextlib.contextmanager
def ieee_fp32():
    old = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old[0]
        torch.set_float32_matmul_precision(old[1])


GPU_CASES = {  # name: (n, m, pads, window, documents + natural order)
    "two-stream 512": (512, 77, (0, 131), None, False),
    "two-stream 512 w=64": (512, 77, (0, 131), 64, False),
    "two-stream 232 documents": (232, 35, (0, 40), None, True),
    "single 512": (512, 0, (0, 200), None, False),
}


def _gpu_case(name, dtype, heads=4):
    n, m, pads, window, documents = GPU_CASES[name]
    if m == 0:
        inputs, positions = single_stream_case(n, [n - p for p in pads], heads, 64, seed=21, device="cuda",
                                               dtype=dtype)
        return inputs, positions, n, m, window, None, None
    inputs, positions, document_ids, layout = two_stream_case(n, m, pads, heads, 64, seed=21, device="cuda",
                                                              dtype=dtype, documents=documents, natural=documents)
    return inputs, positions, n, m, window, document_ids, layout


@pytest.mark.gpu
@compiled
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_fp32_matches_dense(name):
    inputs, positions, n, m, window, document_ids, layout = _gpu_case(name, torch.float32)
    with ieee_fp32():
        ours, reference = compare(inputs, positions, n, m, window, document_ids, layout)
    assert_close(ours, reference, GPU_FP32_REL, f"GPU fp32 {name}")


@pytest.mark.gpu
@compiled
@pytest.mark.parametrize("name", ["two-stream 512", "two-stream 512 w=64", "single 512"])
def test_gpu_bf16_error_is_no_worse_than_dense_bf16(name):
    inputs, positions, n, m, window, document_ids, layout = _gpu_case(name, torch.bfloat16, heads=12)
    with ieee_fp32():  # the truth: dense in fp32 on the same (bf16-representable) inputs
        truth = dense_run([x.float() for x in inputs], positions, n, m, window, document_ids, layout)
    ours, dense_bf16 = compare(inputs, positions, n, m, window, document_ids, layout)
    lines, failures = [], []
    for name_, a, d, t in zip(NAMES, ours, dense_bf16, truth):
        err_ours, err_dense = rel_err(a, t), rel_err(d, t)
        lines.append(f"{name_}: triton {err_ours:.2e} dense {err_dense:.2e}")
        if not (torch.isfinite(a).all() and err_ours <= BF16_VS_DENSE * err_dense + BF16_SLACK):
            failures.append(lines[-1])
    print(f"\n[GPU bf16 {name}] errors vs fp32 dense: " + "; ".join(lines))
    assert not failures, failures


@pytest.mark.gpu
@compiled
@pytest.mark.parametrize("window", [None, 64])
def test_gpu_fp32_permuted_lm_layout_matches_dense(window):
    """The plm objective's layout, compiled kernels with the default tiles, fp32, output and gradients."""
    inputs, positions = permuted_lm_case(512, 77, (0, 131), heads=4, head_dim=64, seed=22)
    inputs, positions = [x.cuda() for x in inputs], positions.cuda()
    with ieee_fp32():
        ours, reference = compare(inputs, positions, 512, 77, window=window, streams="plm")
    assert_close(ours, reference, GPU_FP32_REL, f"GPU fp32 plm w={window}")


@pytest.mark.gpu
@compiled
def test_gpu_inductor_compiled_model_equals_eager():
    """training.compile=true with the triton backend: the inductor-compiled pretraining model (base
    head size 64, n = 256) gives the eager model's logits and parameter gradients, fp32."""
    from mpnet.modeling.model import MPNetForPretraining

    torch.manual_seed(0)
    model = MPNetForPretraining(tiny_config(hidden_size=128, num_attention_heads=2, num_hidden_layers=2,
                                            attention_backend="triton")).cuda().eval()
    with ieee_fp32():
        eager = _pretraining_gradients(model, model, n=256, m=38)
        torch._dynamo.reset()
        compiled = _pretraining_gradients(model, torch.compile(model, fullgraph=True), n=256, m=38)
    _assert_same_training_function(model, eager, compiled, GPU_FP32_REL)


@pytest.mark.gpu
@compiled
def test_gpu_cpu_tensors_are_refused():
    (q, k, v, table), positions, _, _ = two_stream_case(40, 8, (0,), heads=1, head_dim=16, seed=1)
    with pytest.raises(L.TritonAttentionUnavailable):
        L.triton_two_stream_attention(q, k, v, table, P.make_triton_attention_plan(positions, 40, 8))
