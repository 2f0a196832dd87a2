"""Attention benchmarks: one layer's attention, forward + backward, per backend and sequence length.

Two sections, one code path (`AttentionSettings.streams`, problems.py):

- `attention` (streams "two"): the two-stream call PAIR of one pretraining layer. For each length L,
  B = tokens_per_batch // L sequences, n = L tokens, m = round(0.15 L) predicted; the content stream
  has n + m query rows, the query stream m rows, both attend to the n + m content keys and values.
  Positions are a random permutation per sequence, as the collator draws them.
- `single` (streams "one"): single-stream attention over n = L rows in natural order (m = 0), the
  encoder path of fine-tuning and inference.

The relative-position bias comes from a learnable (buckets x heads) table that requires grad and
receives its gradient in every timed run (checked after warm-up). The cells (`ATTENTION_CELLS`), called
through the real modules with precomputed inputs (q/k/v/o Linear layers replaced by identities unless
`with_projections`):

- `sdpa`: torch SDPA, flash kernel, all rows in one call, no bias, no mask: the ceiling.
- `sdpa-bias`: what a user without FlexAttention would run: SDPA's memory-efficient kernel with the
  (B, H, rows, keys) bias + mask materialised in the compute dtype (the mask as -inf). A model builds
  it once per forward and shares it across its layers, so the cell reports
  per-layer time + (build + gradient reduction into the table) / layers.
- `dense`: `RelativeMultiHeadAttention` with its state (mask and fp32 bias) built inside the timed
  region, as the original implementation did per forward: the cost of the first layer.
- `dense-once`: the same module, the state built before timing: the bias is a leaf taking its
  gradient, the cost of each further layer.
- `flex`, `flex-window` (one cell per window W, |pos_q - pos_k| <= W on original positions):
  `FlexTwoStreamAttention` with the project's mask_mods and score_mods; the BlockMasks are built
  outside the timed region and their build timed apart; with `flex_variants` once per entry
  (flex_variants.py: parts left out, bias-table copies, kernel options).
- `triton`, `triton-window`: the Triton kernels, their plan built outside the timed region; with
  `triton_tiles` once per tile setting (triton_tiles.py).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..modeling.attention import (
    DenseAttentionState,
    FlexTwoStreamAttention,
    RelativeMultiHeadAttention,
    make_dense_attention_state,
    make_flex_attention_state,
)
from ..modeling.backends import ATTENTION_BACKENDS
from ..modeling.block_masks import make_two_stream_block_masks, tile_counts
from ..modeling.masks import natural_order, relative_bias_by_distance
from ..modeling.patterns import window_spec
from ..training.toolkit import autocast
from .flex_variants import FlexVariant, parse_flex_variants
from .harness import (
    DTYPES,
    check_gradient,
    compiled_graphs,
    flex_kernel_options,
    kernel_ms_per_call,
    on_cuda,
    phase,
    time_runs,
    timed_build,
    timer_text,
    warm_median,
)
from .problems import (
    ATTENTION_CELLS,
    STREAMS,
    WINDOWED,
    AttentionProblem,
    AttentionSettings,
    SDPAAttention,
    attention_module,
    make_attention_problem,
)
from .report import CELL_HEADERS, Figure, Panel, Section, Table, cell_columns, ok, ratio_text, short_status
from .triton_tiles import TileVariant, parse_tile_variants

LABELS = {"sdpa": "SDPA flash (no bias)", "sdpa-bias": "SDPA mem-eff + bias", "dense": "dense",
          "dense-once": "dense (state once)", "flex": "flex", "triton": "triton"}
# The cheap and the compiled cells first; the dense ones are the likeliest to run out of memory.
RUN_ORDER = {"sdpa": 0, "sdpa-bias": 1, "dense-once": 3, "dense": 4}
# --cuda-graphs: the cells also timed as a CUDA-graph replay (the SDPA ceiling and the fast backends,
# with and without a window).
GRAPHED_CELLS = ("sdpa", "flex", "triton")
PROFILED_CELLS = ("sdpa", "triton")  # --profile: SDPA flash's kernels beside the triton backend's


def backend_of(key: str) -> str:
    """The cell a key belongs to without its window and variant: "triton-w256/dq=64x64" -> "triton"."""
    return key.split("/")[0].split("-w")[0]


def graphed(key: str) -> bool:
    """Whether --cuda-graphs times this cell (key as in attention_variants: "triton", "triton-w256", ...)."""
    return backend_of(key) in GRAPHED_CELLS


@dataclass(frozen=True)
class Variant:
    """One cell of a length: its key (unique in the section), label, window, and triton tiles or flex variant."""

    key: str
    label: str
    window: int | None = None
    tiles: TileVariant | None = None
    flex: FlexVariant | None = None


def attention_variants(settings: AttentionSettings) -> list[Variant]:
    """The cells of one length in report order: a windowed cell per --windows entry, a triton cell per
    --triton-tiles entry, a flex cell per --flex-variants entry."""
    tile_variants = parse_tile_variants(settings.triton_tiles) or [None]
    flex_variants = parse_flex_variants(settings.flex_variants) or [None]
    out = []
    for cell in ATTENTION_CELLS:
        if cell not in settings.backends:
            continue
        backend = WINDOWED.get(cell, cell)
        windows = settings.windows if cell in WINDOWED else [None]
        for window in windows:
            key = backend + ("" if window is None else f"-w{window}")
            label = LABELS[backend] + ("" if window is None else f" w={window}")
            for tiles in tile_variants if backend == "triton" else [None]:
                for flex in flex_variants if backend == "flex" else [None]:
                    changed = tiles or flex
                    out.append(Variant(key, label, window) if changed is None
                               else Variant(f"{key}/{changed.name}", f"{label} {changed.name}", window, tiles, flex))
    return out


def attention_flops(batch, heads, head_dim, rows, kv_len, backward: bool) -> float:
    """4 * B * H * Lq * Lk * D forward (QK^T and PV, 2 FLOPs per multiply-add); x3.5 for forward +
    backward (backward = 2.5 x forward, the FlashAttention convention)."""
    return 4.0 * batch * heads * rows * kv_len * head_dim * (3.5 if backward else 1.0)


def projection_flops(batch, hidden, rows, kv_len, backward: bool) -> float:
    """q, o on every row, k, v on the content rows; x3 for forward + backward."""
    return 2.0 * batch * hidden * hidden * (2 * rows + 2 * kv_len) * (3.0 if backward else 1.0)


# ------------------------------------------------------------------------------------------- cells


@dataclass
class Core:
    """One cell's computation: `forward()` returns the attention output; `leaves` get their gradient
    cleared before each run; `after_backward` finishes the chain rule where the cell's bias leaf is
    not the table; `check` runs after warm-up; `facts` were measured while building; `extra()` times
    what the cell adds to the layer (sdpa-bias: the build and its gradient reduction)."""

    forward: Callable[[], torch.Tensor]
    leaves: list
    facts: dict = field(default_factory=dict)
    after_backward: Callable | None = None
    check: Callable | None = None
    extra: Callable[[], dict] | None = None


def sdpa_kernels(device, dtype):
    from torch.nn.attention import SDPBackend

    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return [SDPBackend.FLASH_ATTENTION]
    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def build_sdpa(settings, p: AttentionProblem, device, timer) -> Core:
    module = attention_module(SDPAAttention, settings, device)
    kernels = sdpa_kernels(device, DTYPES[settings.dtype])
    return Core(lambda: module(p.hidden, p.kv_len, kernels), [p.hidden, *module.parameters()])


def distance_bias_of(settings, table):
    return relative_bias_by_distance(table, settings.max_distance, settings.num_buckets)


def build_dense(settings, p: AttentionProblem, device, timer) -> Core:
    module = attention_module(RelativeMultiHeadAttention, settings, device)

    def forward():  # what the original did per forward: bias from the table, mask and bias materialised
        state = make_dense_attention_state(p.positions, p.n, p.m, distance_bias_of(settings, p.table), settings.max_distance)
        return module(p.hidden, state)

    return Core(forward, [p.hidden, p.table, *module.parameters()], check=lambda: check_gradient(p.table))


def build_dense_once(settings, p: AttentionProblem, device, timer) -> Core:
    module = attention_module(RelativeMultiHeadAttention, settings, device)
    with torch.no_grad():
        built = make_dense_attention_state(p.positions, p.n, p.m, distance_bias_of(settings, p.table),
                                           settings.max_distance)
    # The model shares one state across its layers: per further layer it pays the attention and the
    # accumulation of the (B, H, rows, keys) bias gradient, not the build or the reduction into the
    # table. So the bias is a leaf whose .grad is never cleared: every run adds into it, as each layer does.
    state = DenseAttentionState(built.allowed, built.bias.detach().requires_grad_(settings.backward), built.kv_len)
    return Core(lambda: module(p.hidden, state), [p.hidden, *module.parameters()],
                check=lambda: check_gradient(state.bias, "the materialised bias"))


def materialised_bias(settings, p: AttentionProblem) -> torch.Tensor:
    """The (B, H, rows, keys) attn_mask a user of SDPA builds once per forward: the dense backend's rules
    and bias from the table, the mask folded in as -inf, in the compute dtype; differentiable."""
    state = make_dense_attention_state(p.positions, p.n, p.m, distance_bias_of(settings, p.table), settings.max_distance)
    return state.bias.masked_fill(~state.allowed, float("-inf")).to(DTYPES[settings.dtype])


def sdpa_bias_kernels(device):
    """SDPA's memory-efficient kernel (CPU has none: PyTorch picks among flash and math there)."""
    from torch.nn.attention import SDPBackend

    return [SDPBackend.EFFICIENT_ATTENTION] if device.type == "cuda" else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def build_sdpa_bias(settings, p: AttentionProblem, device, timer) -> Core:
    """SDPA with the bias + mask materialised once per forward; the layer is timed on a prebuilt bias
    leaf, the build and its gradient reduction apart (`time_bias_build`)."""
    module = attention_module(SDPAAttention, settings, device)
    kernels = sdpa_bias_kernels(device)
    with torch.no_grad():
        bias = materialised_bias(settings, p)
    bias.requires_grad_(settings.backward)  # .grad never cleared: it accumulates as over the layers
    core = Core(lambda: module(p.hidden, p.kv_len, kernels, attn_mask=bias), [p.hidden, *module.parameters()],
                check=lambda: check_gradient(bias, "the materialised bias"))
    core.extra = functools.partial(time_bias_build, settings, p, bias.shape, device, timer)
    return core


