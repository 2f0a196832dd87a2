"""Time the two-stream BlockMask builders: tile summaries (block_masks.py) against create_block_mask.

For each length L (n = L tokens, m = 15% predicted, as `benchmark-mpnet`; batch = tokens per batch / L)
and each window (none: the permuted layout; W: natural order, as the model runs a window), builds the
content + query BlockMask pair with

- summaries: mpnet.modeling.block_masks.make_two_stream_block_masks (on CUDA: a CUDA graph per shape,
  captured at its first build);
- summaries-eager: the same, its kernels launched one by one (block_masks.USE_CUDA_GRAPHS = False);
- eager: torch's create_block_mask on the same mask_mods, not compiled;
- compiled: torch.compile(create_block_mask), what the flex backend used before the summaries. Its first
  build compiles (minutes at some shapes): it runs only when asked for with --builders.

and prints, per builder: the first build (compilation and caches included), the median of later
builds with the GPU synchronised after each (wall), the median host time of a build without that
synchronisation (what a training step waits for, the GPU work overlapping), the peak memory the
build added, and the tiles computed / total (block_masks.tile_counts). The summaries' labels are
checked against the eager builder's: FULL tiles must agree, and no tile it skips may be non-empty.

    python scripts/block_mask_build_timing.py                                   # CUDA, summaries + eager
    python scripts/block_mask_build_timing.py --builders summaries,eager,compiled --lengths 512 2048
    python scripts/block_mask_build_timing.py --device cpu --lengths 256 512    # smoke run
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn.attention.flex_attention import create_block_mask

from mpnet.bench.problems import pred_size, two_stream_positions
from mpnet.modeling import block_masks
from mpnet.modeling.block_masks import make_two_stream_block_masks, tile_counts, two_stream_mask_mods
from mpnet.modeling.masks import natural_order
from mpnet.modeling.patterns import as_pattern

BUILDERS = ("summaries", "summaries-eager", "eager", "compiled")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _torch_builder(build):
    def make(positions, n, m, window, layout):
        content_mod, query_mod = two_stream_mask_mods(positions, n, m, as_pattern(None, window), None, 0, layout)
        batch, device = positions.shape[0], positions.device
        content = build(content_mod, batch, None, n + m, n + m, device=device)
        return content, build(query_mod, batch, None, m, n + m, device=device)
    return make


def _summaries(graphs):
    def make(positions, n, m, window, layout):
        block_masks.USE_CUDA_GRAPHS = graphs
        try:
            return make_two_stream_block_masks(positions, n, m, f"window:{window}" if window else None, layout=layout)
        finally:
            block_masks.USE_CUDA_GRAPHS = True
    return make


def _builders(names):
    table = {
        "summaries": _summaries(True),
        "summaries-eager": _summaries(False),
        "eager": _torch_builder(create_block_mask),
        "compiled": _torch_builder(torch.compile(create_block_mask, dynamic=False)),
    }
    return {name: table[name] for name in names}


def _labels(block_mask):
    """(B, q tiles, kv tiles): 0 empty, 1 partial, 2 full."""
    def dense(count, indices):
        cols = indices.shape[-1]
        listed = torch.arange(cols, device=indices.device) < count[..., None]
        out = torch.zeros(*indices.shape[:-1], cols + 1, dtype=torch.int32, device=indices.device)
        out.scatter_(-1, torch.where(listed, indices.long(), cols), 1)
        return out[:, 0, :, :cols]
    return (dense(block_mask.kv_num_blocks, block_mask.kv_indices)
            + 2 * dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices))


def _time(build, args, device, repeats):
    _sync(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    masks = build(*args)
    _sync(device)
    first = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) - base) if device.type == "cuda" else 0
    walls, hosts = [], []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        build(*args)
        hosts.append(time.perf_counter() - start)
        _sync(device)
        walls.append(time.perf_counter() - start)
    return masks, first, statistics.median(walls), statistics.median(hosts), peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--windows", default="none,256", help="comma-separated; 'none' = no window")
    parser.add_argument("--builders", default="summaries,summaries-eager,eager", help=f"comma-separated, of {', '.join(BUILDERS)}")
    parser.add_argument("--tokens-per-batch", type=int, default=16384)
    parser.add_argument("--pred-ratio", type=float, default=0.15)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    names = [name.strip() for name in args.builders.split(",") if name.strip()]
    unknown = [name for name in names if name not in BUILDERS]
    if unknown:
        parser.error(f"unknown builders {unknown}; choose from {', '.join(BUILDERS)}")
    windows = [None if w.strip().lower() == "none" else int(w) for w in args.windows.split(",")]
    builders = _builders(names)

    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print("| L | batch | window | builder | first build ms | build ms (synced) | host ms | peak MiB "
          "| content tiles computed/total | query tiles computed/total | vs eager |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for length in args.lengths:
        n, m = length, pred_size(length, args.pred_ratio)
        batch = max(1, args.tokens_per_batch // length)
        gen = torch.Generator().manual_seed(length)
        permuted = two_stream_positions(batch, n, m, gen).to(device)
        for window in windows:
            layout = natural_order(permuted, n, m) if window is not None else None
            positions = permuted if layout is None else permuted.gather(1, layout)
            results = {}
            for name, build in builders.items():
                try:
                    results[name] = _time(build, (positions, n, m, window, layout), device, args.repeats)
                except torch.cuda.OutOfMemoryError:
                    print(f"| {length} | {batch} | {window} | {name} | out of memory | | | | | | |")
                    torch.cuda.empty_cache()
            for name, (masks, first, wall, host, peak) in results.items():
                agreement = ""
                if name.startswith("summaries") and "eager" in results:
                    mine, truth = [_labels(b) for b in masks], [_labels(b) for b in results["eager"][0]]
                    full_differs = sum(int(((a == 2) != (b == 2)).sum()) for a, b in zip(mine, truth))
                    wrongly_skipped = sum(int(((a == 0) & (b != 0)).sum()) for a, b in zip(mine, truth))
                    left_partial = sum(int(((a == 1) & (b == 0)).sum()) for a, b in zip(mine, truth))
                    agreement = (f"FULL differs {full_differs}, wrongly skipped {wrongly_skipped}, "
                                 f"empty left partial {left_partial}")
                content, query = (tile_counts(b) for b in masks)
                print(f"| {length} | {batch} | {window} | {name} | {first * 1e3:.1f} | {wall * 1e3:.3f} | "
                      f"{host * 1e3:.3f} | {peak / 2**20:.0f} | {content[0]}/{content[1]} | {query[0]}/{query[1]} "
                      f"| {agreement} |", flush=True)
            del results


if __name__ == "__main__":
    main()
