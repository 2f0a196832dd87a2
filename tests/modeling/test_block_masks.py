"""BlockMasks from tile summaries (block_masks.py) against create_block_mask on the same mask_mod.

The oracle is torch's create_block_mask (eager: the mask_mod evaluated on every entry, then reduced
per tile) called with the very mask_mod our BlockMask carries. Claims checked, over many random
batches (permuted layout and natural order, padding anywhere, windows, documents, n and m not
multiples of the tile, tiles of 8-32 so that the cases stay small on CPU):
- FULL is exact in every case: our FULL tiles are create_block_mask's FULL tiles;
- EMPTY is sound in every case (no tile we skip holds an allowed entry), and exact without a window
  or documents, where all the tables (forward and backward) equal create_block_mask's bit for bit;
- with a window or documents, the truly empty tiles we leave PARTIAL are counted: none at 128-tiles
  in natural order at realistic shapes, 16 of 245 (all with a window) at tiles of 8-32;
- every table is contiguous (the compiled kernels read them as contiguous rows: a transposed table
  left strided gave wrong gradients on the GPU), and CUDA-graph replays give the eager tables.
Then what the kernel computes with our tables (full tiles unmasked, partial ones through the mask_mod,
empty ones skipped) equals the dense backend's mask, and flex_attention with our BlockMasks gives the
dense backend's outputs. (On CPU, eager flex_attention evaluates the mask_mod on every entry and does
not read the tables; the GPU test at the end runs the compiled kernel, which does.)
"""
from __future__ import annotations

import math
import random

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, create_mask

from helpers import make_model, with_backend
from mpnet.modeling import block_masks
from mpnet.modeling.attention import make_dense_attention_state
from mpnet.modeling.patterns import window_spec
from mpnet.modeling.block_masks import (make_two_stream_block_masks, summarised_window, tile_counts,
                                        two_stream_mask_mods)
from mpnet.modeling.masks import natural_order
from mpnet.modeling.patterns import AttentionPattern, as_pattern, within_window

EMPTY, PARTIAL, FULL = 0, 1, 2


# ------------------------------------------------------------------------------------- batches


def make_batch(seed, batch, n, m, pads=0, documents=0, natural=False, pad_predicted=False):
    """Stacked (B, n + 2m) positions, document ids (or None) and layout (or None), as the model builds
    them: row b has up to `pads` padding tokens (position -1, document -1) among its context tokens, or
    anywhere when pad_predicted; `documents` > 0 cuts each row into that many more documents, positions
    restarting in each; natural puts the rows in natural order (masks.natural_order)."""
    g = torch.Generator().manual_seed(seed)
    positions, docs = [], []
    for _ in range(batch):
        doc = torch.zeros(n, dtype=torch.long)
        if documents:
            cuts = torch.randint(1, max(n, 2), (documents,), generator=g)
            doc = (torch.arange(n)[:, None] >= cuts[None, :]).sum(1)
        start = torch.zeros(n, dtype=torch.long)
        start[1:] = (doc[1:] != doc[:-1]).long()
        first = torch.where(start.bool() | (torch.arange(n) == 0), torch.arange(n), 0).cummax(0).values
        pos = torch.arange(n) - first
        order = torch.randperm(n, generator=g)
        pos, doc = pos[order], doc[order]
        count = int(torch.randint(0, pads + 1, (1,), generator=g)) if pads else 0
        where = torch.randperm(n if pad_predicted else n - m, generator=g)[:count]
        pos[where], doc[where] = -1, -1
        positions.append(pos)
        docs.append(doc)
    pos, doc = torch.stack(positions), torch.stack(docs)
    stacked = torch.cat([pos, pos[:, n - m:], pos[:, n - m:]], 1)
    stacked_docs = torch.cat([doc, doc[:, n - m:], doc[:, n - m:]], 1) if documents else None
    layout = None
    if natural:
        layout = natural_order(stacked, n, m, stacked_docs)
        stacked = stacked.gather(1, layout)
        stacked_docs = None if stacked_docs is None else stacked_docs.gather(1, layout)
    return stacked, stacked_docs, layout