def time_bias_build(settings, p: AttentionProblem, shape, device, timer) -> dict:
    """The once-per-forward part of sdpa-bias: build from the table and, with backward, reduce an
    upstream (B, H, rows, keys) gradient into the table."""
    upstream = torch.randn(shape, device=device, dtype=DTYPES[settings.dtype]) if settings.backward else None

    def run():
        p.table.grad = None
        with phase("bias build"), torch.set_grad_enabled(settings.backward):
            built = materialised_bias(settings, p)
        if upstream is not None:
            with phase("bias gradient reduction"):
                built.backward(upstream)

    check = (lambda: check_gradient(p.table)) if settings.backward else None
    result = time_runs(timer, run, settings.warmup - 1, settings.repeats, settings.max_seconds, check=check)
    return {"build_ms": result["ms"], "build_first_s": result["first_call_s"], "build_peak_gib": result["peak_gib"]}


def build_flex(settings, p: AttentionProblem, device, timer, window=None, variant: FlexVariant | None = None) -> Core:
    """The flex backend's module and state; with a --flex-variants entry its module call is made here, with the
    entry's bias-table copies, kernel options and parts left out."""
    module = attention_module(FlexTwoStreamAttention, settings, device)
    left_out = variant.leave_out if variant is not None else frozenset()
    with torch.no_grad():
        distance_bias = distance_bias_of(settings, p.table)
    # a leaf: its gradient is carried on to the table below
    distance_bias.requires_grad_(settings.backward and "no-bias-gradient" not in left_out)
    facts = {}
    graphs = compiled_graphs()
    layout, positions = rows_for(p, window)
    copies = variant.copies if variant is not None else None
    with phase("BlockMask build"):
        state, facts["mask_first_s"] = timed_build(timer, lambda: make_flex_attention_state(
            positions, p.n, p.m, distance_bias, settings.max_distance, window_spec(window), layout=layout,
            bias_copies=copies))
    facts.update(tile_facts(state))
    facts["mask_ms"] = warm_median(timer, lambda: make_two_stream_block_masks(positions, p.n, p.m, window_spec(window),
                                                                             layout=layout), settings)
    facts["mask_graphs"] = compiled_graphs() - graphs

    def after_backward():  # the rest of the chain rule, as autograd runs it in the model: bias -> table
        if distance_bias.grad is not None:
            distance_bias_of(settings, p.table).backward(distance_bias.grad)
            distance_bias.grad = None

    forward = (lambda: module(p.hidden, state)) if variant is None else flex_variant_forward(module, p, state, variant,
                                                                                             DTYPES[settings.dtype])
    check = None if left_out & {"no-bias", "no-bias-gradient"} else (lambda: check_gradient(p.table))
    return Core(forward, [p.hidden, p.table, *module.parameters()], facts, after_backward, check=check)


