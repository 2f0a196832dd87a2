"""No leakage, black box: what the rank-i prediction may and may not depend on.

Through any number of layers (3 here), for both backends: changing the predicted token of rank j
(input id at index n - m + j) changes the rank-i query logits iff j < i. Unchanged means within 1e-6
(in practice bit-identical: hidden entries get exactly zero attention weight); changed means by more
than 1e-3 (with these random weights a visible change moves the logits by ~0.1 or more). Also, for
both streams: changing the id (and the given position) of a padding entry, kept padding through
attention_mask 0, changes no real output.

All perturbations are rows of one batch: row 0 is the base, row 1 + t perturbs entry t.
"""
from __future__ import annotations

import pytest
import torch

from helpers import encoding_batch, generator, make_model, other_id, pretraining_batch

SAME = 1e-6
CHANGED = 1e-3
N, M = 18, 6
LAYERS = 3


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "flex"])
def model(request):
    return make_model(seed=31, flex=request.param, num_hidden_layers=LAYERS)


def _perturbed_rows(ids, positions, mask, indices):
    """Row 0: the base; row 1 + a: the base with entry indices[a] replaced by another ordinary id."""
    rows = ids.repeat(len(indices) + 1, 1)
    for a, t in enumerate(indices):
        rows[1 + a, t] = other_id(rows[1 + a, t], shift=7)
    return rows, positions.repeat(len(indices) + 1, 1), mask.repeat(len(indices) + 1, 1)


def test_rank_i_sees_predicted_tokens_of_rank_below_i_only(model):
    ids, positions, mask = pretraining_batch(generator(1), N, M, (0,))
    predicted = list(range(N - M, N))
    rows, pos, msk = _perturbed_rows(ids, positions, mask, predicted)
    with torch.no_grad():
        logits = model(rows, pos, M, attention_mask=msk)  # (M + 1, M, V)
    base = logits[0]
    for j in range(M):
        for i in range(M):
            diff = (logits[1 + j, i] - base[i]).abs().max().item()
            if j >= i:
                assert diff <= SAME, f"rank {i} changed by {diff:.3g} when the predicted token of rank {j} changed"
            else:
                assert diff > CHANGED, f"rank {i} ignores the predicted token of rank {j} (diff {diff:.3g})"


def test_every_rank_sees_every_context_token(model):
    """The control: the test above would notice a dependence (context tokens are visible to all ranks)."""
    ids, positions, mask = pretraining_batch(generator(2), N, M, (0,))
    context = list(range(N - M))
    rows, pos, msk = _perturbed_rows(ids, positions, mask, context)
    with torch.no_grad():
        logits = model(rows, pos, M, attention_mask=msk)
    diffs = (logits[1:] - logits[:1]).abs().amax(-1)  # (context, M)
    assert diffs.min() > CHANGED, diffs


def test_position_compensation_does_not_leak_identity(model):
    """The rank-i query knows every predicted POSITION but no predicted TOKEN of rank >= i: swapping the
    ids of the last two predicted tokens changes only the last rank."""
    ids, positions, mask = pretraining_batch(generator(3), N, M, (0,))
    swapped = ids.clone()
    swapped[0, N - 2], swapped[0, N - 1] = ids[0, N - 1], ids[0, N - 2]
    assert swapped[0, N - 2] != ids[0, N - 2]
    with torch.no_grad():
        a = model(ids, positions, M, attention_mask=mask)
        b = model(swapped, positions, M, attention_mask=mask)
    assert (a[0, : M - 1] - b[0, : M - 1]).abs().max() <= SAME
    assert (a[0, M - 1] - b[0, M - 1]).abs().max() > CHANGED


def test_padding_changes_nothing_in_two_stream(model):
    pads = (0, 4, 7)
    ids, positions, mask = pretraining_batch(generator(4), N, M, pads)
    changed_ids, changed_pos = ids.clone(), positions.clone()
    padding = mask == 0
    assert padding.sum() == sum(pads)
    changed_ids[padding] = torch.randint(3, 60, (int(padding.sum()),), generator=generator(9))
    changed_pos[padding] = torch.randint(0, N, (int(padding.sum()),), generator=generator(10))
    with torch.no_grad():
        a = model(ids, positions, M, attention_mask=mask)
        b = model(changed_ids, changed_pos, M, attention_mask=mask)
        c = model(ids, positions, M)  # padding from pad ids alone gives the same
    assert torch.isfinite(a).all()
    assert (a - b).abs().max() <= SAME
    assert (a - c).abs().max() <= SAME


def test_padding_changes_nothing_in_single_stream(model):
    lengths = (16, 11, 3)
    ids, mask = encoding_batch(generator(5), 16, lengths)
    changed = ids.clone()
    padding = mask == 0
    changed[padding] = torch.randint(3, 60, (int(padding.sum()),), generator=generator(11))
    real = mask.bool()
    with torch.no_grad():
        a = model.encode(ids, attention_mask=mask)
        b = model.encode(changed, attention_mask=mask)
        alone = model.encode(ids[2:3, :3])  # the short row without any padding
    assert (a[real] - b[real]).abs().max() <= SAME
    assert (a[2, :3] - alone[0]).abs().max() <= 1e-5
