"""Two-stream self-attention: the dense reference and the FlexAttention backend (the Triton one: triton_attention.py).

Both modules own the same four projections (`q`, `k`, `v`, `o`, HF's names), take the stacked hidden
states of one layer, shape (B, n + 2m, H) laid out as in `masks.py`, and return the same shape. Keys
and values always come from the content stream (the first n + m rows). Per forward pass the encoder
prepares one attention "state" (masks and relative bias) with the backend's state builder
(its entry in backends.py) and hands it to every layer:

- dense (`make_dense_attention_state`): a materialised (B, 1, n+2m, n+m) mask and (B, H, n+2m, n+m)
  bias, as the original implementation did;
- flex (`make_flex_attention_state`): two BlockMasks (content n+m x n+m, query m x n+m) from
  `block_masks.make_two_stream_block_masks` and score_mods that gather the bias in-kernel from position lookups.

The sizes are those of the MPNet layout; `streams="plm"` (the permuted-LM objective) drops the MASK
section: content n x n, query m x n, rows n + m (`masks.stream_lengths`).

Both compose the same rules: `two_stream_visible & is_real_token & pattern.visible` for the mask
(`permuted_lm_visible` in place of the first for plm)
(an attention pattern from patterns.py, the sliding window among them, plus document isolation
when `document_ids` are given) and relative bias, then the pattern's score mods, for the scores.
A pattern that alternates by layer (swin) gets one state per layer parity: two per forward, at most.

Switching backends never changes parameters or checkpoints.
"""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ..errors import UserError
from .block_masks import kernel_ints, make_two_stream_block_masks
from .masks import STREAM_RULES, distance_index, is_real_token, relative_bias_by_distance, stream_lengths
from .patterns import as_pattern
from .projections import AttentionProjections


class FlexAttentionUnavailable(UserError):
    """Raised when the flex backend is asked to do what this PyTorch build cannot (CPU backward)."""


CPU_TRAINING_MESSAGE = (
    "FlexAttention has no backward pass on CPU in PyTorch, so the flex backend cannot train (or run with "
    "gradients) on CPU; train on a CUDA GPU, or drop --use-flex-attention to use the dense backend "
    "(a checkpoint trained with either backend runs under both; on CPU, flex inference works under torch.no_grad())."
)


def _compile_on(device: torch.device) -> bool:
    # On CUDA the compiled kernel is the whole point. On CPU flex only serves inference and tests:
    # the eager path computes the same function without ~20 s of compilation per shape.
    return device.type == "cuda" or os.environ.get("MPNET_COMPILE_FLEX_CPU") == "1"


# Inductor's default tiles for this kernel (head_dim 64, with the position lookups of our mask_mod /
# score_mod) ask for 242 KB of shared memory on an H200, over its 227 KB limit, and fail to compile.
# These tiles fit. They change speed only, never the result. Measured on an H200 (bf16, L = 512, one
# content+query pair fwd+bwd, `benchmark-mpnet attention --flex-kernel-options ...`): backward tiles
# 32x64 / 64x32 (dK/dV pass, dQ pass) 6.74 ms, 64x64 / 64x64 6.47 ms, 32x128 / 128x32 5.55 ms, the
# last with num_warps 8 7.55 ms; forward 128x64 instead of 64x64 9.0 ms. fp32 (the GPU parity tests)
# keeps the smaller backward tiles: its tiles take twice the shared memory.
CUDA_KERNEL_OPTIONS = {
    torch.float32: {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32,
                    "num_stages": 1},
    torch.bfloat16: {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 128, "BLOCK_M2": 128, "BLOCK_N2": 32,
                     "num_stages": 1},
}
CUDA_KERNEL_OPTIONS[torch.float16] = CUDA_KERNEL_OPTIONS[torch.bfloat16]


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


def run_flex_attention(q, k, v, score_mod, block_mask):
    if _compile_on(q.device):
        options = CUDA_KERNEL_OPTIONS.get(q.dtype, CUDA_KERNEL_OPTIONS[torch.float32]) if q.device.type == "cuda" else None
        return _compiled_flex_attention()(q, k, v, score_mod=score_mod, block_mask=block_mask, kernel_options=options)
    with warnings.catch_warnings():  # the unfused CPU path is chosen on purpose (see _compile_on)
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)