def flex_variant_forward(module, p: AttentionProblem, state, variant: FlexVariant, dtype):
    """FlexTwoStreamAttention.forward with the entry's changes: each stream's flex call without its BlockMask
    (no-mask) or score_mod (no-bias), under the entry's kernel options."""
    from ..modeling import attention as modeling_attention

    no_mask, no_bias = "no-mask" in variant.leave_out, "no-bias" in variant.leave_out
    streams = [(slice(None, state.kv_len), state.content_mask, state.content_score_mod)]
    if state.query_mask is not None:
        streams.append((slice(state.kv_len, None), state.query_mask, state.query_score_mod))

    def forward():
        with flex_kernel_options(variant.kernel_options(dtype)):
            q, k, v = module.project(p.hidden, state.kv_len)
            outputs = [modeling_attention.run_flex_attention(q[:, :, rows], k, v, None if no_bias else score_mod,
                                                             None if no_mask else mask)
                       for rows, mask, score_mod in streams]
            return module.merge(torch.cat(outputs, dim=2))
    return forward


def rows_for(p: AttentionProblem, window):
    """(layout, positions) as the model runs them: with a window the two-stream rows in natural order
    (masks.natural_order), which makes the window block-sparse; else as collated."""
    layout = natural_order(p.positions, p.n, p.m) if window is not None and p.m else None
    return layout, (p.positions if layout is None else p.positions.gather(1, layout))


