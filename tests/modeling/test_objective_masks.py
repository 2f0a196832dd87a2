"""The three objectives' masks against the original MPNet code's definitions, entry by entry, and no leaks.

The oracle is `helpers.original_two_stream_masks`: the original's make_query_and_content_mask(tensor,
a, b, kind='MPLM' | 'PLM') transcribed block by block in pure Python (its compute_mlm uses no mask).
It is checked against the picture in that function's docstring, then compared with the rules of
masks.py (`permuted_lm_visible`, `two_stream_visible`) on full index grids, with the dense state's
materialised mask and with the mask_mods stored in the flex BlockMasks (evaluated per entry through
`create_mask`), whose block tables are checked against those entries. Padding keys (position -1) and a
window on original positions are this project's additions, intersected with the original's masks.

Then the model, black box: a plm or mlm prediction does not change when a token it must not see changes
(the predicted tokens of rank >= i for plm's rank-i query, padding, another document), does change when
a token it sees changes, and the dense and flex backends agree (flex forward only: no CPU backward).
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from helpers import (assert_mask_mod_matches, generator, make_model, max_abs, original_rule_mask,
                     original_two_stream_masks, other_id, pretraining_batch, with_backend)
from mpnet.modeling.attention import make_dense_attention_state
from mpnet.modeling.block_masks import make_two_stream_block_masks
from mpnet.modeling.masks import natural_order, permuted_lm_visible, stream_lengths, two_stream_visible
from mpnet.modeling.model import OBJECTIVES
from mpnet.modeling.patterns import window_spec

GRIDS = [(1, 0), (6, 0), (5, 1), (1, 1), (4, 4), (9, 3), (16, 8), (130, 20), (232, 35)]
KIND = {"mpnet": "MPLM", "plm": "PLM"}


def _grid(rule, n, m, streams):
    kv_len, rows = stream_lengths(n, m, streams)
    return rule(torch.arange(rows)[:, None], torch.arange(kv_len)[None, :], n, m)


def _original(n, m, kind):
    content, query = original_two_stream_masks(n, m, kind)
    return torch.tensor(content + query, dtype=torch.bool).reshape(-1, len(content))


# ----------------------------------------------------------------------------- the oracle itself


def test_oracle_reproduces_the_original_docstring_picture():
    """make_query_and_content_mask's docstring draws a = 7, b = 3 (1 = hidden) for PLM and MPNet."""
    plm_query = [[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 1]]
    mpnet_query = [[0, 0, 0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 1, 1, 1, 0]]
    plm_content = [[0, 0, 0, 0, 1, 1, 1]] * 4 + [[0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 1], [0] * 7]
    mpnet_content = ([[0, 0, 0, 0, 1, 1, 1, 0, 0, 0]] * 4
                     + [[0, 0, 0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]]
                     + [[0, 0, 0, 0, 1, 1, 1, 0, 0, 0]] * 3)
    hidden = lambda block: [[not x for x in row] for row in block]  # noqa: E731  (the original's .eq(0))
    for kind, content, query in (("PLM", plm_content, plm_query), ("MPLM", mpnet_content, mpnet_query)):
        ours_content, ours_query = original_two_stream_masks(7, 3, kind)
        assert hidden(ours_content) == [[bool(x) for x in row] for row in content], kind
        assert hidden(ours_query) == [[bool(x) for x in row] for row in query], kind


def test_oracle_spot_checks_plm():
    """n = 5, m = 2 (c = 3): content CTX 0-2, PRED 3-4; query 0-1; keys 0-4."""
    content, query = original_two_stream_masks(5, 2, "PLM")
    assert content[0] == content[2] == [1, 1, 1, 0, 0]  # CTX: all CTX, no PRED
    assert content[3] == [1, 1, 1, 1, 0] and content[4] == [1, 1, 1, 1, 1]  # PRED i: PRED j <= i
    assert query[0] == [1, 1, 1, 0, 0] and query[1] == [1, 1, 1, 1, 0]  # QUERY i: PRED j < i


# ------------------------------------------------------------------------------- the rules, on grids