def random_case(seed):
    r = random.Random(seed)
    n = r.randint(2, 64)
    m = r.choice([0, 1, r.randint(0, n // 2), r.randint(0, n)])
    rules = r.choice(["none", "none", "window", "documents", "both"])
    window = r.choice([1, 2, 3, 8, 25, 200]) if rules in ("window", "both") else None
    documents = r.choice([1, 3]) if rules in ("documents", "both") else 0
    q_block, kv_block = r.choice([(8, 8), (16, 16), (8, 16), (32, 8), (16, 32)])
    return dict(batch=r.randint(1, 3), n=n, m=m, pads=r.choice([0, 0, 3, n // 3]), documents=documents,
                natural=r.random() < 0.5, pad_predicted=r.random() < 0.3, window=window,
                block_size=(q_block, kv_block))


# ------------------------------------------------------------------------------------- labels


def _dense_table(count, indices):
    """(B, H, rows) counts + (B, H, rows, cols) indices -> (B, rows, cols) 0/1 (head 0)."""
    count, indices = count.cpu(), indices.cpu()
    cols = indices.shape[-1]
    listed = torch.arange(cols) < count[..., None].long()
    out = torch.zeros(*indices.shape[:-1], cols + 1, dtype=torch.long)
    out.scatter_(-1, torch.where(listed, indices.long(), cols), 1)
    return out[:, 0, :, :cols]


def labels(block_mask):
    """(B, q tiles, kv tiles): EMPTY / PARTIAL / FULL, from the forward tables; and the same from the
    backward (transposed) tables, which must agree."""
    partial = _dense_table(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = _dense_table(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    assert not (partial & full).any(), "a tile is both partial and full"
    forward = partial + 2 * full
    partial_t = _dense_table(block_mask.q_num_blocks, block_mask.q_indices)
    full_t = _dense_table(block_mask.full_q_num_blocks, block_mask.full_q_indices)
    assert torch.equal(forward, (partial_t + 2 * full_t).transpose(-1, -2)), "backward tables disagree"
    return forward


def reference(mask_mod, batch, q_len, kv_len, block_size):
    return create_block_mask(mask_mod, batch, None, q_len, kv_len, device="cpu", BLOCK_SIZE=block_size)


TABLES = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
          "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


def compare(case, ours, theirs):
    """Asserts the claims of the module docstring; returns (truly empty tiles left partial, empty tiles)."""
    assert tuple(ours.shape) == tuple(theirs.shape) and ours.BLOCK_SIZE == theirs.BLOCK_SIZE, case
    mine, truth = labels(ours), labels(theirs)
    assert torch.equal(mine == FULL, truth == FULL), f"{case}: FULL differs at {(mine != truth).nonzero()[:5]}"
    wrong = ((mine == EMPTY) & (truth != EMPTY)).nonzero()
    assert not len(wrong), f"{case}: skipped tiles that hold allowed entries at {wrong[:5].tolist()}"
    for name in TABLES:  # the kernels read the tables as contiguous rows, whatever their strides say
        assert getattr(ours, name).is_contiguous(), f"{case}: {name} is not contiguous"
    if case["window"] is None and not case["documents"]:
        for name in TABLES:
            assert torch.equal(getattr(ours, name), getattr(theirs, name)), f"{case}: {name} differs"
    return int(((mine == PARTIAL) & (truth == EMPTY)).sum()), int((truth == EMPTY).sum())


def build_both(case):
    positions, documents, layout = make_batch(case["seed"], case["batch"], case["n"], case["m"], case["pads"],
                                              case["documents"], case["natural"], case["pad_predicted"])
    n, m, size = case["n"], case["m"], case["block_size"]
    content, query = make_two_stream_block_masks(positions, n, m, window_spec(case["window"]), document_ids=documents,
                                                 layout=layout, block_size=size)
    batch = positions.shape[0]
    pairs = [(content, reference(content.mask_mod, batch, n + m, n + m, size))]
    if m:
        pairs.append((query, reference(query.mask_mod, batch, m, n + m, size)))
    else:
        assert query is None
    return positions, documents, layout, pairs


# ------------------------------------------------------------------------------ classification


def test_random_cases_match_create_block_mask():
    leftover, empties, exact_cases = 0, 0, 0
    for seed in range(60):
        case = dict(random_case(seed), seed=seed)
        for ours, theirs in build_both(case)[3]:
            extra, empty = compare(case, ours, theirs)
            leftover, empties = leftover + extra, empties + empty
        exact_cases += case["window"] is None and not case["documents"]
    print(f"truly empty tiles left partial: {leftover} of {empties}; {exact_cases} cases compared table by table")
    assert exact_cases >= 20 and empties > 150
    # Tiles of 8-32 and windows of 1-3 are where the extremes interleave most: measured 16 of 245 (6.5%),
    # all with a window. At 128-tiles in natural order none: test_realistic_shapes_are_classified_exactly.
    assert leftover <= 0.1 * empties


# Realistic shapes, 128-tiles: natural order (as the model runs sparse patterns) and the permuted layout.
REALISTIC = [
    dict(batch=2, n=900, m=135, pads=40, documents=0, natural=False, pad_predicted=False, window=None),
    dict(batch=2, n=900, m=135, pads=40, documents=0, natural=True, pad_predicted=False, window=None),
    dict(batch=2, n=900, m=135, pads=40, documents=0, natural=True, pad_predicted=False, window=64),
    dict(batch=1, n=1700, m=255, pads=0, documents=0, natural=True, pad_predicted=False, window=256),
    dict(batch=2, n=900, m=135, pads=40, documents=5, natural=True, pad_predicted=False, window=None),
    dict(batch=2, n=900, m=135, pads=40, documents=5, natural=True, pad_predicted=False, window=100),
    dict(batch=2, n=1000, m=0, pads=100, documents=0, natural=True, pad_predicted=False, window=128),
    dict(batch=2, n=1000, m=0, pads=100, documents=6, natural=True, pad_predicted=False, window=None),
]


@pytest.mark.parametrize("case", REALISTIC, ids=lambda c: f"n{c['n']}-m{c['m']}-w{c['window']}-d{c['documents']}"
                                                          f"-{'natural' if c['natural'] else 'permuted'}")
def test_realistic_shapes_are_classified_exactly(case):
    case = dict(case, seed=7, block_size=(128, 128))
    for ours, theirs in build_both(case)[3]:
        extra, _ = compare(case, ours, theirs)
        assert extra == 0, f"{case}: {extra} empty tiles left partial"


def test_what_the_kernel_computes_equals_the_dense_mask():
    """Full tiles unmasked, partial tiles through the mask_mod, empty tiles skipped: that entry-level mask
    must be the dense backend's materialised mask."""
    for seed in range(12):
        case = dict(random_case(100 + seed), seed=seed)
        positions, documents, layout, pairs = build_both(case)
        n, m = case["n"], case["m"]
        pattern = as_pattern(None, case["window"])
        allowed = make_dense_attention_state(positions, n, m, torch.zeros(2, 3), 1, pattern=pattern,
                                             document_ids=documents, layout=layout).allowed[:, 0]
        for (ours, _), rows in zip(pairs, (slice(0, n + m), slice(n + m, n + 2 * m))):
            q_len, kv_len = ours.seq_lengths
            bq, bk = ours.BLOCK_SIZE
            tile = labels(ours).repeat_interleave(bq, 1).repeat_interleave(bk, 2)[:, :q_len, :kv_len]
            entries = create_mask(ours.mask_mod, positions.shape[0], 1, q_len, kv_len, device="cpu")[:, 0]
            computed = (tile == FULL) | ((tile == PARTIAL) & entries)
            assert torch.equal(computed, allowed[:, rows]), case


@pytest.mark.parametrize("pattern,documents", [({}, 0), (dict(sliding_window_size=4, attention_pattern="alibi"), 2)])
def test_flex_outputs_with_our_block_masks_equal_the_dense_backend(pattern, documents):
    dense = make_model(seed=5, num_hidden_layers=1, **pattern)
    flex = with_backend(dense, True).eval()
    n, m = 30, 5
    positions, docs, _ = make_batch(11, 3, n, m, pads=5, documents=documents)
    positions, docs = positions[:, :n], None if docs is None else docs[:, :n]
    ids = torch.randint(5, 60, (3, n), generator=torch.Generator().manual_seed(3))
    mask = (positions >= 0).long()
    with torch.no_grad():
        expected = dense(ids, positions.clamp(min=0), m, attention_mask=mask, document_ids=docs)
        got = flex(ids, positions.clamp(min=0), m, attention_mask=mask, document_ids=docs)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


# ------------------------------------------------------------------------------- patterns


def test_which_patterns_the_summaries_cover():
    assert summarised_window(as_pattern(None)) == (True, None)
    assert summarised_window(as_pattern(None, 8)) == (True, 8)
    assert summarised_window(as_pattern("window:8,softcap:30,alibi")) == (True, 8)
    assert summarised_window(as_pattern("neighbourhood:5", 9)) == (True, 5)
    for spec in ["block:8", "window:8,dilated:2:2", "global:4", "swin:4", "prefix:3"]:
        assert summarised_window(as_pattern(spec))[0] is False, spec
    # a pattern built by hand, its mask not written in its spec: never taken for "no mask"
    assert summarised_window(AttentionPattern(masks=(lambda q, k, layer: within_window(q, k, 3),)))[0] is False


@pytest.mark.parametrize("spec", ["block:8", "swin:6", "dilated:3:2,softcap:5"])
def test_other_patterns_fall_back_to_create_block_mask(spec):
    n, m = 40, 6
    positions, _, layout = make_batch(3, 2, n, m, pads=4, natural=True)
    for layer in (0, 1):
        ours = make_two_stream_block_masks(positions, n, m, pattern=spec, layout=layout, layer=layer)
        pattern = as_pattern(spec)
        mods = two_stream_mask_mods(positions, n, m, pattern, None, layer, layout)
        for mine, mod, q_len in zip(ours, mods, (n + m, m)):
            theirs = reference(mod, 2, q_len, n + m, 128)
            for name in TABLES:
                assert torch.equal(getattr(mine, name), getattr(theirs, name)), (spec, layer, name)


# --------------------------------------------------------------------------------- tile counts


def test_tile_counts():
    # single stream, natural order, n = 512, window 64: three diagonals of 4 x 4 tiles
    content, query = make_two_stream_block_masks(torch.arange(512)[None], 512, 0, "window:64")
    assert query is None and tile_counts(content) == (10, 16)
    # the full two-stream masks at L = 512 (BlockMask.sparsity() reads -18% and -81% there)
    n, m = 444, 34
    positions, _, _ = make_batch(0, 3, n, m)
    content, query = make_two_stream_block_masks(positions, n, m)
    q_tiles = math.ceil((n + m) / 128)
    assert content.sparsity() < 0 and query.sparsity() < 0
    assert tile_counts(content) == (int((labels(content) != EMPTY).sum()), 3 * q_tiles * q_tiles)
    assert tile_counts(query) == (int((labels(query) != EMPTY).sum()), 3 * 1 * q_tiles)
    computed, total = tile_counts(query)
    assert 0 < computed <= total
    # a mask built by torch, with heads
    causal = create_block_mask(lambda b, h, q, k: q >= k, 2, 3, 300, 200, device="cpu", BLOCK_SIZE=64)
    assert tile_counts(causal) == (2 * 3 * sum(min(q + 1, 4) for q in range(5)), 2 * 3 * 5 * 4)


# ----------------------------------------------------------------------------------------- GPU

FP32_REL = 1e-4  # tests/modeling/test_gpu_backends.py's fp32 parity tolerance


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [True, False], ids=["graph", "eager"])
def test_building_never_waits_for_the_gpu(monkeypatch, graphs):
    monkeypatch.setattr(block_masks, "USE_CUDA_GRAPHS", graphs)
    device = torch.device("cuda")
    n, m = 300, 45
    positions, docs, layout = (t.to(device) for t in make_batch(21, 2, n, m, pads=20, documents=3, natural=True))
    make_two_stream_block_masks(positions, n, m, "window:32", document_ids=docs, layout=layout)  # shape cached / captured
    make_two_stream_block_masks(positions, n, m)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        make_two_stream_block_masks(positions, n, m, "window:32", document_ids=docs, layout=layout)
        make_two_stream_block_masks(positions, n, m)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_graph_replays_give_the_eager_tables_and_leave_earlier_masks_alone(monkeypatch):
    device = torch.device("cuda")
    for case in [dict(random_case(seed), seed=seed) for seed in range(6)] + [dict(REALISTIC[5], seed=3, block_size=128)]:
        n, m, size = case["n"], case["m"], case["block_size"]
        batches = [[None if t is None else t.to(device) for t in make_batch(
            case["seed"] + k, case["batch"], n, m, case["pads"], case["documents"], case["natural"],
            case["pad_predicted"])] for k in range(3)]

        def build(batch, graphs):
            monkeypatch.setattr(block_masks, "USE_CUDA_GRAPHS", graphs)
            positions, docs, layout = batch
            return make_two_stream_block_masks(positions, n, m, window_spec(case["window"]), document_ids=docs, layout=layout,
                                               block_size=size)
        replayed = [build(batch, True) for batch in batches]  # the first captures, the others replay
        for batch, masks in zip(batches, replayed):
            for mine, eager in zip(masks, build(batch, False)):
                if mine is None:
                    assert eager is None
                    continue
                for name in TABLES:
                    assert torch.equal(getattr(mine, name), getattr(eager, name)), (case, name)
        positions, docs, layout = batches[-1]
        content_mod = two_stream_mask_mods(positions, n, m, as_pattern(None, case["window"]), docs, 0, layout)[0]
        truth = create_block_mask(content_mod, positions.shape[0], None, n + m, n + m, device=device, BLOCK_SIZE=size)
        compare(case, replayed[-1][0], truth)


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [True, False], ids=["graph", "eager"])
@pytest.mark.parametrize("window,documents", [(None, 0), (32, 3)])
def test_compiled_kernel_with_our_block_masks_matches_dense_on_gpu(monkeypatch, window, documents, graphs):
    """The compiled kernel reads the tables: fp32 forward and gradients against the dense backend."""
    monkeypatch.setattr(block_masks, "USE_CUDA_GRAPHS", graphs)
    device = torch.device("cuda")
    n, m = 300, 45
    positions, docs, _ = make_batch(22, 2, n, m, pads=20, documents=documents)
    positions, docs = positions[:, :n].to(device), None if docs is None else docs[:, :n].to(device)
    ids = torch.randint(5, 60, (2, n), generator=torch.Generator().manual_seed(4)).to(device)
    mask = (positions >= 0).long()
    dense = make_model(seed=9, sliding_window_size=window, hidden_size=128).to(device).train()
    flex = with_backend(dense, True).to(device).train()
    old = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        results = []
        for model in (dense, flex):
            model.zero_grad(set_to_none=True)
            logits = model(ids, positions.clamp(min=0), m, attention_mask=mask, document_ids=docs)
            weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5)).to(device)
            (logits * weights).sum().backward()
            results.append((logits.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()
                                              if p.grad is not None}))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old[0]
        torch.set_float32_matmul_precision(old[1])
    (out_d, grads_d), (out_f, grads_f) = results
    assert ((out_f - out_d).norm() / out_d.norm()).item() <= FP32_REL
    assert grads_d.keys() == grads_f.keys()
    for name, grad in grads_d.items():
        if name.endswith("attention.attn.k.bias"):
            continue  # zero in exact arithmetic (softmax is shift-invariant): no relative error to speak of
        err = ((grads_f[name] - grad).norm() / grad.norm()).item()
        assert err <= FP32_REL, f"{name}: relative error {err:.2e}"