def build_triton(settings, p: AttentionProblem, device, timer, window=None, tiles: TileVariant | None = None) -> Core:
    """The Triton backend through the backend registry: its plan (per-row codes and visiting order, built
    once per forward like the BlockMasks) outside the timed region, the table's gradient from its kernels.
    With `tiles` the module's kernel call is made here, with those tiles."""
    module_class, make_state = ATTENTION_BACKENDS["triton"].load()
    from ..modeling.triton_launch import triton_two_stream_attention  # the triton package is there: it loaded

    module = attention_module(module_class, settings, device)
    layout, positions = rows_for(p, window)

    def build():
        return make_state(positions, p.n, p.m, p.table, settings.max_distance, window_spec(window), layout=layout)

    facts = {}
    with phase("plan build"):
        state, facts["mask_first_s"] = timed_build(timer, build)
    facts["mask_ms"] = warm_median(timer, build, settings)
    kernel_tiles = None if tiles is None else tiles.kernel_tiles(DTYPES[settings.dtype], single_stream=not p.m)

    def forward():
        if kernel_tiles is None:
            return module(p.hidden, state)
        q, k, v = module.project(p.hidden, state.kv_len)  # TritonTwoStreamAttention.forward with other tiles
        return module.merge(triton_two_stream_attention(
            q, k, v, state.relative_bias_table, state.plan, max_distance=state.max_distance,
            bias_by_index=state.bias_by_index, buckets=state.buckets, tiles=kernel_tiles))
    return Core(forward, [p.hidden, p.table, *module.parameters()], facts, check=lambda: check_gradient(p.table))


def tile_facts(state) -> dict:
    """128 x 128 tiles the BlockMasks let the kernel compute, out of all tiles, per stream and together."""
    facts = {"tiles_content": list(tile_counts(state.content_mask))}
    computed, total = facts["tiles_content"]
    if state.query_mask is not None:
        facts["tiles_query"] = list(tile_counts(state.query_mask))
        computed, total = computed + facts["tiles_query"][0], total + facts["tiles_query"][1]
    facts["tiles"], facts["density"] = [computed, total], computed / total
    return facts


BUILDERS = {"sdpa": build_sdpa, "sdpa-bias": build_sdpa_bias, "dense": build_dense, "dense-once": build_dense_once,
            "flex": build_flex}