@pytest.mark.parametrize("n,m", GRIDS)
def test_permuted_lm_visible_is_the_original_plm_masks(n, m):
    got = _grid(permuted_lm_visible, n, m, "plm")
    assert got.shape == (n + m, n) and got.dtype == torch.bool
    mismatch = (got != _original(n, m, "PLM")).nonzero().tolist()
    assert not mismatch, f"(n={n}, m={m}) first mismatches (row, key): {mismatch[:5]}"


@pytest.mark.parametrize("n,m", GRIDS)
def test_two_stream_visible_is_the_original_mpnet_masks(n, m):
    assert torch.equal(_grid(two_stream_visible, n, m, "mpnet"), _original(n, m, "MPLM"))


@pytest.mark.parametrize("n", [1, 6, 40])
def test_single_stream_is_the_original_mlm_no_mask(n):
    """mlm runs the m = 0 rows of either layout: every token sees every token (compute_mlm: no mask)."""
    for rule, streams in ((two_stream_visible, "mpnet"), (permuted_lm_visible, "plm")):
        assert _grid(rule, n, 0, streams).all()


def test_permuted_lm_visible_on_scalars():
    """0-d tensors, as FlexAttention's vmap feeds a mask_mod."""
    n, m = 9, 3
    expected = _original(n, m, "PLM")
    for q in range(n + m):
        for k in range(n):
            assert bool(permuted_lm_visible(torch.tensor(q), torch.tensor(k), n, m)) == bool(expected[q, k])


def test_plm_is_mpnet_without_the_mask_section():
    """The paper's reading: MPNet = PLM + position compensation. Dropping the MASK rows and keys from the
    MPNet rule leaves the PLM rule."""
    n, m = 16, 5
    mpnet = _grid(two_stream_visible, n, m, "mpnet")
    kept_rows = list(range(n)) + list(range(n + m, n + 2 * m))
    assert torch.equal(mpnet[kept_rows][:, :n], _grid(permuted_lm_visible, n, m, "plm"))


# ----------------------------------------------------------- both backends on batches (padding, window)

# (objective, n, m, pad counts per row, window); mlm runs the layout with m = 0 rows.
CASES = [
    ("plm", 232, 35, (0, 17), None),
    ("plm", 232, 35, (0, 17), 5),
    ("plm", 232, 35, (3, 0), 64),
    ("plm", 7, 1, (0, 2), None),
    ("plm", 7, 1, (2, 0), 2),
    ("plm", 40, 6, (5,), 1000),
    ("mlm", 232, 35, (0, 17), None),
    ("mlm", 40, 6, (0, 9), 3),
]


def _stacked(objective, n, m, pads):
    """(positions of the stacked rows, the layout's m, streams): padding -1, plm's query rows at the
    predicted positions."""
    _, positions, mask = pretraining_batch(generator(0), n, m, pads)
    positions = torch.where(mask.bool(), positions, -1)
    copies, streams = OBJECTIVES[objective]
    stacked = torch.cat([positions] + [positions[:, n - m:]] * copies, dim=1)
    return stacked, (m if copies else 0), streams


@functools.lru_cache(maxsize=None)
def _expected(objective, n, m, pads, window):
    stacked, layout_m, _ = _stacked(objective, n, m, pads)
    kind = KIND.get(objective, "MLM")
    return torch.stack([original_rule_mask(row, n, layout_m, kind, window) for row in stacked])


@pytest.mark.parametrize("objective,n,m,pads,window", CASES)
def test_dense_mask_is_the_original(objective, n, m, pads, window):
    stacked, layout_m, streams = _stacked(objective, n, m, pads)
    state = make_dense_attention_state(stacked, n, layout_m, torch.zeros(4, 257), 128, window_spec(window),
                                       streams=streams)
    assert state.kv_len == stream_lengths(n, layout_m, streams)[0]
    assert torch.equal(state.allowed[:, 0], _expected(objective, n, m, pads, window))


