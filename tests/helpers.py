"""Shared utilities for the core-encoder tests (masks, backends, HF parity, no-leak, window, GPU).

Everything here is deterministic (explicit generators, no global RNG), tiny, and device-agnostic.
The weights are re-drawn with `randomize_` so that every parameter matters: LayerNorm weights are not
ones, biases are not zeros, attention scores are O(1) (so the score path, not only the bias, shapes
attention), and the relative-bias table is large enough to move the softmax. A wrong key mapping, a
swapped LayerNorm or a bias indexed with the wrong head therefore shows up as a large difference.
"""
from __future__ import annotations

import copy

import torch

from mpnet import MPNetConfig, MPNetForPretraining

VOCAB = 64
PAD_ID = 1  # MPNetConfig default pad_token_id
MASK_ID = VOCAB - 1
FIRST_ORDINARY_ID = 3  # 0 <s>, 1 <pad>, 2 </s>
# Ordinary (non-special) ids are FIRST_ORDINARY_ID .. MASK_ID - 1.

CTX, PRED, MASK, QUERY = "CTX", "PRED", "MASK", "QUERY"


# --------------------------------------------------------------------------------------- models


def tiny_config(**overrides) -> MPNetConfig:
    settings = dict(
        vocab_size=VOCAB,
        mask_token_id=MASK_ID,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        use_flex_attention=False,
        sliding_window_size=None,
    )
    settings.update(overrides)
    return MPNetConfig.tiny(**settings)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, std: float = 0.1, bias_std: float = 1.0) -> torch.nn.Module:
    """Re-draw every parameter (tied ones once) from a seeded generator; works for ours and HF's models."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        shape = param.shape
        if "relative_attention_bias" in name:
            value = bias_std * torch.randn(shape, generator=gen)
        elif name.endswith(("LayerNorm.weight", "layer_norm.weight")):
            value = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        elif name.endswith("bias"):
            value = 0.1 * torch.randn(shape, generator=gen)
        elif "embeddings" in name:
            value = 0.5 * torch.randn(shape, generator=gen)
        else:
            value = std * torch.randn(shape, generator=gen)
        param.copy_(value.to(param.dtype))
    return model


def make_model(seed: int = 0, flex: bool = False, **overrides) -> MPNetForPretraining:
    """A tiny MPNetForPretraining in eval mode with randomized weights (same seed -> same weights)."""
    config = tiny_config(use_flex_attention=flex, **overrides)
    return randomize_(MPNetForPretraining(config), seed).eval()


def with_backend(model: MPNetForPretraining, flex: bool, **overrides) -> MPNetForPretraining:
    """Same weights, other backend (and/or other config fields, e.g. sliding_window_size)."""
    config = copy.deepcopy(model.config)
    config.use_flex_attention = flex
    for key, value in overrides.items():
        setattr(config, key, value)
    other = MPNetForPretraining(config)
    other.load_state_dict(model.state_dict())
    other.tie_weights()
    return other.train(model.training)


# ---------------------------------------------------------------------------------------- data


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ordinary_ids(gen: torch.Generator, shape) -> torch.Tensor:
    return torch.randint(FIRST_ORDINARY_ID, MASK_ID, tuple(shape), generator=gen)


def other_id(token: int, shift: int = 1) -> int:
    """An ordinary id different from `token` (deterministic)."""
    span = MASK_ID - FIRST_ORDINARY_ID
    return FIRST_ORDINARY_ID + (int(token) - FIRST_ORDINARY_ID + shift) % span


def pretraining_batch(gen: torch.Generator, n: int, m: int, pad_counts=(0,)):
    """A two-stream batch as the model takes it (one row per entry of pad_counts).

    Row b has n - pad_counts[b] real tokens at original positions 0..n-pad-1, permuted; the last m
    entries of the permuted order are the predicted ones (always real tokens); the pad entries sit at
    random indices of the context part (never predicted), with id PAD_ID, attention_mask 0 and a
    garbage position (the model must ignore both).
    Returns input_ids (B, n), positions (B, n), attention_mask (B, n).
    """
    rows_ids, rows_pos, rows_mask = [], [], []
    for pad in pad_counts:
        real = n - pad
        assert real >= m, "predicted tokens must be real"
        order = torch.randperm(real, generator=gen)
        context, predicted = order[: real - m], order[real - m:]
        slots = torch.randperm(n - m, generator=gen)
        pad_slots = slots[:pad]
        ctx_pos = torch.empty(n - m, dtype=torch.long)
        ctx_real = torch.ones(n - m, dtype=torch.bool)
        ctx_real[pad_slots] = False
        ctx_pos[ctx_real] = context
        ctx_pos[~ctx_real] = torch.randint(0, n, (pad,), generator=gen)  # garbage, must be ignored
        positions = torch.cat([ctx_pos, predicted])
        mask = torch.cat([ctx_real, torch.ones(m, dtype=torch.bool)]).long()
        ids = ordinary_ids(gen, (n,))
        ids[mask == 0] = PAD_ID
        rows_ids.append(ids)
        rows_pos.append(positions)
        rows_mask.append(mask)
    return torch.stack(rows_ids), torch.stack(rows_pos), torch.stack(rows_mask)


def encoding_batch(gen: torch.Generator, n: int, lengths):
    """Right-padded single-stream batch: row b has lengths[b] real tokens, then PAD_ID.

    Returns input_ids (B, n), attention_mask (B, n).
    """
    ids = ordinary_ids(gen, (len(lengths), n))
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, length in enumerate(lengths):
        mask[b, :length] = 1
    ids[mask == 0] = PAD_ID
    return ids, mask


def stacked_positions(positions: torch.Tensor, attention_mask: torch.Tensor | None, n: int, m: int) -> torch.Tensor:
    """The (B, n + 2m) position layout the encoder sees: padding -1, then the predicted positions twice."""
    if attention_mask is not None:
        positions = torch.where(attention_mask.bool(), positions, -1)
    predicted = positions[:, n - m:]
    return torch.cat([positions, predicted, predicted], dim=1)


# ------------------------------------------------------------------- the rules, independently


def kind_and_rank(index: int, n: int, m: int):
    """Kind (CTX/PRED/MASK/QUERY) and rank of row `index` in the stacked two-stream layout."""
    c = n - m
    if index < c:
        return CTX, None
    if index < n:
        return PRED, index - c
    if index < n + m:
        return MASK, index - n
    return QUERY, index - n - m


def rule_visible(q: int, k: int, n: int, m: int) -> bool:
    """The two-stream rules of docs/ARCHITECTURE.md, written out case by case (True = may attend)."""
    q_kind, q_rank = kind_and_rank(q, n, m)
    k_kind, k_rank = kind_and_rank(k, n, m)
    assert k_kind != QUERY, "keys come from the content stream only"
    if k_kind == CTX:
        return True  # every row sees all context tokens
    if q_kind in (CTX, MASK):
        return k_kind == MASK  # no PRED, all MASK
    if q_kind == PRED:
        return k_rank <= q_rank if k_kind == PRED else k_rank > q_rank
    # QUERY of rank i: PRED j iff j < i, MASK j iff j >= i
    return k_rank < q_rank if k_kind == PRED else k_rank >= q_rank


def rule_mask(positions_row, n: int, m: int, window, rows: range, kv_len: int):
    """Brute-force boolean mask for one batch row: rules, padding keys never seen, window on positions."""
    pos = [int(p) for p in positions_row]
    out = torch.zeros(len(rows), kv_len, dtype=torch.bool)
    for a, q in enumerate(rows):
        for k in range(kv_len):
            keep = rule_visible(q, k, n, m) and pos[k] >= 0
            if keep and window is not None:
                keep = abs(pos[q] - pos[k]) <= window
            out[a, k] = keep
    return out


def original_two_stream_masks(a: int, b: int, kind: str = "MPLM"):
    """The original MPNet code's masks, transcribed block by block in pure Python (True = may attend).

    microsoft/MPNet, pretraining/fairseq/models/masked_permutation_net.py, make_query_and_content_mask(
    tensor, a, b, kind): a = n (the permuted tokens), b = m (the predicted ones). It builds 0/1 blocks
    (ones, torch.triu / torch.tril with diagonal 0, 1 - X) and returns `.eq(0)`, True = hidden; these are
    the 0/1 matrices before that step. Returns (content rows, query rows) as lists of lists of bools:
    kind 'MPLM' (MPNet): content (a + b) x (a + b), query b x (a + b); kind 'PLM': content a x a,
    query b x a. The original's compute_mlm passes no mask at all: every token sees every token.
    """
    def ones(rows, cols):
        return [[1] * cols for _ in range(rows)]

    def zeros(rows, cols):
        return [[0] * cols for _ in range(rows)]

    def triu(size):  # torch.triu(torch.ones(size, size), 0): 1 on and above the diagonal
        return [[1 if j >= i else 0 for j in range(size)] for i in range(size)]

    def tril(size):  # torch.tril(torch.ones(size, size), 0): 1 on and below the diagonal
        return [[1 if j <= i else 0 for j in range(size)] for i in range(size)]

    def one_minus(block):
        return [[1 - x for x in row] for row in block]

    def side_by_side(*blocks):  # torch.cat(..., dim=-1)
        return [sum(rows, []) for rows in zip(*blocks)]

    def stacked(*blocks):  # torch.cat(..., dim=0)
        return [row for block in blocks for row in block]

    if kind == "PLM":
        query = side_by_side(ones(b, a - b), one_minus(triu(b)))
        predicted_columns = stacked(zeros(a - b, b), tril(b))
        content = side_by_side(ones(a, a - b), predicted_columns)
    else:
        query = side_by_side(ones(b, a - b), one_minus(triu(b)), triu(b))
        predicted_columns = stacked(zeros(a - b, b), tril(b), zeros(b, b))
        content = side_by_side(ones(a + b, a - b), predicted_columns, one_minus(predicted_columns))
    as_bool = lambda block: [[bool(x) for x in row] for row in block]  # noqa: E731
    return as_bool(content), as_bool(query)


def original_rule_mask(positions_row, n: int, m: int, kind: str, window=None):
    """The original's masks for one batch row of the stacked layout (content rows, then query rows; all
    rows x content keys), with the project's additions: padding keys (position -1) never seen, and the
    window on original positions. kind: 'MPLM', 'PLM' or 'MLM' (single stream, no mask)."""
    if kind == "MLM":
        rows = [[True] * n for _ in range(n)]
    else:
        content, query = original_two_stream_masks(n, m, kind)
        rows = content + query
    pos = [int(p) for p in positions_row]
    out = torch.zeros(len(rows), len(rows[0]), dtype=torch.bool)
    for q, row in enumerate(rows):
        for k, visible in enumerate(row):
            keep = visible and pos[k] >= 0
            if keep and window is not None:
                keep = abs(pos[q] - pos[k]) <= window
            out[q, k] = keep
    return out


# --------------------------------------------------------------------------------- comparing


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, the norm-wise relative error."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def assert_mask_mod_matches(block_mask, expected, label, reference="the rules"):
    """The BlockMask's shape and its stored mask_mod, evaluated at every (b, q, kv) entry
    (create_mask), against the expected (B, Lq, Lkv) boolean mask."""
    from torch.nn.attention.flex_attention import create_mask

    batch, q_len, kv_len = expected.shape
    assert tuple(block_mask.shape) == (batch, 1, q_len, kv_len), label
    dense = create_mask(block_mask.mask_mod, batch, 1, q_len, kv_len, device="cpu")[:, 0]
    mismatch = (dense != expected).nonzero().tolist()
    assert not mismatch, f"{label}: mask_mod differs from {reference} at (b, q, kv) {mismatch[:5]}"


def compiled_target(fn) -> str:
    """What a torch.compile call compiles, by class name: a model, or a layer for its bound forward (the last
    layer's reaches torch.compile behind a function of its own, toolkit.behind_own_code: its __wrapped__)."""
    fn = getattr(fn, "__wrapped__", fn)
    return type(getattr(fn, "__self__", fn)).__name__