def make_run(core: Core, p: AttentionProblem, settings: AttentionSettings, device):
    """One timed run: forward (no_grad without backward), backward into every leaf."""
    amp = functools.partial(autocast, device, settings.dtype == "bf16")
    if not settings.backward:
        def forward_only():
            with phase("forward"), torch.no_grad(), amp():
                core.forward()
        return forward_only

    def run():
        for leaf in core.leaves:
            leaf.grad = None
        with phase("forward"), amp():
            out = core.forward()
        with phase("backward"):
            out.backward(p.grad_out)
            if core.after_backward is not None:
                core.after_backward()
    return run


def measure_attention(settings: AttentionSettings, p: AttentionProblem, variant: Variant, device, timer) -> dict:
    """Build the cell (its state built and timed here, outside the timed region), warm it up (the first
    run compiles), time it; the FLOP rates. Raises on OOM / failure, labelled with the phase."""
    backend = backend_of(variant.key)
    if backend == "flex":
        builder = functools.partial(build_flex, window=variant.window, variant=variant.flex)
    elif backend == "triton":
        builder = functools.partial(build_triton, window=variant.window, tiles=variant.tiles)
    else:
        builder = BUILDERS[backend]
    with phase("build"):
        core = builder(settings, p, device, timer)
    result = dict(core.facts)
    run = make_run(core, p, settings, device)
    result.update(time_runs(timer, run, settings.warmup - 1, settings.repeats, settings.max_seconds,
                            check=core.check if settings.backward else None))
    if settings.cuda_graphs and device.type == "cuda" and graphed(variant.key):
        result.update(graph_timing(lambda: make_run(builder(settings, p, device, timer), p, settings, device), settings,
                                   timer))
    if settings.profile and device.type == "cuda" and backend in PROFILED_CELLS:
        kernels = kernel_ms_per_call(run)
        result["kernels"] = sorted(([name[:80], ms] for name, ms in kernels.items()), key=lambda item: -item[1])[:6]
        result["kernel_ms"] = sum(kernels.values())
    if core.extra is not None:
        layer = {k: result[k] for k in ("ms", "p20_ms", "p80_ms")}
        result.update(core.extra())
        shared = result["build_ms"] / settings.layers  # per-layer time + (build + reduction) / layers
        result.update({"layer_ms": layer["ms"], **{k: v + shared for k, v in layer.items()}})
        if result["build_peak_gib"] is not None:
            result["peak_gib"] = max(result["peak_gib"], result["build_peak_gib"])
    return result