def _check_block_mask(block_mask, expected, label, exact_empty):
    """Per entry through the stored mask_mod; then the tables: a tile holding a visible entry is never
    skipped, FULL iff the whole (complete) tile is visible, and without a window EMPTY iff nothing is."""
    batch, q_len, kv_len = expected.shape
    assert_mask_mod_matches(block_mask, expected, label, reference="the original")
    bq, bk = block_mask.BLOCK_SIZE
    q_tiles, kv_tiles = math.ceil(q_len / bq), math.ceil(kv_len / bk)
    partial = torch.zeros(batch, q_tiles, kv_tiles, dtype=torch.bool)
    full = torch.zeros_like(partial)
    tables = [(partial, block_mask.kv_num_blocks, block_mask.kv_indices)]
    if block_mask.full_kv_num_blocks is not None:
        tables.append((full, block_mask.full_kv_num_blocks, block_mask.full_kv_indices))
    for labels, counts, indices in tables:
        for b in range(batch):
            for qt in range(q_tiles):
                labels[b, qt, indices[b, 0, qt, :counts[b, 0, qt]].long()] = True
    assert not (partial & full).any(), label
    for b in range(batch):
        for qt in range(q_tiles):
            for kt in range(kv_tiles):
                tile = expected[b, qt * bq:(qt + 1) * bq, kt * bk:(kt + 1) * bk]
                complete = tile.shape == (bq, bk)
                where = f"{label}: tile {(b, qt, kt)}"
                assert bool(full[b, qt, kt]) == (complete and bool(tile.all())), where
                if tile.any():
                    assert partial[b, qt, kt] or full[b, qt, kt], f"{where} holds visible entries but is skipped"
                elif exact_empty:
                    assert not partial[b, qt, kt], f"{where} is empty but computed"


@pytest.mark.parametrize("block_size", [128, 16])
@pytest.mark.parametrize("objective,n,m,pads,window", CASES)
def test_flex_block_masks_are_the_original(objective, n, m, pads, window, block_size):
    stacked, layout_m, streams = _stacked(objective, n, m, pads)
    content, query = make_two_stream_block_masks(stacked, n, layout_m, window_spec(window), streams=streams,
                                              block_size=block_size)
    expected = _expected(objective, n, m, pads, window)
    kv_len, _ = stream_lengths(n, layout_m, streams)
    _check_block_mask(content, expected[:, :kv_len], "content", exact_empty=window is None)
    if layout_m == 0:
        assert query is None
    else:
        _check_block_mask(query, expected[:, kv_len:], "query", exact_empty=window is None)


@pytest.mark.parametrize("window", [3, 40])
def test_plm_natural_order_keeps_the_rules(window):
    """Rows gathered into natural order (what a window or documents trigger): the same mask, permuted."""
    n, m = 60, 9
    stacked, _, _ = _stacked("plm", n, m, (0, 7))
    layout = natural_order(stacked, n, m, streams="plm")
    assert torch.equal(layout[:, :n].sort(1).values, torch.arange(n).expand(2, n))  # content stays content
    natural = stacked.gather(1, layout)
    allowed = make_dense_attention_state(natural, n, m, torch.zeros(2, 257), 128, window_spec(window),
                                         layout=layout, streams="plm").allowed[:, 0]
    permuted = _expected("plm", n, m, (0, 7), window)
    expected = torch.stack([permuted[b][layout[b]][:, layout[b, :n]] for b in range(2)])
    assert torch.equal(allowed, expected)
    content, query = make_two_stream_block_masks(natural, n, m, window_spec(window), layout=layout, streams="plm")
    _check_block_mask(content, expected[:, :n], "content", exact_empty=False)
    _check_block_mask(query, expected[:, n:], "query", exact_empty=False)


# ------------------------------------------------------------------------------ the model, black box

SAME = 1e-6
CHANGED = 1e-3
N, M = 18, 6


@pytest.fixture(scope="module")
def dense_model():
    return make_model(seed=41, num_hidden_layers=3)


