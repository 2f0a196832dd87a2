#!/usr/bin/env python
"""Draw the two-stream attention masks as PNGs (attention-gym style), from the project's own rules.

    python scripts/draw_masks.py [--n 24] [--m 4] [--window 4] [--out-dir docs/masks]

Writes into --out-dir:
- two_stream.png: content stream ((n+m) x (n+m)) and query stream (m x (n+m)), no window;
- two_stream_window{W}.png: the same with the sliding window |pos_q - pos_k| <= W on ORIGINAL positions;
- blocks_window.png: which 128x128 tiles the BlockMask lets FlexAttention compute at n = 2048 with a
  256 window, in the permuted layout the collator produces (the block sparsity the benchmark reports).

Each mask is the BlockMask's own mask_mod (from `make_two_stream_block_masks`) evaluated densely with
`torch.nn.attention.flex_attention.create_mask`, and is checked against the dense backend's
materialised mask (`make_dense_attention_state`) before it is drawn: one rule, two backends.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from torch.nn.attention.flex_attention import create_mask  # noqa: E402

from mpnet.bench.problems import pred_size, two_stream_positions  # noqa: E402
from mpnet.modeling.attention import make_dense_attention_state  # noqa: E402
from mpnet.modeling.block_masks import make_two_stream_block_masks, tile_counts  # noqa: E402
from mpnet.modeling.patterns import window_spec  # noqa: E402


def masks(n, m, window, seed):
    """(content (n+m, n+m), query (m, n+m), positions (n+2m,)) as bool tensors, True = may attend."""
    positions = two_stream_positions(1, n, m, torch.Generator().manual_seed(seed))
    content_bm, query_bm = make_two_stream_block_masks(positions, n, m, window_spec(window))
    content = create_mask(content_bm.mask_mod, 1, 1, n + m, n + m, device="cpu")[0, 0]
    query = create_mask(query_bm.mask_mod, 1, 1, m, n + m, device="cpu")[0, 0]
    dense = make_dense_attention_state(positions, n, m, torch.zeros(1, 257), 128, window_spec(window)).allowed[0, 0]
    if not (torch.equal(dense[: n + m], content) and torch.equal(dense[n + m:], query)):
        raise SystemExit("flex mask_mod and dense mask disagree: fix mpnet/modeling before drawing")
    return content, query, positions[0]


def labels(n, m, positions, rows):
    c = n - m
    out = []
    for i in range(rows):
        if i < c:
            kind = "ctx"
        elif i < n:
            kind = f"pred{i - c}"
        elif i < n + m:
            kind = f"mask{i - n}"
        else:
            kind = f"query{i - n - m}"
        out.append(f"{kind} @{int(positions[i])}")
    return out


def draw(n, m, window, seed, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    content, query, positions = masks(n, m, window, seed)
    kv_labels = labels(n, m, positions, n + m)
    fig, axes = plt.subplots(2, 1, figsize=(7.5, 9.2), dpi=90,
                             gridspec_kw={"height_ratios": [n + m, m + 3]})
    cmap = ListedColormap(["#f4f4f4", "#3b6fb6"])
    for ax, grid, row_labels, title in (
            (axes[0], content, kv_labels, "content stream: rows = keys = [ctx | pred | mask]"),
            (axes[1], query, labels(n, m, positions, n + 2 * m)[n + m:], "query stream: rows = query entries")):
        ax.imshow(grid.int().numpy(), cmap=cmap, vmin=0, vmax=1, interpolation="nearest", aspect="equal")
        ax.set_xticks(range(n + m))
        ax.set_xticklabels(kv_labels, rotation=90, fontsize=5)
        ax.set_yticks(range(len(row_labels)))
        ax.set_yticklabels(row_labels, fontsize=5)
        for edge in (n - m, n):  # segment borders
            ax.axvline(edge - 0.5, color="#d62728", linewidth=0.8)
            if grid.shape[0] == n + m:
                ax.axhline(edge - 0.5, color="#d62728", linewidth=0.8)
        ax.set_xticks([x - 0.5 for x in range(n + m + 1)], minor=True)
        ax.set_yticks([y - 0.5 for y in range(grid.shape[0] + 1)], minor=True)
        ax.grid(which="minor", color="white", linewidth=0.4)
        ax.tick_params(which="minor", length=0)
        ax.set_title(title, fontsize=8)
    window_text = f", sliding window |pos_q - pos_k| <= {window} on original positions" if window else ""
    fig.suptitle(f"MPNet two-stream attention, n={n}, m={m}{window_text}\n"
                 f"blue = may attend; labels: kind+rank @original position; red lines: ctx | pred | mask",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def tile_share(block_mask) -> float:
    """Share of the 128 x 128 tiles the kernel computes (full or partial), of all tiles."""
    computed, total = tile_counts(block_mask)
    return computed / total


def draw_blocks(n, window, seed, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = pred_size(n)
    positions = two_stream_positions(1, n, m, torch.Generator().manual_seed(seed))
    natural = torch.cat([torch.arange(n), torch.arange(n - m, n), torch.arange(n - m, n)])[None]
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), dpi=90)
    for ax, pos, name in ((axes[0], positions, "permuted order (as collated)"),
                          (axes[1], natural, "no permutation (tokens in original order):\nwhat a layout sorted by position allows")):
        content, _ = make_two_stream_block_masks(pos, n, m, window_spec(window))
        tiles = content.to_dense()[0, 0].int().numpy()
        ax.imshow(tiles, cmap="Blues", vmin=0, vmax=1.3, interpolation="nearest")
        ax.set_title(f"{name}\ncontent-stream tiles computed: {100 * tile_share(content):.0f}%", fontsize=8)
        ax.set_xlabel("key block (128)", fontsize=8)
        ax.set_ylabel("query block (128)", fontsize=8)
    fig.suptitle(f"FlexAttention BlockMask tiles, n={n}, m={m}, window {window}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--m", type=int, default=4)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(ROOT / "docs" / "masks"))
    args = parser.parse_args(argv)
    if not 0 < args.m < args.n or args.window <= 0:
        parser.error("need 0 < m < n and window > 0")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "two_stream.png", out / f"two_stream_window{args.window}.png", out / "blocks_window.png"]
    draw(args.n, args.m, None, args.seed, written[0])
    draw(args.n, args.m, args.window, args.seed, written[1])
    draw_blocks(2048, 256, args.seed, written[2])
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
