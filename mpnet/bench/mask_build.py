"""The flex backend's BlockMask build: the `mask-build` section of `benchmark-mpnet`.

For each length L (n = L tokens, m = round(0.15 L) predicted, B = tokens_per_batch // L, positions
permuted as the collator draws them) and each window (none: the permuted layout; W: the rows in natural
order, as the model runs a window) the content + query BlockMask pair of one forward, built by:

- `summaries`: the project's builder (modeling/block_masks.py: per-tile summaries of the rules, no
  compile; on CUDA a CUDA graph per shape, captured at its first build);
- `summaries-eager`: the same with its kernels launched one by one (CUDA only: without CUDA graphs);
- `eager`: torch's `create_block_mask` on the same mask_mods, not compiled;
- `compiled`: `torch.compile(create_block_mask)`, what the flex backend used before the summaries. Its
  first build compiles (minutes at some shapes): it runs only when named in `builders`.

Each cell: the first build (compilation and caches included), the builds' time (the harness' timer),
the host time of a build without waiting for the GPU (what a training step waits for while the GPU
work overlaps), the peak memory, the tiles computed / total, and for the summaries the agreement of
their tile labels with the eager builder's (FULL tiles the same, no tile skipped that holds a visible
pair).
"""
from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..modeling import block_masks
from ..modeling.block_masks import make_two_stream_block_masks, tile_counts, two_stream_mask_mods
from ..modeling.masks import natural_order
from ..modeling.patterns import as_pattern
from .harness import check_counts, check_lengths, time_runs, timer_text
from .problems import pred_size, two_stream_positions
from .report import Figure, Panel, Section, Table, fmt, ok, short_status, time_text, tiles_text

BUILDERS = ("summaries", "summaries-eager", "eager", "compiled")
RUN_ORDER = ("eager", "summaries", "summaries-eager", "compiled")  # the reference first: the others compare with it


@dataclass
class MaskBuildSettings:
    lengths: list = field(default_factory=lambda: [512, 1024, 2048, 4096, 8192, 16384, 32768])
    windows: list = field(default_factory=lambda: [None, 256])  # None: no window (the permuted layout)
    builders: list = field(default_factory=lambda: ["summaries", "summaries-eager", "eager"])
    tokens_per_batch: int = 16384
    pred_ratio: float = 0.15
    device: str | None = None
    warmup: int = 3
    repeats: int = 20
    max_seconds: float = 3.0
    seed: int = 0

    def validate(self, device: torch.device):
        check_lengths(self.lengths, self.tokens_per_batch)
        check_counts(self)
        unknown = [b for b in self.builders if b not in BUILDERS]
        if unknown or not self.builders:
            raise UserError(f"unknown --builders {unknown or '(none)'}; pick from {', '.join(BUILDERS)}")
        if any(w is not None and w <= 0 for w in self.windows) or not self.windows:
            raise UserError(f"--windows takes positive sizes and 'none', got {self.windows}")


def build_with(name: str):
    """(positions, n, m, window, layout) -> (content, query) BlockMasks, by builder."""
    if name.startswith("summaries"):
        def summaries(positions, n, m, window, layout):
            block_masks.USE_CUDA_GRAPHS = name == "summaries"
            try:
                return make_two_stream_block_masks(positions, n, m, f"window:{window}" if window else None, layout=layout)
            finally:
                block_masks.USE_CUDA_GRAPHS = True
        return summaries
    from torch.nn.attention.flex_attention import create_block_mask

    create = create_block_mask if name == "eager" else torch.compile(create_block_mask, dynamic=False)

    def torch_builder(positions, n, m, window, layout):
        content_mod, query_mod = two_stream_mask_mods(positions, n, m, as_pattern(None, window), None, 0, layout)
        batch, device = positions.shape[0], positions.device
        return (create(content_mod, batch, None, n + m, n + m, device=device),
                create(query_mod, batch, None, m, n + m, device=device))
    return torch_builder


def tile_labels(block_mask) -> torch.Tensor:
    """(B, q tiles, kv tiles): 0 skipped, 1 partial (masked per entry), 2 full."""
    def dense(count, indices):
        cols = indices.shape[-1]
        listed = torch.arange(cols, device=indices.device) < count[..., None]
        out = torch.zeros(*indices.shape[:-1], cols + 1, dtype=torch.int32, device=indices.device)
        out.scatter_(-1, torch.where(listed, indices.long(), cols), 1)
        return out[:, 0, :, :cols]
    return dense(block_mask.kv_num_blocks, block_mask.kv_indices) + 2 * dense(block_mask.full_kv_num_blocks,
                                                                             block_mask.full_kv_indices)


def agreement(masks, reference) -> dict:
    """Tiles whose FULL label differs from the reference's, tiles skipped that the reference computes
    (a wrong result), and tiles left partial that the reference skips (only slower)."""
    pairs = [(tile_labels(a), tile_labels(b)) for a, b in zip(masks, reference) if a is not None]
    return {"full_differs": sum(int(((a == 2) != (b == 2)).sum()) for a, b in pairs),
            "wrongly_skipped": sum(int(((a == 0) & (b != 0)).sum()) for a, b in pairs),
            "left_partial": sum(int(((a == 1) & (b == 0)).sum()) for a, b in pairs)}