def _perturbed(ids, indices, shift=7):
    """Row 0: ids; row 1 + a: ids with entry indices[a] replaced by another ordinary id."""
    rows = ids.repeat(len(indices) + 1, 1)
    for a, t in enumerate(indices):
        rows[1 + a, t] = other_id(rows[1 + a, t], shift=shift)
    return rows


@pytest.mark.parametrize("objective", ["plm", "mpnet"])
def test_rank_i_sees_the_predicted_tokens_below_rank_i_only(dense_model, objective):
    """Through 3 layers: the rank-i prediction changes with the content token of rank j iff j < i."""
    ids, positions, mask = pretraining_batch(generator(1), N, M, (0,))
    rows = _perturbed(ids, list(range(N - M, N)))
    with torch.no_grad():
        logits = dense_model(rows, positions.expand_as(rows), M, mask.expand_as(rows), objective=objective)
    for j in range(M):
        for i in range(M):
            diff = max_abs(logits[1 + j, i], logits[0, i])
            if j >= i:
                assert diff <= SAME, f"{objective}: rank {i} moved by {diff:.3g} with the token of rank {j}"
            else:
                assert diff > CHANGED, f"{objective}: rank {i} ignores the token of rank {j} ({diff:.3g})"


@pytest.mark.parametrize("objective", ["plm", "mlm"])
def test_every_prediction_sees_every_context_token(dense_model, objective):
    """The control: a dependence would be noticed."""
    ids, positions, mask = pretraining_batch(generator(2), N, M, (0,))
    rows = _perturbed(ids, list(range(N - M)))
    with torch.no_grad():
        logits = dense_model(rows, positions.expand_as(rows), M, mask.expand_as(rows), objective=objective)
    assert (logits[1:] - logits[:1]).abs().amax(-1).min() > CHANGED


def test_mlm_predictions_see_every_predicted_input(dense_model):
    """mlm is one bidirectional stream: each prediction depends on every (corrupted) predicted input too."""
    ids, positions, mask = pretraining_batch(generator(3), N, M, (0,))
    rows = _perturbed(ids, list(range(N - M, N)))
    with torch.no_grad():
        logits = dense_model(rows, positions.expand_as(rows), M, mask.expand_as(rows), objective="mlm")
    assert (logits[1:] - logits[:1]).abs().amax(-1).min() > CHANGED


@pytest.mark.parametrize("objective", ["plm", "mlm"])
def test_padding_changes_nothing(dense_model, objective):
    pads = (0, 4, 7)
    ids, positions, mask = pretraining_batch(generator(4), N, M, pads)
    padding = mask == 0
    changed_ids, changed_pos = ids.clone(), positions.clone()
    changed_ids[padding] = torch.randint(3, 60, (int(padding.sum()),), generator=generator(9))
    changed_pos[padding] = torch.randint(0, N, (int(padding.sum()),), generator=generator(10))
    with torch.no_grad():
        a = dense_model(ids, positions, M, mask, objective=objective)
        b = dense_model(changed_ids, changed_pos, M, mask, objective=objective)
    assert torch.isfinite(a).all()
    assert max_abs(a, b) <= SAME


