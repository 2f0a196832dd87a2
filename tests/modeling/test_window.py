"""Sliding window, black box: one layer, window w on ORIGINAL positions, both backends.

With a single layer the receptive field is exactly the attention pattern, so:
- single stream: the encoding at position q depends on the token at p iff |p - q| <= w;
- two stream: the rank-i query output depends on the input token at index t iff t is visible to it
  (a context token, or a predicted token of rank < i) AND its original position is within w of the
  predicted token's original position; in particular never on tokens farther than w away, whatever
  their place in the permuted order.
"Does not depend" is checked to 1e-6 (bit-identical in practice), "depends" by more than 1e-3.
All perturbations are rows of one batch: row 0 is the base, row 1 + t perturbs entry t.
"""
from __future__ import annotations

import pytest
import torch

from helpers import generator, make_model, ordinary_ids, other_id, pretraining_batch

SAME = 1e-6
CHANGED = 1e-3


def _perturb_each(ids):
    """(1, n) -> (n + 1, n): row 0 unchanged, row 1 + t with entry t replaced."""
    n = ids.shape[1]
    rows = ids.repeat(n + 1, 1)
    for t in range(n):
        rows[1 + t, t] = other_id(rows[1 + t, t], shift=5)
    return rows


@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("flex", [False, True], ids=["dense", "flex"])
def test_encoding_depends_on_exactly_the_window(flex, window):
    n = 20
    model = make_model(seed=41, flex=flex, num_hidden_layers=1, sliding_window_size=window)
    rows = _perturb_each(ordinary_ids(generator(window), (1, n)))
    with torch.no_grad():
        hidden = model.encode(rows)  # (n + 1, n, H)
    diff = (hidden[1:] - hidden[:1]).abs().amax(-1)  # diff[p, q]: change at q when token p changes
    p, q = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    inside = (p - q).abs() <= window
    assert diff[~inside].max() <= SAME, f"outside the window: max change {diff[~inside].max():.3g}"
    assert diff[inside].min() > CHANGED, f"inside the window: min change {diff[inside].min():.3g}"


@pytest.mark.parametrize("window", [2, 5])
@pytest.mark.parametrize("flex", [False, True], ids=["dense", "flex"])
def test_two_stream_query_depends_on_visible_tokens_within_window_only(flex, window):
    n, m = 24, 6
    model = make_model(seed=43, flex=flex, num_hidden_layers=1, sliding_window_size=window)
    ids, positions, mask = pretraining_batch(generator(window), n, m, (0,))
    rows = _perturb_each(ids)
    with torch.no_grad():
        logits = model(rows, positions.repeat(n + 1, 1), m, attention_mask=mask.repeat(n + 1, 1))
    diff = (logits[1:] - logits[:1]).abs().amax(-1)  # diff[t, i]: change of rank i when entry t changes
    pos = positions[0]
    expected = torch.zeros(n, m, dtype=torch.bool)
    for t in range(n):
        for i in range(m):
            visible = t < n - m or (t - (n - m)) < i
            expected[t, i] = visible and abs(int(pos[t]) - int(pos[n - m + i])) <= window
    far = (pos[:, None] - pos[None, n - m:]).abs() > window  # (t, i): farther than w in the sentence
    assert far.any() and expected.any() and (~expected & ~far).any()  # the case exercises all kinds
    assert diff[far].max() <= SAME, "a query depends on a token farther than the window"
    assert diff[~expected].max() <= SAME
    assert diff[expected].min() > CHANGED
