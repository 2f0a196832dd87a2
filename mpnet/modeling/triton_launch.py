"""Launching the Triton attention kernels (triton_attention.py's docstring first): tiles and launch
settings, the forward and backward launchers, the autograd.Function of eager calls and the two
torch.library ops torch.compile sees, and the checked entry point `triton_two_stream_attention`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import UserError
from .triton_internals import INTERPRET, triton
from .triton_kernels import LOG2E, _delta_kernel, _forward_kernel, _key_gradients_kernel, _query_gradients_kernel
from .triton_plan import TritonAttentionPlan, bucket_layout, bucket_slots, bucket_tables, log2_bias_by_index


class TritonAttentionUnavailable(UserError):
    """The Triton backend cannot run here (no triton package, CPU tensors without the interpreter)."""


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
    # bf16/fp16, head size 64, H200 (benchmark-mpnet attention --triton-tiles, one kernel's tiles
    # changed at a time): 4-warp tiles beat the largest spill-free 8-warp ones (128x64 / 32x128 /
    # 128x64) by 1.3x on the L=512 and 2048 pairs: more programs in flight, and the bias gather and the
    # masks are elementwise work that a larger tile does not amortise. Forward 64x128 was 0.48 / 1.30 ms
    # against 0.63 / 1.61 for 64x64 (L=512 / 2048); dQ with 3 stages 0.06 / 0.07 ms faster than 2.
    # The single stream's dK/dV (its NATURAL variant) gains from a third stage where the pair's loses
    # (--triton-tiles dkdv=32x64s2,default: single 128 0.203 -> 0.193 ms, single 512 0.470 -> 0.439;
    # pair 512 0.80 -> 0.90, pair 2048 1.92 -> 2.33); its other kernels' best tiles are the pair's.
    return KernelTiles(Tiles(64, 128, 4, 2), Tiles(32, 64, 4, 3 if single_stream else 2), Tiles(64, 32, 4, 3))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


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
    slots = bucket_slots(buckets.num_buckets)
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
