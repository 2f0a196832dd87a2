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
mirror the dense and flex backends' interfaces (backends.ATTENTION_BACKENDS registers them as
"triton"), except that the state takes the (buckets, heads) table itself rather than
`relative_bias_by_distance(table)`: the gradient is reduced per bucket, which the per-distance view
cannot carry.

Under torch.compile (`training.compile=true`, `finetune-mpnet --compile`) the plan is traced with the
model and the kernels appear in the graph as two opaque torch.library ops,
`mpnet::triton_attention_forward` / `_backward`, with fake implementations for their shapes and their
autograd registered; eager calls use an autograd.Function over the same launchers (less host time per
call). On the H200 the compiled mpnet-base pretraining step took 49.4 ms with CUDA graphs against
79.9 ms eager (docs/bench/benchmark.md).

Where: this module holds the backend's module interface (state, module, the patterns it supports);
triton_plan.py the rules as integers, the plan and the bias tables; triton_launch.py the tiles, the
launchers, the autograd and the torch.library ops; triton_kernels.py the kernels; triton_internals.py
the triton package as the kernels use it, with every private Triton API they reach.

Kernels run compiled on CUDA. Without a GPU, and with TRITON_INTERPRET=1 set, they run in Triton's
interpreter on CPU tensors: exact, very slow, meant for tests at small shapes (without the variable a
CPU-only machine gets a one-line error instead).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import UserError
from .masks import stream_lengths
from .patterns import WINDOW_NAMES, AttentionPattern, as_pattern
from .projections import AttentionProjections
from .triton_launch import triton_two_stream_attention
from .triton_plan import TritonAttentionPlan, bucket_tables, log2_bias_by_index, make_triton_attention_plan


class UnsupportedTritonPattern(UserError):
    """The Triton backend implements the MPNet rules, a sliding window and document isolation only."""


def supported_window(pattern: str | AttentionPattern | None = None) -> int | None:
    """The sliding window a pattern asks for (None: none). Anything beyond windows raises: the kernels
    implement the MPNet rules, padding, one window on original positions and document isolation."""
    pattern = as_pattern(pattern)
    if pattern.scores or not pattern.masks_are_windows:
        beyond = ", ".join(pattern.parts_outside(WINDOW_NAMES)) or "a mask outside a spec"
        raise UnsupportedTritonPattern(
            f"the Triton attention backend supports sliding windows (window:W) and document isolation only, "
            f"not '{beyond}'; use the flex or dense backend for attention pattern '{pattern.spec}'")
    return pattern.window


# ---------------------------------------------------------------------- the backend's module interface


@dataclass
class TritonAttentionState:
    plan: TritonAttentionPlan
    relative_bias_table: torch.Tensor  # (num_buckets, heads)
    max_distance: int
    kv_len: int
    bias_by_index: torch.Tensor  # the table as the kernels read it, built once per forward for every layer
    buckets: torch.Tensor  # bucket_tables: the buckets by distance and their ranges, likewise
    plan_for_rows: Callable[[slice], TritonAttentionPlan]  # the plan of a subset of query rows (the last layer's)


def make_triton_attention_state(positions, n, m, relative_bias_table, max_distance, pattern=None, *, document_ids=None,
                                layer=0, layout=None, streams="mpnet"):
    """Like make_dense/flex_attention_state, but given the (buckets, heads) table itself."""
    make_plan = functools.partial(make_triton_attention_plan, positions, n, m, window=supported_window(pattern),
                                  document_ids=document_ids, layout=layout, streams=streams)
    return TritonAttentionState(make_plan(), relative_bias_table, max_distance, stream_lengths(n, m, streams)[0],
                                log2_bias_by_index(relative_bias_table, max_distance),
                                bucket_tables(relative_bias_table.shape[0], max_distance, positions.device),
                                lambda rows: make_plan(query_rows=rows))


class TritonTwoStreamAttention(AttentionProjections):
    """Triton backend: both streams in one kernel call per layer; no attention-probability dropout
    (`attention_probs_dropout_prob` is not applied, as with FlexAttention)."""

    computes_row_subset = True  # forward(..., first_row): a plan for the query rows from first_row on

    def forward(self, hidden, state: TritonAttentionState, first_row: int = 0):
        q, k, v = self.project(hidden, state.kv_len, first_row)
        plan = state.plan_for_rows(slice(first_row, None)) if first_row else state.plan
        context = triton_two_stream_attention(q, k, v, state.relative_bias_table, plan,
                                              max_distance=state.max_distance, bias_by_index=state.bias_by_index,
                                              buckets=state.buckets)
        return self.merge(context)

