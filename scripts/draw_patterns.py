#!/usr/bin/env python
"""Draw every attention pattern of mpnet/modeling/patterns.py and write docs/patterns.md.

    python scripts/draw_patterns.py [--n 32] [--out-dir docs/patterns] [--doc docs/patterns.md]

Each mask picture is the FlexAttention BlockMask's own mask_mod evaluated densely
(`create_mask`), checked entry by entry against the dense backend's materialised mask before it is
drawn (as scripts/draw_masks.py does for the window): one rule, two backends. Single stream in
natural order for every pattern, plus the two-stream content/query masks of one pattern in the
permuted layout the collator produces (tick labels from draw_masks.labels). The score mods are drawn
as what they do to a score. The block-sparsity table in the Markdown is computed here too (CPU,
structure only: which 128x128 tiles the kernel would compute), no timing.
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
from draw_masks import tile_share
from torch.nn.attention.flex_attention import create_mask  # noqa: E402

from mpnet.bench.problems import pred_size, two_stream_positions  # noqa: E402
from mpnet.modeling.attention import make_dense_attention_state, make_flex_attention_mask  # noqa: E402
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

DEFINITIONS = [
    ("`window:W`", "\\|d\\| <= W", "`within_window` (masks.py)", "window"),
    ("`neighbourhood:R`", "\\|d\\| <= R (in 1-D the window itself)", "`within_radius` = `within_window`",
     "window"),
    ("`dilated:W:D`", "\\|d\\| <= W·D and d mod D = 0", "`within_dilated_window`", "dilated"),
    ("`global:W[:P...]`", "q or k in {P...} (default {0}, the `<s>` token), or \\|d\\| <= W",
     "`global_or_within_window`", "global"),
    ("`block:B`", "⌊q/B⌋ = ⌊k/B⌋", "`same_block`", "block"),
    ("`swin:B`", "even layers `block:B`; odd layers ⌊(q-B/2)/B⌋ = ⌊(k-B/2)/B⌋", "`same_block`, "
     "`same_shifted_block`", "swin"),
    ("`prefix:P`", "k < P, or k <= q (P = 0: causal)", "`prefix_lm_visible`", "prefix"),
    ("`document_ids`", "doc(q) = doc(k)", "`same_document`", "documents"),
    ("`softcap:C`", "score -> C·tanh(score / C)", "`soft_cap`", "softcap"),
    ("`alibi`", "score -> score - slope_h·\\|d\\|, slope_h = 2^(-8(h+1)/H) (H a power of 2)", "`alibi`, "
     "`alibi_slope`", "alibi"),
]


def _documents(lengths):
    return torch.cat([torch.full((length,), doc) for doc, length in enumerate(lengths)])


def checked_masks(positions, n, m, spec, documents=None, layer=0):
    """(content, query) bool masks from the BlockMasks' mask_mods, equal to the dense backend's or exit."""
    content_bm, query_bm = make_flex_attention_mask(positions, n, m, pattern=spec, document_ids=documents,
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
        natural = [tile_share(make_flex_attention_mask(torch.arange(n)[None], n, 0, pattern=spec,
                                                           layer=layer)[0]) for layer in range(pattern.layer_variants)]
        scattered = tile_share(make_flex_attention_mask(permuted, n, m, pattern=spec)[0])
        rows.append((spec or "(none)", sum(natural) / len(natural), scattered))
    return n, m, rows


def write_markdown(doc_path, out_dir):
    rel = Path(out_dir).resolve().relative_to(Path(doc_path).resolve().parent)
    sparsity_n, sparsity_m, sparsity = sparsity_rows()
    lines = [
        "# Attention patterns",
        "",
        "Sparse masks and score modifications for both attention backends, defined once in",
        "`mpnet/modeling/patterns.py` as small elementwise functions: the dense backend evaluates them on",
        "broadcast grids to materialise its mask, FlexAttention calls the same functions inside its",
        "`mask_mod` / `score_mod`. Every rule reads **original positions** (the `positions` tensor, -1 for",
        "padding), so a pattern means the same thing in the permuted two-stream layout as in natural order,",
        "and it is AND-ed with the MPNet two-stream visibility and the padding rule: a pattern only ever",
        "hides more. Pictures and this page: `python scripts/draw_patterns.py` (each picture is the",
        "BlockMask's mask_mod, checked against the dense mask before drawing).",
        "",
        "```bash",
        "pretrain-mpnet --config configs/mpnet-tiny.yaml --output-dir runs/swin --attention-pattern swin:64,softcap:30",
        "pretrain-mpnet ... model.attention_pattern=global:128:0          # the same, as an override",
        "```",
        "",
        "```python",
        "model = MPNetForSequenceClassification.from_pretrained(ckpt, attention_pattern=\"block:64,alibi\")",
        "```",
        "",
        "`sliding_window_size: N` (and `--sliding-window-size N`) keeps working and means `window:N`; with",
        "both set, the two are intersected. A bad spec stops with one line naming the valid ones.",
        "",
        "## Definitions",
        "",
        "q, k: original positions of the query and the key; d = k - q.",
        "",
        "| spec | visible / score | function | picture |",
        "|---|---|---|---|",
    ]
    for spec, rule, function, stem in DEFINITIONS:
        lines.append(f"| {spec} | {rule} | {function} | [{stem}]({rel}/{stem}.png) |")
    lines += [
        "",
        "Composition: `NAME[:args]` parts joined by commas, e.g. `block:64,softcap:30`. Masks are",
        "intersected (so `global:128:0,block:64` confines even the global token to its block); score mods",
        "are applied in the order written, after the relative-position bias (`alibi,softcap:30` caps the",
        "ALiBi-penalised score; `softcap:30,alibi` penalises the capped one).",
        "",
    ]
    for stem, spec, _, title in MASKS:
        lines += [f"![{title}]({rel}/{stem}.png)", ""]
    lines += [
        f"The two-stream layout (n=24, m=4, permuted as the collator does) with `{TWO_STREAM_SPEC}`: blocks are",
        "cut on original positions, so in the permuted order they are scattered, and the two-stream rules",
        "still decide which predicted tokens a row sees.",
        "",
        f"![two-stream {TWO_STREAM_SPEC}]({rel}/two_stream_block.png)",
        "",
        f"![alibi]({rel}/alibi.png) ![softcap]({rel}/softcap.png)",
        "",
        "## Decisions",
        "",
        "- **neighbourhood = window.** A 1-D neighbourhood of radius r is |d| <= r, exactly `window:r`, so",
        "  `within_radius` is the same function object, not a second definition. NATTEN's neighbourhood",
        "  attention differs only at the sequence ends, where it shifts the window inward so that every",
        "  query sees 2r + 1 keys; that needs each row's length and is not implemented.",
        "- **dilated:W:D** counts W *dilated* steps: the span is W·D positions either side, every D-th one.",
        "- **global** positions are original positions (0 = `<s>`). In two-stream pretraining a global",
        "  position that is predicted is global in all three of its entries (PRED, MASK, QUERY), but the",
        "  two-stream rules still apply: a global query never sees the predicted tokens of its rank or later.",
        "- **swin** alternates by layer: even layers (0, 2, ...) use plain blocks, odd layers blocks",
        "  shifted by B//2 (the first block is [0, B/2)); Swin's cyclic shift with its mask computes the same",
        "  partition on a non-cyclic sequence. The encoder builds one attention state per layer parity, so",
        "  at most two per forward pass (two pairs of BlockMasks on the flex backend), never one per layer.",
        "- **prefix:P** for an encoder is prefix-LM: positions < P attend to each other bidirectionally and",
        "  not past the prefix; a later position sees the prefix and every position up to its own (causal).",
        "  `prefix:0` is a causal encoder. Under two-stream pretraining it is AND-ed with the MPNet rules.",
        "- **document isolation** is not a spec: it belongs to the batch, not to the model. Pass",
        "  `document_ids` (B, n) to `encode(...)` or `MPNetForPretraining.forward(...)` (permuted like",
        "  `positions`; the appended two-stream entries take their predicted token's document). In `encode`",
        "  positions then restart at each run of equal ids. `mpnet.modeling.packing.pack` builds such rows",
        "  with a best-fit-decreasing packer; `PackedBatch.unpack` / `first_tokens` cut the outputs back.",
        "  Packed rows give every example exactly the encoding it gets alone (tests/modeling/test_packing.py, <= 1e-5,",
        "  both backends).",
        "- **alibi** uses the published slopes (Press et al.): 2^(-8(h+1)/H) for H a power of two, otherwise",
        "  the first 2^floor(log2 H) of those plus every other slope of the 2H series; computed from the head",
        "  index inside the score_mod, so it captures no extra tensor. It adds to MPNet's own relative bias.",
        "- **Lean mods.** The flex mask_mod captures `positions` and, only when given, `document_ids`; the",
        "  score_mod captures `positions` and the bias table. Pattern arguments are Python numbers baked into",
        "  the mod (a new value compiles a new kernel; the same spec reuses the cached one).",
        "",
        "## Checkpoints with a pattern, in transformers",
        "",
        "transformers' own MPNet computes full attention with buckets that saturate at 128. A checkpoint whose config",
        "sets `sliding_window_size`, `attention_pattern` or another `relative_attention_max_distance` is therefore saved",
        "with model_type `mpnet_pattern`, an `auto_map` and a small `modeling_mpnet_pattern.py` next to the weights",
        "(mpnet/hub.py), so it never loads silently into a different function:",
        "",
        "```python",
        "from transformers import AutoModelForMaskedLM",
        "model = AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True)  # needs this package installed",
        "```",
        "",
        "computes exactly what ours does (the same for AutoModel and AutoModelForSequenceClassification;",
        "tests/modeling/test_transformers_loading.py compares them bit for bit). Without `trust_remote_code=True` the",
        "Auto classes refuse the directory and name the flag. Only the concrete `transformers.MPNetForMaskedLM` class",
        "still loads it into full attention, with transformers' warning that the model types differ. Loading it here",
        "with `sliding_window_size=None` (and no pattern) and saving writes a plain `mpnet` checkpoint again.",
        "",
        "## Block sparsity",
        "",
        f"Share of 128x128 tiles the content-stream kernel computes at n = {sparsity_n} (single stream in natural",
        f"order; two-stream with m = {sparsity_m} in the permuted layout the collator produces; swin averaged",
        "over its two layer parities). Computed from the BlockMasks on CPU (structure only, no timing).",
        "",
        "| pattern | natural order | permuted two-stream |",
        "|---|---|---|",
    ]
    for spec, natural, scattered in sparsity:
        lines.append(f"| `{spec}` | {100 * natural:.1f}% | {100 * scattered:.1f}% |")
    lines += [
        "",
        "Position-local patterns are block-sparse only when tokens sit in (roughly) original order; in the",
        "permuted two-stream layout every 128-tile holds tokens from all over the sentence, so the kernel",
        "computes as many tiles as with no pattern and the pattern saves nothing (it still changes the",
        "result). A layout",
        "that keeps tokens in original order and expresses the permutation through rank lookups is the",
        "way to make them pay during pretraining; for fine-tuning and inference (natural order) they pay",
        "as is.",
        "",
        "## Linformer and Performer (FlexAttention-Examples): not added",
        "",
        "The FlexAttention-Examples repository lists Linformer and Performer next to Longformer, Swin and",
        "neighbourhood attention. The last three are masks and are here. The first two are not masks or score",
        "modifications; they change",
        "what is computed:",
        "",
        "- **Linformer** projects keys and values along the sequence axis (n -> k rows, learned E, F of",
        "  shape k x n). A projected key row mixes all tokens, so there is no (query, key-token) pair left",
        "  to hide: the two-stream rules cannot be expressed. Concretely the query of rank i would see a",
        "  mixture that contains the predicted tokens of rank >= i, which is the leak the no-leak test",
        "  forbids, and padding and document isolation leak the same way. The projections also fix n at",
        "  training time and have no counterpart in MPNet / HF checkpoints.",
        "- **Performer** (FAVOR+) replaces exp(q·k) by a random-feature product phi(q)·phi(k) so that",
        "  sum_k phi(k) v^T is computed once for all queries. That sharing is exactly what per-row",
        "  visibility forbids: an arbitrary mask (the two-stream rules, per-rank) needs a separate sum per",
        "  query row, i.e. O(n^2) again; only causal-style prefix sums stay linear. MPNet's relative bias",
        "  multiplies the kernel by exp(b(k - q)) (a Toeplitz factor, FFT-able at best), and the result is",
        "  an approximation, so parity with the dense oracle (<= 1e-5) and exact transfer of pretrained",
        "  checkpoints are lost.",
        "",
        "FlexAttention cannot express either (it modifies scores and skips tiles; it does not change the",
        "algorithm), so each would be a third, approximate backend with its own numerics rather than a",
        "pattern. Decision: they do not belong in this library; the sub-quadratic patterns here",
        "(window, dilated, global, block/swin, documents) are exact and skip tiles for real. This is a",
        "reasoned decision, not a measurement: no GPU time was available when this was written. What to measure later,",
        "on the GPU machine with `benchmark-mpnet`: single-stream forward+backward throughput and memory of",
        "a Linformer (k = 256) and a Performer (256 features) layer against flex + `window:256` and",
        "`block:256` at n = 4k-16k, and the GLUE dev score after a short continued pretraining; revisit",
        "only if they win clearly on speed at equal accuracy for single-stream fine-tuning, the one place",
        "where the two-stream objection does not apply.",
        "",
    ]
    Path(doc_path).write_text("\n".join(lines))


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
    write_markdown(args.doc, out)
    for path in [*written, Path(args.doc)]:
        print(path)


if __name__ == "__main__":
    main()