# ----------------------------------------------------------------------------------------- dense


@dataclass
class DenseAttentionState:
    allowed: torch.Tensor  # (B, 1, n+2m, n+m) bool, True = may attend
    bias: torch.Tensor  # (B, H, n+2m, n+m) float32
    kv_len: int
    score_mod: Callable | None = None  # the pattern's score mods on (B, H, n+2m, n+m) scores


def make_dense_attention_state(positions, n, m, distance_bias, max_distance, pattern=None, *, document_ids=None, layer=0,
                               layout=None, streams="mpnet"):
    """Materialise mask and bias for every (row, key) pair from the rules in masks.py and patterns.py.

    pattern: a spec ('block:64,softcap:30') or parsed pattern; `window` is shorthand for window:N.
    document_ids: (B, n + 2m) like positions, or None. layer: the layer parity the state is for.
    streams: the two-stream layout, "mpnet" or "plm" (masks.STREAM_RULES).
    """
    pattern = as_pattern(pattern)
    kv_len, total_rows = stream_lengths(n, m, streams)
    rows = torch.arange(total_rows, device=positions.device)[None] if layout is None else layout
    q_idx, kv_idx = rows[:, :, None], rows[:, None, :kv_len]  # layout slots (see masks.natural_order)
    q_pos = positions[:, :, None]
    kv_pos = positions[:, None, :kv_len]
    q_doc = kv_doc = None
    if document_ids is not None:
        q_doc, kv_doc = document_ids[:, :, None], document_ids[:, None, :kv_len]
    allowed = (STREAM_RULES[streams](q_idx, kv_idx, n, m) & is_real_token(kv_pos)
               & pattern.visible(q_pos, kv_pos, layer, q_doc, kv_doc))
    score_mod = None
    if pattern.scores:
        heads = torch.arange(distance_bias.shape[0], device=positions.device)[None, :, None, None]
        score_mod = functools.partial(pattern.modify_score, head=heads, q_position=q_pos[:, None],
                                      kv_position=kv_pos[:, None], num_heads=distance_bias.shape[0])
    # An embedding lookup, not advanced indexing: its backward reduces the millions of repeated
    # indices by sorting instead of atomics into 12 x 257 slots (383 ms -> a few ms at L=512 on H200).
    bias = F.embedding(distance_index(q_pos, kv_pos, max_distance), distance_bias.t())  # (B, Lq, Lk, H)
    return DenseAttentionState(allowed[:, None], bias.permute(0, 3, 1, 2).float(), kv_len, score_mod)


class RelativeMultiHeadAttention(AttentionProjections):
    """Dense reference: scores materialised, scaled, biased, masked and softmaxed in float32."""

    computes_row_subset = True  # forward(..., first_row): the query rows from first_row on

    def __init__(self, config):
        super().__init__(config)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def forward(self, hidden, state: DenseAttentionState, first_row: int = 0):
        if first_row and state.score_mod is not None:  # score mods see whole score matrices: every row
            return self.forward(hidden, state)[:, first_row:]
        q, k, v = self.project(hidden, state.kv_len, first_row)
        allowed = state.allowed[:, :, first_row:]
        bias = state.bias[:, :, first_row:]
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.head_dim**-0.5 + bias
        if state.score_mod is not None:
            scores = state.score_mod(scores)
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        # A row that may see nothing outputs zeros (as FlexAttention does) instead of NaN.
        probs = torch.where(allowed.any(-1, keepdim=True), probs, 0.0)
        context = torch.matmul(self.dropout(probs).to(v.dtype), v)
        return self.merge(context)


# ------------------------------------------------------------------------------------------ flex


@dataclass
class FlexAttentionState:
    content_mask: BlockMask  # (n+m) x (n+m); plm: n x n
    query_mask: BlockMask | None  # m x (n+m), plm: m x n; None for single-stream encoding
    content_score_mod: object
    query_score_mod: object
    kv_len: int