def graph_timing(build_run, settings: AttentionSettings, timer) -> dict:
    """The same run captured once as a CUDA graph and timed as replays: the GPU time of its kernels with no
    host work between them (what training gets with CUDA graphs, `--compile-mode reduce-overhead`). A
    capture that fails is reported in the cell, which keeps its eager time.

    The run is built afresh on the capturing stream, warmed up and captured there. Autograd runs a node's
    backward on the stream its forward ran on: a cell built on the default stream (the flex one makes its
    replicated bias table at build time, outside the run) sent that node's backward to the legacy stream in
    the middle of the capture, which CUDA refuses (cudaErrorStreamCaptureImplicit, "operation failed due to
    a previous error during capture": the flex cells' failure in every earlier report)."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run = build_run()
            for _ in range(2):
                run()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            run()
        torch.cuda.current_stream().wait_stream(stream)
        result = time_runs(timer, graph.replay, settings.warmup - 1, settings.repeats, settings.max_seconds)
        del graph
        return {"graph_ms": result["ms"], "graph_p20_ms": result["p20_ms"], "graph_p80_ms": result["p80_ms"]}
    except Exception as error:  # noqa: BLE001 - the eager figure stands; the reason goes in the report
        return {"graph_status": f"capture failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}"}


def cell_plan(settings: AttentionSettings, p: AttentionProblem, variant: Variant) -> dict:
    flops = attention_flops(p.batch, settings.heads, settings.head_dim, p.rows, p.kv_len, settings.backward)
    if settings.with_projections:
        flops += projection_flops(p.batch, settings.heads * settings.head_dim, p.rows, p.kv_len, settings.backward)
    cell = {"key": f"L={p.length}/{variant.key}", "name": f"L={p.length:>5} B={p.batch:>3} {variant.label:<22}",
            "L": p.length, "B": p.batch, "n": p.n, "m": p.m, "q_rows": p.rows, "kv_len": p.kv_len,
            "backend": variant.key, "label": variant.label, "window": variant.window, "flops": flops}
    triton = ATTENTION_BACKENDS["triton"]
    if variant.window is not None and variant.window >= p.n - 1:
        cell["status"] = "n/a: window covers L"
    elif backend_of(variant.key) == "triton" and not triton.runs_on(settings.device):
        cell["status"] = f"n/a: the triton backend cannot run on {settings.device.upper()}: {triton.device_limits}"
    return cell


def measure_with_rates(settings, p: AttentionProblem, variant: Variant, cell: dict, device, timer) -> dict:
    result = measure_attention(settings, p, variant, device, timer)
    seconds = result["ms"] / 1e3
    result["tflops"] = cell["flops"] / seconds / 1e12
    if "density" in result:  # the attention FLOPs scaled by the share of tiles computed
        attn = attention_flops(p.batch, settings.heads, settings.head_dim, p.rows, p.kv_len, settings.backward)
        result["eff_tflops"] = (cell["flops"] - attn + attn * result["density"]) / seconds / 1e12
    return result


# -------------------------------------------------------------------------------------------- sweep


def run_attention(session, settings: AttentionSettings, deadline=None) -> Section:
    """Every cell of the sweep into its section of the session's report; the report is rewritten after
    every cell and its plots after every length."""
    settings.validate(session.device)
    section = attention_section(settings)
    return session.sweep_lengths(section, settings, lambda length: measure_length(session, section, settings, length,
                                                                                  deadline))


def measure_length(session, section: Section, settings: AttentionSettings, length: int, deadline=None):
    p = make_attention_problem(settings, length, session.device)
    variants = attention_variants(settings)
    first = len(section.cells)
    for variant in sorted(variants, key=lambda v: RUN_ORDER.get(v.key, 2)):
        cell = cell_plan(settings, p, variant)
        session.measure(section, cell, functools.partial(measure_with_rates, settings, p, variant, cell,
                                                         session.device, session.timer), deadline)
    order = {v.key: i for i, v in enumerate(variants)}
    section.cells[first:] = sorted(section.cells[first:], key=lambda c: order[c["backend"]])


# ------------------------------------------------------------------------------------------ reports


def graph_text(cell: dict) -> str:
    if "graph_ms" in cell:
        return f"{cell['graph_ms']:.3f} [{cell['graph_p20_ms']:.3f}, {cell['graph_p80_ms']:.3f}]"
    return cell.get("graph_status", "")


def main_table(section: Section) -> Table:
    graphs = section.settings.cuda_graphs
    rows = [[c["L"], c["B"], c["m"], f"{c['q_rows']}x{c['kv_len']}", c["label"]] + cell_columns(c)
            + ([graph_text(c)] if graphs else [])
            + [f"{c['layer_ms']:.3f} + {c['build_ms']:.2f} / {section.settings.layers}" if "layer_ms" in c else ""]
            for c in section.cells]
    headers = (["L", "B", "m", "rows x keys", "backend"] + CELL_HEADERS + (["CUDA graph ms [p20, p80]"] if graphs else [])
               + ["sdpa-bias: layer ms + build ms / layers"])
    return Table(headers, rows, "Time, throughput, memory")


def ratio_tables(section: Section) -> list[Table]:
    """Relative throughput (dense = 1.00x) and time relative to SDPA flash, one row per length."""
    variants = [v for v in attention_variants(section.settings) if v.key != "sdpa"]
    by_length = {}
    for c in section.cells:
        by_length.setdefault(c["L"], {})[c["backend"]] = c
    relative, vs_sdpa, graph_rows = [], [], []
    graphed_variants = [v for v in variants if graphed(v.key)]
    for length, row in by_length.items():
        ms = {k: c["ms"] for k, c in row.items() if ok(c)}
        ref = "dense" if "dense" in ms else next((v.key for v in variants if v.key in ms), None)
        mark = "" if ref == "dense" else "*"
        relative.append([length] + [(f"{ms[ref] / ms[v.key]:.2f}x{mark}" if v.key in ms else short_status(row[v.key]))
                                    if v.key in row else "" for v in variants])
        if "sdpa" in ms:
            vs_sdpa.append([length] + [(ratio_text(ms[v.key] / ms["sdpa"]) if v.key in ms else short_status(row[v.key]))
                                       if v.key in row else "" for v in variants])
        graph = {k: c["graph_ms"] for k, c in row.items() if "graph_ms" in c}
        if "sdpa" in graph:
            graph_rows.append([length] + [ratio_text(graph[v.key] / graph["sdpa"]) if v.key in graph else ""
                                          for v in graphed_variants])
    headers = ["L"] + [v.label for v in variants]
    tables = [Table(headers, relative, "Relative throughput (dense = 1.00x, higher is faster; as in the "
                    "FlexAttention-for-MPNet README's table)",
                    ["`*`: dense did not run at this length; the row is relative to the first backend that did."])]
    if vs_sdpa:
        tables.append(Table(headers, vs_sdpa, "Time relative to SDPA flash without bias (lower is better)"))
    if graph_rows:
        tables.append(Table(["L"] + [v.label for v in graphed_variants], graph_rows, "Time relative to SDPA flash, "
                            "both as CUDA-graph replays (GPU time, no host launch time; lower is better)"))
    return tables


def kernel_tables(section: Section) -> list[Table]:
    """--profile's GPU kernels per run of the SDPA flash and triton cells, the evidence of where the triton
    backend's time goes against flash's (in the report file only)."""
    rows = [[c["L"], c["label"], f"{c['kernel_ms']:.3f}", f"{c['ms']:.3f}",
             "; ".join(f"`{name}` {ms:.3f}" for name, ms in c["kernels"])] for c in section.cells if "kernels" in c]
    if not rows:
        return []
    return [Table(["L", "backend", "GPU kernels ms", "timed ms", "kernels"], rows, "Where the time goes (--profile: "
                  "torch.profiler, GPU ms per run, mean of 3 runs; the six largest kernels)", printed=False)]


def method_lines(settings: AttentionSettings) -> list:
    cuda = on_cuda(settings)
    grad = (" and receives its gradient in every timed run (checked after warm-up)" if settings.backward
            else " (forward only here: no gradients are computed)")
    if settings.streams == "two":
        what = ("One two-stream attention call PAIR per cell, as in one pretraining layer: B = tokens_per_batch // L "
                "sequences, n = L, m = round(0.15 L); the content stream has n + m query rows, the query stream m "
                "rows, both attend to the n + m content keys/values; positions a random permutation per sequence.")
    else:
        what = ("Single-stream attention per cell (the encoder of fine-tuning and inference): B = tokens_per_batch // L "
                "rows of n = L tokens in natural order, m = 0, no padding.")
    projections = ("The q/k/v/o projections ARE included (fp32 weights under autocast)." if settings.with_projections
                   else "The q/k/v/o projections are NOT timed (identities): a cell times the head split, the "
                        "attention and the head merge.")
    return [f"- {what} The relative-position bias comes from a learnable ({settings.num_buckets} x heads) table "
            f"that requires grad{grad}. {projections}",
            "- SDPA flash: every row in one `scaled_dot_product_attention` call, no bias, no mask: the ceiling.",
            "- SDPA mem-eff + bias: the user's alternative: SDPA's EFFICIENT_ATTENTION kernel"
            + ("" if cuda else " (CPU: none there, PyTorch picks flash or math)")
            + f" with the (B, heads, rows, keys) bias + mask materialised in {settings.dtype} (mask as -inf) "
            "from the dense backend's own rules. A model builds it once per forward and shares it across its "
            f"layers, so time = per-layer time + (build + gradient reduction into the table) / {settings.layers} "
            "layers (`--layers`); the per-layer runs accumulate into the shared bias gradient as the layers do.",
            "- dense: `RelativeMultiHeadAttention` with `make_dense_attention_state` (mask and fp32 bias) built "
            f"INSIDE the timed region, as the original did per forward, attention dropout {settings.attention_dropout}: "
            "the first layer. dense (state once): the state built before timing, the bias a leaf taking its "
            "gradient: each further layer.",
            "- flex: `FlexTwoStreamAttention` (the project's mask_mods and score_mods, compiled on CUDA), the "
            "BlockMasks built once outside the timed region, their build timed apart (warm median, and the first "
            "build); the bias gradient flows into the captured table copy and on to the table. flex w=W: the "
            "sliding window |pos_q - pos_k| <= W on original positions, rows in natural order as the model runs "
            "them (n/a where W >= L - 1). triton, triton w=W: the hand-written Triton kernels "
            "(the registry's `triton` backend), their plan built once outside the timed region (timed apart as "
            "the mask build), the table's gradient from the kernels. flex, triton and the SDPA cells apply no "
            "attention dropout.",
            f"- Time: median [p20, p80] of up to {settings.repeats} runs "
            f"({timer_text(settings)}) after {settings.warmup} warm-up "
            "runs; \"first call\" = the first run's wall time (compilation included). TFLOP/s: 4 x B x heads x rows x "
            "keys x head_dim" + (" forward, x3.5 with the backward" if settings.backward else ", forward only")
            + ", the same for every backend; tiles = 128 x 128 tiles flex computes of all tiles on the padded "
            "grid (both streams), eff. TFLOP/s = FLOPs x that share / time. peak GiB = max_memory_allocated over "
            "one run. Dynamo: recompile limits 64, a hit is a FAIL, torch._dynamo.reset() between lengths."] + (
               ["- CUDA graph ms (--cuda-graphs): the SDPA, flex and triton cells' run (forward + backward, leaves' "
                "gradients reset) captured once as a CUDA graph after two warm-up runs on a side stream, then timed "
                "as replays like the eager runs: the GPU time of the kernels with no host launch time between them "
                "(what training gets with CUDA graphs); a failed capture is reported in the cell."]
               if settings.cuda_graphs else []) + (
               [f"- Triton tiles (--triton-tiles {','.join(settings.triton_tiles)}): each triton cell once per "
                "entry, the kernels' default tiles with the entry's changes (block_m x block_n, w warps, s stages); "
                "no-bias, no-bias-gradient and no-mask leave that part out of the kernels: their times price it, "
                "their results are wrong by construction."] if settings.triton_tiles else []) + (
               [f"- Flex variants (--flex-variants {','.join(settings.flex_variants)}): each flex cell once per "
                "entry, the backend with the entry's changes: copies=QxK (the bias table read as copy (q % Q) x K + "
                "k % K, the copies' gradients summed back into the table; the backend's own 128x1), kernel options "
                "over the backend's; no-bias-gradient (the table without a gradient), no-bias (no score_mod) and "
                "no-mask (no BlockMask) leave that part out: their times price it, their results are wrong by "
                "construction."] if settings.flex_variants else [])


def attention_figures(section: Section) -> list[Figure]:
    """KEY_time.png and KEY_memory.png: log-log against L, one line per backend, x where one failed."""
    settings, cells = section.settings, section.cells
    stream = "two-stream attention pair" if settings.streams == "two" else "single-stream attention"
    title = (f"{stream}, {'fwd+bwd' if settings.backward else 'forward only'}, {settings.dtype}, "
             f"{settings.tokens_per_batch} tokens/batch, {settings.heads}x{settings.head_dim}")
    figures = []
    for metric, value, ylabel in (("time", "ms", "time per call (ms, median)"), ("memory", "peak_gib", "peak memory (GiB)")):
        lines, failed = {}, {}
        for variant in attention_variants(settings):
            mine = [c for c in cells if c["backend"] == variant.key]
            lines[variant.label] = [(c["L"], c[value]) for c in mine if ok(c) and c.get(value) is not None]
            failed[variant.label] = [(c["L"], short_status(c)) for c in mine
                                     if c["status"] == "OOM" or c["status"].startswith("FAIL")]
        panel = Panel(title, ylabel, "sequence length L (tokens per batch fixed)", lines=lines, failed=failed,
                      log_x=2, log_y=True, empty="no data (CPU: no memory figures)" if metric == "memory" else "no data")
        figures.append(Figure(f"{section.key}_{metric}.png", [panel]))
    return figures


def attention_section(settings: AttentionSettings) -> Section:
    mode = "forward + backward" if settings.backward else "FORWARD ONLY (CPU: FlexAttention has no backward there)"
    what = "one two-stream call pair" if settings.streams == "two" else "single stream (fine-tuning, inference)"
    return Section(STREAMS[settings.streams], f"Attention: {what}, {mode}, {settings.dtype}", settings,
                   lambda s: method_lines(s.settings), lambda s: [main_table(s), *ratio_tables(s), *kernel_tables(s)],
                   attention_figures)