def measure_build(settings: MaskBuildSettings, name: str, inputs: tuple, built: dict, timer) -> dict:
    build = functools.partial(build_with(name), *inputs)
    result = time_runs(timer, build, settings.warmup - 1, settings.repeats, settings.max_seconds)
    hosts = []
    for _ in range(min(settings.repeats, 10)):
        timer.sync()
        started = time.perf_counter()
        built[name] = build()
        hosts.append((time.perf_counter() - started) * 1e3)
    timer.sync()
    content, query = built[name]
    result.update(host_ms=statistics.median(hosts), tiles_content=list(tile_counts(content)),
                  tiles_query=list(tile_counts(query)) if query is not None else None)
    if name.startswith("summaries") and "eager" in built:
        result.update(agreement(built[name], built["eager"]))
    return result


def run_mask_build(session, settings: MaskBuildSettings, deadline=None) -> Section:
    device = session.device
    settings.validate(device)
    section = Section("mask_build", "BlockMask build: tile summaries against create_block_mask", settings,
                      method_lines, lambda s: [build_table(s.cells)], build_figures)
    session.open(section)
    for length in settings.lengths:
        n, m = length, pred_size(length, settings.pred_ratio)
        batch = settings.tokens_per_batch // length
        permuted = two_stream_positions(batch, n, m, torch.Generator().manual_seed(settings.seed + length)).to(device)
        for window in settings.windows:
            layout = natural_order(permuted, n, m) if window is not None else None
            positions = permuted if layout is None else permuted.gather(1, layout)
            built = {}
            for name in [b for b in RUN_ORDER if b in settings.builders]:
                cell = {"key": f"L={length}/w={window}/{name}", "name": f"L={length:>5} B={batch:>3} w={window} {name}",
                        "L": length, "B": batch, "window": window, "builder": name}
                if name == "summaries-eager" and device.type != "cuda":
                    cell["status"] = "n/a: the same as summaries off CUDA (no CUDA graphs there)"
                session.measure(section, cell, functools.partial(measure_build, settings, name,
                                                                 (positions, n, m, window, layout), built,
                                                                 session.timer), deadline)
        session.report.write(plot=True)
    session.finish(section)
    return section


# ------------------------------------------------------------------------------------------ reports


def build_table(cells) -> Table:
    order = {name: i for i, name in enumerate(BUILDERS)}
    rows = []
    for c in sorted(cells, key=lambda c: (c["L"], c["window"] or 0, order[c["builder"]])):
        good = ok(c)
        agree = (f"FULL differs {c['full_differs']}, wrongly skipped {c['wrongly_skipped']}, left partial "
                 f"{c['left_partial']}" if "full_differs" in c else "")
        rows.append([c["L"], c["B"], c["window"] or "none", c["builder"], fmt(c.get("first_call_s"), ".3f") if good else "",
                     time_text(c), fmt(c.get("host_ms"), ".3f") if good else "", fmt(c.get("peak_gib"), ".3f", "n/a")
                     if good else "", tiles_text(c["tiles_content"]) if good else "",
                     tiles_text(c["tiles_query"]) if good and c.get("tiles_query") else "", agree])
    return Table(["L", "B", "window", "builder", "first build s", "build ms median [p20, p80]", "host ms", "peak GiB",
                  "content tiles computed/total", "query tiles computed/total", "tile labels against eager"], rows,
                 "Builds")


def method_lines(section: Section) -> list:
    s = section.settings
    return [f"- One build = the content + query BlockMask pair of one forward: B = {s.tokens_per_batch} // L rows, "
            f"n = L, m = round({s.pred_ratio} L), positions permuted as the collator draws them; with a window the "
            "rows in natural order (masks.natural_order), as the model runs a window.",
            "- summaries: modeling/block_masks.py (tile summaries, no compile; a CUDA graph per shape on CUDA); "
            "summaries-eager: the same, kernels launched one by one; eager: torch's create_block_mask on the same "
            "mask_mods; compiled: torch.compile(create_block_mask).",
            f"- Time: median [p20, p80] of up to {s.repeats} builds ({timer_text(s)}) after {s.warmup} warm-up "
            "builds; first build = the first one's wall time (compilation and caches included); host ms = the "
            "median time a build takes to return without waiting for the GPU; peak GiB = max_memory_allocated "
            "over one build, inputs included.",
            "- Tile labels against eager: FULL tiles whose label differs, tiles skipped that eager computes (a wrong "
            "result) and tiles left partial that eager skips (only slower); all must be 0 but the last."]


def build_figures(section: Section) -> list[Figure]:
    """mask_build.png: build time against L, one line per builder, a panel per window."""
    panels = []
    for window in section.settings.windows:
        cells = [c for c in section.cells if c["window"] == window]
        lines = {b: [(c["L"], c["ms"]) for c in cells if c["builder"] == b and ok(c)] for b in section.settings.builders}
        failed = {b: [(c["L"], short_status(c)) for c in cells
                      if c["builder"] == b and (c["status"] == "OOM" or c["status"].startswith("FAIL"))]
                  for b in section.settings.builders}
        panels.append(Panel(f"window {window or 'none'}", "build ms (median, log)" if not panels else "",
                            "sequence length L", lines=lines, failed=failed, log_x=2, log_y=True))
    return [Figure("mask_build.png", panels, "two-stream BlockMask build", (5.5 * len(panels), 4.5))]