# Gradients into a score_mod's captured tensor are atomic adds from the kernel. With one bias row per
# head, every score of a tile lands on a handful of addresses and the adds serialise (measured on an
# H200, bf16, L=2048: 392 ms fwd+bwd). Giving each query row of a 128-row tile its own copy of the
# table (q_idx % 128) spreads them out (22 ms); autograd then sums the copies back into the table.
BIAS_GRAD_REPLICAS = 128


def make_flex_attention_state(positions, n, m, distance_bias, max_distance, pattern=None, *, document_ids=None, layer=0,
                              layout=None, streams="mpnet", bias_copies=None):
    """bias_copies (Q, K): the score of (query row q, key k) reads table copy (q % Q) * K + k % K (default
    (BIAS_GRAD_REPLICAS, 1) when the table takes a gradient, else one copy); they change speed only."""
    pattern = as_pattern(pattern)
    content_mask, query_mask = make_two_stream_block_masks(positions, n, m, pattern=pattern, document_ids=document_ids,
                                                           layer=layer, layout=layout, streams=streams)
    query_offset, _ = stream_lengths(n, m, streams)
    num_heads = distance_bias.shape[0]
    row_copies, key_copies = bias_copies or ((BIAS_GRAD_REPLICAS, 1) if distance_bias.requires_grad else (1, 1))
    bias = distance_bias[:, None, :].expand(-1, row_copies * key_copies, -1).contiguous()
    positions = kernel_ints(positions)

    def copy_of(q_idx, kv_idx):
        return q_idx % row_copies if key_copies == 1 else (q_idx % row_copies) * key_copies + kv_idx % key_copies

    def content_score_mod(score, b, h, q_idx, kv_idx):
        q_pos, kv_pos = positions[b, q_idx], positions[b, kv_idx]
        score = score + bias[h, copy_of(q_idx, kv_idx), distance_index(q_pos, kv_pos, max_distance)]
        return pattern.modify_score(score, h, q_pos, kv_pos, num_heads)

    def query_score_mod(score, b, h, q_idx, kv_idx):
        return content_score_mod(score, b, h, q_idx + query_offset, kv_idx)

    return FlexAttentionState(content_mask, query_mask, content_score_mod, query_score_mod, query_offset)


class FlexTwoStreamAttention(AttentionProjections):
    """FlexAttention backend: one fused kernel per stream, masks as BlockMasks, bias as a score_mod.

    FlexAttention has no attention-probability dropout: `attention_probs_dropout_prob` is not applied
    by this backend (hidden-state dropout still is).
    """

    computes_row_subset = True  # forward(..., first_row): the query stream alone when first_row = kv_len

    def forward(self, hidden, state: FlexAttentionState, first_row: int = 0):
        if hidden.device.type == "cpu" and torch.is_grad_enabled() and hidden.requires_grad:
            raise FlexAttentionUnavailable(CPU_TRAINING_MESSAGE)
        kv_len = state.kv_len
        if first_row == kv_len and state.query_mask is not None:  # the last layer of mpnet / plm: queries only
            q, k, v = self.project(hidden, kv_len, first_row)
            return self.merge(run_flex_attention(q, k, v, state.query_score_mod, state.query_mask))
        q, k, v = self.project(hidden, kv_len)
        outputs = [run_flex_attention(q[:, :, :kv_len], k, v, state.content_score_mod, state.content_mask)]
        if state.query_mask is not None:
            outputs.append(run_flex_attention(q[:, :, kv_len:], k, v, state.query_score_mod, state.query_mask))
        return self.merge(torch.cat(outputs, dim=2))[:, first_row:]


# ------------------------------------------------------ the state builders of the registry (backends.py)


def _bias_by_distance(table, max_distance):
    return relative_bias_by_distance(table, max_distance, table.shape[0])


def dense_state(positions, n, m, relative_bias_table, max_distance, **rules):
    """The dense backend's state builder (backends.py): one state per forward (and layer parity)."""
    return make_dense_attention_state(positions, n, m, _bias_by_distance(relative_bias_table, max_distance),
                                      max_distance, **rules)


def flex_state(positions, n, m, relative_bias_table, max_distance, **rules):
    """The flex backend's state builder (backends.py), likewise."""
    return make_flex_attention_state(positions, n, m, _bias_by_distance(relative_bias_table, max_distance),
                                     max_distance, **rules)