@pytest.mark.parametrize("objective", ["plm", "mlm"])
def test_documents_do_not_see_each_other(dense_model, objective):
    """Two documents in one row: changing every token of one leaves the other's predictions unchanged."""
    ids, positions, mask = pretraining_batch(generator(5), N, M, (0,))
    documents = (positions >= N // 2).long()  # original positions 0..8 document 0, 9..17 document 1
    positions = positions - documents * (N // 2)  # positions restart in each document
    other = ids.clone()
    in_one = documents[0] == 1
    other[0, in_one] = torch.tensor([other_id(t, shift=5) for t in ids[0, in_one]])
    with torch.no_grad():
        a = dense_model(ids, positions, M, mask, documents, objective=objective)
        b = dense_model(other, positions, M, mask, documents, objective=objective)
    predicted_in_zero = documents[0, N - M:] == 0
    assert predicted_in_zero.any() and (~predicted_in_zero).any()
    assert max_abs(a[0, predicted_in_zero], b[0, predicted_in_zero]) <= SAME
    assert max_abs(a[0, ~predicted_in_zero], b[0, ~predicted_in_zero]) > CHANGED


def test_mlm_is_the_single_stream_encoder_at_the_predicted_positions(dense_model):
    """The mlm forward (permuted rows, logits in rank order) against an independent path: the natural-order
    sequence through `mlm_logits` (HF's MPNetForMaskedLM computation), read at the predicted positions."""
    ids, positions, mask = pretraining_batch(generator(6), N, M, (0, 0))
    natural = torch.empty_like(ids).scatter_(1, positions, ids)
    with torch.no_grad():
        ours = dense_model(ids, positions, M, mask, objective="mlm")
        everywhere = dense_model.mlm_logits(natural)
    predicted_positions = positions[:, N - M:]
    expected = everywhere.gather(1, predicted_positions[:, :, None].expand(-1, -1, everywhere.shape[-1]))
    assert max_abs(ours, expected) <= 1e-5


@pytest.mark.parametrize("pattern", [None, "window:4"])
@pytest.mark.parametrize("objective", ["plm", "mlm"])
def test_dense_and_flex_compute_the_same_objective(objective, pattern):
    """Both backends, padding and documents (and a window: rows in natural order), forward only."""
    dense = make_model(seed=43, attention_pattern=pattern)
    flex = with_backend(dense, True)
    ids, positions, mask = pretraining_batch(generator(7), 24, 5, (0, 6))
    documents = torch.zeros_like(ids)
    documents[1] = (positions[1] >= 10).long()
    positions = positions.clone()
    positions[1] = positions[1] - documents[1] * 10
    with torch.no_grad():
        for docs in (None, documents):
            a = dense(ids, positions, 5, mask, docs, objective=objective)
            b = flex(ids, positions, 5, mask, docs, objective=objective)
            assert a.shape == (2, 5, dense.config.vocab_size)
            assert max_abs(a, b) <= 1e-4, (objective, pattern, docs is not None)


def test_unknown_objective_is_one_line():
    from mpnet.errors import UserError

    model = make_model(seed=0)
    ids, positions, mask = pretraining_batch(generator(8), 8, 2, (0,))
    with pytest.raises(UserError, match="unknown pretraining objective 'mpnett'; choose one of mpnet, mlm, plm"):
        model(ids, positions, 2, mask, objective="mpnett")


# ------------------------------------------------------------------------------ GPU: with gradients


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 16])
@pytest.mark.parametrize("objective", ["plm", "mlm"])
def test_gpu_flex_trains_the_objective_as_dense_does(objective, window):
    """CUDA only (FlexAttention's backward): output and every parameter gradient of flex against dense, in
    true fp32, relative by norm <= 1e-4, the tolerance and its reasons of tests/modeling/test_gpu_backends.py
    (k.bias gradients vanish in exact arithmetic and are left out, as there)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from helpers import rel_err

    old = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        dense = make_model(seed=47, sliding_window_size=window, hidden_size=256, num_attention_heads=4,
                           intermediate_size=512)
        flex = with_backend(dense, True)
        n, m = 232, 35
        ids, positions, mask = (t.cuda() for t in pretraining_batch(generator(n), n, m, (0, 31)))
        cotangent = torch.randn(2, m, dense.config.vocab_size, generator=generator(99)).cuda()
        results = []
        for model in (dense.cuda().train(), flex.cuda().train()):
            out = model(ids, positions, m, mask, objective=objective)
            (out.float() * cotangent).sum().backward()
            grads = {k: p.grad.float() for k, p in model.named_parameters() if p.grad is not None}
            results.append((out.detach().float(), grads))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old[0]
        torch.set_float32_matmul_precision(old[1])
    (out_d, grads_d), (out_f, grads_f) = results
    assert rel_err(out_f, out_d) <= 1e-4
    assert grads_d.keys() == grads_f.keys()
    for name in grads_d:
        if not name.endswith("attention.attn.k.bias"):
            assert rel_err(grads_f[name], grads_d[name]) <= 1e-4, name
