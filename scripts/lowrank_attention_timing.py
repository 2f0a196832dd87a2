"""Time Linformer and Performer attention against SDPA, for the "do they belong here?" argument.

The FlexAttention-Examples repository lists Linformer and Performer beside the mask patterns.
docs/patterns.md explains why they are not masks (they mix keys, so the two-stream rules and padding cannot
be applied); this command supplies the speed half of the argument: single-stream attention core, forward + backward, the same
batch shapes as `benchmark-mpnet patterns` (tokens per batch fixed, 12 heads x 64), bf16.

    python scripts/lowrank_attention_timing.py                      # L = 1024, 4096, 16384 on the GPU
    python scripts/lowrank_attention_timing.py --lengths 256 --device cpu   # smoke run (forward + backward)

Linformer: keys and values projected along the sequence, n -> k rows (learned E, F of k x n, one pair
shared by the heads, as in the paper's "headwise sharing"). Performer: FAVOR+ positive random
features (m features, orthogonality not needed for timing), non-causal. Neither carries a relative
bias or a mask; compare them with the flex rows of docs/patterns.md (which do carry the bias).
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from mpnet.bench.harness import Timer


def linformer(q, k, v, E, Fp):
    """q, k, v: (B, H, n, d); E, Fp: (r, n). softmax(q (E k)^T / sqrt d) (F v)."""
    k_low = torch.einsum("rn,bhnd->bhrd", E, k)
    v_low = torch.einsum("rn,bhnd->bhrd", Fp, v)
    return F.scaled_dot_product_attention(q, k_low, v_low)


def performer(q, k, v, features):
    """FAVOR+ with positive features phi(x) = exp(w.x - |x|^2 / 2) / sqrt(m); features: (m, d)."""
    scale = q.shape[-1] ** -0.25

    def phi(x, stabiliser_dims):
        # the max subtracted for stability must be one constant per query row (cancels in the
        # normaliser) but one constant over ALL keys (a per-key one would reweight them)
        x = x * scale
        projected = x @ features.t()
        stabiliser = projected.amax(dim=stabiliser_dims, keepdim=True).detach()
        return torch.exp(projected - (x * x).sum(-1, keepdim=True) / 2 - stabiliser) / math.sqrt(features.shape[0])

    q_f, k_f = phi(q.float(), (-1,)), phi(k.float(), (-2, -1))
    kv = torch.einsum("bhnm,bhnd->bhmd", k_f, v.float())
    normaliser = torch.einsum("bhnm,bhm->bhn", q_f, k_f.sum(dim=2)).clamp_min(1e-6)
    return (torch.einsum("bhnm,bhmd->bhnd", q_f, kv) / normaliser[..., None]).to(q.dtype)


def time_ms(fn, device, repeats=10):
    """(median ms, peak GiB or None on CPU) by the benchmarks' own timer, after three warm-up runs."""
    for _ in range(3):
        fn()
    times, peak = Timer(device).measure(fn, repeats, max_seconds=60)
    return sorted(times)[len(times) // 2], peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,4096,16384", help="sequence lengths (default 1024,4096,16384)")
    parser.add_argument("--tokens-per-batch", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--rank", type=int, default=256, help="Linformer projected length k (default 256)")
    parser.add_argument("--features", type=int, default=256, help="Performer random features m (default 256)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"{dtype}, forward + backward, {args.heads} heads x {args.head_dim}, {args.tokens_per_batch} tokens per batch")
    print("| L | B | SDPA full (ceiling) ms | Linformer k=%d ms | Performer m=%d ms | peak GiB (SDPA / Lin / Perf) |"
          % (args.rank, args.features))
    print("|---|---|---|---|---|---|")
    for length in [int(x) for x in args.lengths.split(",")]:
        batch = max(1, args.tokens_per_batch // length)
        gen = torch.Generator().manual_seed(length)
        shape = (batch, args.heads, length, args.head_dim)
        q, k, v = (torch.randn(shape, generator=gen).to(device, dtype).requires_grad_() for _ in range(3))
        grad = torch.randn(shape, generator=gen).to(device, dtype)
        E, Fp = (torch.randn(args.rank, length, generator=gen).div(math.sqrt(length)).to(device, dtype)
                 .requires_grad_() for _ in range(2))
        features = torch.randn(args.features, args.head_dim, generator=gen).to(device)
        cells = {
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v).backward(grad),
            "linformer": lambda: linformer(q, k, v, E, Fp).backward(grad),
            "performer": lambda: performer(q, k, v, features).backward(grad),
        }
        results = {}
        for name, fn in cells.items():
            try:
                results[name] = time_ms(fn, device)
            except torch.cuda.OutOfMemoryError:
                results[name] = (None, None)
            q.grad = k.grad = v.grad = E.grad = Fp.grad = None
        ms = " | ".join("OOM" if results[n][0] is None else f"{results[n][0]:.2f}" for n in cells)
        peaks = " / ".join("-" if results[n][1] is None else f"{results[n][1]:.2f}" for n in cells)
        print(f"| {length} | {batch} | {ms} | {peaks} |", flush=True)


if __name__ == "__main__":
    main()
