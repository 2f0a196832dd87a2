#!/usr/bin/env python
"""Draw every attention pattern of mpnet/modeling/patterns.py for docs/patterns.md, and write the page's
generated block-sparsity table.

    python scripts/draw_patterns.py [--n 32] [--out-dir docs/patterns] [--doc docs/patterns.md]

Each mask picture is the FlexAttention BlockMask's own mask_mod evaluated densely
(`create_mask`), checked entry by entry against the dense backend's materialised mask before it is
drawn (as scripts/draw_masks.py does for the window): one rule, two backends. Single stream in
natural order for every pattern, plus the two-stream content/query masks of one pattern in the
permuted layout the collator produces (tick labels from draw_masks.labels). The score mods are drawn
as what they do to a score. The block-sparsity table is computed here too (CPU, structure only: which
128x128 tiles the kernel would compute), no timing, and replaces the part of --doc between the
GENERATED markers; the rest of the page is written by hand.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from draw_masks import labels as two_stream_labels  # noqa: E402
from draw_masks import tile_share  # noqa: E402
from torch.nn.attention.flex_attention import create_mask  # noqa: E402

from mpnet.bench.problems import pred_size, two_stream_positions  # noqa: E402
from mpnet.modeling.attention import make_dense_attention_state  # noqa: E402
from mpnet.modeling.block_masks import make_two_stream_block_masks  # noqa: E402
from mpnet.modeling.patterns import alibi_slope, as_pattern, soft_cap  # noqa: E402

# (file stem, spec, document lengths or None, what the picture shows)
MASKS = [
    ("window", "window:3", None, "window:3 (= neighbourhood:3)"),
    ("dilated", "dilated:3:2", None, "dilated:3:2"),
    ("global", "global:2:0:16", None, "global:2:0:16"),
    ("block", "block:8", None, "block:8"),
    ("swin", "swin:8", None, "swin:8"),
    ("prefix", "prefix:12", None, "prefix:12"),
    ("documents", None, (10, 14, 8), "document_ids (10, 14, 8 tokens)"),
    ("composed", "block:16,dilated:4:2", None, "block:16,dilated:4:2"),
]
TWO_STREAM_SPEC = "block:8"

def _documents(lengths):
    return torch.cat([torch.full((length,), doc) for doc, length in enumerate(lengths)])


def checked_masks(positions, n, m, spec, documents=None, layer=0):
    """(content, query) bool masks from the BlockMasks' mask_mods, equal to the dense backend's or exit."""
    content_bm, query_bm = make_two_stream_block_masks(positions, n, m, pattern=spec, document_ids=documents,
                                                       layer=layer)
    content = create_mask(content_bm.mask_mod, 1, 1, n + m, n + m, device="cpu")[0, 0]
    query = create_mask(query_bm.mask_mod, 1, 1, m, n + m, device="cpu")[0, 0] if m else None
    dense = make_dense_attention_state(positions, n, m, torch.zeros(1, 257), 128, pattern=spec,
                                       document_ids=documents, layer=layer).allowed[0, 0]
    if not torch.equal(dense[: n + m], content) or (m and not torch.equal(dense[n + m:], query)):
        raise SystemExit(f"{spec}: flex mask_mod and dense mask disagree; fix mpnet/modeling before drawing")
    return content, query


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _show(ax, grid, title, tick_every=8, xlabels=None, ylabels=None):
    from matplotlib.colors import ListedColormap

    ax.imshow(grid.int().numpy(), cmap=ListedColormap(["#f4f4f4", "#3b6fb6"]), vmin=0, vmax=1,
              interpolation="nearest")
    rows, cols = grid.shape
    if xlabels is None:
        ax.set_xticks(range(0, cols, tick_every))
        ax.set_yticks(range(0, rows, tick_every))
        ax.tick_params(labelsize=6)
        ax.set_xlabel("key position", fontsize=7)
        ax.set_ylabel("query position", fontsize=7)
    else:
        ax.set_xticks(range(cols))
        ax.set_xticklabels(xlabels, rotation=90, fontsize=4.5)
        ax.set_yticks(range(rows))
        ax.set_yticklabels(ylabels, fontsize=4.5)
    ax.set_xticks([x - 0.5 for x in range(cols + 1)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(rows + 1)], minor=True)
    ax.grid(which="minor", color="white", linewidth=0.3)
    ax.tick_params(which="minor", length=0)
    ax.set_title(title, fontsize=8)


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    _plt().close(fig)


def draw_single_stream(n, out):
    plt = _plt()
    positions = torch.arange(n)[None]
    written = []
    for stem, spec, doc_lengths, title in MASKS:
        documents = None if doc_lengths is None else _documents(doc_lengths)[None]
        layers = (0, 1) if as_pattern(spec).alternates else (0,)
        fig, axes = plt.subplots(1, len(layers), figsize=(3.1 * len(layers), 3.2), squeeze=False)
        for ax, layer in zip(axes[0], layers):
            content, _ = checked_masks(positions, n, 0, spec, documents, layer)
            suffix = f", {'odd (shifted)' if layer else 'even'} layers" if len(layers) > 1 else ""
            _show(ax, content, f"{title}{suffix}, n={n}")
        written.append(out / f"{stem}.png")
        _save(fig, written[-1])
    return written


def draw_two_stream(out, n=24, m=4, seed=0):
    plt = _plt()
    positions = two_stream_positions(1, n, m, torch.Generator().manual_seed(seed))
    content, query = checked_masks(positions, n, m, TWO_STREAM_SPEC)
    kv_labels = two_stream_labels(n, m, positions[0], n + m)
    query_labels = two_stream_labels(n, m, positions[0], n + 2 * m)[n + m:]
    fig, axes = plt.subplots(2, 1, figsize=(6, 7.4), gridspec_kw={"height_ratios": [n + m, m + 3]})
    _show(axes[0], content, f"content stream, {TWO_STREAM_SPEC} on original positions", xlabels=kv_labels,
          ylabels=kv_labels)
    _show(axes[1], query, "query stream", xlabels=kv_labels, ylabels=query_labels)
    for ax in axes:
        for edge in (n - m, n):
            ax.axvline(edge - 0.5, color="#d62728", linewidth=0.6)
    for edge in (n - m, n):
        axes[0].axhline(edge - 0.5, color="#d62728", linewidth=0.6)
    fig.suptitle(f"two-stream MPNet + {TWO_STREAM_SPEC}, n={n}, m={m}; labels: kind+rank @original position",
                 fontsize=7)
    path = out / "two_stream_block.png"
    _save(fig, path)
    return [path]


def draw_score_mods(n, out):
    plt = _plt()
    heads = 4
    d = torch.arange(n)
    distance = (d[None, :] - d[:, None]).abs().float()
    fig, axes = plt.subplots(1, heads, figsize=(8, 2.4))
    for h, ax in enumerate(axes):
        slope = float(alibi_slope(torch.tensor(h), heads))
        image = ax.imshow((-slope * distance).numpy(), cmap="Blues_r", vmin=-slope * (n - 1), vmax=0)
        ax.set_title(f"head {h}: slope {slope:g}", fontsize=7)
        ax.tick_params(labelsize=5)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=5)
    fig.suptitle(f"alibi: added score -slope_h * |d|, H={heads}, n={n}", fontsize=8)
    alibi_path = out / "alibi.png"
    _save(fig, alibi_path)

    fig, ax = plt.subplots(figsize=(3.6, 2.8))
    score = torch.linspace(-40, 40, 401)
    ax.plot(score, score, color="#bbbbbb", linewidth=0.8, label="no cap")
    for cap in (5.0, 15.0, 30.0):
        ax.plot(score, soft_cap(score, cap), linewidth=1.2, label=f"softcap:{cap:g}")
    ax.set_xlabel("score", fontsize=7)
    ax.set_ylabel("capped score", fontsize=7)
    ax.set_ylim(-40, 40)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=6)
    ax.set_title("softcap: C * tanh(score / C)", fontsize=8)
    softcap_path = out / "softcap.png"
    _save(fig, softcap_path)
    return [alibi_path, softcap_path]


SPARSITY_SPECS = [None, "window:128", "dilated:64:2", "global:128:0", "block:128", "block:256", "swin:256",
                  "prefix:512", "window:256,block:512"]


def sparsity_rows(n=2048, seed=0):
    """Share of 128x128 tiles the content-stream kernel computes, natural order vs the permuted two-stream
    layout (where the tokens of a window are scattered over the sequence)."""
    m = pred_size(n)
    permuted = two_stream_positions(1, n, m, torch.Generator().manual_seed(seed))
    rows = []
    for spec in SPARSITY_SPECS:
        pattern = as_pattern(spec)
        natural = [tile_share(make_two_stream_block_masks(torch.arange(n)[None], n, 0, pattern=spec, layer=layer)[0])
                   for layer in range(pattern.layer_variants)]
        scattered = tile_share(make_two_stream_block_masks(permuted, n, m, pattern=spec)[0])
        rows.append((spec or "(none)", sum(natural) / len(natural), scattered))
    return n, m, rows


BEGIN = "<!-- GENERATED by scripts/draw_patterns.py: block sparsity -->"
END = "<!-- end of GENERATED -->"


def sparsity_block() -> str:
    n, m, rows = sparsity_rows()
    lines = [f"Share of 128x128 tiles the content-stream kernel computes at n = {n} (single stream in natural",
             f"order; two-stream with m = {m} in the permuted layout the collator produces; swin averaged",
             "over its two layer parities). Computed from the BlockMasks on CPU (structure only, no timing).",
             "", "| pattern | natural order | permuted two-stream |", "|---|---|---|"]
    lines += [f"| `{spec}` | {100 * natural:.1f}% | {100 * scattered:.1f}% |" for spec, natural, scattered in rows]
    return "\n".join(lines)


def write_generated(doc_path):
    """Replace the part of the page between BEGIN and END with the block-sparsity table computed now."""
    text = Path(doc_path).read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{doc_path}: expected one '{BEGIN}' ... '{END}' block to write the table into")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    Path(doc_path).write_text(f"{head}{BEGIN}\n{sparsity_block()}\n{END}{tail}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32, help="sequence length of the single-stream pictures")
    parser.add_argument("--out-dir", default=str(ROOT / "docs" / "patterns"))
    parser.add_argument("--doc", default=str(ROOT / "docs" / "patterns.md"))
    args = parser.parse_args(argv)
    if args.n < 16:
        parser.error("--n must be at least 16 for the example patterns to show")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = draw_single_stream(args.n, out) + draw_two_stream(out) + draw_score_mods(args.n, out)
    write_generated(args.doc)
    for path in [*written, Path(args.doc)]:
        print(path)


if __name__ == "__main__":
    main()
